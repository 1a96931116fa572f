"""Trigger reconstruction: the smallest patch that sends clean images to a class, and a scan of every class.

:func:`reconstruct_trigger` finds, for one class, the smallest patch (mask ``m`` in ``[0, 1]^(H x W)``,
pattern ``p`` in ``[0, 1]^(C x H x W)``, stamped ``(1 - m) * x + m * p``) that sends clean images of
other classes to it: gradient descent on the cross-entropy towards the class plus ``l1`` times the
mask's area (weight raised while the patch works, else lowered). :func:`scan_targets` runs it for
every class: a backdoor's target needs a far smaller patch than the others (Neural Cleanse, Wang et
al. S&P 2019; written for anp-onnx). On CPU :func:`reconstruct_each` runs the classes side by side,
one thread each, with exactly the patches one thread computes in turn. Used by the unlearning
refinement (:mod:`anp_onnx.unlearn`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .convert import torch_logits
from .data import ImageSet
from .errors import Cancelled
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check, emit


@dataclass
class Trigger:
    """A reconstructed patch: ``mask`` (1, 1, H, W) and ``pattern`` (1, C, H, W), both in [0, 1]."""

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    success: float  # share of the clean non-target images the patch sends to the target
    area: float  # sum of the mask

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.mask) * x + self.mask * self.pattern


def shuffled_batches(n: int, size: int, rng: np.random.Generator):
    """Indices 0..n-1 in an order drawn from ``rng``, in batches of ``size`` (the last may be shorter)."""
    order = rng.permutation(n)
    for s in range(0, n, size):
        yield order[s:s + size]


@contextmanager
def frozen_weights(net):
    """``net``'s parameters without gradients for the duration; their flags as they were afterwards."""
    params = list(net.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def reconstruct_trigger(net, images: ImageSet, target: int, *, steps: int = 300, batch_size: int = 64,
                        l1: float = 1e-2, lr: float = 0.1, device: str = "cpu", seed: int = 0,
                        cancel: Optional[CancelToken] = None) -> Trigger:
    """The smallest patch found that sends ``images`` of other classes to ``target`` (see the module doc)."""
    x_all = torch.from_numpy(images.x[images.y != target])
    if not len(x_all):
        x_all = torch.from_numpy(images.x)
    g = torch.Generator().manual_seed(seed)
    _, c, h, w = x_all.shape
    mask_logit = torch.full((1, 1, h, w), -3.0, device=device).add_(0.1 * torch.randn(1, 1, h, w, generator=g).to(device))
    pattern_logit = (0.1 * torch.randn(1, c, h, w, generator=g)).to(device)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
    weight, best = l1, None
    rng = np.random.default_rng(seed)
    goal = torch.full((batch_size,), target, dtype=torch.long, device=device)
    net.eval()
    step = 0
    with frozen_weights(net):
        while step < steps:
            for idx in shuffled_batches(len(x_all), batch_size, rng):
                check(cancel)
                x = x_all[idx].to(device)
                mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
                logits = net((1 - mask) * x + mask * pattern)
                hit = float((logits.argmax(1) == target).float().mean())
                loss = F.cross_entropy(logits, goal[:len(idx)]) + weight * mask.sum() / c
                opt.zero_grad()
                loss.backward()
                opt.step()
                area = float(mask.detach().sum())
                if hit >= 0.9 and (best is None or area < best[0]):
                    best = (area, mask.detach().clone(), pattern.detach().clone())
                weight = weight * 1.2 if hit >= 0.95 else max(weight / 1.2, l1 * 1e-2)
                step += 1
                if step >= steps:
                    break
    if best is None:
        mask, pattern = torch.sigmoid(mask_logit).detach(), torch.sigmoid(pattern_logit).detach()
        best = (float(mask.sum()), mask, pattern)
    trigger = Trigger(target, best[1], best[2], 0.0, best[0])
    with torch.inference_mode():
        hits = torch_logits(lambda x: net(trigger.stamp(x)), x_all.numpy(), device).argmax(1) == target
    trigger.success = float(hits.mean())
    return trigger


@dataclass(frozen=True)
class TargetScan:
    """Per class, the area of the smallest patch found that sends other classes' images there."""

    areas: tuple[float, ...]  # inf: no patch reached the success level
    success: tuple[float, ...]
    triggers: dict[int, Trigger] = field(default_factory=dict, compare=False, repr=False)  # the patches, per class

    @property
    def smallest(self) -> int:
        return int(np.argmin(self.areas))

    @property
    def anomaly(self) -> float:
        """Neural Cleanse's anomaly index of the smallest area: (median - min) / (1.4826 * MAD)."""
        a = np.asarray([v for v in self.areas if np.isfinite(v)], dtype=np.float64)
        if len(a) < 3:
            return 0.0
        med = np.median(a)
        mad = 1.4826 * np.median(np.abs(a - med))
        return float((med - a.min()) / mad) if mad > 0 else 0.0

    def to_dict(self) -> dict:
        return {"areas": [round(v, 2) if np.isfinite(v) else None for v in self.areas],
                "success": [round(v, 3) for v in self.success], "smallest": self.smallest,
                "anomaly": round(self.anomaly, 2)}


def side_by_side_workers(device: str, jobs: int) -> int:
    """How many reconstructions :func:`reconstruct_each` runs at once: on CPU one per intra-op thread
    torch has (at most ``jobs``), on other devices one."""
    if not str(device).startswith("cpu"):
        return 1
    return max(1, min(torch.get_num_threads(), jobs))


class _LinkedToken(CancelToken):
    """Cancelled when its parent is, or when :meth:`cancel` is called (a sibling job failed)."""

    def __init__(self, parent: Optional[CancelToken]) -> None:
        super().__init__()
        self._parent = parent

    def check(self) -> None:
        check(self._parent)
        super().check()


def reconstruct_each(net, images: ImageSet, classes: Sequence[int], *, workers: Optional[int] = None,
                     context: Callable[[], ContextManager] = nullcontext,
                     done: Optional[Callable[[int, int, int], None]] = None, cancel: Optional[CancelToken] = None,
                     device: str = "cpu", **kwargs) -> list[Trigger]:
    """:func:`reconstruct_trigger` for each class of ``classes`` (in that order), ``kwargs`` passed on.

    With more than one worker (default :func:`side_by_side_workers`) the classes run side by side, in
    threads of one intra-op thread each: a reconstruction is compute-bound at any batch size, and
    independent per class, so this uses the cores better than intra-op threads alone (the whole scan
    1.08x faster on the 2-core development CPU, benchmarks/README.md), and its patches are exactly
    those of one thread computing the classes in turn. ``context`` makes the context each reconstruction runs in (autocast
    is per thread); ``done(class, finished, total)`` is called as each class finishes.
    """
    classes = list(classes)
    workers = side_by_side_workers(device, len(classes)) if workers is None else max(1, min(workers, len(classes)))

    def one(c: int, token: Optional[CancelToken]) -> Trigger:
        with context():
            return reconstruct_trigger(net, images, c, device=device, cancel=token, **kwargs)

    if workers == 1:
        out = []
        for c in classes:
            out.append(one(c, cancel))
            if done is not None:
                done(c, len(out), len(classes))
        return out
    token, threads = _LinkedToken(cancel), torch.get_num_threads()
    torch.set_num_threads(1)  # read by each new thread when it starts computing
    try:
        with frozen_weights(net), ThreadPoolExecutor(workers) as pool:
            jobs = {pool.submit(one, c, token): c for c in classes}  # in the order of classes
            for finished, job in enumerate(as_completed(jobs), 1):
                if job.exception() is not None:
                    token.cancel()  # the others stop at their next step
                    break
                if done is not None:
                    done(jobs[job], finished, len(classes))
        errors = [j.exception() for j in jobs if j.exception() is not None]  # all done: the pool has shut down
        if errors:  # a job's own error before the Cancelled it caused in the others
            raise ([e for e in errors if not isinstance(e, Cancelled)] or errors)[0]
        return [j.result() for j in jobs]
    finally:
        torch.set_num_threads(threads)


def scan_targets(net, images: ImageSet, classes: Sequence[int], *, steps: int = 100, batch_size: int = 32,
                 device: str = "cpu", seed: int = 0, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, workers: Optional[int] = None) -> TargetScan:
    """A short :func:`reconstruct_trigger` per class of ``classes`` (side by side: :func:`reconstruct_each`);
    classes left out get area inf."""
    n = max(classes) + 1 if classes else 0
    areas, success = [float("inf")] * n, [0.0] * n

    def done(c: int, finished: int, total: int) -> None:
        emit(progress, ProgressEvent(Stage.REFINE, finished, total, {"scan_class": c}))

    triggers = reconstruct_each(net, images, classes, workers=workers, done=done, cancel=cancel, device=device,
                                steps=steps, batch_size=batch_size, seed=seed)
    for c, t in zip(classes, triggers):
        success[c] = t.success
        areas[c] = t.area if t.success >= 0.5 else float("inf")
    return TargetScan(tuple(areas), tuple(success), dict(zip(classes, triggers)))
