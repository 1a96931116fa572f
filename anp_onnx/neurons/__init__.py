"""Neuron kinds and neuron discovery.

>>> from anp_onnx.neurons import find_neurons
>>> found = find_neurons(model_proto)          # every registered kind
>>> [layer.name for layer in found.layers]
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional, Sequence

import onnx

from ..graph import GraphIndex
from . import batchnorm  # noqa: F401  (registers the kind)
from .base import NeuronKind, NeuronLayer, PerturbedModule
from .registry import all_kinds, get_kind, register_kind

__all__ = [
    "NeuronKind", "NeuronLayer", "PerturbedModule", "NeuronSearch", "find_neurons",
    "all_kinds", "get_kind", "register_kind",
]


@dataclass(frozen=True)
class NeuronSearch:
    """Result of :func:`find_neurons`: the layers used, and notes on what was skipped."""

    layers: tuple[NeuronLayer, ...]
    notes: tuple[str, ...]
    excluded: tuple[str, ...] = ()

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
    """Find neuron layers of the given ``kinds`` (default: all registered), in graph order.

    ``include``/``exclude`` are shell-style patterns matched against layer names; a layer takes part
    when it matches some include pattern (or none was given) and no exclude pattern.
    """
    index = GraphIndex(model)
    chosen = [get_kind(k) for k in kinds] if kinds else list(all_kinds().values())
    layers: list[NeuronLayer] = []
    notes: list[str] = []
    for kind in chosen:
        found, kind_notes = kind.find(model, index)
        layers.extend(found)
        notes.extend(kind_notes)
    order = {node.output[0]: i for i, node in enumerate(model.graph.node) if node.output}
    layers.sort(key=lambda layer: order.get(layer.output, len(order)))
    layers = _unique_names(layers)
    kept, excluded = [], []
    for layer in layers:
        ok = (not include or any(fnmatch.fnmatchcase(layer.name, p) for p in include)) and not (
            exclude and any(fnmatch.fnmatchcase(layer.name, p) for p in exclude)
        )
        (kept if ok else excluded).append(layer)
    return NeuronSearch(tuple(kept), tuple(notes), tuple(layer.name for layer in excluded))


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
