"""Reconstructive Neuron Pruning's masks (RNP, Li et al. ICML 2023), a mask stage beside ANP's.

RNP ranks neurons in two steps on clean data, both on a copy of the weights (written for anp-onnx
from the paper's description):

1. **unlearn**: gradient *ascent* on the clean cross-entropy over every weight
   (:func:`anp_onnx.unlearn.trainable_initializers`), batch statistics on, until the epoch's clean
   accuracy falls to ``clean_threshold`` (near chance): the clean features go first, and what is
   left standing is mostly the backdoor's;
2. **recover**: on the unlearnt weights, learn a mask per neuron in [0, 1] (from 1) that brings the
   clean accuracy back; the neurons the recovery does not need (low masks) are the backdoor's.

The weights then go back to the original values: only the masks are kept, and the pipeline ranks,
chooses and writes back the pruning exactly as for ANP's masks (the same neurons, the same
semantics: a mask scales the neuron's weight part). Selected by its settings type:
``anp_onnx.repair(..., config=RNPConfig())``.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from .anp import MaskResult, _batches, resolve_device
from .augment import augment_batch, default_crop_padding
from .context import RepairContext, current_masks
from .data import ImageSet
from .errors import SettingsError
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check, emit
from .stages import MaskStage, register_mask_stage
from .unlearn import trainable_initializers

_LOGGER = logging.getLogger(__name__)

__all__ = ["RNPConfig", "RNPStage", "rnp_masks"]


@dataclass(frozen=True)
class RNPConfig:
    """RNP's settings (the paper's defaults where it gives them).

    Unlearning: SGD ``unlearn_lr`` with ``momentum`` and ``weight_decay``, gradients clipped to norm
    ``max_grad_norm``, at most ``unlearn_epochs`` epochs, stopping after the first whose clean
    accuracy is at most ``clean_threshold``. Recovering: ``recover_epochs`` epochs of SGD
    ``mask_lr`` with ``momentum`` on the masks alone, loss ``alpha`` times the clean cross-entropy,
    masks clipped to [0, 1]. Batches of ``batch_size`` with crop + flip when ``augment``.
    ``renormalise`` as in :class:`~anp_onnx.ANPConfig` (neurons without normalisation perturbed as
    BatchNorm channels after their layer).
    """

    unlearn_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_grad_norm: float = 20.0
    unlearn_epochs: int = 20
    clean_threshold: float = 0.2
    mask_lr: float = 0.2
    recover_epochs: int = 20
    alpha: float = 0.2
    batch_size: int = 128
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    renormalise: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bool, str)):
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise SettingsError(f"invalid RNP settings: {f.name} must be a finite number >= 0, not {value!r}")
        if self.batch_size < 2 or self.unlearn_epochs < 1 or self.recover_epochs < 1:
            raise SettingsError("invalid RNP settings: batch_size must be >= 2 and the epochs >= 1")
        if not 0.0 <= self.momentum < 1.0 or not 0.0 <= self.clean_threshold <= 1.0:
            raise SettingsError("invalid RNP settings: momentum must be in [0, 1), clean_threshold in [0, 1]")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise SettingsError("invalid RNP settings: device must be auto, cpu or cuda[:N]")

    @property
    def iterations(self) -> int:  # the report's "iterations": the recovery's epochs
        return self.recover_epochs

    def to_dict(self) -> dict:
        return {"method": "rnp", **asdict(self)}

    def resolve(self) -> "RNPConfig":
        return replace(self, device=resolve_device(self.device))


def rnp_masks(ctx: RepairContext, clean: ImageSet, config: RNPConfig = RNPConfig(), *,
              progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> MaskResult:
    """RNP's masks for every neuron of ``ctx`` (module doc); the weights are as before afterwards."""
    config = config.resolve()
    device = config.device
    modules = list(ctx.modules.values())
    if not modules:
        raise SettingsError("no neurons to rank")
    trainable = [t.tensor for t in trainable_initializers(ctx)]
    if not trainable:
        raise SettingsError("RNP found no weight of the model to unlearn")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    net = ctx.net.to(device).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(clean.x, dtype=np.float32)).to(device)
    y_all = torch.from_numpy(clean.y.astype(np.int64)).to(device)
    padding = default_crop_padding(*clean.x.shape[2:]) if config.augment else 0
    size = min(config.batch_size, len(clean))
    per_epoch = max(1, len(clean) // size)
    batches = _batches(len(clean), size, gen)

    def batch():
        idx = next(batches).to(device)
        x = x_all[idx]
        return (augment_batch(x, gen, padding=padding, flip=True) if config.augment else x), y_all[idx]

    saved = [t.detach().clone() for t in trainable]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    history: dict[str, list[float]] = {"unlearn_acc": [], "recover_acc": [], "recover_loss": []}
    mask_sums = [torch.zeros_like(m.neuron_mask, dtype=torch.float64) for m in modules]
    steps = 0
    start = time.perf_counter()
    _LOGGER.info("RNP: %d neurons in %d layers, %d images; unlearning %d weights on %s",
                 sum(m.neuron_mask.numel() for m in modules), len(modules), len(clean), len(trainable), device)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for m in modules:
            m.batch_stats, m.perturbed = True, False
            with torch.no_grad():
                m.neuron_mask.fill_(1.0)
        for t in trainable:
            t.requires_grad_(True)
        opt = torch.optim.SGD(trainable, lr=config.unlearn_lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        for epoch in range(config.unlearn_epochs):
            correct = seen = 0
            for _ in range(per_epoch):
                check(cancel)
                x, y = batch()
                logits = net(x)
                opt.zero_grad(set_to_none=True)
                (-F.cross_entropy(logits, y)).backward()
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                opt.step()
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
            history["unlearn_acc"].append(correct / seen)
            emit(progress, ProgressEvent(Stage.OPTIMISE, epoch + 1, config.unlearn_epochs,
                                         metrics={"unlearn_acc": correct / seen}, message="RNP unlearning"))
            if correct / seen <= config.clean_threshold:
                break
        for t in trainable:
            t.requires_grad_(False)
        _LOGGER.info("RNP: unlearnt in %d epochs (clean accuracy %.1f%%); recovering the masks",
                     len(history["unlearn_acc"]), 100 * history["unlearn_acc"][-1])
        masks = [m.neuron_mask for m in modules]
        for p in masks:
            p.requires_grad_(True)
        mask_opt = torch.optim.SGD(masks, lr=config.mask_lr, momentum=config.momentum)
        for epoch in range(config.recover_epochs):
            correct = seen = 0
            for _ in range(per_epoch):
                check(cancel)
                x, y = batch()
                logits = net(x)
                loss = config.alpha * F.cross_entropy(logits, y)
                mask_opt.zero_grad(set_to_none=True)
                loss.backward()
                mask_opt.step()
                for m, total in zip(modules, mask_sums):
                    m.clip_mask()
                    total += m.neuron_mask.detach()
                steps += 1
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
            history["recover_acc"].append(correct / seen)
            history["recover_loss"].append(float(loss.detach()))
            emit(progress, ProgressEvent(Stage.OPTIMISE, epoch + 1, config.recover_epochs,
                                         metrics={"acc_nat": correct / seen}, message="RNP recovering",
                                         payload={"masks": current_masks(ctx.modules)}))
    finally:
        with torch.no_grad():
            for t, v in zip(trainable, saved):
                t.copy_(v)
                t.requires_grad_(False)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m in modules:
            m.batch_stats = False
    seconds = time.perf_counter() - start
    means = {name: (total / max(steps, 1)).float().cpu().numpy() for name, total in zip(ctx.modules, mask_sums)}
    return MaskResult(current_masks(ctx.modules), config.recover_epochs, seconds, device, history, means, None)


@register_mask_stage
class RNPStage(MaskStage):
    """Reconstructive Neuron Pruning's masks: unlearn the clean data on a copy, recover with masks."""

    name = "rnp"
    description = "RNP: masks that recover clean accuracy after the clean data was unlearnt"
    config_type = RNPConfig

    def resolve(self, config: RNPConfig) -> RNPConfig:
        return config.resolve()

    def run(self, ctx, clean, config: RNPConfig, *, target=None, progress=None, cancel=None) -> MaskResult:
        return rnp_masks(ctx, clean, config, progress=progress, cancel=cancel)

