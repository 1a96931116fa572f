"""Registry of neuron kinds, keyed by name and by the ONNX ops each kind handles.

A kind is registered once, under its ``name`` (what masks files and ``--kinds`` say) and under each of
its ``ops`` (the ONNX op types whose nodes it turns into neuron layers). Registering a name or an op
that is already taken fails loudly, so no two kinds claim the same node.
"""

from __future__ import annotations

from typing import TypeVar

from .base import NeuronKind

_KINDS: dict[str, NeuronKind] = {}
_BY_OP: dict[str, NeuronKind] = {}
K = TypeVar("K", bound=type)


def register_kind(cls: K) -> K:
    """Class decorator: instantiate ``cls`` and register it under ``cls.name`` and each of ``cls.ops``."""
    name = cls.name  # type: ignore[attr-defined]
    ops = tuple(getattr(cls, "ops", ()))
    if name in _KINDS:
        raise ValueError(f"neuron kind {name!r} is already registered")
    if not ops:
        raise ValueError(f"neuron kind {name!r} declares no ONNX ops")
    taken = [f"{op!r} (by {_BY_OP[op].name!r})" for op in ops if op in _BY_OP]
    if taken or len(set(ops)) != len(ops):
        raise ValueError(f"neuron kind {name!r}: ONNX ops already registered: "
                         f"{', '.join(taken) or 'the same op twice in its ops'}")
    kind = cls()
    _KINDS[name] = kind
    for op in ops:
        _BY_OP[op] = kind
    return cls


def get_kind(name: str) -> NeuronKind:
    """The kind registered under ``name`` (the name stored in masks files and layers)."""
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown neuron kind {name!r}; known: {', '.join(sorted(_KINDS))}") from None


def kind_for_op(op_type: str) -> NeuronKind:
    """The kind that handles ONNX nodes of ``op_type``."""
    try:
        return _BY_OP[op_type]
    except KeyError:
        raise KeyError(f"no neuron kind handles the ONNX op {op_type!r}; handled: "
                       f"{', '.join(sorted(_BY_OP))}") from None


def all_kinds() -> dict[str, NeuronKind]:
    """Every registered kind by name, in search order: by ``priority``, then in order of registration."""
    return dict(sorted(_KINDS.items(), key=lambda item: item[1].priority))
