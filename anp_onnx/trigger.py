"""Trigger reconstruction: the smallest patch that sends clean images to a class, and a scan of every class.

:func:`reconstruct_trigger` finds, for one class, the smallest patch (mask ``m`` in ``[0, 1]^(H x W)``,
pattern ``p`` in ``[0, 1]^(C x H x W)``, stamped ``(1 - m) * x + m * p``) that sends clean images of
other classes to it: gradient descent on the cross-entropy towards the class plus ``l1`` times the
mask's area (weight raised while the patch works, else lowered). :func:`scan_targets` runs it for
every class: a backdoor's target needs a far smaller patch than the others (Neural Cleanse, Wang et
al. S&P 2019; written for anp-onnx). Used by the unlearning refinement (:mod:`anp_onnx.unlearn`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .convert import torch_logits
from .data import ImageSet
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


def scan_targets(net, images: ImageSet, classes: Sequence[int], *, steps: int = 100, batch_size: int = 32,
                 device: str = "cpu", seed: int = 0, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> TargetScan:
    """A short :func:`reconstruct_trigger` per class of ``classes``; classes left out get area inf."""
    n = max(classes) + 1 if classes else 0
    areas, success = [float("inf")] * n, [0.0] * n
    for i, c in enumerate(classes):
        emit(progress, ProgressEvent(Stage.REFINE, i + 1, len(classes), {"scan_class": c}))
        t = reconstruct_trigger(net, images, c, steps=steps, batch_size=batch_size, device=device, seed=seed,
                                cancel=cancel)
        success[c] = t.success
        areas[c] = t.area if t.success >= 0.5 else float("inf")
    return TargetScan(tuple(areas), tuple(success))
