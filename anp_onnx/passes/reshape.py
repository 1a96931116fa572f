"""Reshape rewrites: inert ``allowzero`` dropped, and a fixed batch size made any batch size."""

from __future__ import annotations

import copy

import numpy as np
import onnx

from ..graph import GraphIndex
from ..model import make_session
from .chain import Pass


def _allowzero(node: onnx.NodeProto) -> bool:
    return any(a.name == "allowzero" and a.i for a in node.attribute)


def drop_inert_allowzero(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """A copy where ``Reshape(allowzero=1)`` loses the attribute unless its constant shape holds a 0.

    The torch dynamo exporter writes ``allowzero=1`` on every Reshape; onnx2torch refuses it. It only
    changes what a 0 in the target shape means (an empty dimension instead of "copy the input's"),
    so without a 0 the node computes the same either way. A computed shape (from the batch size) has
    no 0 for a non-empty batch; the parity check on real images would show it otherwise.
    """
    index = None
    out = model
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Reshape" or not _allowzero(node):
            continue
        if index is None:
            index = GraphIndex(model)
        shape = index.constant(node.input[1]) if len(node.input) > 1 else None
        if shape is not None and (np.asarray(shape) == 0).any():
            continue
        if out is model:
            out = copy.deepcopy(model)
        target = out.graph.node[i]
        for a in list(target.attribute):
            if a.name == "allowzero":
                target.attribute.remove(a)
    return out, out is not model


def generalize_batch(input_name: str, batch: int) -> Pass:
    """The pass that makes a model with fixed batch ``batch`` at ``input_name`` accept any batch size.

    Exporters without dynamic axes bake the batch size into Reshape targets (``x.view(x.size(0), -1)``
    becomes a Reshape to ``[1, N]``). onnxruntime tells the concrete target of every Reshape; a
    leading entry equal to the fixed batch becomes 0 ("copy the input's dimension"), and the input's
    batch dimension becomes symbolic. The parity check then confirms the result against the
    original file at its own batch size. For the torch conversion only.
    """

    def generalize_batch(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        return _any_batch(model, input_name, batch), True

    return generalize_batch


def _any_batch(model: onnx.ModelProto, input_name: str, batch: int) -> onnx.ModelProto:
    """A copy of ``model`` whose Reshape targets and input batch dimension follow the input's batch."""
    out = copy.deepcopy(model)
    reshapes = [n for n in out.graph.node if n.op_type == "Reshape" and not _allowzero(n)]
    graph_input = next(v for v in out.graph.input if v.name == input_name)
    if reshapes:
        probe = copy.deepcopy(out)
        known = {o.name for o in probe.graph.output}
        for name in {n.input[1] for n in reshapes} - known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
        dims = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
        elem = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
        session = make_session(probe)
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, {input_name: np.zeros(dims, dtype=elem)})))
        for i, node in enumerate(reshapes):
            target = np.asarray(values.get(node.input[1]))
            if target.ndim == 1 and target.size >= 2 and int(target[0]) == batch:
                fixed = target.copy()
                fixed[0] = 0
                name = f"{node.input[1]}_anp_any_batch_{i}"
                out.graph.initializer.append(onnx.numpy_helper.from_array(fixed.astype(np.int64), name))
                node.input[1] = name
    dim = graph_input.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "batch"
    return out
