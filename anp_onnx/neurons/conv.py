"""Output channels of convolution and linear layers as neurons (for models without BatchNorm).

When a network has no normalisation layer, or its BatchNorm was folded into the preceding
convolution at export (``do_constant_folding``, tf2onnx, ONNX optimisers all do this), ANP's authors
take the neuron to be an output channel of the convolution / linear layer itself and perturb it the
same way: with noise, output channel ``c``'s weight row is scaled by ``(m_c + d_c)`` and its bias by
``(1 + x_c)``; without noise the weight row is scaled by ``m_c`` and the bias is left alone.

Layers found (weights must be initializers; other nodes are skipped with a note), one kind named
"conv" for all of them (``--kinds conv``; masks files say "conv"):

* ``Conv`` (1-D, 2-D, 3-D, grouped and depthwise included): output channel = axis 0 of the weight.
  onnx2torch turns a Conv with asymmetric pads into ``Sequential(pad, conv)``; that is handled.
* ``ConvTranspose``: weights are ``(C_in, C_out / group, ...)``, so output channel ``c`` is column
  ``c % (C_out / group)`` of the rows of its group ``c // (C_out / group)`` (axis 1 when group = 1).
* ``Gemm`` that onnx2torch turns into ``nn.Linear`` and ``MatMul`` by a 2-D initializer (Dense as
  MatMul + Add, whose bias noise ``x`` does not apply): see anp_onnx.neurons.linear.

Each op is one ``ChannelHandler`` (anp_onnx.neurons.channels), found in a table keyed by op type;
this module holds the kind, Conv's and ConvTranspose's handlers.

By default these neurons are *renormalised* (see ``PerturbedModule.renormalise`` and
``ANPConfig.renormalise``): the layer runs unperturbed and the mask and noise act on a BatchNorm
channel with clean-data statistics placed after it; a pruned channel then outputs its clean mean,
written into the bias (a Conv/Gemm without one gains a bias initializer; a MatMul's mean goes into
the following Add's bias, found at discovery as the ``shift`` parameter). What follows describes
the plain neurons (``renormalise=False``).

Pruning a neuron zeroes its weight row and KEEPS its bias, so a pruned channel outputs the constant
bias. This carries the reference's BatchNorm pruning over (a pruned BatchNorm channel has gamma = 0 and
outputs the constant beta: the mask scales gamma, never beta) and matches the mask above, which scales
the weight only. It is the same operation, not the same constant, as on the unfolded model: folding
gives weight' = W * gamma / std and bias' = beta + gamma * (b - mean) / std, so a pruned folded channel
outputs bias' (the BN output for a zero conv response), while gamma = 0 before folding outputs beta
(the channel's mean output). The torch model mirrors the write-back exactly: a mask of 0 scales the weight
row to 0 and leaves the bias, so the masks learnt are the masks of the function that is written.

The last classifier layer is excluded: a Conv/ConvTranspose/Gemm/MatMul from which a graph output is
reached without passing another such layer (walking back from each graph output through whatever
ops lie in between, e.g. Flatten, Reshape, Softmax, ReLU, GlobalAveragePool, Add). Its output units
are the classes; pruning one would delete a class, and ANP perturbs hidden neurons only.

The kind is the fallback of the default search (used when no normalisation kind finds a layer);
beside normalisation layers it adds only the convs into which an exporter fused a BatchNorm (see
:meth:`ConvKind.find_beside`).
"""

from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from ..graph import LINEAR_OPS, GraphIndex, InitializerEditor, node_label
from .base import FALLBACK, NeuronKind, NeuronLayer, PerturbedModule
from .channels import ChannelHandler, attr
from .linear import GemmHandler, MatMulHandler
from .registry import get_kind, register_kind

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

#: Element-wise activations: a conv whose output goes straight into one had its normalisation folded in
#: (conv -> BN -> ReLU exported with BN fused), unlike a conv feeding a normalisation or a residual Add.
ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Gelu", "Mish", "ThresholdedRelu",
})


def _row_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


class PerturbedConv(PerturbedModule):
    """A Conv/ConvTranspose whose output channel c has weight scaled by (m+d) and bias by (1+x).

    Holds the converted module's weight and bias as buffers and calls ``F.conv{1,2,3}d`` (or
    ``F.conv_transpose{1,2,3}d``) with its stride, padding, dilation and groups, so with mask 1 and
    no noise the output is exactly the original module's.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd, pad: Optional[nn.Module] = None) -> None:
        if conv.padding_mode != "zeros":
            raise TypeError(f"conv neurons: padding_mode {conv.padding_mode!r} is not supported")
        super().__init__(conv.out_channels)
        self.centreable = True
        self.transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.pad = pad
        self.spatial = conv.weight.dim() - 2
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        self.output_padding = getattr(conv, "output_padding", 0)

    def scaled_weight(self, wc: Optional[torch.Tensor]) -> torch.Tensor:
        if wc is None:
            return self.weight
        wc = wc.to(self.weight.dtype)
        if not self.transposed:
            return self.weight * wc.view(_row_shape(self.weight.dim(), 0, -1))
        # (C_in, C_out/g, *k): output channel g*(C_out/g) + j is column j of group g's rows
        c_in, c_out_g = self.weight.shape[:2]
        g = self.groups
        w = self.weight.reshape(g, c_in // g, c_out_g, *self.weight.shape[2:])
        coef = wc.view(g, 1, c_out_g, *([1] * self.spatial))
        return (w * coef).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wc, bc = self.coefficients()
        weight = self.scaled_weight(wc)
        bias = self.bias if (bc is None or self.bias is None) else self.bias * bc.to(self.bias.dtype)
        if self.pad is not None:
            x = self.pad(x)
        if self.transposed:
            z = _CONV_T_FN[self.spatial](x, weight, bias, self.stride, self.padding, self.output_padding,
                                         self.groups, self.dilation)
        else:
            z = _CONV_FN[self.spatial](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return self.renormalise(z, 1)


class ConvHandler(ChannelHandler):
    """Conv (1-D to 3-D, grouped and depthwise): output channel c is row c of the weight."""

    op: ClassVar[str] = "Conv"
    fuses_batchnorm: ClassVar[bool] = True
    #: The torch modules onnx2torch makes of the op, and those of them that are not (transposed).
    module_type: ClassVar[type] = nn.modules.conv._ConvNd
    excluded_type: ClassVar[Optional[type]] = nn.modules.conv._ConvTransposeNd

    def size(self, node: onnx.NodeProto, index: GraphIndex, w_shape: tuple[int, ...], bias: str) -> tuple[int, str]:
        if len(w_shape) not in (3, 4, 5):
            return 0, f"{node.op_type} with a {len(w_shape)}-D weight skipped"
        return self.channels(node, w_shape), ""

    def channels(self, node: onnx.NodeProto, w_shape: tuple[int, ...]) -> int:
        """The number of output channels of a node with a weight of shape ``w_shape``."""
        return w_shape[0]

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        pad = None
        if isinstance(module, nn.Sequential) and len(module) == 2:  # onnx2torch: asymmetric pads
            pad, module = module[0], module[1]
        if not isinstance(module, self.module_type) or (
                self.excluded_type is not None and isinstance(module, self.excluded_type)):
            raise TypeError(f"{layer.name}: expected a torch {layer.op_type} module, got {type(module).__name__}")
        return PerturbedConv(module, pad)

    def prune_weight(self, node: onnx.NodeProto, weight: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        weight[pruned] = 0
        return weight


class ConvTransposeHandler(ConvHandler):
    """ConvTranspose: weights ``(C_in, C_out / group, ...)``; channel c is column ``c % (C_out / group)``
    of the rows of group ``c // (C_out / group)``."""

    op: ClassVar[str] = "ConvTranspose"
    module_type: ClassVar[type] = nn.modules.conv._ConvTransposeNd
    excluded_type: ClassVar[Optional[type]] = None

    def size(self, node: onnx.NodeProto, index: GraphIndex, w_shape: tuple[int, ...], bias: str) -> tuple[int, str]:
        if len(w_shape) in (3, 4, 5):
            pads = list(attr(node, "pads", []))
            if pads and pads[: len(pads) // 2] != pads[len(pads) // 2:]:
                return 0, "ConvTranspose with asymmetric pads skipped (onnx2torch cannot convert it)"
        return super().size(node, index, w_shape, bias)

    def channels(self, node: onnx.NodeProto, w_shape: tuple[int, ...]) -> int:
        return w_shape[1] * int(attr(node, "group", 1))

    def prune_weight(self, node: onnx.NodeProto, weight: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        g = int(attr(node, "group", 1))
        c_in, c_out_g = weight.shape[:2]
        grouped = weight.reshape(g, c_in // g, c_out_g, *weight.shape[2:])
        grouped[pruned // c_out_g, :, pruned % c_out_g] = 0
        return grouped.reshape(weight.shape)


#: The handler of each op whose output channels are "conv" neurons.
HANDLERS: dict[str, ChannelHandler] = {
    h.op: h for h in (ConvHandler(), ConvTransposeHandler(), GemmHandler(), MatMulHandler())}


@register_kind
class ConvKind(NeuronKind):
    """One neuron per output channel of a Conv / ConvTranspose / Gemm / MatMul with constant weights."""

    name = "conv"
    description = "output channels of Conv / ConvTranspose / Gemm / MatMul+Add (BN folded or absent)"
    ops = tuple(HANDLERS)
    priority = FALLBACK

    def find(self, model: onnx.ModelProto, index: GraphIndex) -> tuple[list[NeuronLayer], list[str]]:
        layers, notes = [], []
        classifiers = classifier_nodes(model, index)
        for node in model.graph.node:
            if node.op_type not in HANDLERS or node.domain not in ("", "ai.onnx"):
                continue
            label = node_label(node)
            layer, why = HANDLERS[node.op_type].layer(node, index, self.name)
            if layer is None:
                notes.append(f"{label}: {why}")
            elif id(node) in classifiers:
                notes.append(f"classifier layer {label} excluded ({layer.size} output units are the classes)")
            else:
                layers.append(layer)
        return layers, notes

    def find_beside(self, model: onnx.ModelProto, index: GraphIndex,
                    normalising: Sequence[NeuronLayer]) -> tuple[list[NeuronLayer], list[str]]:
        """Conv/ConvTranspose layers whose only reader is an activation that no layer of ``normalising``
        reads; notes on them, and on the other layers of this kind (not used).

        In a network that keeps some normalisation layers these are the convs into which an exporter
        folded a BatchNorm (the torch exporter folds Conv -> BN, not BN after a residual Add), so they
        stand for the missing normalisation neurons; without them the model has fewer neurons than the
        same network with every BatchNorm kept. (Conv -> ReLU -> BN is normalised after the activation.)
        """
        normalised: set[str] = set()
        for layer in normalising:
            normalised |= get_kind(layer.kind).normalised_inputs(layer, index)
        chosen: list[NeuronLayer] = []
        others = False
        layers, _ = self.find(model, index)
        for layer in layers:
            readers = index.consumers.get(layer.output, [])
            if (HANDLERS[layer.op_type].fuses_batchnorm and index.uses.get(layer.output, 0) == 1
                    and len(readers) == 1 and readers[0][0].op_type in ACTIVATIONS
                    and readers[0][0].output[0] not in normalised):
                chosen.append(layer)
            else:
                others = True
        notes = []
        if chosen:
            notes.append(f"{len(chosen)} conv layers followed directly by an activation (normalisation "
                         f"folded into them) also used as neurons: {', '.join(f.name for f in chosen[:5])}"
                         + (" ..." if len(chosen) > 5 else ""))
        if others:
            notes.append("normalisation neurons found: other conv/linear output channels not used "
                         "(list the kinds to use all, e.g. --kinds batchnorm conv)")
        return chosen, notes

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        handler = HANDLERS.get(layer.op_type)
        if handler is None:
            raise TypeError(f"{layer.name}: conv neurons do not cover {layer.op_type}")
        wrapped = handler.wrap(module, layer)
        if wrapped.neuron_mask.numel() != layer.size:
            raise TypeError(f"{layer.name}: the torch module has {wrapped.neuron_mask.numel()} output units, "
                            f"the ONNX node {layer.size}")
        return wrapped

    def write_back(self, layer: NeuronLayer, pruned: np.ndarray, editor: InitializerEditor,
                   centre: Optional[np.ndarray] = None) -> None:
        node = self.node_of(layer, editor)
        handler = HANDLERS[node.op_type]
        pruned = np.asarray(pruned, dtype=np.int64)
        weight = handler.prune_weight(node, editor.read(node, 1).copy(), pruned)
        editor.write(node, 1, weight)
        if centre is None:
            return  # the bias is kept: a pruned channel outputs its constant bias
        # a renormalised channel outputs its clean mean
        handler.write_centre(layer, node, pruned, np.asarray(centre, dtype=weight.dtype)[pruned], editor)


def classifier_nodes(model: onnx.ModelProto, index: GraphIndex) -> set[int]:
    """ids of the Conv/ConvTranspose/Gemm/MatMul nodes that reach a graph output with no other in between."""
    return index.walk_back_from_outputs(LINEAR_OPS)[1]
