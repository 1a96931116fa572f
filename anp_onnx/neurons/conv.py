"""Output channels of convolution and linear layers as neurons (for models without BatchNorm).

When a network has no normalisation layer, or its BatchNorm was folded into the preceding
convolution at export (``do_constant_folding``, tf2onnx, ONNX optimisers all do this), ANP's authors
take the neuron to be an output channel of the convolution / linear layer itself and perturb it the
same way: with noise, output channel ``c``'s weight row is scaled by ``(m_c + d_c)`` and its bias by
``(1 + x_c)``; without noise the weight row is scaled by ``m_c`` and the bias is left alone.

Layers found (weights must be initializers; other nodes are skipped with a note):

* ``Conv`` (1-D, 2-D, 3-D, grouped and depthwise included): output channel = axis 0 of the weight.
  onnx2torch turns a Conv with asymmetric pads into ``Sequential(pad, conv)``; that is handled.
* ``ConvTranspose``: weights are ``(C_in, C_out / group, ...)``, so output channel ``c`` is column
  ``c % (C_out / group)`` of the rows of its group ``c // (C_out / group)`` (axis 1 when group = 1).
* ``Gemm`` that onnx2torch turns into ``nn.Linear`` (transA = 0, B an initializer, C absent or a 1-D
  initializer): output units are the rows of B when transB = 1 and its columns when transB = 0.
  Other Gemms become onnx2torch's generic ``OnnxGemm`` and are skipped with a note.
* ``MatMul`` whose second input is a 2-D initializer (tf2onnx/Keras write Dense as MatMul + Add):
  output units are the columns of the weight. The bias lives in the following ``Add``, a separate
  node and torch module, which is left untouched: a MatMul neuron's mask and weight noise apply,
  the bias noise ``x`` does not (the mask still counts; the bias is kept anyway, see below).

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
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from ..graph import LINEAR_OPS, GraphIndex, InitializerEditor, node_label
from .base import NeuronKind, NeuronLayer, PerturbedModule
from .registry import register_kind

#: Ops whose output units are neurons of this kind (and which end a walk back from the outputs).

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


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


class PerturbedLinear(PerturbedModule):
    """nn.Linear (a converted Gemm) with output unit c's weight row scaled by (m+d), bias by (1+x)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.out_features)
        self.centreable = True
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wc, bc = self.coefficients()
        weight = self.weight if wc is None else self.weight * wc.to(self.weight.dtype)[:, None]
        bias = self.bias if (bc is None or self.bias is None) else self.bias * bc.to(self.bias.dtype)
        return self.renormalise(F.linear(x, weight, bias), -1)


class PerturbedMatMul(PerturbedModule):
    """onnx2torch's MatMul (x @ W, W an initializer passed in by the graph) with column c of W scaled.

    The bias of a following Add is a separate module and is not perturbed (no bias noise).
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        wc, _ = self.coefficients()
        return self.renormalise(torch.matmul(x, y if wc is None else y * wc.to(y.dtype)), -1)


@register_kind
class ConvKind(NeuronKind):
    """One neuron per output channel of a Conv / ConvTranspose / Gemm / MatMul with constant weights."""

    name = "conv"
    description = "output channels of Conv / ConvTranspose / Gemm / MatMul+Add (BN folded or absent)"

    def find(self, model: onnx.ModelProto, index: GraphIndex) -> tuple[list[NeuronLayer], list[str]]:
        layers, notes = [], []
        classifiers = classifier_nodes(model, index)
        for node in model.graph.node:
            if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx"):
                continue
            label = node_label(node)
            layer, why = self._layer(node, index)
            if layer is None:
                notes.append(f"{label}: {why}")
            elif id(node) in classifiers:
                notes.append(f"classifier layer {label} excluded ({layer.size} output units are the classes)")
            else:
                layers.append(layer)
        return layers, notes

    def _layer(self, node: onnx.NodeProto, index: GraphIndex) -> tuple[Optional[NeuronLayer], str]:
        op = node.op_type
        inputs = list(node.input)
        weight = inputs[1] if len(inputs) > 1 else ""
        bias = inputs[2] if len(inputs) > 2 else ""
        if not weight or not index.is_initializer(weight):
            return None, f"{op} with a non-constant weight skipped"
        if bias and not index.is_initializer(bias):
            return None, f"{op} with a non-constant bias skipped"
        w_shape = tuple(int(d) for d in index.initializers[weight].dims)
        if op == "Conv":
            if len(w_shape) not in (3, 4, 5):
                return None, f"Conv with a {len(w_shape)}-D weight skipped"
            size = w_shape[0]
        elif op == "ConvTranspose":
            if len(w_shape) not in (3, 4, 5):
                return None, f"ConvTranspose with a {len(w_shape)}-D weight skipped"
            pads = list(_attr(node, "pads", []))
            if pads and pads[: len(pads) // 2] != pads[len(pads) // 2:]:
                return None, "ConvTranspose with asymmetric pads skipped (onnx2torch cannot convert it)"
            size = w_shape[1] * int(_attr(node, "group", 1))
        elif op == "Gemm":
            if int(_attr(node, "transA", 0)):
                return None, "Gemm with transA=1 skipped (onnx2torch makes it a generic module)"
            if len(w_shape) != 2:
                return None, "Gemm with a non-2-D weight skipped"
            if bias and len(index.initializers[bias].dims) != 1:
                return None, "Gemm with a non-1-D bias skipped (onnx2torch makes it a generic module)"
            size = w_shape[0] if int(_attr(node, "transB", 0)) else w_shape[1]
        else:  # MatMul
            if len(w_shape) != 2:
                return None, f"MatMul with a {len(w_shape)}-D weight skipped"
            if index.is_initializer(inputs[0]):
                return None, "MatMul with a constant first input skipped"
            size = w_shape[1]
            bias = ""
            shift = _bias_add(node, index, size)
        params = (("weight", weight),) + ((("bias", bias),) if bias else ())
        if op == "MatMul" and shift:
            params += (("shift", shift),)
        return NeuronLayer(name=node_label(node), kind=self.name, op_type=op, node_name=node.name,
                           output=node.output[0], size=size, params=params), ""

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        op = layer.op_type
        if op in ("Conv", "ConvTranspose"):
            pad = None
            if isinstance(module, nn.Sequential) and len(module) == 2:  # onnx2torch: asymmetric pads
                pad, module = module[0], module[1]
            cls = nn.modules.conv._ConvTransposeNd if op == "ConvTranspose" else nn.modules.conv._ConvNd
            if not isinstance(module, cls) or (op == "Conv") == isinstance(module, nn.modules.conv._ConvTransposeNd):
                raise TypeError(f"{layer.name}: expected a torch {op} module, got {type(module).__name__}")
            wrapped = PerturbedConv(module, pad)
        elif op == "Gemm":
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{layer.name}: expected onnx2torch's nn.Linear for a Gemm, got "
                                f"{type(module).__name__} (a generic Gemm cannot carry conv neurons)")
            wrapped = PerturbedLinear(module)
        elif op == "MatMul":
            from .._compat import onnx2torch

            matmul = getattr(onnx2torch().node_converters, "OnnxMatMul", None)
            if matmul is None or not isinstance(module, matmul):
                raise TypeError(f"{layer.name}: expected onnx2torch's OnnxMatMul, got {type(module).__name__}")
            wrapped = PerturbedMatMul(layer.size)
            wrapped.centreable = "shift" in dict(layer.params)
        else:
            raise TypeError(f"{layer.name}: conv neurons do not cover {op}")
        if wrapped.neuron_mask.numel() != layer.size:
            raise TypeError(f"{layer.name}: the torch module has {wrapped.neuron_mask.numel()} output units, "
                            f"the ONNX node {layer.size}")
        return wrapped

    def write_back(self, layer: NeuronLayer, pruned: np.ndarray, editor: InitializerEditor,
                   centre: Optional[np.ndarray] = None) -> None:
        node = self.node_of(layer, editor)
        weight = editor.read(node, 1).copy()
        pruned = np.asarray(pruned, dtype=np.int64)
        if node.op_type == "Conv":
            weight[pruned] = 0
        elif node.op_type == "ConvTranspose":
            g = int(_attr(node, "group", 1))
            c_in, c_out_g = weight.shape[:2]
            grouped = weight.reshape(g, c_in // g, c_out_g, *weight.shape[2:])
            grouped[pruned // c_out_g, :, pruned % c_out_g] = 0
            weight = grouped.reshape(weight.shape)
        elif node.op_type == "Gemm" and int(_attr(node, "transB", 0)):
            weight[pruned, :] = 0
        else:  # Gemm with transB=0, MatMul: output units are columns
            weight[:, pruned] = 0
        editor.write(node, 1, weight)
        if centre is None:
            return  # the bias is kept: a pruned channel outputs its constant bias
        values = np.asarray(centre, dtype=weight.dtype)[pruned]
        if node.op_type == "Gemm":  # Gemm adds beta * C
            values = values / np.asarray(float(_attr(node, "beta", 1.0)), dtype=weight.dtype)
        if node.op_type == "MatMul":  # the bias is the following Add's: it gains the MatMul's clean mean
            add, i = _bias_add_input(node, editor.index, layer.param("shift"))
            shift = editor.read(add, i).copy()
            flat = shift.reshape(-1)
            flat[pruned] += values
            editor.write(add, i, flat.reshape(shift.shape))
            return
        if len(node.input) > 2 and node.input[2]:  # a renormalised channel outputs its clean mean
            bias = editor.read(node, 2).copy()
            bias[pruned] = values
            editor.write(node, 2, bias)
        else:
            bias = np.zeros(layer.size, dtype=weight.dtype)
            bias[pruned] = values
            while len(node.input) > 2:  # an empty optional bias name
                node.input.pop()
            editor.add_input(node, bias, "bias_anp")


def _bias_add(node: onnx.NodeProto, index: GraphIndex, size: int) -> str:
    """The per-column constant of the Add that alone reads a MatMul's output (Dense = MatMul + Add), or ""."""
    out = node.output[0]
    readers = index.consumers.get(out, [])
    if index.uses.get(out, 0) != 1 or len(readers) != 1:
        return ""
    add, i = readers[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return ""
    other = add.input[1 - i]
    if not index.is_initializer(other):
        return ""
    dims = [int(d) for d in index.initializers[other].dims]
    if not dims or dims[-1] != size or int(np.prod(dims)) != size:
        return ""
    return other


def _bias_add_input(node: onnx.NodeProto, index: GraphIndex, name: str) -> tuple[onnx.NodeProto, int]:
    add, _ = index.consumers[node.output[0]][0]
    return add, list(add.input).index(name)


def classifier_nodes(model: onnx.ModelProto, index: GraphIndex) -> set[int]:
    """ids of the Conv/ConvTranspose/Gemm/MatMul nodes that reach a graph output with no other in between."""
    return index.walk_back_from_outputs(LINEAR_OPS)[1]
