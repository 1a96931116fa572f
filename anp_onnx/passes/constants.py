"""Precomputed constants: nodes that compute only from constants replaced by their values."""

from __future__ import annotations

import copy
import logging
from itertools import chain
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..model import default_opset

_LOGGER = logging.getLogger(__name__)

#: Ops never precomputed: their output is not a function of their inputs.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli"})
#: Largest constant (elements) precomputing may read or create: shape arithmetic, not weights.
_SIZE_LIMIT = 1 << 16
_NUMPY_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.INT16,
                TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32,
                TensorProto.UINT64, TensorProto.BOOL}


def precompute_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """A copy where nodes computing only from constants (shape arithmetic) are replaced by initializers.

    The torch dynamo exporter without its optimiser writes e.g. a ReduceMean whose axes come from
    Reshape(Constant, Constant); onnx2torch needs such axes, Reshape/Pad/Slice arguments and the like
    as constants. Nodes are evaluated one at a time with onnx's reference evaluator, in graph order,
    when every input is an initializer, a Constant node or an already computed value, and the result
    is small. A ``CastLike`` of a constant is precomputed too when the type of the value it is cast
    like is known (the unoptimised dynamo export casts every Python number in the model, Clip's
    bounds included, like the tensor it meets), and so is a Constant of a list of numbers. Only the
    conversion copy changes; the written model keeps its nodes.
    """
    from onnx.reference import ReferenceEvaluator

    opset = default_opset(model)
    initializers = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}  # constant values met so far (initializers read when needed)
    computed: dict[int, list[np.ndarray]] = {}
    types = _element_types(model)

    def value(name: str) -> Optional[np.ndarray]:
        if name in arrays:
            return arrays[name]
        if name in initializers:
            arrays[name] = numpy_helper.to_array(initializers[name])
            return arrays[name]
        return None

    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM_OPS or not node.output:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        inputs = [name for name in node.input if name]
        if node.op_type == "CastLike" and len(inputs) == 2 and inputs[1] in types:
            source = value(inputs[0]) if inputs[0] in arrays or inputs[0] in initializers else None
            if source is not None and source.size <= _SIZE_LIMIT:
                result = source.astype(types[inputs[1]])
                arrays[node.output[0]] = result
                computed[i] = [result]
                continue
        if any(name not in arrays and name not in initializers for name in inputs):
            continue
        if node.op_type != "Constant" and any(initializers[n].data_location == onnx.TensorProto.EXTERNAL
                                              for n in inputs if n in initializers and n not in arrays):
            continue
        try:
            feed = {name: value(name) for name in inputs}
            if any(v.size > _SIZE_LIMIT for v in feed.values()):
                continue
            results = [np.asarray(r) for r in ReferenceEvaluator(node, opsets={"": opset}).run(None, feed)]
        except Exception:  # noqa: BLE001 - a node the evaluator cannot run stays as it is
            continue
        if any(r.size > _SIZE_LIMIT for r in results):
            continue
        arrays.update((name, r) for name, r in zip(node.output, results) if name)
        if (node.op_type != "Constant" and inputs) or _listed_constant(node):
            computed[i] = results  # onnx2torch takes Constant nodes of a tensor as they are
    if not computed:
        return model, False
    out = copy.deepcopy(model)
    keep = [node for i, node in enumerate(out.graph.node) if i not in computed]
    for i in sorted(computed):
        for name, result in zip(model.graph.node[i].output, computed[i]):
            if name:
                out.graph.initializer.append(numpy_helper.from_array(result, name))
    del out.graph.node[:]
    out.graph.node.extend(keep)
    _LOGGER.debug("replaced %d constant-only nodes by their values in the conversion copy", len(computed))
    return out, True


def _listed_constant(node: onnx.NodeProto) -> bool:
    """A Constant of ``value_ints``/``value_floats``/... : onnx2torch gives converters a Python list for
    those where they expect a tensor (Unsqueeze's axes from ``torch.unbind`` in the dynamo export)."""
    return node.op_type == "Constant" and any(
        a.name in ("value_int", "value_ints", "value_float", "value_floats") for a in node.attribute)


def _element_types(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """Value name -> numpy dtype, where the graph declares a plain numpy type (not bfloat16, float8)."""
    out = {}
    for v in chain(model.graph.input, model.graph.value_info, model.graph.output):
        elem = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0
        if elem in _NUMPY_TYPES:
            out[v.name] = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    return out
