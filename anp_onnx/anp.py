"""The ANP mask optimisation: the reference code's loop and defaults (see ANP_SPEC), plus one option.

One iteration per batch: re-draw the neuron noise in [-eps, eps]; ``steps`` signed-gradient ascent
steps on the noise; one SGD step on the masks for
``alpha * CE(clean) + (1 - alpha) * CE(perturbed)``; clamp masks to [0, 1]. Everything but the masks
and the noise stays frozen.

The option, on by default (``ANPConfig.target="auto"``): when the collapse probe
(:mod:`anp_onnx.collapse`) names a suspected target, the noise steps pull images towards it and the
perturbed loss is the pull, ``-log(1 - p_target)`` on images of other classes (see ANPConfig).
``ANPConfig.reference()`` is the reference loop exactly.

:class:`ANPStage` is the pipeline's first mask stage (:mod:`anp_onnx.stages`): the calibration of
renormalised neurons and the collapse probe run before it (:mod:`anp_onnx.learn`), and
:func:`optimize_masks` is the loop alone.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import augment_batch, default_crop_padding
from .collapse import CollapseProbe, probe_supported
from .context import RepairContext, current_masks
from .data import ImageSet
from .errors import SettingsError
from .neurons import PerturbedModule
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check, emit
from .stages import MaskStage, register_mask_stage

_LOGGER = logging.getLogger(__name__)
BN_MODES = ("train", "eval")
_WHOLE = ("steps", "iterations", "batch_size", "crop_padding", "seed", "target")
#: Iterations when none are given: the reference's on a GPU, fewer on a CPU (see ANPConfig.resolve).
REFERENCE_ITERATIONS = 2000
CPU_ITERATIONS = 300


@dataclass(frozen=True)
class ANPConfig:
    """ANP hyper-parameters; the defaults are the reference code's.

    ``iterations`` defaults to the reference's 2000 on a GPU and to 300 on a CPU (see :meth:`resolve`).

    ``target`` is anp-onnx's one change to the loop, on by default: ``"auto"`` runs the collapse
    probe (:mod:`anp_onnx.collapse`) first and, when clean images under neuron noise clearly collapse
    to one class, the loop becomes *targeted*: the noise step pushes images towards that class
    instead of just raising the loss, and the robust part of the mask loss is the pull towards it,
    ``-log(1 - p_target)`` on images of other classes, instead of cross-entropy (this ranks backdoor
    neurons far better on small networks, see benchmarks/); a class index forces a target; ``None``
    is the reference's untargeted loop. A targeted step uses
    ``targeted_eps`` (0.2: on the sample models it ranked the backdoor neurons better than 0.4)
    instead of ``eps``. :meth:`reference` gives the reference settings throughout.

    ``renormalise`` concerns neurons whose layer does not normalise (conv/linear output channels,
    per-channel Mul/Add: BatchNorm folded away or absent). When on (the default) they are first
    calibrated on the clean data and then perturbed as BatchNorm channels placed right after their
    layer, with the clean output's mean and spread as statistics: the model is unchanged, ANP runs
    as on a BatchNorm network (batch statistics, a pruned neuron outputs its clean mean) and the
    collapse probe can be trusted (see :meth:`PerturbedModule.renormalise`). Off: the weights are
    scaled directly and a pruned neuron outputs its bias.
    """

    eps: float = 0.4
    steps: int = 1
    alpha: float = 0.2
    mask_lr: float = 0.2
    momentum: float = 0.9
    iterations: Optional[int] = None
    batch_size: int = 128
    bn_mode: str = "train"
    augment: bool = True
    crop_padding: Optional[int] = None
    project_noise: bool = False
    seed: int = 0
    device: str = "auto"
    target: Optional[int | str] = "auto"
    targeted_eps: float = 0.2
    renormalise: bool = True

    @classmethod
    def reference(cls, **changes) -> "ANPConfig":
        """The reference code's settings exactly (untargeted perturbation), with ``changes``."""
        return cls(**{"target": None, **changes})

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):  # numbers must be numbers, finite: NaN passes no "x < 0" check
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None or isinstance(value, str):
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise SettingsError(f"invalid ANP settings: {f.name} must be a finite number, not {value!r}")
            if f.name in _WHOLE and value != int(value):
                raise SettingsError(f"invalid ANP settings: {f.name} must be a whole number, not {value!r}")
        if self.eps < 0 or self.targeted_eps < 0:
            problems.append("eps must be >= 0")
        if self.steps < 1:
            problems.append("steps must be >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append("alpha must be in [0, 1]")
        if self.mask_lr <= 0:
            problems.append("mask_lr must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            problems.append("momentum must be in [0, 1)")
        if self.iterations is not None and self.iterations < 1:
            problems.append("iterations must be >= 1")
        if self.batch_size < 2:
            problems.append("batch_size must be >= 2")
        if self.bn_mode not in BN_MODES:
            problems.append(f"bn_mode must be one of {', '.join(BN_MODES)}")
        if self.crop_padding is not None and self.crop_padding < 0:
            problems.append("crop_padding must be >= 0")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            problems.append("device must be auto, cpu or cuda[:N]")
        if not (self.target is None or self.target == "auto"
                or (isinstance(self.target, int) and not isinstance(self.target, bool) and self.target >= 0)):
            problems.append("target must be 'auto', None or a class index >= 0")
        if problems:
            raise SettingsError("invalid ANP settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve(self) -> "ANPConfig":
        """A copy with ``device`` and ``iterations`` made concrete for this machine.

        ``iterations=None`` means the reference's 2000 on a GPU and :data:`CPU_ITERATIONS` on a CPU,
        where 2000 iterations of a CIFAR network take half an hour or more.
        """
        device = resolve_device(self.device)
        iterations = self.iterations
        if iterations is None:
            iterations = REFERENCE_ITERATIONS if device.startswith("cuda") else CPU_ITERATIONS
        return replace(self, device=device, iterations=iterations)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError("device cuda was asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    return device


@dataclass
class MaskResult:
    """Masks per layer (values in [0, 1]) and the optimisation's history.

    ``mean_masks`` is each mask's mean over all iterations: among equal final masks, the lower mean
    fell earlier, and ranks first for pruning. ``centres`` holds the renormalised layers' clean
    (mean, spread) per neuron (see ``ANPConfig.renormalise``); writing the pruning back needs them.
    ``target`` is the class the noise step pushed towards (None: the reference's untargeted step),
    ``probe`` the collapse probe that chose it, if run, and ``stage`` the mask stage that learnt them
    ("probe": none did, the run stopped after the probe; ``skipped`` says why, see anp_onnx.pipeline).
    """

    masks: dict[str, np.ndarray]
    iterations: int
    seconds: float
    device: str
    history: dict[str, list[float]] = field(default_factory=dict)
    mean_masks: dict[str, np.ndarray] = field(default_factory=dict)
    target: Optional[int] = None
    probe: Optional[CollapseProbe] = None
    centres: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    stage: str = "anp"
    skipped: str = ""


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches of indices, one epoch after another (no batch of size 1)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        chunks = list(torch.split(perm, batch_size))
        if len(chunks) > 1 and len(chunks[-1]) < 2:
            chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
        yield from chunks


def _pull_loss(logits: torch.Tensor, y: torch.Tensor, target: int) -> torch.Tensor:
    """How strongly perturbed images of other classes are pulled to ``target``: mean -log(1 - p_target).

    The targeted variant's robust loss: the masks learn to resist the pull towards the suspected
    target rather than every error the noise causes, so neurons that merely make the network fragile
    keep their masks. A batch with only target-class images falls back to cross-entropy.
    """
    others = y != target
    if not bool(others.any()):
        return F.cross_entropy(logits, y)
    p_target = logits[others].float().softmax(1)[:, target]
    return -torch.log1p(-p_target.clamp(max=1 - 1e-6)).mean()


def _set_noise(modules: list[PerturbedModule], on: bool) -> None:
    for m in modules:
        m.perturbed = on


@register_mask_stage
class ANPStage(MaskStage):
    """Adversarial Neuron Pruning's mask optimisation (the reference loop, optionally targeted)."""

    name = "anp"
    description = "ANP: masks that keep clean accuracy under adversarial neuron perturbation"
    config_type = ANPConfig

    def resolve(self, config: ANPConfig) -> ANPConfig:
        return config.resolve()

    def wants_probe(self, ctx: RepairContext, config: ANPConfig) -> bool:
        if config.target != "auto":
            return False
        if config.eps > 0 and config.targeted_eps > 0 and probe_supported(ctx.modules.values()):
            return True
        _LOGGER.info("collapse probe skipped (it needs normalising or renormalised neurons): untargeted perturbation")
        return False

    def noise_target(self, config: ANPConfig, probe: Optional[CollapseProbe]) -> Optional[int]:
        if config.target == "auto":
            return probe.suspected_target if probe is not None else None
        return config.target

    def run(self, ctx: RepairContext, clean: ImageSet, config: ANPConfig, *, target: Optional[int],
            progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> MaskResult:
        return optimize_masks(ctx.net, ctx.modules, clean, config, target=target, progress=progress, cancel=cancel)


def optimize_masks(
    net: nn.Module,
    neurons: dict[str, PerturbedModule],
    data: ImageSet,
    config: ANPConfig = ANPConfig(),
    *,
    target: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    progress_every: int = 10,
) -> MaskResult:
    """The ANP loop on ``net`` whose perturbable ``neurons`` are installed (and, if wanted, calibrated).

    ``target`` makes the noise targeted (see ANPConfig; None: the reference's untargeted step).
    ``data`` is the clean set (images in [0, 1]). A fixed ``config.seed`` gives identical masks on
    the same device. Masks are left in the modules when this returns (or raises Cancelled).
    """
    if len(data) < 2:
        raise SettingsError("ANP needs at least 2 clean images")
    config = config.resolve()
    device = config.device
    modules = list(neurons.values())
    if not modules:
        raise SettingsError("no neurons to optimise")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    net.to(device).eval()
    for m in modules:
        m.batch_stats = config.bn_mode == "train"
        m.perturbed = False
        with torch.no_grad():
            m.neuron_mask.fill_(1.0)
        m.reset_noise(0.0)
    eps = config.eps if target is None else config.targeted_eps
    x_all = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32)).to(device)
    y_all = torch.from_numpy(data.y.astype(np.int64)).to(device)
    padding = config.crop_padding if config.crop_padding is not None else default_crop_padding(*data.x.shape[2:])
    mask_params = [m.neuron_mask for m in modules]
    noise_params = [p for m in modules for p in (m.neuron_noise, m.neuron_noise_bias)]
    mask_opt = torch.optim.SGD(mask_params, lr=config.mask_lr, momentum=config.momentum)
    noise_opt = torch.optim.SGD(noise_params, lr=eps / config.steps if eps > 0 else 0.0)
    history: dict[str, list[float]] = {"loss_nat": [], "loss_rob": [], "acc_nat": []}
    mask_sums = [torch.zeros_like(m.neuron_mask, dtype=torch.float64) for m in modules]
    batches = _batches(len(data), min(config.batch_size, len(data)), gen)
    start = time.perf_counter()
    _LOGGER.info("ANP: %d neurons in %d layers, %d images, %d iterations on %s; %s noise, eps %g",
                 sum(m.neuron_mask.numel() for m in modules), len(modules), len(data), config.iterations, device,
                 "untargeted" if target is None else f"targeted (class {target})", eps)
    try:
        for it in range(1, config.iterations + 1):
            check(cancel)
            idx = next(batches).to(device)
            x, y = x_all[idx], y_all[idx]
            if config.augment:
                x = augment_batch(x, gen, padding=padding, flip=True)
            loss_rob_value = 0.0
            if eps > 0:
                for m in modules:
                    m.reset_noise(eps, gen)
                _set_noise(modules, True)
                toward = None if target is None else torch.full_like(y, target)
                for _ in range(config.steps):
                    check(cancel)
                    noise_opt.zero_grad(set_to_none=True)
                    if toward is None:  # the reference: raise the loss on the true labels
                        (-F.cross_entropy(net(x), y)).backward()
                    else:  # targeted: pull the images towards the suspected target
                        F.cross_entropy(net(x), toward).backward()
                    for p in noise_params:
                        if p.grad is not None:
                            p.grad.sign_()
                    noise_opt.step()
                    if config.project_noise:
                        for m in modules:
                            m.project_noise(eps)
            check(cancel)
            mask_opt.zero_grad(set_to_none=True)
            if eps > 0:
                _set_noise(modules, True)
                loss_rob = F.cross_entropy(net(x), y) if target is None else _pull_loss(net(x), y, target)
                loss_rob_value = float(loss_rob.detach())
            else:
                loss_rob = torch.zeros((), device=device)
            _set_noise(modules, False)
            logits = net(x)
            loss_nat = F.cross_entropy(logits, y)
            loss = config.alpha * loss_nat + (1 - config.alpha) * loss_rob
            loss.backward()
            mask_opt.step()
            for m, total in zip(modules, mask_sums):
                m.clip_mask()
                total += m.neuron_mask.detach()
            history["loss_nat"].append(float(loss_nat.detach()))
            history["loss_rob"].append(loss_rob_value)
            history["acc_nat"].append(float((logits.detach().argmax(1) == y).float().mean()))
            if progress is not None and (it % progress_every == 0 or it == 1 or it == config.iterations):
                k = min(progress_every, it)
                emit(progress, ProgressEvent(
                    Stage.OPTIMISE, it, config.iterations,
                    metrics={
                        "loss_nat": float(np.mean(history["loss_nat"][-k:])),
                        "loss_rob": float(np.mean(history["loss_rob"][-k:])),
                        "acc_nat": float(np.mean(history["acc_nat"][-k:])),
                    },
                    payload={"masks": current_masks(neurons)},
                ))
    finally:
        _set_noise(modules, False)
        for m in modules:
            m.reset_noise(0.0)
            m.batch_stats = False
    seconds = time.perf_counter() - start
    means = {name: (total / config.iterations).float().cpu().numpy() for name, total in zip(neurons, mask_sums)}
    return MaskResult(current_masks(neurons), config.iterations, seconds, device, history, means, target)
