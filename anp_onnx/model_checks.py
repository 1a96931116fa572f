"""Checks of the numbers a model declares, made before anything allocates, infers or runs with them.

A damaged or hostile ONNX file can pass onnx.checker and still hold numbers that make the native
libraries anp-onnx relies on misbehave: an input of 10^9 x 10^9 pixels (allocated by the class probe
and the loaders), a convolution stride of 0 or a negative padding (onnx's shape inference and
onnxruntime divide by the one and index with the other, and the process dies of a signal instead
of raising), NaN weights (every output NaN). :mod:`anp_onnx.model` calls these while loading; each
raises a one-line :class:`~anp_onnx.errors.ModelError` naming the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ModelError, UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from .model import InputSpec

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
#: Largest input a model may declare: pixels a side, channels, values per image, values per
#: onnxruntime run with a fixed batch (unknown sizes count 1).
MAX_SIDE = 16384
MAX_CHANNELS = 1024
MAX_IMAGE_VALUES = 2**26
MAX_BATCH_VALUES = 2**28
#: Ops whose initializer inputs are weights: an infinite value there is damage, not a fill value.
_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
               "LayerNormalization", "GroupNormalization"}
#: Sliding-window ops and the range of each integer attribute (each value in it).
_WINDOW_OPS = {"Conv", "ConvTranspose", "ConvInteger", "MaxPool", "AveragePool", "LpPool", "MaxUnpool", "DeformConv"}
_WINDOW_ATTRIBUTES = {"strides": (1, MAX_SIDE), "dilations": (1, MAX_SIDE), "kernel_shape": (1, MAX_SIDE),
                      "pads": (0, MAX_SIDE), "output_padding": (0, MAX_SIDE), "group": (1, 2**20)}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_input_size(spec: "InputSpec", where: str) -> None:
    """Refuse declared input sizes no image classifier has, before any array of that size is made."""
    image = spec.channels * (spec.height or 1) * (spec.width or 1)
    checks = (("a height of {} pixels", spec.height, MAX_SIDE), ("a width of {} pixels", spec.width, MAX_SIDE),
              ("{} channels", spec.channels, MAX_CHANNELS), ("{} values per image", image, MAX_IMAGE_VALUES),
              ("{} values per run of its fixed batch", (spec.batch or 1) * image, MAX_BATCH_VALUES))
    for what, value, limit in checks:
        if value and value > limit:
            raise UnsupportedModelError(
                f"{where}: input {spec.describe()} declares {what.format(value)}, more than the {limit} anp-onnx "
                "accepts; refused before anything of that size is allocated")


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _nodes(sub)


def check_attributes(model: onnx.ModelProto, where: str) -> None:
    """Refuse a sliding-window node (Conv, pools) whose strides, dilations, kernel, pads or group are
    out of range: onnx's shape inference and onnxruntime crash the process on some of them."""
    for node in _nodes(model.graph):
        if node.op_type not in _WINDOW_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            bounds = _WINDOW_ATTRIBUTES.get(attr.name)
            if bounds is None:
                continue
            values = list(attr.ints) if attr.type == onnx.AttributeProto.INTS else [attr.i]
            if attr.type not in (onnx.AttributeProto.INTS, onnx.AttributeProto.INT) or \
                    not all(bounds[0] <= v <= bounds[1] for v in values):
                label = node.name or (node.output[0] if node.output else "?")
                raise ModelError(f"{where}: node {label} ({node.op_type}) has {attr.name} {values}; each must be in "
                                 f"{bounds[0]}..{bounds[1]} (the file is damaged)")


def non_finite_weights(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(name, "NaN" | "infinite")`` for each float initializer or Constant holding NaN, or holding an
    infinity where a weight op (Conv, Gemm, MatMul, the normalisations) reads it; -inf as a fill value
    elsewhere (a Max, a mask) is legitimate."""
    weights = {i for n in model.graph.node if n.op_type in _WEIGHT_OPS for i in n.input}
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant" and n.output
                for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    bad = []
    for name, tensor in tensors:
        if tensor.data_type not in FLOAT_TYPES:
            continue
        try:
            values = onnx.numpy_helper.to_array(tensor)
        except Exception as exc:  # raw data of the wrong length and other damage
            raise ModelError(f"tensor {name} cannot be read ({first_line(exc)})") from exc
        values = values.astype(np.float32, copy=False) if values.dtype.kind != "f" else values
        if np.isnan(values).any():
            bad.append((name, "NaN"))
        elif name in weights and np.isinf(values).any():
            bad.append((name, "infinite"))
    return bad


def check_finite(proto: onnx.ModelProto, path: Path) -> None:
    """ModelError naming the first initializers that hold NaN or infinite weights (see non_finite_weights)."""
    try:
        bad = non_finite_weights(proto)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    if bad:
        shown = ", ".join(f"{name} ({kind})" for name, kind in bad[:3])
        shown += f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ModelError(f"{path}: weights hold NaN or infinite values: {shown}; the file is damaged or its "
                         "training diverged, and such a model can be neither evaluated nor repaired")
