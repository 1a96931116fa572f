"""How much to prune, decided from clean data only: the pruning curve and the automatic choice.

Neurons are pruned in mask order (lowest first; among equal masks, the one whose mask was lower on
average during the optimisation goes first, i.e. the one that fell earlier). The *pruning curve* is
clean accuracy, measured on held-out clean images, against the number of neurons pruned, and, when
the collapse probe named a suspected target (:mod:`anp_onnx.collapse`), the fraction of probed
clean images that a neuron perturbation aimed at that target sends there: the *backdoor signal*.

The *automatic choice*:

* with a suspected target, the fewest neurons whose pruning makes the backdoor signal go (at most
  :data:`GONE_FRACTION` of the unpruned model's, at two grid points in a row), provided
  held-out accuracy stays within ``signal_max_drop`` (default 10 points) of the unpruned model's;
* otherwise (no suspected target, or the signal does not go within that cost), prune until the
  held-out accuracy drop first exceeds ``max_drop`` (default 2 points), and stop just before.

A triggered set, when given, adds ASR to the curve for display; it never takes part in the choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import SettingsError
from .options import DEFAULT_MAX_DROP, DEFAULT_MAX_FRACTION, DEFAULT_SIGNAL_MAX_DROP
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check, emit
from .prune import AutoPrune, PruneSpec, RankedNeuron

__all__ = ["CurvePoint", "PruningCurve", "compute_curve", "effective_pruning", "pruning_after_refinements",
           "grid_counts", "GONE_FRACTION",
           "DEFAULT_MAX_DROP", "DEFAULT_SIGNAL_MAX_DROP", "DEFAULT_MAX_FRACTION"]

GRID_POINTS = 48
#: After pruning, the backdoor signal (the fraction of probed clean images of other classes that a
#: neuron perturbation aimed at the suspected target sends there) counts as gone when it is at most
#: this fraction of the unpruned model's. Measured on the sample models: the signal falls before the
#: attack success rate does, and 1% was the level at which ASR had fallen too (see benchmarks/).
GONE_FRACTION = 0.01


@dataclass(frozen=True)
class CurvePoint:
    """Clean accuracy (and ASR when measured) with the ``count`` lowest-ranked neurons pruned.

    ``signal`` is the fraction of probed clean images the collapse probe sent to the suspected
    target (the backdoor signal), when it was measured at this point.
    """

    count: int
    threshold: float
    accuracy: float
    asr: Optional[float] = None
    signal: Optional[float] = None


@dataclass
class PruningCurve:
    """The pruning curve, the automatic choice on it, and how it was made."""

    points: list[CurvePoint]
    baseline: float
    chosen: CurvePoint
    max_drop: float
    n_images: int
    total: int
    rule: str = ""
    ranking: list[RankedNeuron] = field(default_factory=list, repr=False)
    suspected_target: Optional[int] = None
    signal_gone: Optional[bool] = None

    def spec(self) -> PruneSpec:
        """The automatic choice as a count."""
        return PruneSpec.count(self.chosen.count)

    def at(self, count: int) -> CurvePoint:
        """The measured point nearest to ``count``."""
        return min(self.points, key=lambda p: abs(p.count - count))

    def to_dict(self) -> dict:
        return {
            "baseline_accuracy": self.baseline, "max_drop": self.max_drop, "n_images": self.n_images,
            "total_neurons": self.total, "rule": self.rule, "chosen": asdict(self.chosen),
            "suspected_target": self.suspected_target, "signal_gone": self.signal_gone,
            "points": [asdict(p) for p in self.points],
        }


def effective_pruning(pruning: PruneSpec, refinements: Sequence[str]) -> PruneSpec:
    """What is pruned before the ``refinements`` run: ``pruning`` itself, except that an automatic
    choice prunes nothing when refinements follow it.

    Why: on the development bench (benchmarks/README.md, "Unlearning"), the unlearning of the unpruned
    model kept more accuracy than pruning first, on every model where both were measured. Where no
    backdoor signal went, the budget fallback's pruning removed no third-party backdoor and spent the
    accuracy the unlearning needs; where the signal went (the sample PreAct, kabu's BN-kept CNN), the
    signal rule's pruning cost 5-9 points, unlearning alone 2.5 on the BadNets PreAct (ASR 3.2%). A count
    or threshold asked for is kept. Every path that plans for a repair comes here
    (:func:`anp_onnx.repair`, ``Repairer.plan`` and ``Repairer.finish`` with refinements, and so the CLI
    and the desktop app): they all prune the same.
    """
    if refinements and isinstance(pruning, AutoPrune):
        return PruneSpec.count(0)
    return pruning


def pruning_after_refinements(pruning: PruneSpec, curve: Optional[PruningCurve], refinements: Sequence[str],
                              changed: bool) -> PruneSpec:
    """What is pruned once the ``refinements`` ran (``changed``: they changed weights): what
    :func:`effective_pruning` said, except that when they changed nothing and the ``curve``'s backdoor
    signal went, the automatic choice prunes as without them (the signal rule): on the SIG sample
    the unlearning kept no round (73.2% / ASR 99.1% unpruned) where the signal rule's 39 neurons
    removed the backdoor (63.9% / 0.0%; benchmarks/README.md).
    """
    if refinements and not changed and isinstance(pruning, AutoPrune) and curve is not None and curve.signal_gone:
        return pruning
    return effective_pruning(pruning, refinements)


#: evaluate(pruned neurons, measure_signal, above) -> (clean accuracy, ASR or None, backdoor signal or None).
#: ``above``: the signal's exact value matters only up to this level; above it, any value above it
#: will do (the measurement may stop early). None: measure it exactly.
Evaluator = Callable[[Sequence[RankedNeuron], bool, Optional[float]],
                     tuple[float, Optional[float], Optional[float]]]


def _first_crossing(measured: dict[int, CurvePoint], floor: float) -> int:
    """The last count before accuracy first falls below ``floor`` (counts in increasing order).

    Stopping at the first crossing, rather than taking the largest count anywhere above the floor,
    keeps a noisy accuracy estimate from picking a lucky point far down the curve.
    """
    best = 0
    for k in sorted(measured):
        if measured[k].accuracy < floor:
            break
        best = k
    return best


def grid_counts(max_count: int, points: int = GRID_POINTS) -> list[int]:
    """Counts 0..max_count: every count when few, else ``points`` evenly spread."""
    if max_count <= points:
        return list(range(max_count + 1))
    return sorted(set(int(round(v)) for v in np.linspace(0, max_count, points + 1)))


def compute_curve(
    ranking: Sequence[RankedNeuron],
    evaluate: Evaluator,
    *,
    n_images: int,
    max_drop: float = DEFAULT_MAX_DROP,
    max_fraction: float = DEFAULT_MAX_FRACTION,
    suspected_target: Optional[int] = None,
    signal_max_drop: float = DEFAULT_SIGNAL_MAX_DROP,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> PruningCurve:
    """Sweep pruning counts in ``ranking`` order with ``evaluate`` and choose automatically.

    The sweep runs on a grid up to ``max_fraction`` of the neurons and stops early once accuracy has
    fallen far below what either rule accepts. The backdoor signal is measured (when there is a
    ``suspected_target``) until it has gone; then every count between the last grid point before
    the choice and the next one is measured, so the choice is exact to one neuron. Accuracy is
    measured first at each point; the signal only where the point could be chosen (accuracy within
    the signal's cap) or is the next grid point of a candidate, and beyond the gone level only as
    far as it takes to know it is above it (the evaluator may stop early).
    """
    if not 0 <= max_drop <= 1 or not 0 <= signal_max_drop <= 1:
        raise SettingsError("the accuracy budget (max drop) must be in [0, 1]")
    if not 0 < max_fraction <= 1:
        raise SettingsError("max_fraction must be in (0, 1]")
    total = len(ranking)
    measured: dict[int, CurvePoint] = {}
    with_signal = suspected_target is not None

    gone_level: Optional[float] = None  # the signal's exact value matters only up to it (None: exactly)

    def point(k: int, signal: bool = False) -> CurvePoint:
        if k not in measured:
            check(cancel)
            acc, asr, _ = evaluate(ranking[:k], False, None)
            measured[k] = CurvePoint(k, ranking[k - 1].mask if k else 0.0, acc, asr)
        if signal and measured[k].signal is None:
            check(cancel)
            measured[k] = replace(measured[k], signal=evaluate(ranking[:k], True, gone_level)[2])
        return measured[k]

    grid = grid_counts(int(np.floor(max_fraction * total)))
    baseline = point(0, with_signal).accuracy
    gone_level = GONE_FRACTION * (measured[0].signal or 0.0) if with_signal else 0.0
    floor_ok = baseline - max_drop
    floor_signal = baseline - signal_max_drop
    far = baseline - max(3 * max_drop, 0.10, signal_max_drop + 0.05 if with_signal else 0.0)
    below = 0
    gone_at: Optional[int] = None
    for step, k in enumerate(grid, start=1):
        p = point(k)
        # a point below the accuracy cap cannot be chosen: its signal is measured only if asked as "next"
        measure = with_signal and gone_at is None and p.accuracy >= floor_signal
        p = point(k, measure)
        emit(progress, ProgressEvent(Stage.SWEEP, step, len(grid), metrics={"count": k, "accuracy": p.accuracy}))
        if measure and p.signal is not None and p.signal <= gone_level and p.accuracy >= floor_signal:
            nxt = grid[step] if step < len(grid) else None
            if nxt is None or point(nxt, True).signal <= gone_level:
                gone_at = k
        below = below + 1 if p.accuracy < far else 0
        if below >= 3:
            break
    if gone_at is not None:
        earlier = [g for g in grid if g < gone_at]
        for k in range(earlier[-1] + 1 if earlier else 0, gone_at):
            if point(k).accuracy >= floor_signal and point(k, True).signal <= gone_level:
                gone_at = k
                break
        best = gone_at
        rule = (f"the fewest neurons, in mask order, whose pruning removes the backdoor signal (neuron noise "
                f"aimed at suspected target {suspected_target} sends at most {GONE_FRACTION:.0%} as many clean "
                f"images there as before), with clean accuracy on {n_images} held-out images within "
                f"{100 * signal_max_drop:g} points")
    else:
        best = _first_crossing(measured, floor_ok)
        after = [k for k in sorted(measured) if k > best]
        if after and after[0] - best > 1:
            for k in range(best + 1, after[0]):
                point(k)
            best = _first_crossing(measured, floor_ok)
        rule = (f"pruning in mask order until clean accuracy on {n_images} held-out images first falls more "
                f"than {100 * max_drop:g} points below the unpruned model's")
        if with_signal:
            rule += (f" (the backdoor signal of suspected target {suspected_target} did not go within "
                     f"{100 * signal_max_drop:g} points of accuracy)")
    points = [measured[k] for k in sorted(measured)]
    return PruningCurve(points, baseline, measured[best], max_drop, n_images, total, rule, list(ranking),
                        suspected_target, (gone_at is not None) if with_signal else None)
