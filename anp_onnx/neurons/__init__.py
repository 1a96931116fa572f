"""Neuron kinds and neuron discovery.

>>> from anp_onnx.neurons import find_neurons
>>> found = find_neurons(model_proto)          # BatchNorm channels, else conv/linear output channels
>>> [layer.name for layer in found.layers]

A kind is a :class:`NeuronKind` subclass in its own module, registered with :func:`register_kind`
under its name and the ONNX ops it handles (``ops``), with a ``priority`` (normalisation kinds
first, :data:`~anp_onnx.neurons.base.FALLBACK` kinds last); the module is imported below.
"""

from __future__ import annotations

from . import batchnorm, conv  # noqa: F401  (register the kinds)
from . import norms  # noqa: F401  (InstanceNorm, LayerNorm and GroupNorm kinds)
from . import affine  # noqa: F401  (per-channel Mul/Add kind)
from .base import NeuronKind, NeuronLayer, PerturbedModule
from .discovery import NeuronSearch, find_neurons
from .registry import all_kinds, get_kind, kind_for_op, register_kind

__all__ = [
    "NeuronKind", "NeuronLayer", "PerturbedModule", "NeuronSearch", "find_neurons",
    "all_kinds", "get_kind", "kind_for_op", "register_kind", "FALLBACK_KINDS",
]

#: Names of the kinds the default search (``kinds=None``) uses only when no other registered kind
#: finds a layer (their ``priority`` is FALLBACK or above): BatchNorm (and other normalisation)
#: channels are the reference neuron; conv/linear output channels stand in for models without them
#: (BN folded into the conv, or no BN at all).
FALLBACK_KINDS = tuple(name for name, kind in all_kinds().items() if kind.fallback)
