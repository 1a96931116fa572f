"""Instance-, Layer- and GroupNormalization elements as neurons (perturbed like BatchNorm in ANP).

InstanceNormalization: one neuron per channel (``scale``/``B`` of shape (C,)).
LayerNormalization (opset 17+): one neuron per element of ``scale`` (which has the normalized shape,
possibly several dimensions); masks are flat, in C order, and reshaped to the scale's shape.
GroupNormalization: one neuron per element of ``scale``, which is one per group at opset 18-20 (a
group's mask and noise then act on all its channels in torch) and one per channel from opset 21 on.
onnx2torch 1.5 has no GroupNormalization converter: anp_onnx.onnx2torch_ext adds one.

All always normalise with the statistics of the current input, so the ``batch_stats`` switch (the
reference's train mode) changes nothing. As in ANP, the scale is multiplied by (m + d) and the bias
by (1 + x) with noise, the scale by m without; pruning sets the scale to 0 and keeps the bias.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from ..graph import GraphIndex, InitializerEditor, node_label
from ..model import default_opset
from .base import NeuronKind, NeuronLayer, PerturbedModule
from .registry import register_kind


def _scaled(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], wc: torch.Tensor,
            bc: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Apply the per-neuron coefficients (flat) to a weight and bias of any shape."""
    if weight is not None:
        weight = weight * wc.reshape(weight.shape).to(weight.dtype)
    if bias is not None and bc is not None:
        bias = bias * bc.reshape(bias.shape).to(bias.dtype)
    return weight, bias


class PerturbedInstanceNorm(PerturbedModule):
    """InstanceNorm with gamma scaled by (m + d) and beta by (1 + x), per channel."""

    normalises = True

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__(norm.num_features)
        self.register_buffer("weight", norm.weight.detach().clone())
        self.register_buffer("bias", norm.bias.detach().clone())
        self.eps = float(norm.eps)
        self.momentum = float(norm.momentum) if norm.momentum is not None else 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = _scaled(self.weight, self.bias, *self.coefficients())
        return F.instance_norm(x, None, None, weight, bias, True, self.momentum, self.eps)


class PerturbedLayerNorm(PerturbedModule):
    """LayerNorm with each element of gamma scaled by (m + d) and of beta by (1 + x)."""

    normalises = True

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__(int(norm.weight.numel()))
        self.register_buffer("weight", norm.weight.detach().clone())
        bias = getattr(norm, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = _scaled(self.weight, self.bias, *self.coefficients())
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class PerturbedGroupNorm(PerturbedModule):
    """GroupNorm with gamma scaled by (m + d) and beta by (1 + x), per channel or per group.

    ``size`` is the number of neurons: the channels (opset 21), or the groups (opset 18), in which
    case each neuron's coefficients are repeated over the C / num_groups channels of its group.
    """

    normalises = True

    def __init__(self, norm: nn.GroupNorm, size: int) -> None:
        if size not in (norm.num_channels, norm.num_groups):
            raise ValueError(f"GroupNorm with {norm.num_channels} channels in {norm.num_groups} groups "
                             f"cannot have {size} neurons")
        super().__init__(size)
        self.register_buffer("weight", norm.weight.detach().clone())
        self.register_buffer("bias", norm.bias.detach().clone())
        self.num_groups = int(norm.num_groups)
        self.repeat = int(norm.num_channels) // size
        self.eps = float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wc, bc = self.coefficients()
        if self.repeat > 1:
            wc = wc.repeat_interleave(self.repeat)
            bc = None if bc is None else bc.repeat_interleave(self.repeat)
        weight, bias = _scaled(self.weight, self.bias, wc, bc)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class PerturbedFunctionalNorm(PerturbedModule):
    """onnx2torch's functional norm modules (scale and bias as forward arguments), perturbed.

    Used only if onnx2torch did not see the parameters as initializers; ``inner`` computes the norm.
    """

    normalises = True

    def __init__(self, inner: nn.Module, size: int) -> None:
        super().__init__(size)
        self.inner = inner

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale, bias = _scaled(scale, bias, *self.coefficients())
        return self.inner(x, scale, bias)


def _functional(module: nn.Module, class_name: str) -> bool:
    return type(module).__name__ == class_name


class _NormKind(NeuronKind):
    """A normalisation node (one op type) whose scale elements are neurons, perturbed like BatchNorm."""

    op_type: ClassVar[str] = ""

    def _params(self, node: onnx.NodeProto) -> list[str]:
        return [name for name in node.input[1:3] if name]

    def _check(self, node: onnx.NodeProto, index: GraphIndex, scale: np.ndarray) -> Optional[str]:
        return None

    def find(self, model: onnx.ModelProto, index: GraphIndex) -> tuple[list[NeuronLayer], list[str]]:
        layers, notes = [], []
        for node in model.graph.node:
            if node.op_type != self.op_type:
                continue
            params = self._params(node)
            if len(node.input) < 2 or not node.input[1] or not all(index.is_initializer(p) for p in params):
                notes.append(f"{node_label(node)}: {self.op_type} with non-constant parameters skipped")
                continue
            if len([o for o in node.output if o]) != 1:
                notes.append(f"{node_label(node)}: {self.op_type} with several outputs skipped")
                continue
            scale = index.array(node.input[1])
            problem = self._check(node, index, scale)
            if problem:
                notes.append(f"{node_label(node)}: {problem}")
                continue
            roles = [("scale", node.input[1])]
            if len(params) > 1:
                roles.append(("bias", params[1]))
            layers.append(NeuronLayer(
                name=node_label(node), kind=self.name, op_type=node.op_type, node_name=node.name,
                output=node.output[0], size=int(scale.size), params=tuple(roles),
            ))
        return layers, notes

    def write_back(self, layer: NeuronLayer, pruned: np.ndarray, editor: InitializerEditor,
                   centre: Optional[np.ndarray] = None) -> None:
        node = self.node_of(layer, editor)
        scale = editor.read(node, 1).copy()
        flat = scale.reshape(-1)  # a view of the copy: C order, as the masks
        flat[np.asarray(pruned, dtype=np.int64)] = 0  # the bias is kept, as in the reference
        editor.write(node, 1, scale)


@register_kind
class InstanceNormKind(_NormKind):
    """One neuron per channel of an InstanceNormalization node with constant scale and bias."""

    name = "instancenorm"
    description = "InstanceNormalization channels (mask and noise on scale, noise on bias)"
    op_type = "InstanceNormalization"
    ops = (op_type,)

    def _check(self, node: onnx.NodeProto, index: GraphIndex, scale: np.ndarray) -> Optional[str]:
        if scale.ndim != 1 or len(node.input) < 3 or not node.input[2]:
            return "InstanceNormalization with an unusual scale or no bias skipped"
        return None

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.weight is not None:
            return PerturbedInstanceNorm(module)
        if _functional(module, "OnnxInstanceNorm"):
            return PerturbedFunctionalNorm(module, layer.size)
        raise TypeError(f"{layer.name}: expected a torch InstanceNorm module, got {type(module).__name__}")


@register_kind
class LayerNormKind(_NormKind):
    """One neuron per element of the scale of a LayerNormalization node with constant parameters."""

    name = "layernorm"
    description = "LayerNormalization scale elements (mask and noise on scale, noise on bias)"
    op_type = "LayerNormalization"
    ops = (op_type,)

    def _check(self, node: onnx.NodeProto, index: GraphIndex, scale: np.ndarray) -> Optional[str]:
        if len(node.input) > 2 and node.input[2] and index.array(node.input[2]).shape != scale.shape:
            return "LayerNormalization whose bias and scale shapes differ skipped"
        return None

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            if module.weight.numel() != layer.size:
                raise TypeError(f"{layer.name}: LayerNorm scale has {module.weight.numel()} elements, "
                                f"expected {layer.size}")
            return PerturbedLayerNorm(module)
        if _functional(module, "OnnxLayerNorm"):
            return PerturbedFunctionalNorm(module, layer.size)
        raise TypeError(f"{layer.name}: expected a torch LayerNorm module, got {type(module).__name__}")


@register_kind
class GroupNormKind(_NormKind):
    """One neuron per element of the scale of a GroupNormalization node with constant parameters.

    At opset 18-20 the scale holds one value per group (a neuron is a group of channels), from opset
    21 on one per channel.
    """

    name = "groupnorm"
    description = "GroupNormalization scale elements: groups at opset 18-20, channels from 21 (as instancenorm)"
    op_type = "GroupNormalization"
    ops = (op_type,)

    def _check(self, node: onnx.NodeProto, index: GraphIndex, scale: np.ndarray) -> Optional[str]:
        if scale.ndim != 1 or len(node.input) < 3 or not node.input[2]:
            return "GroupNormalization with an unusual scale or no bias skipped"
        if index.array(node.input[2]).shape != scale.shape:
            return "GroupNormalization whose bias and scale shapes differ skipped"
        groups = next((int(a.i) for a in node.attribute if a.name == "num_groups"), 0)
        if groups <= 0:
            return "GroupNormalization without a valid num_groups skipped"
        if default_opset(index.model) < 21:
            if scale.size != groups:
                return (f"GroupNormalization whose scale has {scale.size} elements for {groups} groups "
                        "(opset < 21: one per group) skipped")
        elif scale.size % groups:
            return f"GroupNormalization whose {scale.size} channels do not split into {groups} groups skipped"
        return None

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        if isinstance(module, nn.GroupNorm) and module.affine:
            if layer.size not in (module.num_channels, module.num_groups):
                raise TypeError(f"{layer.name}: GroupNorm has {module.num_channels} channels in "
                                f"{module.num_groups} groups, expected {layer.size} neurons")
            return PerturbedGroupNorm(module, layer.size)
        if _functional(module, "OnnxGroupNorm"):
            return PerturbedFunctionalNorm(module, layer.size)
        raise TypeError(f"{layer.name}: expected a torch GroupNorm module, got {type(module).__name__}")
