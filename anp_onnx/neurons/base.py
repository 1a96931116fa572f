"""What a neuron is, and the interface every neuron kind implements.

A *neuron layer* is one ONNX node whose output channels are ANP neurons (a BatchNormalization node
and its C channels, for example). A *kind* knows three things: how to find its layers in an ONNX
graph, how to make the converted torch module perturbable (mask and noise per neuron, as in
ANP_SPEC.md), and how to fold a pruning decision back into the ONNX initializers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import onnx
import torch
from torch import nn

from ..graph import GraphIndex, InitializerEditor


@dataclass(frozen=True)
class NeuronLayer:
    """One ONNX node whose ``size`` output channels are neurons.

    ``name`` is unique within the model and used as the key of masks; ``output`` is the node's first
    output value name (unique in a valid graph), which links the layer to its torch module;
    ``params`` names the initializers a fold may change, by role (for BatchNormalization: scale, bias).
    """

    name: str
    kind: str
    op_type: str
    node_name: str
    output: str
    size: int
    params: tuple[tuple[str, str], ...]

    def param(self, role: str) -> str:
        return dict(self.params)[role]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "op_type": self.op_type, "node": self.node_name,
            "output": self.output, "size": self.size, "params": dict(self.params),
        }


class PerturbedModule(nn.Module):
    """Per-neuron mask m (init 1) and relative noise on weight (d) and bias (x), as in ANP.

    With noise the neuron's weight is scaled by (m + d) and its bias by (1 + x); without noise by m
    and 1. Subclasses apply :meth:`coefficients` to their own weight and bias. ``normalises`` says
    whether the layer renormalises its input (BatchNorm with batch statistics, InstanceNorm,
    LayerNorm), which the collapse probe needs (see anp_onnx.collapse).
    """

    normalises: ClassVar[bool] = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.neuron_mask = nn.Parameter(torch.ones(size))
        self.neuron_noise = nn.Parameter(torch.zeros(size))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(size))
        self.perturbed = False
        self.batch_stats = False

    def coefficients(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.perturbed:
            return self.neuron_mask + self.neuron_noise, 1.0 + self.neuron_noise_bias
        return self.neuron_mask, None

    @torch.no_grad()
    def reset_noise(self, eps: float, generator: Optional[torch.Generator] = None) -> None:
        """Draw noise uniformly from [-eps, eps] (eps 0: set it to zero)."""
        for p in (self.neuron_noise, self.neuron_noise_bias):
            if eps > 0:
                r = torch.rand(p.shape, generator=generator)
                p.copy_((r * 2 - 1) * eps)
            else:
                p.zero_()

    @torch.no_grad()
    def clip_mask(self) -> None:
        self.neuron_mask.clamp_(0.0, 1.0)

    @torch.no_grad()
    def project_noise(self, eps: float) -> None:
        self.neuron_noise.clamp_(-eps, eps)
        self.neuron_noise_bias.clamp_(-eps, eps)

    @torch.no_grad()
    def set_mask(self, values: np.ndarray | torch.Tensor) -> None:
        self.neuron_mask.copy_(torch.as_tensor(values, dtype=self.neuron_mask.dtype))


class NeuronKind(ABC):
    """A family of neuron layers (BatchNorm channels, conv output channels, ...)."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def find(self, model: onnx.ModelProto, index: GraphIndex) -> tuple[list[NeuronLayer], list[str]]:
        """Layers of this kind in ``model``, and plain-words notes on matching nodes it must skip."""

    @abstractmethod
    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        """A perturbable replacement for the onnx2torch module that computes ``layer``."""

    @staticmethod
    def node_of(layer: NeuronLayer, editor: InitializerEditor) -> onnx.NodeProto:
        """The ONNX node (in the editor's model) that computes ``layer``."""
        node = editor.index.producer.get(layer.output)
        if node is None:
            raise KeyError(f"no node produces {layer.output} for layer {layer.name}")
        return node

    @abstractmethod
    def fold(self, layer: NeuronLayer, pruned: np.ndarray, editor: InitializerEditor) -> None:
        """Write the pruning of neurons ``pruned`` (indices) into the ONNX initializers."""
