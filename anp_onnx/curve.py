"""How much to prune, decided from clean data only: the pruning curve and the automatic choice.

Neurons are pruned in mask order (lowest first; among equal masks, the one whose mask was lower on
average during the optimisation goes first, i.e. the one that fell earlier). The *pruning curve* is
clean accuracy, measured on held-out clean images, against the number of neurons pruned; the
*automatic choice* prunes in that order until the accuracy drop first exceeds a budget (default
2 points), and stops just before. A triggered set, when given, adds ASR to the curve for display; it never takes part in
the choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import SettingsError
from .progress import CancelToken, ProgressCallback, ProgressEvent, check, emit
from .prune import PruneSpec, RankedNeuron

DEFAULT_MAX_DROP = 0.02
DEFAULT_MAX_FRACTION = 0.5
GRID_POINTS = 48


@dataclass(frozen=True)
class CurvePoint:
    """Clean accuracy (and ASR when measured) with the ``count`` lowest-ranked neurons pruned."""

    count: int
    threshold: float
    accuracy: float
    asr: Optional[float] = None


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
            "points": [asdict(p) for p in self.points],
        }


Evaluator = Callable[[Sequence[RankedNeuron]], tuple[float, Optional[float]]]


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
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> PruningCurve:
    """Sweep pruning counts in ``ranking`` order with ``evaluate`` and choose automatically.

    The sweep runs on a grid up to ``max_fraction`` of the neurons, stops early once accuracy has
    fallen far below the budget, then measures every count between the last grid point within the
    budget and the next one, so the choice is exact to one neuron.
    """
    if not 0 <= max_drop <= 1:
        raise SettingsError("the accuracy budget (max drop) must be in [0, 1]")
    if not 0 < max_fraction <= 1:
        raise SettingsError("max_fraction must be in (0, 1]")
    total = len(ranking)
    measured: dict[int, CurvePoint] = {}

    def point(k: int) -> CurvePoint:
        if k not in measured:
            check(cancel)
            acc, asr = evaluate(ranking[:k])
            measured[k] = CurvePoint(k, ranking[k - 1].mask if k else 0.0, acc, asr)
        return measured[k]

    grid = grid_counts(int(np.floor(max_fraction * total)))
    baseline = point(0).accuracy
    floor_ok = baseline - max_drop
    far = baseline - max(3 * max_drop, 0.10)
    below = 0
    for step, k in enumerate(grid, start=1):
        p = point(k)
        emit(progress, ProgressEvent("sweep", step, len(grid), metrics={"count": k, "accuracy": p.accuracy}))
        below = below + 1 if p.accuracy < far else 0
        if below >= 3:
            break
    best = _first_crossing(measured, floor_ok)
    after = [k for k in sorted(measured) if k > best]
    if after and after[0] - best > 1:
        for k in range(best + 1, after[0]):
            point(k)
        best = _first_crossing(measured, floor_ok)
    points = [measured[k] for k in sorted(measured)]
    rule = (f"pruning in mask order until clean accuracy on {n_images} held-out images first falls more than "
            f"{100 * max_drop:g} points below the unpruned model's")
    return PruningCurve(points, baseline, measured[best], max_drop, n_images, total, rule, list(ranking))
