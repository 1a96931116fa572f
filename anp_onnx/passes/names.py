"""Node names that stay unique through onnx2torch's normalisation of them."""

from __future__ import annotations

import copy

import onnx


def unique_node_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """A copy whose node names stay unique after onnx2torch's normalisation.

    onnx2torch turns '/a/Constant_1' into 'a/Constant_1' and numbers duplicates as 'name_1', so two
    different nodes can end up with one module name and one of them is silently dropped. Modules are
    mapped back to ONNX through their output values, so the names themselves do not matter.
    """
    out = copy.deepcopy(model)
    for i, node in enumerate(out.graph.node):
        node.name = f"{node.name or node.op_type}__{i}"
    return out, True
