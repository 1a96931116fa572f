"""BatchNormalization channels as neurons (the reference ANP neuron)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from ..graph import GraphIndex, InitializerEditor, node_label
from .base import NeuronKind, NeuronLayer, PerturbedModule
from .registry import register_kind


class PerturbedBatchNorm(PerturbedModule):
    """BatchNorm with gamma scaled by (m + d) and beta by (1 + x) (ANP's NoisyBatchNorm).

    With ``batch_stats`` (the reference's train mode) it normalises with the batch's statistics and,
    unlike torch's train mode, never updates the running statistics.
    """

    normalises = True

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__(bn.num_features)
        self.register_buffer("weight", bn.weight.detach().clone())
        self.register_buffer("bias", bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = float(bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wc, bc = self.coefficients()
        weight = self.weight * wc
        bias = self.bias if bc is None else self.bias * bc
        if self.batch_stats:
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)


@register_kind
class BatchNormKind(NeuronKind):
    """One neuron per channel of a BatchNormalization node with constant parameters."""

    name = "batchnorm"
    description = "BatchNormalization channels (mask and noise on gamma, noise on beta)"
    ops = ("BatchNormalization",)

    def find(self, model: onnx.ModelProto, index: GraphIndex) -> tuple[list[NeuronLayer], list[str]]:
        layers, notes = [], []
        for node in model.graph.node:
            if node.op_type not in self.ops:
                continue
            params = list(node.input[1:5])
            if len(params) < 4 or not all(index.is_initializer(p) for p in params):
                notes.append(f"{node_label(node)}: BatchNormalization with non-constant parameters skipped")
                continue
            if len([o for o in node.output if o]) != 1:
                notes.append(f"{node_label(node)}: training-mode BatchNormalization (several outputs) skipped")
                continue
            size = int(index.array(params[0]).size)
            layers.append(NeuronLayer(
                name=node_label(node), kind=self.name, op_type=node.op_type, node_name=node.name,
                output=node.output[0], size=size,
                params=(("scale", node.input[1]), ("bias", node.input[2])),
            ))
        return layers, notes

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"{layer.name}: expected a torch BatchNorm module, got {type(module).__name__}")
        return PerturbedBatchNorm(module)

    def write_back(self, layer: NeuronLayer, pruned: np.ndarray, editor: InitializerEditor,
                   centre: Optional[np.ndarray] = None) -> None:
        node = self.node_of(layer, editor)
        scale = editor.read(node, 1).copy()
        scale[pruned] = 0  # the reference keeps beta: a pruned channel outputs the constant beta
        editor.write(node, 1, scale)
