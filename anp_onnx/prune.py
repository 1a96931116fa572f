"""Choosing which neurons to prune from their masks.

Neurons are ordered by mask value, lowest first (ties keep graph order). A :class:`PruneSpec` says
how many of that order to prune, one variant per mode: every neuron with mask <= threshold (the
reference's default, t = :data:`REFERENCE_THRESHOLD`), a count, a fraction of all neurons, or the
automatic choice from clean data (:mod:`anp_onnx.curve`). Mask files are :mod:`anp_onnx.masks_io`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterable, Mapping, Optional, Sequence

import numpy as np

from .errors import DataError, SettingsError
from .options import DEFAULT_MAX_DROP

if TYPE_CHECKING:  # pragma: no cover
    from .neurons import NeuronLayer

#: The reference's pruning threshold (prune every neuron whose mask is at most this).
REFERENCE_THRESHOLD = 0.2


class _ByMode(type):
    """``PruneSpec(mode, value)`` builds the variant of that mode (``PruneSpec()`` is automatic)."""

    def __call__(cls, *args, **kwargs):
        if cls is not PruneSpec:
            return super().__call__(*args, **kwargs)
        mode = args[0] if args else kwargs.pop("mode", "auto")
        value = args[1] if len(args) > 1 else kwargs.pop("value", None)
        variant = _VARIANTS.get(mode) if isinstance(mode, str) else None
        if variant is None:
            raise SettingsError(f"pruning mode must be one of {', '.join(PRUNE_MODES)}, not {mode!r}")
        return variant() if value is None else variant(value)


class PruneSpec(metaclass=_ByMode):
    """How much to prune: :meth:`auto`, :meth:`threshold`, :meth:`count` or :meth:`fraction`.

    ``mode`` names the variant and ``value`` is its parameter. ``auto`` prunes, in mask order, as
    decided on held-out clean data by the pruning curve (``value`` is the accuracy budget without a
    backdoor signal, default 2 points; see :mod:`anp_onnx.curve`); ``threshold`` 0.2 is the
    reference's choice.
    """

    mode: ClassVar[str] = ""
    value: float

    @classmethod
    def auto(cls, max_drop: float = DEFAULT_MAX_DROP) -> "AutoPrune":
        return AutoPrune(float(max_drop))

    @classmethod
    def threshold(cls, t: float) -> "ThresholdPrune":
        return ThresholdPrune(float(t))

    @classmethod
    def count(cls, k: int) -> "CountPrune":
        return CountPrune(k)

    @classmethod
    def fraction(cls, f: float) -> "FractionPrune":
        return FractionPrune(float(f))

    def describe(self) -> str:
        raise NotImplementedError

    def choose(self, ranked: Sequence["RankedNeuron"]) -> list["RankedNeuron"]:
        """The neurons of ``ranked`` (lowest mask first) this spec prunes."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"mode": self.mode, "value": self.value}


def _in_unit(value: float, what: str) -> None:
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise SettingsError(f"{what} must be in [0, 1]")


@dataclass(frozen=True)
class AutoPrune(PruneSpec):
    """The automatic choice from the pruning curve; ``value``: accuracy budget without a signal."""

    mode: ClassVar[str] = "auto"
    value: float = DEFAULT_MAX_DROP

    def __post_init__(self) -> None:
        _in_unit(self.value, "the accuracy budget of automatic pruning")

    def describe(self) -> str:
        return f"automatic choice from clean data; accuracy budget {100 * self.value:g} points without a backdoor signal"

    def choose(self, ranked: Sequence["RankedNeuron"]) -> list["RankedNeuron"]:
        raise SettingsError("automatic pruning needs held-out clean data: use a pruning curve "
                            "(Repairer.pruning_curve) or give a threshold, count or fraction")


@dataclass(frozen=True)
class ThresholdPrune(PruneSpec):
    """Every neuron whose mask is at most ``value``."""

    mode: ClassVar[str] = "threshold"
    value: float = REFERENCE_THRESHOLD

    def __post_init__(self) -> None:
        _in_unit(self.value, "pruning threshold")

    def describe(self) -> str:
        return f"mask <= {self.value:g}"

    def choose(self, ranked: Sequence["RankedNeuron"]) -> list["RankedNeuron"]:
        # masks are float32: compare in float32 so that a mask of exactly 0.2 is pruned at t = 0.2
        t = np.float32(self.value)
        return [n for n in ranked if np.float32(n.mask) <= t]


def _first(ranked: Sequence["RankedNeuron"], k: int) -> list["RankedNeuron"]:
    if k > len(ranked):
        raise SettingsError(f"cannot prune {k} neurons: the model has {len(ranked)}")
    return list(ranked[:k])


@dataclass(frozen=True)
class CountPrune(PruneSpec):
    """The ``value`` lowest masks."""

    mode: ClassVar[str] = "count"
    value: float = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value >= 0) or self.value != int(self.value):
            raise SettingsError("pruning count must be a whole number >= 0")

    def describe(self) -> str:
        return f"{int(self.value)} lowest masks"

    def choose(self, ranked: Sequence["RankedNeuron"]) -> list["RankedNeuron"]:
        return _first(ranked, int(self.value))


@dataclass(frozen=True)
class FractionPrune(PruneSpec):
    """The lowest ``value`` fraction of all neurons."""

    mode: ClassVar[str] = "fraction"
    value: float = 0.0

    def __post_init__(self) -> None:
        _in_unit(self.value, "pruning fraction")

    def describe(self) -> str:
        return f"lowest {self.value:.1%} of neurons"

    def choose(self, ranked: Sequence["RankedNeuron"]) -> list["RankedNeuron"]:
        return _first(ranked, int(math.floor(self.value * len(ranked) + 1e-9)))


_VARIANTS: dict[str, type[PruneSpec]] = {v.mode: v for v in (AutoPrune, ThresholdPrune, CountPrune, FractionPrune)}
PRUNE_MODES = tuple(_VARIANTS)


@dataclass(frozen=True)
class RankedNeuron:
    """One neuron in pruning order: its layer, channel index and mask."""

    layer: str
    index: int
    mask: float


@dataclass(frozen=True)
class PrunePlan:
    """Neurons to prune, as layer name -> sorted channel indices."""

    pruned: Mapping[str, np.ndarray]
    spec: PruneSpec
    total: int
    asked: Optional[PruneSpec] = None  # the automatic choice ``spec`` stands for until the refinements ran

    @property
    def count(self) -> int:
        return int(sum(len(v) for v in self.pruned.values()))

    def per_layer(self) -> dict[str, int]:
        return {name: int(len(idx)) for name, idx in self.pruned.items()}

    def describe(self) -> str:
        """The spec in words, and the automatic choice it stands for when that pruned nothing (see ``asked``)."""
        if self.asked is not None and self.asked != self.spec:
            return f"{self.asked.describe()}: nothing pruned, the refinements repair the weights instead"
        return self.spec.describe()

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(), "count": self.count, "total": self.total,
            "neurons": {name: [int(i) for i in idx] for name, idx in self.pruned.items() if len(idx)},
        }


def rank_neurons(masks: Mapping[str, np.ndarray],
                 tiebreak: Optional[Mapping[str, np.ndarray]] = None) -> list[RankedNeuron]:
    """All neurons, lowest mask first.

    Among equal masks the lower ``tiebreak`` value goes first (anp-onnx passes each mask's mean over
    the optimisation: the mask that fell earlier ranks lower); remaining ties keep layer order, then
    channel order.
    """
    names = list(masks)
    final = np.concatenate([np.asarray(masks[n], dtype=np.float64).ravel() for n in names]) if names else np.zeros(0)
    if tiebreak is not None and all(n in tiebreak for n in names):
        second = np.concatenate([np.asarray(tiebreak[n], dtype=np.float64).ravel() for n in names])
    else:
        second = np.zeros_like(final)
    order = np.lexsort((np.arange(final.size), second, final))
    flat = [(n, i) for n in names for i in range(len(masks[n]))]
    return [RankedNeuron(flat[j][0], flat[j][1], float(final[j])) for j in order]


def plan_pruning(masks: Mapping[str, np.ndarray], spec: PruneSpec,
                 tiebreak: Optional[Mapping[str, np.ndarray]] = None) -> PrunePlan:
    """The neurons that ``spec`` prunes given ``masks`` (ranked with ``tiebreak``, see rank_neurons)."""
    return plan_from_neurons(masks, spec.choose(rank_neurons(masks, tiebreak)), spec)


def plan_from_neurons(masks: Mapping[str, np.ndarray], chosen: Iterable[RankedNeuron], spec: PruneSpec) -> PrunePlan:
    pruned: dict[str, list[int]] = {name: [] for name in masks}
    for n in chosen:
        pruned[n.layer].append(n.index)
    total = int(sum(len(v) for v in masks.values()))
    return PrunePlan({k: np.array(sorted(v), dtype=np.int64) for k, v in pruned.items()}, spec, total)


def match_masks(masks: Mapping[str, np.ndarray], layers: Sequence["NeuronLayer"]) -> dict[str, np.ndarray]:
    """Check saved masks fit the model's layers (names and sizes); return them in layer order."""
    by_name = {layer.name: layer for layer in layers}
    unknown = [name for name in masks if name not in by_name]
    if unknown:
        raise DataError(f"the masks name layers this model does not have: {', '.join(unknown[:5])}")
    out = {}
    for layer in layers:
        if layer.name not in masks:
            continue
        try:
            values = np.asarray(masks[layer.name], dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"masks for {layer.name} are not numbers") from None
        if values.shape != (layer.size,):
            raise DataError(f"masks for {layer.name} have {values.size} values, the layer has {layer.size} neurons")
        if not np.all(np.isfinite(values)):
            raise DataError(f"masks for {layer.name} contain NaN or infinite values")
        out[layer.name] = values
    if not out:
        raise DataError("the masks match no layer of this model")
    return out
