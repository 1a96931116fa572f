"""The middle of :func:`anp_onnx.repair`: learn masks, choose the pruning, run the refinements.

Two orders, one result:

* a fixed pruning (a count, a fraction, a threshold), or no refinements: calibrate -> probe -> ANP ->
  curve -> the choice -> the refinements on the pruned model;
* the automatic choice with refinements (the default): an automatic choice prunes nothing before
  the refinements (:func:`~anp_onnx.curve.effective_pruning`), so ANP's masks can matter only when
  the refinements change no weight and the probe named a target (then the backdoor signal's rule
  may prune after all, :func:`~anp_onnx.curve.pruning_after_refinements`; without a suspected
  target there is no signal, and nothing is pruned). So the order is calibrate -> probe -> the
  refinements on the unpruned model -> ANP and the curve only where they can change the output.
  The written model is the one the first order would write; what is saved when ANP did not run:
  no masks file (``RepairResult.masks`` is empty, ``optimisation.stage`` is "probe").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import numpy as np

from .anp import MaskResult
from .curve import PruningCurve, pruning_after_refinements
from .data import ImageSet
from .finish import refine
from .options import CurveSettings
from .progress import CancelToken, ProgressCallback
from .prune import AutoPrune, PrunePlan, PruneSpec
from .stages import RefinementResult

_LOGGER = logging.getLogger(__name__)


#: Why ANP did not run (``MaskResult.skipped``).
WEIGHTS_CHANGED = ("the refinements changed the weights, and the automatic choice prunes nothing after them "
                   "(no masks saved; a fixed pruning or no refinements runs ANP)")
NOTHING_CHANGED = ("the refinements changed no weight and the probe suspected no target, so the automatic choice "
                   "has no backdoor signal to prune by and prunes nothing (no masks saved)")


def defers_anp(pruning: PruneSpec, refinements: Sequence[str]) -> bool:
    """Whether a repair runs the refinements before ANP (and ANP only where it can matter; module doc)."""
    return bool(refinements) and isinstance(pruning, AutoPrune)


@dataclass
class Learnt:
    """What :func:`learn_and_choose` did: the mask stage's result (its ``masks`` empty when ANP did not
    run), the curve (None when not measured), the plan, the refinements' weights and results, and the
    stages in the order they ran."""

    optimisation: MaskResult
    curve: Optional[PruningCurve]
    plan: PrunePlan
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    refined: list[RefinementResult] = field(default_factory=list)
    order: list[str] = field(default_factory=list)


def learn_and_choose(rep, clean: ImageSet, val: Optional[ImageSet], config: Any, pruning: PruneSpec,
                     refinements: Sequence[str], *, poisoned: Optional[ImageSet] = None, target: Optional[int] = None,
                     signal_max_drop: float = CurveSettings.signal_max_drop,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Learnt:
    """Masks, curve, plan and refinements of one repair (see the module doc for the order).

    ``rep`` is the :class:`~anp_onnx.Repairer`; ``val`` the held-out clean images (the curve's);
    ``poisoned`` and ``target`` only add ASR to the curve's points (never used for a decision).
    """
    deferred = defers_anp(pruning, refinements)
    seed = getattr(config, "seed", 0)
    result = rep.optimize(clean, config, progress=progress, cancel=cancel, probe_only=deferred)
    learnt = Learnt(result, None, rep.plan({layer.name: np.ones(layer.size, np.float32) for layer in rep.layers},
                                           PruneSpec.count(0)))

    def run_refinements() -> None:
        learnt.initializers, learnt.refined = refine(rep.ctx, learnt.plan, clean, refinements, target=result.target,
                                                     device=result.device, seed=seed, holdout=val,
                                                     progress=progress, cancel=cancel)
        learnt.order.extend(refinements)

    if deferred:
        run_refinements()
        if not learnt.initializers and result.target is not None:
            _LOGGER.info("the refinements changed no weight: ANP learns masks for the backdoor signal's rule")
            result = learnt.optimisation = rep.optimize(clean, config, progress=progress, cancel=cancel,
                                                        probe=result.probe)
        else:
            result.skipped = (NOTHING_CHANGED if not learnt.initializers else WEIGHTS_CHANGED)
            _LOGGER.info("ANP not run: %s", result.skipped)
    if result.masks:
        learnt.order += [result.stage, "rank"]
        if val is not None or isinstance(pruning, AutoPrune):
            settings = CurveSettings(pruning.value if isinstance(pruning, AutoPrune) else CurveSettings.max_drop,
                                     signal_max_drop)
            learnt.curve = rep.pruning_curve(
                result.masks, val if val is not None else clean, tiebreak=result.mean_masks, poisoned=poisoned,
                target=target, max_drop=settings.max_drop, suspected_target=result.target, signal_data=clean,
                signal_max_drop=settings.signal_max_drop, device=getattr(config, "device", "cpu"),
                progress=progress, cancel=cancel)
            learnt.order.append("curve")
        spec = pruning_after_refinements(pruning, learnt.curve, refinements, bool(learnt.initializers))
        learnt.plan = rep.plan(result.masks, spec, tiebreak=result.mean_masks, curve=learnt.curve)
    if learnt.plan.spec != pruning:  # the plan stands for the automatic choice asked for
        learnt.plan = replace(learnt.plan, asked=pruning)
    _LOGGER.info("pruning %d of %d neurons (%s)", learnt.plan.count, learnt.plan.total, learnt.plan.describe())
    if not deferred:
        run_refinements()
    return learnt
