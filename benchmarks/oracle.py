"""The oracle frontier of a mask ranking: the best TEST clean accuracy at which test ASR <= 5%.

A diagnostic of the development bench (benchmarks/quality.py), never a decision: it uses the
triggered TEST set, which no repair may see. Neurons are pruned in mask order (lowest first,
``anp_onnx.rank_neurons`` with the mean masks as tie-break, the order the repair prunes in), up to
half of them; the frontier says whether the ranking could have removed the backdoor at all (the
ranking fails when it is "never") and at what cost, so a row whose repair missed it while the
oracle found a cheap point is a failure of the choice, not of the ranking.

:func:`frontier` (pure) picks the best point of measured ``count -> (accuracy, asr)``;
:func:`search` decides where to measure (a grid, bisection where ASR crosses the level);
:class:`TorchPrefixes` measures a prefix of the ranking on the torch model with the repair's masks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

import numpy as np

MAX_ASR = 0.05
MAX_FRACTION = 0.5
GRID_POINTS = 24


@dataclass(frozen=True)
class Frontier:
    """The best point (``count`` None: no point with ASR <= ``max_asr`` up to ``max_count``)."""

    count: Optional[int]
    accuracy: Optional[float]
    asr: Optional[float]
    max_count: int
    max_asr: float = MAX_ASR

    def describe(self) -> str:
        if self.count is None:
            return f"never (<= {self.max_count} pruned)"
        return f"{100 * self.accuracy:.1f}% at {self.count}"

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.describe()}


def frontier(points: Mapping[int, tuple[Optional[float], Optional[float]]], max_count: int,
             max_asr: float = MAX_ASR) -> Frontier:
    """The highest accuracy among ``points`` (count -> (accuracy, ASR)) with ASR <= ``max_asr`` and
    count <= ``max_count``; among equal accuracies, the fewest neurons. Points without a measured
    accuracy or ASR do not count."""
    best = None
    for k in sorted(points):
        acc, asr = points[k]
        if k > max_count or acc is None or asr is None or asr > max_asr:
            continue
        if best is None or acc > best[1]:
            best = (k, acc, asr)
    if best is None:
        return Frontier(None, None, None, max_count, max_asr)
    return Frontier(best[0], best[1], best[2], max_count, max_asr)


def grid(max_count: int, points: int = GRID_POINTS) -> list[int]:
    """Counts 0..max_count: all when few, else ``points`` + 1 evenly spread."""
    if max_count <= points:
        return list(range(max_count + 1))
    return sorted({int(round(v)) for v in np.linspace(0, max_count, points + 1)})


def search(asr_at: Callable[[int], float], acc_at: Callable[[int], float], total: int, *,
           max_asr: float = MAX_ASR, max_fraction: float = MAX_FRACTION, points: int = GRID_POINTS,
           floor: Optional[float] = None) -> tuple[Frontier, dict[int, tuple[Optional[float], float]]]:
    """Measure ASR on a grid of counts up to ``max_fraction`` of ``total``, and the accuracy where
    ASR <= ``max_asr``; where ASR crosses ``max_asr`` between two grid points, bisect to the first
    count at or below it. The grid stops early once the accuracy is at most ``floor`` (e.g. chance)
    at two measured grid points in a row. Returns the frontier and every measured point."""
    max_count = int(np.floor(max_fraction * total))
    asr: dict[int, float] = {}
    acc: dict[int, float] = {}

    def a(k: int) -> float:
        if k not in asr:
            asr[k] = asr_at(k)
        if asr[k] <= max_asr and k not in acc:
            acc[k] = acc_at(k)
        return asr[k]

    counts, low = [], 0
    for k in grid(max_count, points):
        counts.append(k)
        a(k)
        low = low + 1 if floor is not None and k in acc and acc[k] <= floor else 0
        if low >= 2:
            break
    for lo, hi in zip(counts, counts[1:]):
        if a(lo) > max_asr >= a(hi):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if a(mid) <= max_asr else (mid, hi)
    measured = {k: (acc.get(k), v) for k, v in sorted(asr.items())}
    return frontier(measured, max_count, max_asr), measured


def attack_success(pred: np.ndarray, labels: np.ndarray, target: Optional[int], mode: str,
                   num_classes: int) -> float:
    """ASR: all-to-one, the share of images not of ``target`` predicted as it; all-to-all, the
    share predicted as label + 1 (mod classes)."""
    if mode == "all-to-all":
        return float((pred == (labels + 1) % num_classes).mean())
    keep = labels != target
    return float((pred[keep] == target).mean()) if keep.any() else float("nan")


class TorchPrefixes:
    """Accuracy / ASR with the first k neurons of ``ranking`` pruned, in the Repairer's torch model
    (masks 0 there, the layers' centres as the repair set them), on ``device``."""

    def __init__(self, rep, masks: Mapping[str, np.ndarray], ranking, test, triggered, target: Optional[int],
                 mode: str, device: str = "cpu") -> None:
        self.rep, self.masks, self.ranking, self.device = rep, masks, ranking, device
        self.test, self.triggered, self.target, self.mode = test, triggered, target, mode
        self.num_classes = rep.model.num_classes

    def predict(self, k: int, images: np.ndarray) -> np.ndarray:
        from anp_onnx.convert import torch_logits
        from anp_onnx.prune import PruneSpec, plan_from_neurons

        plan = plan_from_neurons(self.masks, self.ranking[:k], PruneSpec.count(k))
        with self.rep.ctx.on_device(self.device), self.rep.ctx.pruned(plan) as net:
            return torch_logits(net, images, self.device).argmax(1)

    def accuracy(self, k: int) -> float:
        return float((self.predict(k, self.test.x) == self.test.y).mean())

    def asr(self, k: int) -> float:
        pred = self.predict(k, self.triggered.x)
        return attack_success(pred, self.triggered.y, self.target, self.mode, self.num_classes)
