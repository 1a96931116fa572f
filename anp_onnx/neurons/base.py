"""What a neuron is, and the interface every neuron kind implements.

A *neuron layer* is one ONNX node whose output channels are ANP neurons (a BatchNormalization node
and its C channels, for example). A *kind* handles some ONNX op types (``ops``) and knows three
things: how to find its layers in an ONNX graph, how to make the converted torch module perturbable
(mask and noise per neuron, as in ANP_SPEC.md), and how to write a pruning decision back into the
ONNX initializers (:meth:`NeuronKind.write_back`). Its ``priority`` orders the default search:
normalisation kinds first, the conv/linear fallback last (see :func:`anp_onnx.neurons.find_neurons`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from ..graph import GraphIndex, InitializerEditor

#: Variance epsilon of renormalised neurons in batch-statistics mode (BatchNorm's default).
RENORM_EPS = 1e-5

#: Priority of the normalisation kinds (BatchNorm, Instance/Layer/GroupNorm, per-channel Mul+Add):
#: their neurons are, or stand for, BatchNorm channels, the reference neuron; searched first.
NORMALISATION = 0
#: Priority from which a kind is a fallback: the default search uses it only when no normalisation
#: kind finds a layer (conv/linear output channels, for models without normalisation layers).
FALLBACK = 100


@dataclass(frozen=True)
class NeuronLayer:
    """One ONNX node whose ``size`` output channels are neurons.

    ``name`` is unique within the model and used as the key of masks; ``output`` is the node's first
    output value name (unique in a valid graph), which links the layer to its torch module;
    ``params`` names the initializers the write-back may change, by role (for BatchNormalization: scale, bias).
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
    #: Whether the write-back can write a pruned neuron's clean mean (see :meth:`renormalise`); set by wrap().
    centreable: bool = False

    def __init__(self, size: int) -> None:
        super().__init__()
        self.neuron_mask = nn.Parameter(torch.ones(size))
        self.neuron_noise = nn.Parameter(torch.zeros(size))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(size))
        self.perturbed = False
        self.batch_stats = False
        # Renormalisation (layers that do not normalise; see renormalise()): the clean output's
        # per-neuron mean and the layer's spread (see finish_calibration), None until calibrated.
        self.register_buffer("centre", None)
        self.register_buffer("spread", None)
        self._calibration: Optional[list[torch.Tensor]] = None

    @property
    def renormalised(self) -> bool:
        """Whether the neuron is perturbed as a BatchNorm channel after the layer (see :meth:`renormalise`)."""
        return self.centre is not None

    def coefficients(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Weight and bias coefficients per neuron; (None, None) when :meth:`renormalise` applies them."""
        if self.renormalised or self._calibration is not None:
            return None, None
        if self.perturbed:
            return self.neuron_mask + self.neuron_noise, 1.0 + self.neuron_noise_bias
        return self.neuron_mask, None

    def renormalise(self, z: torch.Tensor, axis: int) -> torch.Tensor:
        """The layer's unperturbed output ``z`` (neurons along ``axis``) as a perturbed BatchNorm channel.

        For layers that do not normalise (conv/linear output channels, per-channel Mul/Add) once
        :meth:`set_centres` gave the clean output's per-neuron mean ``M`` and the spread ``S`` (the
        layer's, see :meth:`finish_calibration`).
        The neuron behaves as BatchNorm with running statistics ``(M, S)``, gamma ``S`` and beta ``M``
        placed after the layer, which in eval mode is the identity, so the model is unchanged:

        * without ``batch_stats``: ``y = a * (z - M) + b * M``;
        * with ``batch_stats`` (ANP's train mode): ``y = a * S * (z - mean_B) / std_B + b * M``, the
          batch's own statistics, as a BatchNorm layer in train mode computes it;

        with ``a = m + d`` and ``b = 1 + x`` under noise, ``a = m`` and ``b = 1`` without. A pruned
        neuron (m = 0) outputs its clean mean ``M``, as a pruned BatchNorm channel outputs beta, which
        is what BatchNorm folded into the layer leaves otherwise unrecoverable. The write-back writes
        ``W' = m W`` and ``bias' = m bias + (1 - m) M``. Without centres (and while calibrating,
        which records ``z``) this returns ``z``.
        """
        dims = [d for d in range(z.dim()) if d != axis % z.dim()]  # all but the neurons' axis
        if self._calibration is not None:
            zt = z.detach().double()
            self._calibration.append(torch.stack([zt.sum(dims), (zt * zt).sum(dims),
                                                  torch.full_like(zt.sum(dims), z.numel() / z.shape[axis])]).cpu())
            return z
        if not self.renormalised:
            return z
        shape = [1] * z.dim()
        shape[axis] = -1
        centre, spread = self.centre.to(z.dtype).view(shape), self.spread.to(z.dtype).view(shape)
        if self.perturbed:
            a = (self.neuron_mask + self.neuron_noise).to(z.dtype).view(shape)
            b = (1.0 + self.neuron_noise_bias).to(z.dtype).view(shape)
        else:
            a, b = self.neuron_mask.to(z.dtype).view(shape), 1.0
        if self.batch_stats:
            var, mean = torch.var_mean(z, dim=dims, keepdim=True, unbiased=False)
            return a * spread * (z - mean) * torch.rsqrt(var + RENORM_EPS) + b * centre
        return a * (z - centre) + b * centre

    def start_calibration(self) -> None:
        """Record the outputs of the following forward passes (unperturbed) for :meth:`finish_calibration`."""
        self.centre = self.spread = None
        self._calibration = []

    def abort_calibration(self) -> None:
        """Stop recording without setting centres (the calibration pass failed or was interrupted)."""
        self._calibration = None

    def finish_calibration(self) -> None:
        """Set the centres from the recorded outputs: each neuron's mean; the layer's mean spread.

        The spread ``S`` is one value for the whole layer, the mean over its neurons of their standard
        deviation, not each neuron's own: as with a BatchNorm in train mode, whose batch statistics
        scale up a channel that is quieter on clean data than on the training data its running
        statistics came from (a channel that fires for a trigger), a neuron that is quiet on clean
        images is brought to the layer's level under batch statistics. With per-neuron spreads the
        renormalised model in batch-statistics mode is the model itself, and on the BN-folded sample
        the collapse probe found no target (29% of the errors in the target class, against 62% with
        the layer's spread and 76% on the same network with its BatchNorm kept).
        """
        recorded, self._calibration = self._calibration, None
        if not recorded:
            raise RuntimeError("no output was recorded while calibrating")
        total, total_sq, count = torch.stack(recorded).sum(0)
        mean = total / count
        std = (total_sq / count - mean * mean).clamp(min=0).sqrt()
        self.set_centres(mean.float().numpy(), torch.full_like(std, float(std.mean())).float().numpy())

    def set_centres(self, centre: Optional[np.ndarray], spread: Optional[np.ndarray]) -> None:
        """Turn renormalisation on with these per-neuron statistics (None: off)."""
        if centre is None or spread is None:
            self.centre = self.spread = None
            return
        size = self.neuron_mask.numel()
        centre, spread = np.asarray(centre, np.float32).reshape(-1), np.asarray(spread, np.float32).reshape(-1)
        if centre.size != size or spread.size != size:
            raise ValueError(f"{size} neurons, but {centre.size} centres and {spread.size} spreads")
        self.centre = torch.from_numpy(centre.copy()).to(self.neuron_mask.device)
        self.spread = torch.from_numpy(spread.copy()).to(self.neuron_mask.device)

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
    """A family of neuron layers (BatchNorm channels, conv output channels, ...).

    ``name`` is what masks files, layers and ``--kinds`` say; ``ops`` the ONNX op types whose nodes
    the kind turns into layers (one kind per op, see :func:`~anp_onnx.neurons.register_kind`);
    ``priority`` the search order (:data:`NORMALISATION` first; :data:`FALLBACK` and above only when
    no normalisation kind finds a layer).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    ops: ClassVar[tuple[str, ...]]
    priority: ClassVar[int] = NORMALISATION

    @property
    def fallback(self) -> bool:
        """Whether the default search uses this kind only when no normalisation kind finds a layer."""
        return self.priority >= FALLBACK

    @abstractmethod
    def find(self, model: onnx.ModelProto, index: GraphIndex) -> tuple[list[NeuronLayer], list[str]]:
        """Layers of this kind in ``model``, and plain-words notes on matching nodes it must skip."""

    def find_beside(self, model: onnx.ModelProto, index: GraphIndex,
                    normalising: Sequence[NeuronLayer]) -> tuple[list[NeuronLayer], list[str]]:
        """Layers of this fallback kind that the default search adds to the normalisation layers found.

        ``normalising`` are the layers the normalisation kinds found; returns layers and notes. None by
        default: the fallback is not used beside them.
        """
        return [], []

    def normalised_inputs(self, layer: NeuronLayer, index: GraphIndex) -> set[str]:
        """The values that ``layer`` (of this kind) normalises: the inputs of the node computing it.

        :meth:`find_beside` uses it to tell a layer whose output is normalised later from one whose
        normalisation was folded into it. A kind whose layer spans several nodes adds their inputs.
        """
        node = index.producer.get(layer.output)
        return set() if node is None else set(node.input)

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
    def write_back(self, layer: NeuronLayer, pruned: np.ndarray, editor: InitializerEditor,
                   centre: Optional[np.ndarray] = None) -> None:
        """Write the pruning of neurons ``pruned`` (indices) into the ONNX initializers.

        ``centre`` (one value per neuron) is given for renormalised neurons (see
        :meth:`PerturbedModule.renormalise`): a pruned neuron must then output its centre.
        """
