"""The mask part of the pipeline: calibrate -> probe -> the chosen mask stage.

The clean data must hold at least two classes (:func:`check_classes`): ANP's mask loss is the
cross-entropy against the images' labels, and with one label a network that answers that class
for everything (what a backdoored network does under noise when the label is its target) scores
best; the pruning curve could not see accuracy lost on the other classes either. So one class is
refused, not warned about; fewer classes than the model has are logged as a warning.

:func:`learn_masks` prepares the perturbable neurons (masks 1, no noise), calibrates renormalised
neurons on the clean data (:mod:`anp_onnx.calibrate`), runs the collapse probe when the stage
wants it (:mod:`anp_onnx.collapse`), and hands over to the mask stage that the settings' type
selects (:mod:`anp_onnx.stages`; ANP by default). Progress events name each part
(``Stage.CALIBRATE``, ``Stage.PROBE``, then the stage's own, ``Stage.OPTIMISE`` for ANP), and
``cancel`` is checked within each.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import numpy as np
import torch

from .anp import MaskResult
from .calibrate import calibrate, clear_centres, current_centres
from .collapse import CollapseProbe, find_target
from .context import RepairContext
from .data import ImageSet
from .errors import DataError, SettingsError
from .progress import CancelToken, ProgressCallback, check
from .stages import mask_stage_for

_LOGGER = logging.getLogger(__name__)


def learn_masks(ctx: RepairContext, clean: ImageSet, config: Any, *, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None, probe_only: bool = False,
                probe: Optional[CollapseProbe] = None) -> MaskResult:
    """Masks for every neuron of ``ctx`` learnt on ``clean`` by the stage ``config`` selects.

    The result records the probe (if run), the class the stage aimed at and the renormalised
    layers' centres. The torch model's masks are left as the stage left them. ``probe_only``: stop
    after the probe (no masks, ``stage`` "probe", ``iterations`` 0); ``probe``: an earlier probe's
    result (of a ``probe_only`` run on the same data), used instead of probing again.
    """
    if len(clean) < 2:
        raise SettingsError("ANP needs at least 2 clean images")
    check_classes(clean, ctx.model.num_classes)
    stage = mask_stage_for(config)
    config = stage.resolve(config)
    device = getattr(config, "device", "cpu")
    modules = list(ctx.modules.values())
    ctx.net.to(device).eval()
    for m in modules:
        m.batch_stats = False
        m.perturbed = False
        with torch.no_grad():
            m.neuron_mask.fill_(1.0)
    check(cancel)
    if getattr(config, "renormalise", True):
        calibrate(ctx.net, modules, clean, device=device, progress=progress, cancel=cancel)
    else:
        clear_centres(modules)
    started = time.perf_counter()
    if probe is None and stage.wants_probe(ctx, config):
        check(cancel)
        probe = find_target(ctx.net, modules, clean, device=device, progress=progress, cancel=cancel)
        _LOGGER.info("collapse probe: %s", probe.describe())
    target = stage.noise_target(config, probe)
    if probe_only:
        return MaskResult({}, 0, time.perf_counter() - started, device, target=target, probe=probe, stage="probe",
                          centres=current_centres(ctx.modules))
    result = stage.run(ctx, clean, config, target=target, progress=progress, cancel=cancel)
    bad = [name for name, values in result.masks.items() if not np.all(np.isfinite(values))]
    if bad:
        raise SettingsError(f"the mask optimisation diverged: the masks of {bad[0]} are not finite numbers; "
                            "use a smaller mask learning rate or perturbation budget")
    result.target, result.probe, result.stage = target, probe, stage.name
    result.centres = current_centres(ctx.modules)
    return result


def check_classes(clean: ImageSet, num_classes: Optional[int] = None) -> None:
    """DataError when ``clean`` holds one class only; a warning when it misses some of ``num_classes``."""
    classes = np.unique(clean.y)
    where = clean.source or "the clean data"
    if len(classes) == 1:
        raise DataError(f"{where} holds images of only class {int(classes[0])}; "
                        "ANP learns from the labels of clean images of at least 2 classes (ideally all the model's)")
    if num_classes and len(classes) < num_classes:
        _LOGGER.warning("%s holds images of %d of the model's %d classes; ANP is most reliable with every class",
                        where, len(classes), num_classes)
