"""The curve stage: measure the pruning curve on the torch model and make the automatic choice.

:func:`measure_curve` prunes the ranked neurons prefix by prefix in the torch model (masks at 0)
and measures held-out clean accuracy, the backdoor signal of a suspected target (the collapse
probe's pull, :func:`anp_onnx.collapse.probe_pull`) and, for display only, ASR on a triggered set;
:func:`anp_onnx.curve.compute_curve` decides where to measure and what to choose.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .collapse import MIN_PULL, PROBE_EPS, probe_pull
from .context import RepairContext
from .convert import torch_logits
from .curve import PruningCurve, compute_curve
from .data import ImageSet
from .evaluate import infer_target
from .options import CurveSettings
from .progress import CancelToken, ProgressCallback
from .prune import PruneSpec, RankedNeuron, plan_from_neurons


def measure_curve(ctx: RepairContext, masks: dict[str, np.ndarray], ranking: Sequence[RankedNeuron],
                  clean: ImageSet, settings: CurveSettings = CurveSettings(), *,
                  suspected_target: Optional[int] = None, signal_data: Optional[ImageSet] = None,
                  poisoned: Optional[ImageSet] = None, target: Optional[int] = None, device: str = "cpu",
                  progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> PruningCurve:
    """The pruning curve of ``ranking`` (neurons of ``masks``, lowest first) on held-out ``clean``.

    With a ``suspected_target`` the backdoor signal is measured on ``signal_data`` (default
    ``clean``). ``poisoned`` (triggered images, true labels) adds ASR to each point for display;
    its ``target`` defaults to the unpruned model's majority prediction on it. Every mask is 1 and
    the net is on the CPU afterwards.
    """
    probe_set = signal_data if signal_data is not None else clean
    signal_eps: list[float] = []  # the probe's noise, fixed on the first (unpruned) measurement
    with ctx.on_device(device) as net:
        keep = None
        if poisoned is not None and len(poisoned):
            if target is None:
                with ctx.pruned(None):
                    target = infer_target(torch_logits(net, poisoned.x, device).argmax(1))
            keep = poisoned.y != target
        modules = list(ctx.modules.values())
        scores: dict[int, tuple[float, Optional[float]]] = {}  # count -> (accuracy, ASR): a prefix is measured once

        def evaluate_prefix(chosen: Sequence[RankedNeuron], signal: bool, above: Optional[float] = None):
            share = None
            with ctx.pruned(plan_from_neurons(masks, chosen, PruneSpec.count(len(chosen)))):
                if len(chosen) not in scores:
                    acc = float((torch_logits(net, clean.x, device).argmax(1) == clean.y).mean())
                    asr = None
                    if keep is not None and keep.any():
                        pred = torch_logits(net, poisoned.x[keep], device).argmax(1)
                        asr = float((pred == target).mean())
                    scores[len(chosen)] = (acc, asr)
                if signal and suspected_target is not None:
                    if not signal_eps:  # a weak pull says too little: then all points use twice the noise
                        share = probe_pull(net, modules, probe_set, suspected_target, device=device, cancel=cancel)
                        signal_eps.append(PROBE_EPS if share >= MIN_PULL else 2 * PROBE_EPS)
                    if share is None or signal_eps[0] != PROBE_EPS:
                        share = probe_pull(net, modules, probe_set, suspected_target, eps=signal_eps[0],
                                           device=device, stop_above=above, cancel=cancel)
            return (*scores[len(chosen)], share)

        return compute_curve(ranking, evaluate_prefix, n_images=len(clean), max_drop=settings.max_drop,
                             max_fraction=settings.max_fraction, suspected_target=suspected_target,
                             signal_max_drop=settings.signal_max_drop, progress=progress, cancel=cancel)
