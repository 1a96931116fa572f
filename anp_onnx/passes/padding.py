"""Explicit padding: ``auto_pad`` SAME_*/VALID of Conv and pools written out as ``pads``."""

from __future__ import annotations

import copy

import onnx

from ..shapes import infer_shapes

_OPS = ("Conv", "MaxPool", "AveragePool")


def _uses_auto_pad(node: onnx.NodeProto) -> bool:
    return any(a.name == "auto_pad" and a.s not in (b"NOTSET", b"") for a in node.attribute)


def explicit_auto_pad(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """A copy where Conv/MaxPool/AveragePool ``auto_pad`` SAME_*/VALID become explicit ``pads``.

    onnx2torch does not convert ``auto_pad`` (older exporters such as CNTK write it). The padding is
    computed from the input's spatial size as the ONNX spec defines it, so it needs shapes known by
    shape inference; nodes whose input size is unknown are left as they are.
    """
    if not any(n.op_type in _OPS and _uses_auto_pad(n) for n in model.graph.node):
        return model, False
    out = copy.deepcopy(model)
    try:
        inferred = infer_shapes(out)
    except Exception:  # noqa: BLE001 - without shapes nothing can be made explicit
        return model, False
    shapes = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    inits = {t.name: list(t.dims) for t in out.graph.initializer}
    changed = False
    for node in out.graph.node:
        if node.op_type not in _OPS:  # ConvTranspose/LpPool pad differently: left to the converter
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs.get("auto_pad")
        if mode is None or mode.s in (b"NOTSET", b""):
            continue
        spatial = (shapes.get(node.input[0]) or [None, None])[2:]
        if node.op_type == "Conv":
            kernel = (attrs["kernel_shape"].ints if "kernel_shape" in attrs else inits.get(node.input[1], [0, 0])[2:])
        else:
            kernel = attrs["kernel_shape"].ints
        if not spatial or any(d is None for d in spatial) or len(kernel) != len(spatial):
            continue
        strides = attrs["strides"].ints if "strides" in attrs else [1] * len(spatial)
        dilations = attrs["dilations"].ints if "dilations" in attrs else [1] * len(spatial)
        begin, end = [], []
        for size, k, st, dl in zip(spatial, kernel, strides, dilations):
            total = 0 if mode.s == b"VALID" else max((-(-size // st) - 1) * st + (k - 1) * dl + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(large if mode.s == b"SAME_LOWER" else small)
            end.append(small if mode.s == b"SAME_LOWER" else large)
        node.attribute.remove(mode)
        if "pads" in attrs:
            node.attribute.remove(attrs["pads"])
        node.attribute.append(onnx.helper.make_attribute("pads", begin + end))
        changed = True
    return (out, True) if changed else (model, False)
