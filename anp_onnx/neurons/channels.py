"""What the "conv" kind asks of each ONNX op whose output channels it takes as neurons.

The "conv" kind (anp_onnx.neurons.conv) covers Conv, ConvTranspose, Gemm and MatMul. What differs
between these ops (how many output channels a node has, which part of the weight a channel is,
which torch module onnx2torch makes of it, where a pruned channel's clean mean goes) is one
:class:`ChannelHandler` per op: conv.py has Conv's and ConvTranspose's, linear.py Gemm's and MatMul's,
and the kind finds the handler of a node in a table keyed by op type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

import numpy as np
import onnx
from onnx import helper
from torch import nn

from ..graph import GraphIndex, InitializerEditor, node_label
from .base import NeuronLayer, PerturbedModule

#: Initializers by role, as in NeuronLayer.params.
Params = tuple[tuple[str, str], ...]


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default`` when it has none."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class ChannelHandler(ABC):
    """One ONNX op (``op``) whose output channels are neurons of the "conv" kind.

    Input 1 is the weight, input 2 (when there is one) the bias; both must be initializers.
    """

    op: ClassVar[str]
    #: Whether exporters fuse a following BatchNorm into this op (Conv -> BN), so that a layer of it
    #: read only by an activation stands for a BatchNorm (see ConvKind.find_beside).
    fuses_batchnorm: ClassVar[bool] = False

    def layer(self, node: onnx.NodeProto, index: GraphIndex, kind: str) -> tuple[Optional[NeuronLayer], str]:
        """``node`` as a layer of ``kind``; or None and why it is skipped."""
        op = node.op_type
        inputs = list(node.input)
        weight = inputs[1] if len(inputs) > 1 else ""
        bias = inputs[2] if len(inputs) > 2 else ""
        if not weight or not index.is_initializer(weight):
            return None, f"{op} with a non-constant weight skipped"
        if bias and not index.is_initializer(bias):
            return None, f"{op} with a non-constant bias skipped"
        w_shape = tuple(int(d) for d in index.initializers[weight].dims)
        size, why = self.size(node, index, w_shape, bias)
        if why:
            return None, why
        return NeuronLayer(name=node_label(node), kind=kind, op_type=op, node_name=node.name,
                           output=node.output[0], size=size, params=self.params(node, index, weight, bias, size)), ""

    @abstractmethod
    def size(self, node: onnx.NodeProto, index: GraphIndex, w_shape: tuple[int, ...], bias: str) -> tuple[int, str]:
        """The number of output channels of ``node`` (weight of shape ``w_shape``); or 0 and why it is skipped."""

    def params(self, node: onnx.NodeProto, index: GraphIndex, weight: str, bias: str, size: int) -> Params:
        """The initializers the write-back may change, by role: the weight, and the bias if any."""
        return (("weight", weight),) + ((("bias", bias),) if bias else ())

    @abstractmethod
    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        """The perturbable replacement for onnx2torch's module of ``layer`` (TypeError if it is another)."""

    @abstractmethod
    def prune_weight(self, node: onnx.NodeProto, weight: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        """``weight`` (a copy, changed in place) with the entries of output channels ``pruned`` set to 0."""

    def write_centre(self, layer: NeuronLayer, node: onnx.NodeProto, pruned: np.ndarray, values: np.ndarray,
                     editor: InitializerEditor) -> None:
        """Make the pruned channels output ``values`` (their clean means): written into the node's bias,
        or into a bias initializer the node gains when it has none."""
        if len(node.input) > 2 and node.input[2]:
            bias = editor.read(node, 2).copy()
            bias[pruned] = values
            editor.write(node, 2, bias)
        else:
            bias = np.zeros(layer.size, dtype=values.dtype)
            bias[pruned] = values
            while len(node.input) > 2:  # an empty optional bias name
                node.input.pop()
            editor.add_input(node, bias, "bias_anp")
