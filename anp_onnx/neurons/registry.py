"""Registry of neuron kinds, keyed by name; registering a name twice fails loudly."""

from __future__ import annotations

from typing import TypeVar

from .base import NeuronKind

_KINDS: dict[str, NeuronKind] = {}
K = TypeVar("K", bound=type)


def register_kind(cls: K) -> K:
    """Class decorator: instantiate ``cls`` and register it under ``cls.name``."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _KINDS:
        raise ValueError(f"neuron kind {name!r} is already registered")
    _KINDS[name] = cls()
    return cls


def get_kind(name: str) -> NeuronKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown neuron kind {name!r}; known: {', '.join(sorted(_KINDS))}") from None


def all_kinds() -> dict[str, NeuronKind]:
    return dict(_KINDS)
