"""Finding the neuron layers of a model: which kinds are searched, in which order, and what is noted.

Generic: it knows the kinds only through the registry (their ``priority`` and ``fallback``) and the
:class:`~anp_onnx.neurons.base.NeuronKind` interface (``find``, ``find_beside``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional, Sequence

import onnx

from ..graph import GraphIndex
from .base import NeuronKind, NeuronLayer
from .registry import all_kinds, get_kind


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

    ``kinds=None``: every registered kind that is not a fallback (the normalisation kinds: BatchNorm,
    per-channel Mul/Add, Instance/Layer/GroupNorm), in priority order; when those find no layer, the
    fallback kinds (conv/linear output channels), else the layers each fallback kind adds beside them
    (:meth:`~anp_onnx.neurons.base.NeuronKind.find_beside`). Explicit kinds are all used, in the order
    given. ``include``/``exclude`` are shell-style patterns matched against layer names; a layer takes
    part when it matches some include pattern (or none was given) and no exclude pattern.
    """
    index = GraphIndex(model)
    if kinds:
        searched = [get_kind(k) for k in kinds]
        layers, notes = _search(model, index, searched)
    else:
        searched = [kind for kind in all_kinds().values() if not kind.fallback]
        layers, notes = _search(model, index, searched)
        fallback = [kind for kind in all_kinds().values() if kind.fallback]
        if layers:
            normalising = list(layers)
            for kind in fallback:
                beside, more = kind.find_beside(model, index, normalising)
                layers += beside
                notes += more
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
    """The layers, a repeated name made unique with ``#1``, ``#2``, ... (graph order)."""
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
