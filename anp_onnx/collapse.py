"""A backdoor signal from clean data alone: where clean images go under adversarial neuron noise.

ANP's own observation (Wu & Wang 2021, Sec. 3) is that a backdoored network *collapses* towards its
target class when its neurons are perturbed slightly: the errors an adversarial neuron perturbation
causes on clean images mostly land in one class. This module measures that, with nothing but clean
images:

* :func:`probe_collapse` applies one signed-gradient step of relative neuron noise (size ``eps``,
  the same perturbation as ANP's, from zero) that raises the cross-entropy on clean images, with
  normalisation layers using the batch's statistics as during ANP, and counts which class each
  image that became wrong is now predicted as;
* :func:`find_target` runs it at ``PROBE_EPS`` (twice that when too few images went wrong);
* :class:`CollapseProbe` says which class took the largest *share* of those errors and whether that
  share is strong enough to name a *suspected target*.

Measured on the sample models (benchmarks/probe_clean_model.py): the suspected target is the
attack's target on the three PreAct models with BatchNorm (error shares 0.57-0.76) and on the
BN-folded one with renormalised neurons (0.62); the I-BAU VGGs are not clear enough to name one, and
the same PreAct trained without poison names none, BN kept or folded (top shares 0.18-0.19).
With plain conv neurons nothing renormalises the perturbed activations and the errors go to a class
that is not the target, so the probe is only trusted when every neuron layer normalises (BatchNorm,
InstanceNorm, GroupNorm, LayerNorm) or is renormalised (``PerturbedModule.renormalise``); elsewhere
anp-onnx falls back to the reference behaviour.

The suspected target is used twice (see anp.py and curve.py): ANP's noise step can push towards it
(targeted perturbation), and after pruning :func:`probe_pull` measures the *backdoor signal*, the
fraction of probed clean images of other classes that one noise step aimed at the suspected target
sends there; it counts as gone at 1% of the unpruned model's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet
from .neurons import PerturbedModule
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check, emit

#: Relative neuron noise of the probe (half the reference ANP eps: strong enough to make a backdoored
#: network collapse, weak enough to leave most clean images correct).
PROBE_EPS = 0.2
#: A class is the suspected target when it takes at least this share of the perturbation's errors ...
MIN_SHARE = 0.3
#: ... and at least this many times the share of the runner-up.
MIN_RATIO = 2.0
#: A pull weaker than this on the unpruned model says too little: the signal is measured at twice
#: the noise instead.
MIN_PULL = 0.1
PROBE_IMAGES = 256
#: Probe batches (random images, random starting noise) whose errors are pooled.
PROBE_REPEATS = 4
#: Fewer errors than this say too little about where they go: the probe retries with twice the noise.
MIN_ERRORS = 10


@dataclass(frozen=True)
class CollapseProbe:
    """Where the errors of an adversarial neuron perturbation on clean images went, by class."""

    eps: float
    counts: tuple[int, ...]
    images: int

    @property
    def errors(self) -> int:
        return int(sum(self.counts))

    def share(self, cls: int) -> float:
        """Share of the errors predicted as ``cls`` (0 when there were no errors)."""
        return self.counts[cls] / self.errors if self.errors else 0.0

    @property
    def top(self) -> int:
        return int(np.argmax(self.counts))

    @property
    def ratio(self) -> float:
        """Top share over the runner-up's (inf when only one class got errors)."""
        ordered = sorted(self.counts, reverse=True)
        return float("inf") if len(ordered) < 2 or ordered[1] == 0 else ordered[0] / ordered[1]

    @property
    def suspected_target(self) -> Optional[int]:
        """The class the network collapses to, when the collapse is clear enough to name it."""
        if self.errors < MIN_ERRORS:
            return None
        if self.share(self.top) >= MIN_SHARE and self.ratio >= MIN_RATIO:
            return self.top
        return None

    def describe(self) -> str:
        if not self.errors:
            return f"no probed clean image became wrong under neuron noise {self.eps:g}"
        head = (f"{self.errors} of {self.images} probed clean images became wrong under neuron noise "
                f"{self.eps:g}; class {self.top} took {self.share(self.top):.0%} of them")
        t = self.suspected_target
        if t is not None:
            return head + f": suspected backdoor target {t}"
        return head + (": too few errors to name a target" if self.errors < MIN_ERRORS
                       else ": no single class dominates")

    def to_dict(self) -> dict:
        return {"eps": self.eps, "images": self.images, "errors": self.errors, "counts": list(self.counts),
                "top": self.top, "top_share": self.share(self.top), "suspected_target": self.suspected_target}


def probe_supported(modules: Iterable[PerturbedModule]) -> bool:
    """Whether the probe can be trusted for these neurons: all of them renormalise their input."""
    modules = list(modules)
    return bool(modules) and all(m.normalises or m.renormalised for m in modules)


def find_target(net: nn.Module, modules: Iterable[PerturbedModule], data: ImageSet, *,
                device: str = "cpu", progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> CollapseProbe:
    """The collapse probe at :data:`PROBE_EPS`, retried at twice that when too few images went wrong.

    Reports a :data:`Stage.PROBE` event per probe batch (a retry continues the count: batches 5 to 8
    of 8) and stops at the next check of ``cancel`` (between the passes of each batch).
    """
    modules = list(modules)
    probe = probe_collapse(net, modules, data, device=device, progress=progress, cancel=cancel)
    if probe.errors < MIN_ERRORS:
        def renumbered(event: ProgressEvent) -> None:
            emit(progress, ProgressEvent(event.stage, event.step + PROBE_REPEATS, 2 * PROBE_REPEATS,
                                         event.metrics, event.payload, event.message))

        probe = probe_collapse(net, modules, data, eps=2 * PROBE_EPS, device=device,
                               progress=renumbered if progress is not None else None, cancel=cancel)
    return probe


@contextmanager
def _probing(net: nn.Module, modules: list[PerturbedModule], device: str):
    """Noise on, batch statistics on, masks frozen; afterwards zero noise and each switch as it was."""
    saved = [(m.neuron_mask.requires_grad, m.batch_stats, m.perturbed) for m in modules]
    net.to(device).eval()
    try:
        for m in modules:
            m.neuron_mask.requires_grad_(False)
            m.batch_stats = True
            m.perturbed = True
        yield [p for m in modules for p in (m.neuron_noise, m.neuron_noise_bias)]
    finally:
        for m, (req, batch_stats, perturbed) in zip(modules, saved):
            m.perturbed = perturbed
            m.batch_stats = batch_stats
            m.reset_noise(0.0)
            m.neuron_mask.requires_grad_(req)


def _noise_step(net: nn.Module, modules: list[PerturbedModule], params: list[torch.Tensor], x: torch.Tensor,
                labels: torch.Tensor, eps: float, towards: bool,
                cancel: Optional[CancelToken] = None) -> tuple[torch.Tensor, int]:
    """From zero noise, one signed step of size ``eps`` that raises the cross-entropy on ``labels``
    (or, ``towards``, lowers it); returns the predictions under that noise. ``cancel`` is checked
    before each of its three passes (forward, backward, forward), a second or so apart on a CPU."""
    for m in modules:
        m.reset_noise(0.0)
    check(cancel)
    loss = F.cross_entropy(net(x), labels)
    check(cancel)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    check(cancel)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.add_(g.sign(), alpha=-eps if towards else eps)
        out = net(x)
    return out.argmax(1), int(out.shape[1])


def _picks(data: ImageSet, max_images: int, repeats: int, seed: int) -> list[np.ndarray]:
    """``repeats`` seeded random choices of up to ``max_images`` of ``data`` (class-sorted data mixes)."""
    n = min(len(data), max_images)
    rng = np.random.default_rng(seed)
    return [np.sort(rng.permutation(len(data))[:n]) for _ in range(repeats)]


def _batches(data: ImageSet, picks: list[np.ndarray], device: str):
    for pick in picks:
        yield (torch.from_numpy(np.ascontiguousarray(data.x[pick], dtype=np.float32)).to(device),
               torch.from_numpy(data.y[pick].astype(np.int64)).to(device))


def probe_collapse(net: nn.Module, modules: Iterable[PerturbedModule], data: ImageSet, *,
                   eps: float = PROBE_EPS, device: str = "cpu", max_images: int = PROBE_IMAGES,
                   repeats: int = PROBE_REPEATS, seed: int = 0, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> CollapseProbe:
    """Count where clean images go under adversarial neuron noise of size ``eps``.

    ``repeats`` times: a batch of up to ``max_images`` of ``data`` (a seeded random choice, so
    class-sorted data is mixed), normalised with its own statistics as in ANP; from zero noise, one
    signed-gradient step of size ``eps`` that raises the cross-entropy (ANP's noise step; a random
    start made the errors scatter on the sample models); the predictions that became wrong are
    counted by class and pooled over the batches. The masks currently set in ``modules`` stay in
    place, so this also measures a pruned model; afterwards the noise is zero and each module's
    switches are as they were (also when ``cancel`` stops it). One :data:`Stage.PROBE` event per batch.
    """
    modules = list(modules)
    counts = None
    images = 0
    with _probing(net, modules, device) as params:
        for step, (x, y) in enumerate(_batches(data, _picks(data, max_images, repeats, seed), device), start=1):
            pred, classes = _noise_step(net, modules, params, x, y, eps, towards=False, cancel=cancel)
            wrong = np.bincount(pred[pred != y].cpu().numpy(), minlength=int(classes))
            counts = wrong if counts is None else counts + wrong
            images += len(y)
            emit(progress, ProgressEvent(Stage.PROBE, step, repeats, metrics={"errors": int(counts.sum())},
                                         message=f"neuron noise {eps:g}"))
    return CollapseProbe(float(eps), tuple(int(c) for c in counts), images)


def probe_pull(net: nn.Module, modules: Iterable[PerturbedModule], data: ImageSet, target: int, *,
               eps: float = PROBE_EPS, device: str = "cpu", max_images: int = PROBE_IMAGES,
               repeats: int = PROBE_REPEATS, seed: int = 0, stop_above: Optional[float] = None,
               cancel: Optional[CancelToken] = None) -> float:
    """Fraction of clean images (true class not ``target``) that one neuron-noise step of size ``eps``
    aimed at ``target`` sends there: the backdoor signal.

    Same batches, normalisation and restoring as :func:`probe_collapse`; the step lowers the
    cross-entropy towards ``target`` instead of raising it on the true labels. With ``stop_above``
    the batches stop as soon as the fraction over all of them is certain to exceed it (the hits so
    far already do); the fraction of the batches run is returned then, which exceeds it too.
    """
    modules = list(modules)
    picks = _picks(data, max_images, repeats, seed)
    all_others = sum(int((data.y[pick] != target).sum()) for pick in picks)
    hits = total = 0
    with _probing(net, modules, device) as params:
        for x, y in _batches(data, picks, device):
            pred, _ = _noise_step(net, modules, params, x, torch.full_like(y, target), eps, towards=True,
                                  cancel=cancel)
            others = y != target
            hits += int((pred[others] == target).sum())
            total += int(others.sum())
            if stop_above is not None and hits > stop_above * all_others:
                break
    return hits / total if total else 0.0
