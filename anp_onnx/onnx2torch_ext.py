"""Converters for ONNX opset 16-21 op versions that onnx2torch 1.5.15 lacks.

Registered in onnx2torch's own registry (``add_converter``), not a fork. Three groups:

* versions whose changes only widen the accepted types (or add an attribute a float model does not
  use): the existing converter of the latest older version is registered for them too;
* ``Reduce*-18`` (axes moved from an attribute to an optional input): axes must be a constant;
* ``Pad-18/19/21``, ``Split-18``, ``Resize-18/19``, ``AveragePool-19``: the older converter, when
  the node does not use what the new version added (the ``axes`` input of Pad, ``wrap`` mode,
  ``num_outputs``, antialiasing, dilations); otherwise a clear NotImplementedError.
"""

from __future__ import annotations

from typing import Any, Callable

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
    _guarded(add, latest, "Split", (18,), lambda n: None if "num_outputs" not in n.attributes
             else "Split with num_outputs")
    _guarded(add, latest, "Resize", (18, 19), _resize_ok)
    _guarded(add, latest, "AveragePool", (19,), lambda n: None if all(d == 1 for d in n.attributes.get("dilations", [1]))
             else "AveragePool with dilations")
    _registered = True


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
