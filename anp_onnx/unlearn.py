"""Weight-level repair: reconstruct a trigger for the suspected target, then unlearn it.

Neuron pruning alone removed the backdoor of few third-party models without destroying them
(benchmarks/README.md). This refinement (Neural Cleanse's mitigation, Wang et al. S&P 2019, written
for anp-onnx) changes weights instead, on clean data only:

1. :func:`~anp_onnx.trigger.reconstruct_trigger` finds, for the suspected target class, the
   smallest patch that sends clean images of other classes to the target (:mod:`anp_onnx.trigger`;
   :func:`~anp_onnx.trigger.scan_targets` runs it for every class to find or confirm the target);
2. :func:`unlearn` fine-tunes the model's weights (the float initializers of Conv, ConvTranspose,
   Gemm, MatMul and the affine parameters of normalisation nodes; :func:`trainable_initializers`)
   so that stamped images are classified as the ORIGINAL model classified them unstamped, while
   clean images keep the original's outputs (distillation: KL divergence to the original's softened
   outputs on both). Normalisation layers keep their running statistics (eval mode).

The new weights are returned as initializer values; the export writes and verifies them.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from .augment import augment_batch, default_crop_padding
from .convert import torch_logits
from .data import ImageSet
from .errors import SettingsError
from .precision import autocast, resolve_precision
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check, emit
from .stages import Refinement, RefinementResult, register_refinement
from .trigger import (TargetScan, Trigger, frozen_weights, reconstruct_each, reconstruct_trigger, scan_targets,
                      shuffled_batches)

__all__ = ["TRAINABLE_INPUTS", "Trainable", "trainable_initializers", "unlearn", "UnlearnSettings",
           "TriggerUnlearning", "FastTriggerUnlearning", "Trigger", "TargetScan", "reconstruct_trigger",
           "reconstruct_each", "scan_targets", "ANOMALY_MIN", "MAX_DROP_POINTS"]

_LOGGER = logging.getLogger(__name__)

#: Node inputs whose initializers the unlearning may change: op -> input positions.
TRAINABLE_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
}


@dataclass
class Trainable:
    """A torch tensor of the converted net that holds ONNX initializer ``name`` (transposed or not)."""

    name: str
    tensor: torch.Tensor
    transposed: bool

    def value(self) -> np.ndarray:
        v = self.tensor.detach().cpu().numpy()
        return np.ascontiguousarray(v.T if self.transposed else v)


def trainable_initializers(ctx) -> list[Trainable]:
    """The float initializers :data:`TRAINABLE_INPUTS` names, each with the one torch tensor holding it.

    A tensor is matched by value (onnx2torch copies initializers exactly; a Gemm/MatMul weight may
    be transposed). An initializer held by no tensor, by several, or equal to another one is left
    out: changing it could not be written back unambiguously.
    """
    graph = ctx.model.proto.graph
    inits = {t.name: t for t in graph.initializer}
    wanted: list[str] = []
    for node in graph.node:
        for pos in TRAINABLE_INPUTS.get(node.op_type, ()):
            if pos < len(node.input) and node.input[pos] in inits and node.input[pos] not in wanted:
                wanted.append(node.input[pos])
    arrays = {n: numpy_helper.to_array(inits[n]) for n in wanted}
    arrays = {n: a for n, a in arrays.items() if a.dtype == np.float32 and a.size > 1}
    skip = {id(p) for m in ctx.modules.values() for p in (m.neuron_mask, m.neuron_noise, m.neuron_noise_bias)}
    tensors = [t for t in list(ctx.net.parameters()) + list(ctx.net.buffers())
               if id(t) not in skip and t.dtype == torch.float32 and t.numel() > 1]
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_shape.setdefault(tuple(t.shape), []).append(t)
    found: list[Trainable] = []
    for name, a in arrays.items():
        hits = [(t, False) for t in by_shape.get(a.shape, []) if np.array_equal(t.detach().cpu().numpy(), a)]
        if a.ndim == 2 and a.shape[0] != a.shape[1]:
            hits += [(t, True) for t in by_shape.get(a.T.shape, []) if np.array_equal(t.detach().cpu().numpy(), a.T)]
        twins = [o for o, b in arrays.items() if o != name and b.shape == a.shape and np.array_equal(a, b)]
        if len(hits) == 1 and not twins:
            found.append(Trainable(name, hits[0][0], hits[0][1]))
    ids = [id(f.tensor) for f in found]
    return [f for f in found if ids.count(id(f.tensor)) == 1]


def unlearn(net, trainable: list[Trainable], images: ImageSet, triggers: Sequence[Trigger], *,
            teacher: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, epochs: int = 20,
            batch_size: int = 64, lr: float = 0.01, stamped: float = 0.5, temperature: float = 2.0,
            augment: bool = True, sam_rho: float = 0.0, device: str = "cpu", seed: int = 0,
            progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> dict[str, float]:
    """Fine-tune ``trainable`` so stamped images get the teacher's outputs on the unstamped ones.

    ``teacher`` maps a batch to the logits to imitate (default: ``net`` as it is before training);
    ``stamped`` is the share of each batch that carries a trigger (each image one of ``triggers``,
    in turn); ``augment`` crops and flips each batch (:func:`~anp_onnx.augment.augment_batch`) before
    it is stamped. ``sam_rho`` > 0: each step takes the gradient at weights moved by adaptive
    sharpness-aware minimisation (:func:`_sam_step`). Returns the last epoch's loss.
    """
    x_all = torch.from_numpy(images.x)
    net.eval()
    if teacher is None:
        teacher = copy.deepcopy(net).eval()
    tensors = [t.tensor for t in trainable]
    opt = torch.optim.SGD(tensors, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    padding = default_crop_padding(x_all.shape[2], x_all.shape[3]) if augment else 0
    loss_value = float("nan")
    with frozen_weights(net):
        for t in tensors:
            t.requires_grad_(True)
        try:
            for epoch in range(epochs):
                total, count = 0.0, 0
                for idx in shuffled_batches(len(x_all), batch_size, rng):
                    check(cancel)
                    x = augment_batch(x_all[idx], g, padding=padding, flip=augment).to(device)
                    k = int(round(stamped * len(idx)))
                    with torch.no_grad():
                        soft = F.softmax(teacher(x) / temperature, dim=1)
                    x = torch.cat([_stamp_each(triggers, x[:k]), x[k:]])
                    loss = _distill_loss(net, x, soft, temperature)
                    opt.zero_grad()
                    loss.backward()
                    if sam_rho > 0:
                        _sam_step(tensors, sam_rho, lambda: _distill_loss(net, x, soft, temperature))
                    opt.step()
                    total, count = total + float(loss.detach()) * len(idx), count + len(idx)
                loss_value = total / max(count, 1)
                emit(progress, ProgressEvent(Stage.REFINE, epoch + 1, epochs, {"loss": loss_value}))
        finally:
            for t in tensors:  # buffers made trainable here; parameters get their flags back from frozen_weights
                t.requires_grad_(False)
    return {"loss": loss_value}


def _distill_loss(net, x: torch.Tensor, soft: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence of ``net``'s tempered outputs on ``x`` from the teacher's ``soft`` targets."""
    return F.kl_div(F.log_softmax(net(x) / temperature, dim=1), soft, reduction="batchmean")


def _sam_step(tensors: Sequence[torch.Tensor], rho: float, loss_fn: Callable[[], torch.Tensor]) -> None:
    """Replace the gradients of ``tensors`` by those at the adaptive-SAM neighbour of the weights.

    The weights move by ``rho * w^2 * g / ||w * g||`` (Kwon et al. ICML 2021: the worst case within
    ``rho`` of relative size, so large weights move most), ``loss_fn`` is backpropagated there, and
    the weights go back; the optimiser then steps with the new gradients.
    """
    with torch.no_grad():
        scaled = [t.abs() * t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
        norm = float(torch.stack([s.norm() for s in scaled]).norm()) + 1e-12
        moves = [rho * t.abs() * s / norm for t, s in zip(tensors, scaled)]
        for t, e in zip(tensors, moves):
            t.add_(e)
    for t in tensors:
        t.grad = None
    try:
        loss_fn().backward()
    finally:
        with torch.no_grad():
            for t, e in zip(tensors, moves):
                t.sub_(e)


def _stamp_each(triggers: Sequence[Trigger], x: torch.Tensor) -> torch.Tensor:
    """``x`` with image i stamped by ``triggers[i % len(triggers)]``."""
    if len(triggers) == 1 or not len(x):
        return triggers[0].stamp(x)
    masks = torch.cat([t.mask for t in triggers])[torch.arange(len(x)) % len(triggers)]
    patterns = torch.cat([t.pattern for t in triggers])[torch.arange(len(x)) % len(triggers)]
    return (1 - masks) * x + masks * patterns


@dataclass(frozen=True)
class UnlearnSettings:
    """Settings of :class:`TriggerUnlearning` (the defaults were chosen on the development bench)."""

    rounds: int = 3  # reconstruct, unlearn; again on the unlearnt model (each finds what is left)
    epochs: int = 7  # unlearning epochs per round
    lr: float = 0.01
    steps: int = 300  # reconstruction steps per round
    l1: float = 1e-2
    stamped: float = 0.5
    scan_steps: int = 200  # per class (100 left the backdoor's class within noise of the others; 200 made every
    # bench decision 300 made, in two thirds of the time: benchmarks/README.md, "Unlearning")
    retries: int = 2  # a round over the accuracy guard is redone from the kept weights at a third of the lr
    guard_se: float = 0.0  # the guard's drop is at least this many standard errors of the held-out accuracy
    guard_images: str = "either"  # a round passes when the held-out or all clean images' accuracy allows it; or
    # "holdout" / "all" alone (benchmarks/README.md, "Unlearning")
    augment: bool = True  # crop + flip the unlearning's batches
    reuse_scan: bool = False  # round 1 unlearns the scan's patches of its targets instead of reconstructing them
    precision: str = "fp32"  # the rounds' reconstruction and training: anp_onnx.precision (scan, guard: float32)
    channels_last: bool = True  # compute on channels-last tensors where the ops allow (CPU: ~1.3x; float rounding)
    sam_rho: float = 0.0  # > 0: adaptive sharpness-aware steps in the unlearning (twice the passes)


#: Unlearning runs only when a backdoor is suspected: the collapse probe named a target, or the scan's
#: smallest patch is at least this anomalous (Neural Cleanse's index; with 200 steps per class 0.85-0.95
#: on the three clean models at seed 0, 1.99-3.98 on the backdoored ones without a probe target;
#: benchmarks/README.md, "A longer scan" and "A shorter scan").
ANOMALY_MIN = 1.5
#: A round is kept only while clean accuracy stays within this many points of the start: on the held-out
#: images or on all clean images (``UnlearnSettings.guard_images``).
MAX_DROP_POINTS = 3.0


def _restore(trainable: Sequence[Trainable], values: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, v in zip(trainable, values):
            t.tensor.copy_(v)


def _guard_images(which: str, clean: ImageSet, holdout: Optional[ImageSet]) -> list[Optional[ImageSet]]:
    """The image sets whose accuracy the guard watches: ``[holdout]``; with ``which="all"`` every clean
    image; with ``"either"`` both (a round passes when either stays within the guard)."""
    if which not in ("holdout", "all", "either"):
        raise SettingsError(f"guard_images must be 'holdout', 'all' or 'either', got {which!r}")
    if which == "holdout":
        return [holdout]
    every = clean if holdout is None or not len(holdout) else ImageSet(
        np.concatenate([clean.x, holdout.x]), np.concatenate([clean.y, holdout.y]), clean.class_names, clean.source)
    return [every] if which == "all" else [holdout, every]


def _within_guard(net, judged, start_accs, guards, device: str) -> tuple[bool, Optional[float]]:
    """Whether a set of ``judged`` keeps its accuracy within its guard (checked in order, up to the
    first that does), and the first set's accuracy."""
    first = None
    for i, (images, a0, g) in enumerate(zip(judged, start_accs, guards)):
        a = _accuracy(net, images, device)
        first = a if i == 0 else first
        if a is None or a >= a0 - g:
            return True, first
    return False, first


def _accuracy(net, images: Optional[ImageSet], device: str) -> Optional[float]:
    if images is None or not len(images):
        return None
    with torch.inference_mode():
        pred = torch_logits(net, images.x, device).argmax(1)
    return 100.0 * float((pred == images.y).mean())


@register_refinement
class TriggerUnlearning(Refinement):
    """Reconstruct a trigger for the suspected target (and the class a scan finds), then unlearn it.

    Skipped when no backdoor is suspected (no probe target and a scan anomaly under
    :data:`ANOMALY_MIN`); each round is kept only while the accuracy on the held-out images, or on all
    clean images, stays within :data:`MAX_DROP_POINTS` of the unrefined model's, else the weights go
    back to the last kept round.
    """

    name = "unlearn"
    description = "reconstruct a trigger for the suspected target and unlearn it (changes weights)"
    settings = UnlearnSettings()

    def run(self, ctx, plan, clean, *, target=None, device="cpu", seed=0, holdout=None, progress=None,
            cancel=None) -> RefinementResult:
        start = time.perf_counter()
        s = self.settings
        metrics: dict[str, float] = {}
        values: dict[str, np.ndarray] = {}
        precision = resolve_precision(s.precision, device)
        with ctx.on_device(device, channels_last=s.channels_last) as net:
            net.eval()
            # float32: the scan decides (whether to unlearn, and which class); its result is not checked later
            scan = scan_targets(net, clean, list(range(ctx.model.num_classes or clean.num_classes_seen)),
                                steps=s.scan_steps, device=device, seed=seed, progress=progress, cancel=cancel)
            metrics.update({"scan_smallest": float(scan.smallest), "scan_anomaly": scan.anomaly,
                            "bf16": float(precision == "bf16")})
            if target is None and scan.anomaly < ANOMALY_MIN:
                _LOGGER.info("unlearning skipped: no target suspected (scan anomaly %.2f < %.1f)",
                             scan.anomaly, ANOMALY_MIN)
                return RefinementResult({}, {**metrics, "skipped": 1.0}, time.perf_counter() - start)
            # the probe's class and the scan's smallest patch: each was right where the other was not
            targets = [scan.smallest] if target in (None, scan.smallest) else [target, scan.smallest]
            metrics.update({f"target_{i + 1}": float(t) for i, t in enumerate(targets)})
            trainable = trainable_initializers(ctx)
            if not trainable:
                _LOGGER.warning("unlearning skipped: no initializer of the model matched its torch weights")
                return RefinementResult({}, {**metrics, "skipped": 1.0}, time.perf_counter() - start)
            judged = _guard_images(s.guard_images, clean, holdout)
            start_accs = [_accuracy(net, images, device) for images in judged]
            guards = [MAX_DROP_POINTS if a is None or not s.guard_se else
                      max(MAX_DROP_POINTS, s.guard_se * float(np.sqrt(a * (100 - a) / len(images))))
                      for a, images in zip(start_accs, judged)]
            start_acc = start_accs[0]
            kept = [t.tensor.detach().clone() for t in trainable]
            teacher = copy.deepcopy(net).eval()
            triggers: list[Trigger] = []
            rounds, lr = 0, s.lr
            for r in range(s.rounds):
                emit(progress, ProgressEvent(Stage.REFINE, r + 1, s.rounds, {"round": r + 1}))
                if r == 0 and s.reuse_scan:
                    triggers += [scan.triggers[t] for t in targets]
                else:
                    triggers += reconstruct_each(net, clean, targets, context=lambda: autocast(precision, device),
                                                 steps=s.steps, l1=s.l1, device=device, seed=seed + r, cancel=cancel)
                for attempt in range(s.retries + 1):
                    with autocast(precision, device):
                        unlearn(net, trainable, clean, triggers, teacher=teacher, epochs=s.epochs, lr=lr,
                                stamped=s.stamped, augment=s.augment, sam_rho=s.sam_rho, device=device,
                                seed=seed + r, cancel=cancel)
                    passed, acc = _within_guard(net, judged, start_accs, guards, device)
                    if passed:
                        break
                    _LOGGER.info("unlearning round %d at lr %g: guard accuracy %.1f%% (from %.1f%%); "
                                 "back to the last kept weights", r + 1, lr, acc, start_acc)
                    _restore(trainable, kept)
                    lr /= 3  # models without normalisation need smaller steps (benchmarks/README.md)
                else:
                    break
                kept, rounds = [t.tensor.detach().clone() for t in trainable], r + 1
                metrics[f"holdout_acc_{r + 1}"] = acc if acc is not None else float("nan")
                metrics[f"lr_{r + 1}"] = lr
            _restore(trainable, kept)
            emit(progress, ProgressEvent(Stage.REFINE, s.rounds, s.rounds, {"rounds_kept": rounds}))
            metrics.update({"rounds": float(rounds), "weights": float(len(trainable)),
                            **{f"trigger_area_{i + 1}": t.area for i, t in enumerate(triggers)}})
            if rounds:
                values = {t.name: t.value() for t in trainable}
        _LOGGER.info("unlearning: %d of %d rounds kept for class %s (%d initializers changed)",
                     rounds, s.rounds, " and ".join(map(str, targets)), len(values))
        return RefinementResult(values, metrics, time.perf_counter() - start)


@register_refinement
class FastTriggerUnlearning(TriggerUnlearning):
    """:class:`TriggerUnlearning` with its rounds in bfloat16 where the device computes it natively."""

    name = "unlearn-bf16"
    description = "the unlearning, its rounds in bfloat16 where native (faster; results differ slightly)"
    settings = UnlearnSettings(precision="auto")
