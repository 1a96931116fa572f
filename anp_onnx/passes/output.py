"""The model's final Softmax/LogSoftmax: which one it is, and a copy without it."""

from __future__ import annotations

import copy
from typing import Optional

import onnx

_ACTIVATIONS = ("Softmax", "LogSoftmax")


def _final_node(model: onnx.ModelProto) -> Optional[onnx.NodeProto]:
    output = model.graph.output[0].name
    return next((n for n in model.graph.node if output in n.output), None)


def output_activation(model: onnx.ModelProto) -> Optional[str]:
    """"Softmax" or "LogSoftmax" when that op computes the model's first output, else None."""
    node = _final_node(model)
    return node.op_type if node is not None and node.op_type in _ACTIVATIONS else None


def strip_output_softmax(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """A copy of ``model`` whose first output is the input of its final Softmax/LogSoftmax, if any."""
    node = _final_node(model)
    if node is None or node.op_type not in _ACTIVATIONS:
        return model, False
    output = model.graph.output[0].name
    out = copy.deepcopy(model)
    for n in out.graph.node:
        if output in n.output:
            out.graph.node.remove(n)
            break
    out.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    return out, True
