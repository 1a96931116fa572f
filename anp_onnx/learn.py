"""The mask part of the pipeline: calibrate -> probe -> the chosen mask stage.

:func:`learn_masks` prepares the perturbable neurons (masks 1, no noise), calibrates renormalised
neurons on the clean data (:mod:`anp_onnx.calibrate`), runs the collapse probe when the stage
wants it (:mod:`anp_onnx.collapse`), and hands over to the mask stage that the settings' type
selects (:mod:`anp_onnx.stages`; ANP by default). Progress events name each part
(``Stage.CALIBRATE``, ``Stage.PROBE``, then the stage's own, ``Stage.OPTIMISE`` for ANP), and
``cancel`` is checked within each.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch

from .anp import MaskResult
from .calibrate import calibrate, clear_centres, current_centres
from .collapse import find_target
from .context import RepairContext
from .data import ImageSet
from .errors import SettingsError
from .progress import CancelToken, ProgressCallback, check
from .stages import mask_stage_for

_LOGGER = logging.getLogger(__name__)


def learn_masks(ctx: RepairContext, clean: ImageSet, config: Any, *, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> MaskResult:
    """Masks for every neuron of ``ctx`` learnt on ``clean`` by the stage ``config`` selects.

    The result records the probe (if run), the class the stage aimed at and the renormalised
    layers' centres. The torch model's masks are left as the stage left them.
    """
    if len(clean) < 2:
        raise SettingsError("ANP needs at least 2 clean images")
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
    probe = None
    if stage.wants_probe(ctx, config):
        check(cancel)
        probe = find_target(ctx.net, modules, clean, device=device, progress=progress, cancel=cancel)
        _LOGGER.info("collapse probe: %s", probe.describe())
    target = stage.noise_target(config, probe)
    result = stage.run(ctx, clean, config, target=target, progress=progress, cancel=cancel)
    bad = [name for name, values in result.masks.items() if not np.all(np.isfinite(values))]
    if bad:
        raise SettingsError(f"the mask optimisation diverged: the masks of {bad[0]} are not finite numbers; "
                            "use a smaller mask learning rate or perturbation budget")
    result.target, result.probe, result.stage = target, probe, stage.name
    result.centres = current_centres(ctx.modules)
    return result
