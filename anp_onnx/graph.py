"""Read-only index over an ONNX graph, and a careful editor of initializer values.

The editor is how pruning reaches the ONNX file: it changes only initializer *values*, copies an
initializer before changing it when anything else reads it, and keeps the data type.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _subgraph_inputs(node: onnx.NodeProto) -> Iterable[str]:
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                yield from inner.input
                yield from _subgraph_inputs(inner)


class GraphIndex:
    """Initializers, producers and consumers of the main graph of ``model`` (not copied)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        self.uses: dict[str, int] = defaultdict(int)
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
                    self.uses[name] += 1
            for name in _subgraph_inputs(node):
                self.uses[name] += 1
        for out in graph.output:
            self.uses[out.name] += 1
        self.graph_inputs = {v.name for v in graph.input}

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def walk_back_from_outputs(self, stop_ops: tuple[str, ...]) -> tuple[set[int], set[int]]:
        """Walk back from the graph outputs through producers, stopping at ``stop_ops`` nodes.

        Returns the ids of the nodes passed (those between the outputs and the first stop node on
        every path) and the ids of the stop nodes reached. Initializers are not followed.
        """
        passed: set[int] = set()
        stops: set[int] = set()
        seen: set[str] = set()
        stack = [out.name for out in self.model.graph.output]
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            node = self.producer.get(value)
            if node is None:
                continue
            if node.op_type in stop_ops and node.domain in ("", "ai.onnx"):
                stops.add(id(node))
                continue
            passed.add(id(node))
            stack.extend(name for name in node.input if name and not self.is_initializer(name))
        return passed, stops

    def constant(self, name: str) -> np.ndarray | None:
        """Value of ``name`` when it is an initializer or a Constant node's tensor, else None."""
        if name in self.initializers:
            return self.array(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None


#: Ops with learnt weights: the ops of the conv kind (anp_onnx.neurons.conv), whose output channels are
#: the fallback neurons; a classifier ends in one; after one a tensor's channels are learnt features
#: (not the input's colour channels), and before the last one the classes are not yet formed.
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def node_label(node: onnx.NodeProto) -> str:
    """A readable, stable name for a node: its name, or op type and first output when unnamed."""
    return node.name or f"{node.op_type}({node.output[0]})"


class InitializerEditor:
    """Writes new values into initializers of ``model`` (which it modifies in place).

    ``write(node, i, values)`` sets the initializer feeding input ``i`` of ``node``. An initializer
    read anywhere else (another node, a subgraph, a graph output or graph input) is first copied
    under a new name and the node re-pointed to the copy, so nothing but this node sees the change.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.index = GraphIndex(model)
        self._names = set(self.index.initializers) | set(self.index.producer)
        self.copies: dict[str, str] = {}
        self.changed: set[str] = set()

    def read(self, node: onnx.NodeProto, i: int) -> np.ndarray:
        return self.index.array(node.input[i])

    def write(self, node: onnx.NodeProto, i: int, values: np.ndarray) -> str:
        name = node.input[i]
        tensor = self.index.initializers[name]
        # from IR 4 on, an initializer that is also a graph input can be overridden by the caller; before
        # IR 4 every initializer had to be listed as an input, so that says nothing about sharing
        overridable = name in self.index.graph_inputs and self.model.ir_version >= 4
        shared = self.index.uses[name] > 1 or overridable
        if shared and name not in self.changed:
            new_name = self._unique(f"{name}_anp_{node.name or node.output[0]}")
            tensor = self.model.graph.initializer.add()  # add(), not append(): append stores a copy
            tensor.CopyFrom(self.index.initializers[name])
            tensor.name = new_name
            self.index.initializers[new_name] = tensor
            self.index.uses[name] -= 1
            self.index.uses[new_name] = 1
            node.input[i] = new_name
            if self.model.ir_version < 4:  # IR 3: every initializer must also be a graph input
                declared = next((v for v in self.model.graph.input if v.name == name), None)
                if declared is not None:
                    extra = self.model.graph.input.add()
                    extra.CopyFrom(declared)
                    extra.name = new_name
            self.copies[name] = new_name
            name = new_name
        old = numpy_helper.to_array(tensor)
        if values.shape != old.shape:
            raise ValueError(f"initializer {name}: shape {values.shape} != {old.shape}")
        new = numpy_helper.from_array(values.astype(old.dtype, copy=False), name)
        tensor.ClearField("float_data")
        tensor.ClearField("double_data")
        tensor.ClearField("int32_data")
        tensor.raw_data = new.raw_data
        self.changed.add(name)
        return name

    def add_input(self, node: onnx.NodeProto, values: np.ndarray, suffix: str) -> str:
        """Give ``node`` one more input: a new initializer ``<node>_<suffix>`` holding ``values``.

        For an optional input the node lacks (a Conv's or Gemm's bias); returns the name chosen.
        """
        name = self._unique(f"{node.name or node.output[0]}_{suffix}")
        tensor = self.model.graph.initializer.add()
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values), name))
        self.index.initializers[name] = tensor
        self.index.uses[name] = 1
        if self.model.ir_version < 4:  # IR 3: every initializer must also be a graph input
            self.model.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(values.dtype), list(values.shape)))
        node.input.append(name)
        self.changed.add(name)
        return name

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name
