"""onnx shape inference that also types the outputs of GroupNormalization nodes (no torch needed).

onnx's shape inference (1.17) gives GroupNormalization's output no type, so every value after it
lacks a shape; the spec says the output is like the input, and that is declared here.
"""

from __future__ import annotations

from itertools import chain
from typing import Callable

import onnx


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference, with GroupNormalization outputs typed (onnx 1.17 leaves them untyped)."""
    return complete_group_norm_shapes(onnx.shape_inference.infer_shapes(model), onnx.shape_inference.infer_shapes)


def complete_group_norm_shapes(model: onnx.ModelProto, infer: Callable) -> onnx.ModelProto:
    """Declare untyped GroupNormalization outputs like their inputs and run ``infer`` again.

    Repeated while it types more (a GroupNormalization after another one has a typed input only
    after the first round); nodes whose input is untyped too are left as they are.
    """
    nodes = [n for n in model.graph.node
             if n.op_type == "GroupNormalization" and n.domain in ("", "ai.onnx") and n.output and n.output[0]]
    for _ in range(len(nodes)):
        graph = model.graph
        typed = {v.name: v for v in chain(graph.input, graph.value_info, graph.output)
                 if v.type.HasField("tensor_type")}
        added = False
        for node in nodes:
            if node.output[0] in typed or node.input[0] not in typed:
                continue
            info = graph.value_info.add()
            info.CopyFrom(typed[node.input[0]])
            info.name = node.output[0]
            added = True
        if not added:
            break
        model = infer(model)
    return model
