"""Converters for the raw ops of the torch dynamo exporter's unoptimised output (``optimize=False``).

``torch.onnx.export(..., dynamo=True, optimize=False)`` keeps the ONNX functions of its aten
decompositions as they are; its optimiser, which is skipped, would have folded most of them away.
onnx2torch 1.5.15 has no converter for these, so they are added to its own registry
(``add_converter``) by :func:`register`, called from :func:`anp_onnx.onnx2torch_ext.register`:

* ``CastLike-15/19/21`` (arithmetic with a Python number: the number is cast like the tensor;
  ReLU6's bounds): a cast to the second input's dtype. ``saturate`` only concerns float8 types,
  which torch tensors here never have;
* ``Gelu-20`` (``F.gelu``, both ``approximate`` modes) and ``Mish-18``;
* ``SplitToSequence-11`` and ``SequenceAt-11`` (``torch.chunk`` / ``torch.split``): the pieces as a
  tuple and one of them; split sizes and positions are read once when they are constants;
* ``Split-18`` with ``num_outputs`` (``F.glu``, ``torch.chunk`` in optimised exports): pieces of
  ceil(n / num_outputs), the last one smaller (:func:`split18`, registered by onnx2torch_ext).

A Constant of a list of numbers, which onnx2torch hands to converters as a list, and a CastLike of
a constant are precomputed in the conversion copy (:mod:`anp_onnx.passes.constants`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


class OnnxCastLike(nn.Module):
    """``x`` cast to the dtype of ``like``."""

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype)


class OnnxSplitToSequence(nn.Module):
    """SplitToSequence: ``x`` split along ``axis`` into a tuple of tensors.

    Without ``split``, pieces of size 1 (squeezed unless ``keepdims``); a scalar ``split`` is the size
    of every piece (the last may be smaller); a 1-D ``split`` lists the sizes.
    """

    def __init__(self, axis: int, keepdims: bool, split: Optional[list[int] | int] = None) -> None:
        super().__init__()
        self.axis, self.keepdims, self.split = axis, keepdims, split

    def forward(self, x: torch.Tensor, split: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        sizes = self.split
        if split is not None:
            sizes = int(split) if split.dim() == 0 else [int(s) for s in split.tolist()]
        if sizes is None:
            pieces = torch.split(x, 1, dim=self.axis)
            return pieces if self.keepdims else tuple(p.squeeze(self.axis) for p in pieces)
        return torch.split(x, sizes, dim=self.axis)


class OnnxSequenceAt(nn.Module):
    """SequenceAt: the item of a sequence at ``position`` (negative counts from the end)."""

    def __init__(self, position: Optional[int] = None) -> None:
        super().__init__()
        self.position = position

    def forward(self, sequence: tuple[torch.Tensor, ...], position: Optional[torch.Tensor] = None) -> torch.Tensor:
        return sequence[int(position) if position is not None else self.position]


class OnnxSplitInto(nn.Module):
    """Split-18 with ``num_outputs``: pieces of ceil(n / num_outputs) along ``axis``, the last smaller."""

    def __init__(self, axis: int, num_outputs: int) -> None:
        super().__init__()
        self.axis, self.num_outputs = axis, num_outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[self.axis]
        size = -(-n // self.num_outputs)
        return torch.split(x, [size] * (self.num_outputs - 1) + [n - size * (self.num_outputs - 1)], dim=self.axis)


def split18(base: Callable) -> Callable:
    """Split-18: ``base`` (the Split-13 converter) unless the node gives ``num_outputs`` instead of sizes."""

    def converter(node, graph):
        from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

        count = node.attributes.get("num_outputs")
        if count is None or (len(node.input_values) > 1 and node.input_values[1]):
            return base(node, graph)
        return OperationConverterResult(
            torch_module=OnnxSplitInto(int(node.attributes.get("axis", 0)), int(count)),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))

    return converter


def register(o2t: Any, add: Callable[[str, int, Callable], None]) -> None:
    """Register the converters with ``add(op, version, converter)`` (which skips registered ones)."""
    common = o2t.utils.common
    mapping, result = common.OnnxMapping, common.OperationConverterResult

    def const(name: str, graph) -> Optional[torch.Tensor]:
        try:
            value = common.get_const_value(name, graph)
        except KeyError:
            return None
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)

    def cast_like(node, graph):
        return result(torch_module=OnnxCastLike(), onnx_mapping=common.onnx_mapping_from_node(node))

    def gelu(node, graph):
        approximate = node.attributes.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise NotImplementedError(f"Gelu with approximate={approximate!r} is not supported")
        return result(torch_module=nn.GELU(approximate=approximate),
                      onnx_mapping=mapping(inputs=(node.input_values[0],), outputs=node.output_values))

    def mish(node, graph):
        return result(torch_module=nn.Mish(),
                      onnx_mapping=mapping(inputs=(node.input_values[0],), outputs=node.output_values))

    def split_to_sequence(node, graph):
        axis, keepdims = int(node.attributes.get("axis", 0)), bool(node.attributes.get("keepdims", 1))
        inputs = [v for v in node.input_values if v]
        split = const(inputs[1], graph) if len(inputs) > 1 else None
        if len(inputs) > 1 and split is None:  # sizes computed at run time
            return result(torch_module=OnnxSplitToSequence(axis, keepdims),
                          onnx_mapping=mapping(inputs=tuple(inputs[:2]), outputs=node.output_values))
        sizes = None if split is None else int(split) if split.dim() == 0 else [int(s) for s in split.tolist()]
        return result(torch_module=OnnxSplitToSequence(axis, keepdims, sizes),
                      onnx_mapping=mapping(inputs=(inputs[0],), outputs=node.output_values))

    def sequence_at(node, graph):
        position = const(node.input_values[1], graph)
        if position is None:
            return result(torch_module=OnnxSequenceAt(), onnx_mapping=common.onnx_mapping_from_node(node))
        return result(torch_module=OnnxSequenceAt(int(position)),
                      onnx_mapping=mapping(inputs=(node.input_values[0],), outputs=node.output_values))

    for version in (15, 19, 21):
        add("CastLike", version, cast_like)
    add("Gelu", 20, gelu)
    add("Mish", 18, mish)
    add("SplitToSequence", 11, split_to_sequence)
    add("SequenceAt", 11, sequence_at)
