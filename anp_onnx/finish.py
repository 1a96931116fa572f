"""The pipeline's tail, shared by :func:`anp_onnx.repair`, the CLI and the desktop app.

:func:`finish` takes a chosen pruning plan and does everything after it: write back and verify
(:mod:`anp_onnx.export`), save the masks (:mod:`anp_onnx.masks_io`), measure the original and the
repaired file in onnxruntime on the test and held-out sets (:mod:`anp_onnx.evaluate`), and write
the report (:mod:`anp_onnx.report`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .anp import MaskResult
from .calibrate import current_centres
from .context import RepairContext
from .curve import PruningCurve
from .data import ImageSet
from .errors import OutputError
from .evaluate import EvalResult, evaluate
from .export import export, model_outputs
from .masks_io import mask_values_path, save_mask_values_txt, save_masks_json
from .model import LoadedModel, load_model
from .outputs import OutputSet
from .progress import CancelToken, ProgressCallback
from .prune import PrunePlan
from .report import report_paths, write_report
from .results import RepairResult
from .stages import RefinementResult, get_refinement
from . import unlearn as _unlearn  # noqa: F401,E402  (registers the "unlearn" refinement)


@dataclass(frozen=True)
class Evaluation:
    """Images the repair is measured on (never used to decide what to prune).

    ``test`` clean test images and ``poisoned`` their triggered copies (true labels) give ACC/ASR
    before and after; ``target`` is the attack's class (None: inferred from the original model's
    predictions on ``poisoned``); ``holdout`` is the held-out part of the clean data. ``before``
    is the original model's score on test/poisoned when it was already measured.
    """

    test: Optional[ImageSet] = None
    poisoned: Optional[ImageSet] = None
    target: Optional[int] = None
    holdout: Optional[ImageSet] = None
    before: Optional[EvalResult] = None


def repair_outputs(model: LoadedModel | os.PathLike | str, out: os.PathLike | str, *,
                   masks_path: Optional[os.PathLike | str] = None, report: bool = True, overwrite: bool = False,
                   replace_input: bool = False, inputs: Mapping[str, object] = {},
                   masks_optional: bool = False) -> OutputSet:
    """Every file a repair writes (model, its external data, masks JSON, mask_values.txt, report) and
    every file it reads (the model, its data files, ``inputs``: what -> path), checked before any work.

    ``model`` is the path until the model is loaded; call again with the :class:`LoadedModel` to
    add its external data files. ``masks_optional``: the masks may not be learnt (see
    :mod:`anp_onnx.pipeline`); an earlier run's masks files there are then removed, not left beside
    a model they do not belong to.
    """
    outputs = model_outputs(model, out, overwrite=overwrite, replace_input=replace_input)
    for what, path in inputs.items():
        outputs.add_input(path, what)
    if masks_path is not None:
        outputs.add_output(masks_path, "masks file", optional=masks_optional)
        outputs.add_output(mask_values_path(masks_path), "mask values file", optional=masks_optional)
    if report:
        for kind, path in report_paths(out).items():
            outputs.add_output(path, f"report's {kind} file", optional=kind in ("curve", "masks"))
    return outputs.check()


def save_masks(ctx: RepairContext, masks: Mapping[str, np.ndarray], path: Path,
               facts: Optional[Mapping[str, object]] = None,
               mean_masks: Optional[Mapping[str, np.ndarray]] = None,
               outputs: Optional[OutputSet] = None) -> list[Path]:
    """Masks as JSON at ``path`` (with the renormalised layers' centres) and as mask_values.txt beside it.

    With ``outputs`` they go to the set's temporary names (moved into place by its commit);
    without, both are checked (replacing existing files, never the model) and written as a set of their own.
    """
    txt = mask_values_path(path)
    if outputs is None:
        own = OutputSet(overwrite=True)
        own.add_input(ctx.model.path, "input model")
        own.add_inputs(sorted(ctx.model.external_files), "input model's external data")
        own.add_output(path, "masks file")
        own.add_output(txt, "mask values file")
        with own.check():
            save_masks(ctx, masks, path, facts, mean_masks, own)
            return own.commit()
    try:
        save_masks_json(outputs.temp(path), masks, ctx.layers, facts, mean_masks, current_centres(ctx.modules))
        save_mask_values_txt(outputs.temp(txt), masks)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return [path, txt]


def refine(ctx: RepairContext, plan: PrunePlan, clean: ImageSet, names: Sequence[str], *,
           target: Optional[int] = None, device: str = "cpu", seed: int = 0, holdout: Optional[ImageSet] = None,
           progress: Optional[ProgressCallback] = None,
           cancel: Optional[CancelToken] = None) -> tuple[dict[str, np.ndarray], list[RefinementResult]]:
    """Run the refinements ``names`` (registered, see :mod:`anp_onnx.stages`) on the pruned model, in order.

    ``target`` is the suspected backdoor target, if any. Returns the initializers to write (later
    refinements win) and each refinement's result.
    """
    initializers: dict[str, np.ndarray] = {}
    results = []
    for name in names:
        stage = get_refinement(name)
        with ctx.pruned(plan):
            results.append(stage.run(ctx, plan, clean, target=target, device=device, seed=seed, holdout=holdout,
                                      progress=progress, cancel=cancel))
        initializers.update(results[-1].initializers)
    return initializers, results


def finish(ctx: RepairContext, plan: PrunePlan, masks: Mapping[str, np.ndarray], out: Path, *,
           optimisation: Optional[MaskResult] = None, config: Any = None, curve: Optional[PruningCurve] = None,
           evaluation: Evaluation = Evaluation(), verify_images: Optional[ImageSet] = None,
           masks_path: Optional[Path] = None, report: bool = True, overwrite: bool = False,
           model_facts: Optional[Mapping[str, object]] = None, metadata: Optional[Mapping[str, object]] = None,
           parity: Optional[float] = None, stages: tuple[str, ...] = (), masks_source: str = "learnt in this run",
           initializers: Optional[Mapping[str, np.ndarray]] = None, replace_input: bool = False,
           mean_masks: Optional[Mapping[str, np.ndarray]] = None, started: Optional[float] = None,
           outputs: Optional[OutputSet] = None, refined: Optional[Mapping[str, dict]] = None) -> RepairResult:
    """Write the repaired model for ``plan``, its masks (unless ``masks_path`` is None) and report.

    ``optimisation`` is the mask stage's result when the masks were learnt in this run;
    ``model_facts`` (path, sha256 of the input) go into the masks file and the model's metadata;
    ``initializers`` are the refinements' new weights (see :func:`refine`); ``replace_input`` lets
    ``out`` be the input model (see :func:`anp_onnx.export.export`). ``mean_masks`` (the ranking's
    tie-breakers) default to the optimisation's; give them for masks loaded from a file.
    ``outputs`` is the checked output set (see :func:`repair_outputs`; made here when None): every
    file is written to a temporary name and all are moved into place at the end, or none.
    """
    start = started if started is not None else time.perf_counter()
    if outputs is None:
        outputs = repair_outputs(ctx.model, out, masks_path=masks_path, report=report, overwrite=overwrite,
                                 replace_input=replace_input)
    with outputs:
        try:
            repaired = _finish(ctx, plan, masks, Path(out), outputs, optimisation=optimisation, config=config,
                               curve=curve, evaluation=evaluation, verify_images=verify_images, masks_path=masks_path,
                               report=report, model_facts=model_facts, metadata=metadata, parity=parity,
                               stages=stages, masks_source=masks_source, initializers=initializers,
                               mean_masks=mean_masks, start=start, refined=refined)
        except OSError as exc:
            raise OutputError(f"cannot write the outputs of {out} ({exc.strerror or exc}); nothing was written") \
                from exc
        outputs.commit()
    return repaired


def _finish(ctx: RepairContext, plan: PrunePlan, masks: Mapping[str, np.ndarray], out: Path, outputs: OutputSet, *,
            optimisation, config, curve, evaluation, verify_images, masks_path, report, model_facts, metadata,
            parity, stages, masks_source, initializers, mean_masks, start, refined=None) -> RepairResult:
    """:func:`finish` with every file written to the temporary names of ``outputs``."""
    facts = dict(model_facts or {})
    meta = dict(metadata or {})
    if config is not None:
        meta.setdefault("anp", config.to_dict())
    result = export(ctx, plan, out, verify_images=verify_images, metadata=meta,
                    source_sha256=facts.get("sha256"), initializers=initializers, outputs=outputs)
    files = list(result.files)
    if masks_path is not None:
        extra: dict[str, object] = {"model": facts, "preprocessing": ctx.preprocessing.to_dict(),
                                    "masks": masks_source}
        if config is not None:
            extra["config"] = config.to_dict()
        if optimisation is not None:
            extra["suspected_target"] = optimisation.target
            extra["probe"] = optimisation.probe.to_dict() if optimisation.probe else None
        if mean_masks is None and optimisation is not None:
            mean_masks = optimisation.mean_masks
        files += save_masks(ctx, masks, masks_path, extra, mean_masks, outputs)
    ev = evaluation
    before = after = holdout_before = holdout_after = None
    if ev.test is not None or ev.poisoned is not None or ev.holdout is not None:
        written = load_model(outputs.temp(out), layout=ctx.model.input.layout)
        if ev.test is not None or ev.poisoned is not None:
            before = ev.before or evaluate(ctx.model, ev.test, ctx.preprocessing, poisoned=ev.poisoned,
                                           target=ev.target)
            after = evaluate(written, ev.test, ctx.preprocessing, poisoned=ev.poisoned, target=before.target)
        if ev.holdout is not None:
            holdout_before = evaluate(ctx.model, ev.holdout, ctx.preprocessing)
            holdout_after = evaluate(written, ev.holdout, ctx.preprocessing)
    repaired = RepairResult(out, dict(masks), plan, ctx.layers, config, ctx.preprocessing, optimisation, result,
                            parity, before, after, holdout_before, holdout_after, files,
                            time.perf_counter() - start, curve, list(stages) + ["write-back", "verify"],
                            masks_source, dict(refined or {}))
    if before is not None or holdout_before is not None:
        repaired.stages.append("evaluate")
    if report:
        repaired.stages.append("report")
        repaired.files += write_report(repaired, to=outputs.temp)
    return repaired


def refinement_facts(names: Sequence[str], results) -> dict[str, dict]:
    """``RepairResult.refinements``: per refinement its figures, seconds and how many initializers it changed."""
    return {n: {"metrics": r.metrics, "seconds": round(r.seconds, 1), "initializers": len(r.initializers)}
            for n, r in zip(names, results)}


def refinement_summary(facts: Mapping[str, Any]) -> str:
    """One line on what a refinement did, from its entry in ``RepairResult.refinements``."""
    m = facts.get("metrics", {})
    if m.get("skipped"):
        return f"skipped (no backdoor suspected: scan anomaly {m.get('scan_anomaly', 0):.2f})"
    targets = [str(int(v)) for k, v in sorted(m.items()) if k.startswith("target_")]
    return (f"{int(m.get('rounds', 0))} rounds kept for class {' and '.join(targets) or '-'}, "
            f"{facts.get('initializers', 0)} initializers changed, {facts.get('seconds', 0):.0f} s")


def stages_ran(parity: Optional[float], optimisation: Optional[MaskResult],
               curve: Optional[PruningCurve], order: Optional[Sequence[str]] = None) -> list[str]:
    """The stages before the write-back that produced these results, in pipeline order (``order``: the
    stages after the probe as they ran, when not the usual mask stage -> rank -> curve)."""
    stages = ["convert"] + (["parity"] if parity is not None else [])
    if optimisation is not None:
        stages += (["calibrate"] if optimisation.centres else []) + (["probe"] if optimisation.probe else [])
        if order is not None:
            return stages + list(order)
        stages.append(optimisation.stage)
    return stages + ["rank"] + (["curve"] if curve is not None else [])
