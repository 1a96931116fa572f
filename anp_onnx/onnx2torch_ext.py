"""Converters for ONNX opset 16-21 op versions that onnx2torch 1.5.15 lacks.

Registered in onnx2torch's own registry (``add_converter``), not a fork. Four groups here, and the
raw ops of the dynamo exporter's unoptimised output in :mod:`anp_onnx.onnx2torch_dynamo`:

* versions whose changes only widen the accepted types (or add an attribute a float model does not
  use): the existing converter of the latest older version is registered for them too;
* ``Reduce*-18`` (axes moved from an attribute to an optional input): axes must be a constant;
* ``Pad-18/19/21``, ``Resize-18/19``, ``AveragePool-19``: the older converter, when the node does
  not use what the new version added (the ``axes`` input of Pad, ``wrap`` mode, antialiasing,
  dilations); otherwise a clear NotImplementedError (``Split-18``: the older converter, or pieces of
  ``num_outputs``, see :mod:`anp_onnx.onnx2torch_dynamo`);
* ``GroupNormalization-18/21``, which onnx2torch has no converter for at all (see
  :func:`_group_norm_converter`). onnx's shape inference (1.17) gives GroupNormalization's output no
  type, so every value after it would lack the shape that several onnx2torch converters read
  (GlobalAveragePool, pools, norms): onnx2torch's shape inference step is wrapped so that it declares
  each GroupNormalization output like its input (same type and shape, as the spec says) and infers
  again (:func:`anp_onnx.shapes.complete_group_norm_shapes`); models without GroupNormalization
  are untouched.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConversionError
from .onnx2torch_dynamo import register as register_dynamo_ops
from .onnx2torch_dynamo import split18
from .shapes import complete_group_norm_shapes

_TYPES_ONLY = {
    "Cast": (19, 21), "Constant": (19, 21), "ConstantOfShape": (20, 21), "Equal": (19,), "Flatten": (21,),
    "GreaterOrEqual": (16,), "LessOrEqual": (16,), "Identity": (19, 21), "IsInf": (20,), "IsNaN": (20,),
    "Reshape": (19, 21), "Shape": (19, 21), "Transpose": (21,), "Unsqueeze": (21,), "Squeeze": (21,),
}
_REDUCE = {
    "ReduceL1": (18,), "ReduceL2": (18,), "ReduceLogSum": (18,), "ReduceLogSumExp": (18,),
    "ReduceMax": (18, 20), "ReduceMean": (18,), "ReduceMin": (18, 20), "ReduceProd": (18,), "ReduceSumSquare": (18,),
}
_registered = False


def register(o2t: Any) -> None:
    """Add the missing converters to onnx2torch's registry (idempotent)."""
    global _registered
    if _registered:
        return
    reg = o2t.node_converters.registry
    table = reg._CONVERTER_REGISTRY  # noqa: SLF001 - read-only look-up of what is registered

    def latest(op: str, below: int) -> Callable | None:
        versions = [k.version for k in table if k.domain == "" and k.operation_type == op and k.version < below]
        return table[reg.OperationDescription("", op, max(versions))] if versions else None

    def add(op: str, version: int, converter: Callable) -> None:
        if reg.OperationDescription("", op, version) not in table:
            reg.add_converter(operation_type=op, version=version)(converter)

    for op, versions in _TYPES_ONLY.items():
        for v in versions:
            base = latest(op, v)
            if base is not None:
                add(op, v, base)
    for op, versions in _REDUCE.items():
        for v in versions:
            add(op, v, _reduce_converter(o2t))
    _guarded(add, latest, "Pad", (18, 19, 21), _pad_ok)
    if latest("Split", 18) is not None:
        add("Split", 18, split18(latest("Split", 18)))
    _guarded(add, latest, "Resize", (18, 19), _resize_ok)
    _guarded(add, latest, "AveragePool", (19,), lambda n: None if all(d == 1 for d in n.attributes.get("dilations", [1]))
             else "AveragePool with dilations")
    add("GroupNormalization", 18, _group_norm_converter(per_channel=False))
    add("GroupNormalization", 21, _group_norm_converter(per_channel=True))
    register_dynamo_ops(o2t, add)
    _wrap_shape_inference(importlib.import_module(f"{o2t.__name__}.converter"))
    _registered = True


def _wrap_shape_inference(converter_module: Any) -> None:
    """Make onnx2torch's shape inference step also type the values after GroupNormalization nodes."""
    original = converter_module.safe_shape_inference
    if getattr(original, "completes_group_norm", False):
        return

    def inference(onnx_model_or_path, **kwargs):
        return complete_group_norm_shapes(original(onnx_model_or_path, **kwargs), original)

    inference.completes_group_norm = True  # type: ignore[attr-defined]
    converter_module.safe_shape_inference = inference


def _guarded(add, latest, op: str, versions: tuple[int, ...], problem: Callable[[Any], str | None]) -> None:
    for v in versions:
        base = latest(op, 18 if op != "AveragePool" else 19)
        if base is None:
            continue

        def converter(node, graph, _base=base, _v=v):
            why = problem(node)
            if why:
                raise NotImplementedError(f"{why} (opset {_v}) is not supported by the torch conversion")
            return _base(node, graph)

        add(op, v, converter)


def _pad_ok(node) -> str | None:
    if len(node.input_values) > 3 and node.input_values[3]:
        return "Pad with an axes input"
    if node.attributes.get("mode", "constant") == "wrap":
        return "Pad in wrap mode"
    return None


def _resize_ok(node) -> str | None:
    a = node.attributes
    if a.get("antialias", 0):
        return "Resize with antialias"
    if a.get("axes") is not None:
        return "Resize with axes"
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "Resize with keep_aspect_ratio_policy"
    if a.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        return "Resize with half_pixel_symmetric coordinates"
    return None


def _reduce_converter(o2t: Any) -> Callable:
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    def converter(node, graph):
        keepdims = node.attributes.get("keepdims", 1)
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            try:
                axes = [int(a) for a in get_const_value(node.input_values[1], graph).tolist()]
            except KeyError:
                raise NotImplementedError(f"{node.operation_type} with non-constant axes is not supported") from None
        if not axes and node.attributes.get("noop_with_empty_axes", 0):
            raise NotImplementedError(f"{node.operation_type} with noop_with_empty_axes is not supported")
        return OperationConverterResult(
            torch_module=OnnxReduceStaticAxes(operation_type=node.operation_type, axes=axes or None,
                                              keepdims=keepdims),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    return converter


class OnnxGroupNorm(nn.Module):
    """GroupNormalization with scale and bias given to ``forward`` (when they are not initializers).

    ``per_channel`` False is opset 18: one scale/bias value per group, repeated over the group's
    channels here; True is opset 21: one value per channel.
    """

    def __init__(self, num_groups: int, epsilon: float, per_channel: bool) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.per_channel = per_channel

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNormalization: {channels} channels do not split into {self.num_groups} groups")
        if not self.per_channel:
            scale = scale.reshape(-1).repeat_interleave(channels // self.num_groups)
            bias = bias.reshape(-1).repeat_interleave(channels // self.num_groups)
        return F.group_norm(x, self.num_groups, scale.reshape(-1), bias.reshape(-1), self.epsilon)


def _input_channels(node, graph) -> Optional[int]:
    """C of the node's input X from the (shape-inferred) value_info, or None where it is unknown."""
    info = graph.value_info.get(node.input_values[0])
    if info is None or not info.type.HasField("tensor_type"):
        return None
    dims = info.type.tensor_type.shape.dim
    if len(dims) < 2 or not dims[1].HasField("dim_value") or dims[1].dim_value <= 0:
        return None
    return int(dims[1].dim_value)


def _group_norm_converter(per_channel: bool) -> Callable:
    """GroupNormalization -> ``nn.GroupNorm`` when scale and bias are initializers, else OnnxGroupNorm.

    Opset 18 (``per_channel`` False) has one scale/bias value per group: the torch module gets them
    repeated over the C / num_groups channels of each group, so it needs C, which comes from shape
    inference; where C is unknown the module repeats them at run time (OnnxGroupNorm). Opset 21 has one
    value per channel, so C is the scale's length. ``stash_type`` (the precision of the statistics) is
    accepted and ignored: torch computes them in the input's float type.
    """
    version = 21 if per_channel else 18

    def converter(node, graph):
        from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, onnx_mapping_from_node

        where = f"GroupNormalization-{version} {node.name or node.output_values[0]!r}"
        groups = node.attributes.get("num_groups")
        if groups is None or int(groups) <= 0:
            raise ConversionError(f"{where}: missing or invalid num_groups attribute")
        groups = int(groups)
        epsilon = float(node.attributes.get("epsilon", 1e-5))
        params = list(node.input_values[1:3])
        if len(params) < 2 or not all(params):
            raise ConversionError(f"{where}: needs both a scale and a bias input")
        if not all(name in graph.initializers for name in params):
            return OperationConverterResult(torch_module=OnnxGroupNorm(groups, epsilon, per_channel),
                                            onnx_mapping=onnx_mapping_from_node(node))
        scale = graph.initializers[params[0]].to_torch().reshape(-1)
        bias = graph.initializers[params[1]].to_torch().reshape(-1)
        if scale.numel() != bias.numel():
            raise ConversionError(f"{where}: scale has {scale.numel()} elements but bias {bias.numel()}")
        known = _input_channels(node, graph)
        if per_channel:
            channels = scale.numel()
            if known is not None and known != channels:
                raise ConversionError(f"{where}: scale has {channels} elements but the input has {known} channels")
        else:
            if scale.numel() != groups:
                raise ConversionError(f"{where}: scale has {scale.numel()} elements, expected one per group "
                                      f"(num_groups {groups})")
            channels = known
            if channels is None:  # C unknown before run time: repeat the per-group values then
                return OperationConverterResult(torch_module=OnnxGroupNorm(groups, epsilon, per_channel),
                                                onnx_mapping=onnx_mapping_from_node(node))
        if channels % groups:
            raise ConversionError(f"{where}: {channels} channels do not split into {groups} groups")
        if not per_channel:
            scale = scale.repeat_interleave(channels // groups)
            bias = bias.repeat_interleave(channels // groups)
        module = nn.GroupNorm(groups, channels, eps=epsilon, affine=True)
        with torch.no_grad():  # as onnx2torch's own norm converters: the initializers' dtype is kept
            module.weight.data = scale.clone()
            module.bias.data = bias.clone()
        return OperationConverterResult(torch_module=module,
                                        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],),
                                                                 outputs=node.output_values))

    return converter
