"""The reference ANP loop and the floor loop on a native torch module, timed.

:func:`reference_loop` re-implements the ANP reference loop of docs ANP_SPEC.md ("The optimisation
loop") on a module whose BatchNorm layers are :class:`~benchmarks.native.NoisyBatchNorm2d`: the
model in train() mode, noise re-drawn in [-eps, eps], ``steps`` signed-gradient steps on the noise
(SGD, lr eps/steps), one SGD step (momentum 0.9) on the masks for
``alpha * CE(clean) + (1 - alpha) * CE(noisy)``, masks clamped to [0, 1]. As in the reference code,
the network's other weights keep ``requires_grad=True`` unless ``freeze=True``: every backward
also computes (and accumulates, never used) their gradients.

:func:`floor_loop` is the work any implementation needs per iteration: 3 forwards and 2 backwards
with frozen weights, gradients only for the per-channel noise (first backward) and masks (second),
no optimiser.

Both draw the same mini-batches (shuffled epochs, batch 128) and the same augmentation (random
crop from a 4-pixel zero padding, horizontal flip) on the batch, on the loop's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.native import NoisyBatchNorm2d


@dataclass(frozen=True)
class LoopSettings:
    """The reference defaults (ANP_SPEC)."""

    eps: float = 0.4
    steps: int = 1
    alpha: float = 0.2
    mask_lr: float = 0.2
    momentum: float = 0.9
    batch_size: int = 128
    padding: int = 4
    seed: int = 0


@dataclass
class LoopTiming:
    """``seconds`` for ``iterations`` timed iterations (after ``warmup`` untimed ones), final masks."""

    iterations: int
    warmup: int
    seconds: float
    masks: dict[str, np.ndarray]

    @property
    def ms_per_iteration(self) -> float:
        return 1000.0 * self.seconds / self.iterations


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per image: a random crop of the original size from the zero-padded batch, then a flip (p=0.5).

    Offsets and flips are drawn on the CPU from ``generator``; the two gathers run on ``x``'s device.
    """
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding,) * 4)
    rows = rows.to(x.device).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    cols = cols.to(x.device).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def epochs_of_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of shuffled mini-batches, epoch after epoch (the last batch of an epoch may be smaller)."""
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _noisy_layers(model: nn.Module) -> list[NoisyBatchNorm2d]:
    layers = [m for m in model.modules() if isinstance(m, NoisyBatchNorm2d)]
    if not layers:
        raise ValueError("the model has no NoisyBatchNorm2d (see benchmarks.native.install_noisy_bn)")
    return layers


def _masks(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: m.neuron_mask.detach().cpu().numpy().copy()
            for name, m in model.named_modules() if isinstance(m, NoisyBatchNorm2d)}


def _set_weights_trainable(model: nn.Module, layers: list[NoisyBatchNorm2d], trainable: bool) -> None:
    anp = {id(p) for m in layers for p in (m.neuron_mask, m.neuron_noise, m.neuron_noise_bias)}
    for p in model.parameters():
        p.requires_grad_(id(p) in anp or trainable)


def reference_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iterations: int, *, warmup: int = 0,
                   settings: LoopSettings = LoopSettings(), freeze: bool = False) -> LoopTiming:
    """The reference ANP loop on ``model`` (NoisyBatchNorm2d installed) and data ``x``, ``y`` (its device).

    ``freeze=False`` is the reference: the other weights keep ``requires_grad=True``; True freezes
    them. ``warmup`` iterations run first, untimed; the masks then restart at 1 for the timed run.
    """
    s = settings
    device = x.device
    layers = _noisy_layers(model)
    _set_weights_trainable(model, layers, not freeze)
    gen = torch.Generator().manual_seed(s.seed)
    masks = [m.neuron_mask for m in layers]
    noises = [p for m in layers for p in (m.neuron_noise, m.neuron_noise_bias)]
    model.train()
    correct = torch.zeros((), device=device)
    total_loss = 0.0

    def iteration(batches: Iterator[torch.Tensor], mask_opt: torch.optim.Optimizer,
                  noise_opt: torch.optim.Optimizer) -> None:
        nonlocal correct, total_loss
        idx = next(batches).to(device)
        images, labels = crop_flip(x[idx], gen, s.padding), y[idx]
        if s.eps > 0:  # 1. new random noise, then signed-gradient ascent steps on it
            for m in layers:
                m.reset(s.eps, gen)
            for _ in range(s.steps):
                noise_opt.zero_grad()
                for m in layers:
                    m.perturbed = True
                (-F.cross_entropy(model(images), labels)).backward()
                for p in noises:
                    p.grad.sign_()
                noise_opt.step()
        mask_opt.zero_grad()  # 2. the mask step on the clean and the perturbed loss
        loss_rob: torch.Tensor | float = 0.0
        if s.eps > 0:
            for m in layers:
                m.perturbed = True
            loss_rob = F.cross_entropy(model(images), labels)
        for m in layers:
            m.perturbed = False
        logits = model(images)
        loss_nat = F.cross_entropy(logits, labels)
        loss = s.alpha * loss_nat + (1 - s.alpha) * loss_rob
        loss.backward()
        mask_opt.step()
        for m in layers:
            m.clip_mask()
        correct = correct + (logits.detach().argmax(1) == labels).sum()  # the reference's running figures
        total_loss += float(loss.detach())

    def run(count: int) -> float:
        for m in layers:
            with torch.no_grad():
                m.neuron_mask.fill_(1.0)
            m.reset(0.0)
        mask_opt = torch.optim.SGD(masks, lr=s.mask_lr, momentum=s.momentum)
        noise_opt = torch.optim.SGD(noises, lr=s.eps / s.steps if s.eps > 0 else 0.0)
        batches = epochs_of_batches(len(y), s.batch_size, gen)
        _sync(device)
        start = time.perf_counter()
        for _ in range(count):
            iteration(batches, mask_opt, noise_opt)
        _sync(device)
        return time.perf_counter() - start

    if warmup:
        run(warmup)
    seconds = run(iterations)
    for m in layers:
        m.perturbed = False
    return LoopTiming(iterations, warmup, seconds, _masks(model))


def floor_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iterations: int, *, warmup: int = 0,
               settings: LoopSettings = LoopSettings()) -> LoopTiming:
    """3 forwards + 2 backwards per iteration, gradients only for the noise and the masks.

    Frozen weights, BatchNorm on batch statistics without running-statistics updates, other layers
    (dropout) in eval mode, the same batches and augmentation as :func:`reference_loop`; the
    gradients are computed and dropped (no optimiser), so the masks stay at 1.
    """
    s = settings
    device = x.device
    layers = _noisy_layers(model)
    _set_weights_trainable(model, layers, False)
    model.eval()
    for m in layers:
        m.batch_stats, m.update_stats = True, False
        m.reset(s.eps, torch.Generator().manual_seed(s.seed))
    gen = torch.Generator().manual_seed(s.seed)
    masks = [m.neuron_mask for m in layers]
    noises = [p for m in layers for p in (m.neuron_noise, m.neuron_noise_bias)]

    def set_noise(on: bool) -> None:
        for m in layers:
            m.perturbed = on

    def run(count: int) -> float:
        batches = epochs_of_batches(len(y), s.batch_size, gen)
        _sync(device)
        start = time.perf_counter()
        for _ in range(count):
            idx = next(batches).to(device)
            images, labels = crop_flip(x[idx], gen, s.padding), y[idx]
            set_noise(True)
            torch.autograd.grad(F.cross_entropy(model(images), labels), noises)
            rob = F.cross_entropy(model(images), labels)
            set_noise(False)
            nat = F.cross_entropy(model(images), labels)
            torch.autograd.grad(s.alpha * nat + (1 - s.alpha) * rob, masks)
        _sync(device)
        return time.perf_counter() - start

    try:
        if warmup:
            run(warmup)
        seconds = run(iterations)
    finally:
        for m in layers:
            m.batch_stats, m.update_stats, m.perturbed = None, True, False
            m.reset(0.0)
    return LoopTiming(iterations, warmup, seconds, _masks(model))
