"""Neuron kinds and neuron discovery.

>>> from anp_onnx.neurons import find_neurons
>>> found = find_neurons(model_proto)          # BatchNorm channels, else conv/linear output channels
>>> [layer.name for layer in found.layers]
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional, Sequence

import onnx

from ..graph import GraphIndex
from . import batchnorm, conv  # noqa: F401  (register the kinds)
from . import norms  # noqa: F401  (InstanceNorm and LayerNorm kinds)
from . import affine  # noqa: F401  (per-channel Mul/Add kind)
from .base import NeuronKind, NeuronLayer, PerturbedModule
from .registry import all_kinds, get_kind, register_kind

__all__ = [
    "NeuronKind", "NeuronLayer", "PerturbedModule", "NeuronSearch", "find_neurons",
    "all_kinds", "get_kind", "register_kind", "FALLBACK_KINDS",
]

#: Kinds the default search (``kinds=None``) uses only when no other registered kind finds a layer:
#: BatchNorm (and other normalisation) channels are the reference neuron; conv/linear output
#: channels stand in for models without them (BN folded into the conv, or no BN at all).
FALLBACK_KINDS = ("conv",)


@dataclass(frozen=True)
class NeuronSearch:
    """Result of :func:`find_neurons`: the layers used, and notes on what was skipped."""

    layers: tuple[NeuronLayer, ...]
    notes: tuple[str, ...]
    excluded: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()  # the kinds searched

    @property
    def total(self) -> int:
        return sum(layer.size for layer in self.layers)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (number of layers, number of neurons)."""
        out: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            n_layers, n_neurons = out.get(layer.kind, (0, 0))
            out[layer.kind] = (n_layers + 1, n_neurons + layer.size)
        return out


def find_neurons(
    model: onnx.ModelProto,
    kinds: Optional[Sequence[str]] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> NeuronSearch:
    """Find neuron layers of the given ``kinds``, in graph order.

    ``kinds=None``: every registered kind but the :data:`FALLBACK_KINDS` (the normalisation kinds:
    BatchNorm, per-channel Mul/Add, Instance/LayerNorm); when those find no layer, the fallback kinds
    (conv/linear output channels). Explicit kinds are all used.
    ``include``/``exclude`` are shell-style patterns matched against layer names; a layer takes part
    when it matches some include pattern (or none was given) and no exclude pattern.
    """
    index = GraphIndex(model)
    if kinds:
        searched = [get_kind(k) for k in kinds]
        layers, notes = _search(model, index, searched)
    else:
        searched = [kind for name, kind in all_kinds().items() if name not in FALLBACK_KINDS]
        layers, notes = _search(model, index, searched)
        fallback = [kind for name, kind in all_kinds().items() if name in FALLBACK_KINDS]
        if layers:
            folded, skipped = _folded_convs(model, index, fallback, layers)
            if folded:
                layers += folded
                notes.append(f"{len(folded)} conv layers followed directly by an activation (normalisation "
                             f"folded into them) also used as neurons: {', '.join(f.name for f in folded[:5])}"
                             + (" ..." if len(folded) > 5 else ""))
            if fallback and skipped:
                notes.append("normalisation neurons found: other conv/linear output channels not used "
                             "(list the kinds to use all, e.g. --kinds batchnorm conv)")
        elif fallback:
            searched += fallback
            layers, more = _search(model, index, fallback)
            notes += ["no normalisation neurons: using conv/linear output channels"] + more
    order = {node.output[0]: i for i, node in enumerate(model.graph.node) if node.output}
    layers.sort(key=lambda layer: order.get(layer.output, len(order)))
    layers = _unique_names(layers)
    kept, excluded = [], []
    for layer in layers:
        ok = (not include or any(fnmatch.fnmatchcase(layer.name, p) for p in include)) and not (
            exclude and any(fnmatch.fnmatchcase(layer.name, p) for p in exclude)
        )
        (kept if ok else excluded).append(layer)
    return NeuronSearch(tuple(kept), tuple(notes), tuple(layer.name for layer in excluded),
                        tuple(kind.name for kind in searched))


#: Element-wise activations: a conv whose output goes straight into one had its normalisation folded in
#: (conv -> BN -> ReLU exported with BN fused), unlike a conv feeding a normalisation or a residual Add.
ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Gelu", "Mish", "ThresholdedRelu",
})


def _folded_convs(model: onnx.ModelProto, index: GraphIndex, kinds: Sequence[NeuronKind],
                  norms: Sequence[NeuronLayer]) -> tuple[list[NeuronLayer], bool]:
    """Conv/ConvTranspose layers (of ``kinds``) whose only reader is an activation that no normalisation
    layer (of ``norms``) reads; and whether other such layers exist.

    In a network that keeps some normalisation layers these are the convs into which an exporter
    folded a BatchNorm (the torch exporter folds Conv -> BN, not BN after a residual Add), so they
    stand for the missing normalisation neurons; without them the model has fewer neurons than the
    same network with every BatchNorm kept. (Conv -> ReLU -> BN is normalised after the activation.)
    """
    normalised: set[str] = set()
    for layer in norms:
        node = index.producer.get(layer.output)
        if node is None:
            continue
        normalised.update(node.input)
        if layer.op_type == "Mul+Add":  # the layer's output is the Add's; its input is the Mul's
            for v in node.input:
                mul = index.producer.get(v)
                if mul is not None and mul.op_type == "Mul":
                    normalised.update(mul.input)
    chosen: list[NeuronLayer] = []
    others = False
    layers, _ = _search(model, index, kinds)
    for layer in layers:
        readers = index.consumers.get(layer.output, [])
        if (layer.op_type in ("Conv", "ConvTranspose") and index.uses.get(layer.output, 0) == 1
                and len(readers) == 1 and readers[0][0].op_type in ACTIVATIONS
                and readers[0][0].output[0] not in normalised):
            chosen.append(layer)
        else:
            others = True
    return chosen, others


def _search(model: onnx.ModelProto, index: GraphIndex,
            kinds: Sequence[NeuronKind]) -> tuple[list[NeuronLayer], list[str]]:
    layers: list[NeuronLayer] = []
    notes: list[str] = []
    for kind in kinds:
        found, kind_notes = kind.find(model, index)
        layers.extend(found)
        notes.extend(kind_notes)
    return layers, notes


def _unique_names(layers: list[NeuronLayer]) -> list[NeuronLayer]:
    seen: dict[str, int] = {}
    out = []
    for layer in layers:
        count = seen.get(layer.name, 0)
        seen[layer.name] = count + 1
        if count:
            layer = NeuronLayer(f"{layer.name}#{count}", layer.kind, layer.op_type, layer.node_name,
                                layer.output, layer.size, layer.params)
        out.append(layer)
    return out
