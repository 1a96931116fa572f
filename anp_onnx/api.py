"""The public Python API: the one-call :func:`repair`, and a stepwise :class:`Repairer`.

>>> import anp_onnx
>>> result = anp_onnx.repair("model.onnx", "clean/", out="repaired.onnx")
>>> result.plan.count, result.output

Both run the pipeline of docs/ARCHITECTURE.md, one stage module per step: load (:mod:`~anp_onnx.model`) ->
convert and find neurons (:mod:`~anp_onnx.context`) -> parity -> calibrate -> probe -> mask stage
(:mod:`~anp_onnx.learn`) -> rank (:mod:`~anp_onnx.prune`) -> curve and choice (:mod:`~anp_onnx.sweep`) ->
refine -> write back, verify, evaluate, report (:mod:`~anp_onnx.finish`); with the default automatic choice
and refinements, :func:`repair` refines right after the probe and runs the mask stage only where it can
change the output (:mod:`~anp_onnx.pipeline`). The CLI and the app are thin layers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .anp import ANPConfig, MaskResult, resolve_device
from .calibrate import calibrate, current_centres, set_centres
from .collapse import CollapseProbe, find_target, probe_supported
from .context import open_context
from .convert import parity
from .curve import PruningCurve, effective_pruning, pruning_after_refinements
from .data import ImageSet, load_images
from .errors import SettingsError
from .evaluate import EvalResult, evaluate
from .export import PARITY_IMAGES, export, random_images
from .finish import Evaluation, finish, refine, refinement_facts, repair_outputs, save_masks, stages_ran
from .learn import check_classes, learn_masks
from .masks_io import default_masks_path, file_sha256, load_masks, mask_values_path
from .metadata import preprocessing_from_metadata, read_metadata
from .model import LoadedModel, load_model
from .neurons import NeuronLayer
from .options import DEFAULT_HOLDOUT, DEFAULT_REFINEMENTS, CurveSettings, NeuronSelection
from .pipeline import defers_anp, learn_and_choose
from .preprocessing import Preprocessing
from .progress import CancelToken, ProgressCallback
from .prune import REFERENCE_THRESHOLD, AutoPrune, PrunePlan, PruneSpec, match_masks, plan_from_neurons, \
    plan_pruning, rank_neurons
from .results import ExportResult, ModelInfo, RepairResult
from .stages import get_refinement, mask_stage_for
from .sweep import measure_curve

__all__ = ["Repairer", "repair", "prune", "inspect_model", "evaluate_model", "ModelInfo", "ExportResult",
           "RepairResult", "DEFAULT_HOLDOUT", "default_masks_path", "mask_values_path"]

_LOGGER = logging.getLogger(__name__)
ImagesLike = os.PathLike | str | ImageSet


class Repairer:
    """A model opened for repair, for step-by-step use (the desktop app calls the steps one by one):
    :meth:`load_data` -> :meth:`check_parity` -> :meth:`optimize` -> :meth:`pruning_curve` ->
    :meth:`plan` -> :meth:`finish` (or just :meth:`export`). Each step is one stage function
    applied to :attr:`ctx`, the :class:`~anp_onnx.context.RepairContext`."""

    def __init__(self, model: LoadedModel, *, preprocessing: Optional[Preprocessing] = None,
                 kinds: Optional[Sequence[str]] = None, include: Optional[Sequence[str]] = None,
                 exclude: Optional[Sequence[str]] = None) -> None:
        pre = preprocessing or preprocessing_from_metadata(model.proto) or Preprocessing()
        self.ctx = open_context(model, pre, NeuronSelection.of(kinds, include, exclude))
        self.parity: Optional[float] = None
        self._sha256: Optional[str] = None

    @classmethod
    def open(cls, path: os.PathLike | str, *, layout: Optional[str] = None, **kwargs) -> "Repairer":
        return cls(load_model(path, layout=layout), **kwargs)

    model = property(lambda self: self.ctx.model, doc="The loaded ONNX model.")
    neurons = property(lambda self: self.ctx.neurons, doc="The neuron search's result.")
    net = property(lambda self: self.ctx.net, doc="The torch network (images in [0, 1] -> logits).")
    modules = property(lambda self: self.ctx.modules, doc="Layer name -> perturbable torch module.")

    @property
    def layers(self) -> tuple[NeuronLayer, ...]:
        return self.ctx.layers

    @property
    def preprocessing(self) -> Preprocessing:
        return self.ctx.preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing) -> None:
        self.ctx.net.preprocessing = value
        self.parity = None

    def load_data(self, path: os.PathLike | str, *, limit: Optional[int] = None) -> ImageSet:
        """Images from a folder or .npz, resized and converted to what the model takes."""
        spec = self.model.input
        return load_images(path, size=spec.size, channels=spec.channels, num_classes=self.model.num_classes,
                           limit=limit)

    def check_parity(self, images: ImageSet) -> float:
        """Max |torch - onnxruntime| on up to 32 of ``images``; ConversionError when they disagree."""
        self.ctx.reset_masks()
        self.parity = parity(self.model, self.net, images.x[:PARITY_IMAGES], self.preprocessing)
        _LOGGER.info("conversion parity: max |torch - onnxruntime| = %.2e on %d images",
                     self.parity, min(len(images), PARITY_IMAGES))
        return self.parity

    def reset_masks(self) -> None:
        self.ctx.reset_masks()

    def apply_plan(self, plan: PrunePlan) -> None:
        """Set the torch model's masks to the plan (0 pruned, 1 kept): the repaired model in torch."""
        self.ctx.apply_plan(plan)

    def optimize(self, clean: ImageSet, config: Any = ANPConfig(), *, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, probe_only: bool = False,
                 probe: Optional[CollapseProbe] = None) -> MaskResult:
        """Learn masks on ``clean`` (calibrate, probe, then the mask stage ``config`` selects: ANP for
        an ANPConfig); the torch model is left with all masks at 1, on the CPU. ``probe_only`` and
        ``probe``: see :func:`anp_onnx.learn.learn_masks`."""
        try:
            return learn_masks(self.ctx, clean, config, progress=progress, cancel=cancel, probe_only=probe_only,
                               probe=probe)
        finally:
            self.net.to("cpu")
            self.ctx.reset_masks()

    def pruning_curve(self, masks: Mapping[str, np.ndarray], clean: ImageSet, *,
                      tiebreak: Optional[Mapping[str, np.ndarray]] = None, poisoned: Optional[ImageSet] = None,
                      target: Optional[int] = None, max_drop: float = CurveSettings.max_drop,
                      max_fraction: float = CurveSettings.max_fraction, suspected_target: Optional[int] = None,
                      signal_data: Optional[ImageSet] = None,
                      signal_max_drop: float = CurveSettings.signal_max_drop, device: str = "cpu",
                      progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelToken] = None) -> PruningCurve:
        """Clean accuracy on ``clean`` against neurons pruned in mask order, and the automatic choice
        (see :func:`anp_onnx.sweep.measure_curve`)."""
        masks = match_masks(masks, self.layers)
        settings = CurveSettings(max_drop, signal_max_drop, max_fraction)
        return measure_curve(self.ctx, masks, rank_neurons(masks, tiebreak), clean, settings,
                             suspected_target=suspected_target, signal_data=signal_data, poisoned=poisoned,
                             target=target, device=resolve_device(device), progress=progress, cancel=cancel)

    def plan(self, masks: Mapping[str, np.ndarray], spec: PruneSpec = PruneSpec.threshold(REFERENCE_THRESHOLD), *,
             tiebreak: Optional[Mapping[str, np.ndarray]] = None, curve: Optional[PruningCurve] = None,
             refinements: Sequence[str] = ()) -> PrunePlan:
        """Neurons to prune. ``auto`` specs need the ``curve`` (see :meth:`pruning_curve`); with the
        ``refinements`` that will run after it, the spec is :func:`~anp_onnx.curve.effective_pruning`'s."""
        masks = match_masks(masks, self.layers)
        if (effective := effective_pruning(spec, refinements)) != spec:
            _LOGGER.info("the automatic choice prunes nothing before the refinements (benchmarks/README.md)")
            return replace(plan_pruning(masks, effective, tiebreak), asked=spec)
        if isinstance(spec, AutoPrune):
            if curve is None:
                raise SettingsError("automatic pruning needs a pruning curve on held-out clean data")
            return plan_from_neurons(masks, curve.ranking[:curve.chosen.count], spec)
        return plan_pruning(masks, spec, tiebreak)

    @property
    def centres(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Renormalised layers' clean (mean, spread) per neuron (set by :meth:`optimize`; see ANPConfig)."""
        return current_centres(self.modules)

    def set_centres(self, centres: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Renormalise exactly the layers named in ``centres`` (as saved with masks), the others not."""
        set_centres(self.modules, centres)

    def model_facts(self) -> dict:
        """Path and SHA-256 of the input file (hashed once)."""
        path = self.model.path
        if path is None:
            return {}
        if self._sha256 is None:
            self._sha256 = file_sha256(path)
        return {"path": str(path), "sha256": self._sha256}

    def save_masks(self, masks: Mapping[str, np.ndarray], path: os.PathLike | str,
                   extra: Optional[Mapping[str, object]] = None,
                   mean_masks: Optional[Mapping[str, np.ndarray]] = None) -> list[Path]:
        """Masks as JSON at ``path`` and as the reference's mask_values.txt beside it."""
        facts = {"model": self.model_facts(), **(dict(extra) if extra else {})}
        return save_masks(self.ctx, masks, Path(path), facts, mean_masks)

    def export(self, plan: PrunePlan, out: os.PathLike | str, *, overwrite: bool = False,
               verify_images: Optional[ImageSet] = None,
               metadata: Optional[Mapping[str, object]] = None) -> ExportResult:
        """Write ``plan`` into the original ONNX model at ``out``, verified first (see anp_onnx.export)."""
        return export(self.ctx, plan, out, overwrite=overwrite, verify_images=verify_images, metadata=metadata,
                      source_sha256=self.model_facts().get("sha256"))

    def finish(self, plan: PrunePlan, masks: Mapping[str, np.ndarray], out: os.PathLike | str, *,
               save_masks: bool = True, refinements: Sequence[str] = (), refine_data: Optional[ImageSet] = None,
               progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
               **kwargs) -> RepairResult:
        """Run ``refinements`` on ``refine_data`` (see :func:`repair`), export ``plan``, save the masks beside
        it, evaluate before/after and write the report (see :func:`anp_onnx.finish.finish`)."""
        opt = kwargs.get("optimisation")
        kwargs.setdefault("stages", tuple(stages_ran(self.parity, opt, kwargs.get("curve")) + list(refinements)))
        masks_path = default_masks_path(out) if save_masks else None
        outputs = repair_outputs(self.model, out, masks_path=masks_path, report=kwargs.get("report", True),
                                 overwrite=kwargs.get("overwrite", False),
                                 replace_input=kwargs.get("replace_input", False))
        asked, curve = plan.asked or plan.spec, kwargs.get("curve")
        if effective_pruning(asked, refinements) != plan.spec:  # planned without them
            plan = self.plan(masks, asked, curve=curve, refinements=refinements)
        with self.ctx.weights_kept():  # refinements train the torch weights: this Repairer keeps the original's
            initializers, refined = refine(
                self.ctx, plan, refine_data, refinements, target=getattr(opt, "target", None),
                device=getattr(opt, "device", "cpu"), holdout=getattr(kwargs.get("evaluation"), "holdout", None),
                progress=progress, cancel=cancel) if refinements else ({}, [])
            if pruning_after_refinements(asked, curve, refinements, bool(initializers)) != plan.spec:
                plan = self.plan(masks, asked, curve=curve)  # they changed nothing: the signal rule prunes
            return finish(self.ctx, plan, masks, Path(out), masks_path=masks_path, model_facts=self.model_facts(),
                          parity=self.parity, outputs=outputs, initializers=initializers,
                          refined=refinement_facts(refinements, refined), **kwargs)

    def evaluate(self, clean: Optional[ImageSet], *, poisoned: Optional[ImageSet] = None,
                 target: Optional[int] = None, model: Optional[LoadedModel] = None) -> EvalResult:
        """ACC/ASR of ``model`` (default: the original) in onnxruntime with this preprocessing."""
        return evaluate(model or self.model, clean, self.preprocessing, poisoned=poisoned, target=target)

    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(m.path, m.input, m.num_classes, m.opset, m.ir_version,
                         f"{m.proto.producer_name} {m.proto.producer_version}".strip(), self.neurons,
                         self.parity, m.notes + self.neurons.notes, read_metadata(m.proto))


def inspect_model(path: os.PathLike | str, *, layout: Optional[str] = None,
                  data: Optional[os.PathLike | str] = None, preprocessing: Optional[Preprocessing] = None,
                  kinds: Optional[Sequence[str]] = None, include: Optional[Sequence[str]] = None,
                  exclude: Optional[Sequence[str]] = None, renormalise: bool = True) -> ModelInfo:
    """Describe a model and check its conversion (on ``data`` when given, else on random images).

    With clean ``data`` the collapse probe runs too (``ModelInfo.probe``), when every neuron layer
    normalises or (``renormalise``, as in ``ANPConfig``) is renormalised on ``data``: a suspected
    target is a sign of a backdoor, found without any trigger (see anp_onnx.collapse).
    """
    rep = Repairer.open(path, layout=layout, preprocessing=preprocessing, kinds=kinds, include=include,
                        exclude=exclude)
    images = rep.load_data(data) if data is not None else random_images(rep.model.input)
    rep.check_parity(images)
    info = rep.info()
    if data is not None and renormalise:
        calibrate(rep.net, rep.modules.values(), images)
    if data is not None and probe_supported(rep.modules.values()):
        info = replace(info, probe=find_target(rep.net, rep.modules.values(), images))
    return info


def _as_images(rep: Repairer, data: Optional[ImagesLike]) -> Optional[ImageSet]:
    if data is None or isinstance(data, ImageSet):
        return data
    return rep.load_data(data)


def repair(
    model: os.PathLike | str,
    data: ImagesLike,
    *,
    out: os.PathLike | str,
    config: Any = ANPConfig(),
    pruning: PruneSpec = PruneSpec(),
    preprocessing: Optional[Preprocessing] = None,
    layout: Optional[str] = None,
    holdout: float = DEFAULT_HOLDOUT,
    test_data: Optional[ImagesLike] = None,
    poisoned_data: Optional[ImagesLike] = None,
    target: Optional[int] = None,
    masks_out: Optional[os.PathLike | str] = None,
    overwrite: bool = False,
    kinds: Optional[Sequence[str]] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    report: bool = True,
    signal_max_drop: float = CurveSettings.signal_max_drop,
    refinements: Sequence[str] = DEFAULT_REFINEMENTS,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> RepairResult:
    """Repair a backdoored ONNX classifier and write the pruned model to ``out``.

    ``data`` is the clean set (folder or .npz, or an :class:`ImageSet`); ``holdout`` (fraction < 1
    or a count) of it is kept aside, stratified by class: the pruning curve and the automatic choice
    (the default ``pruning``) are measured on it. ``config`` selects the mask stage by its type
    (:class:`ANPConfig`: ANP; see anp_onnx.stages). With the default ``config`` (``target="auto"``)
    ANP first probes where clean images collapse under neuron noise; a suspected backdoor target
    makes the noise targeted and lets the automatic choice prune until its signal goes, spending at
    most ``signal_max_drop`` of held-out accuracy (see anp_onnx.collapse and anp_onnx.curve).
    ``test_data`` and ``poisoned_data`` (triggered images with their true labels) add ACC/ASR before
    and after, measured in onnxruntime; they never influence what is pruned. Masks are saved as
    JSON and mask_values.txt next to the output unless ``masks_out`` says where. ``refinements``
    names registered stages that change weights before the model is written (default: "unlearn",
    anp_onnx.unlearn; () for none). With refinements the automatic choice prunes nothing, so they
    run first, and ANP (and its masks file) only if they changed no weight and a target is
    suspected (anp_onnx.pipeline); a fixed ``pruning`` runs ANP first and refines the pruned model.
    """
    start = time.perf_counter()
    for name in refinements:  # unknown names fail before any work
        get_refinement(name)
    masks_path = Path(masks_out) if masks_out else default_masks_path(out)
    checks = dict(masks_path=masks_path, report=report, overwrite=overwrite,
                  masks_optional=defers_anp(pruning, refinements),
                  inputs={"clean data": data, "test data": test_data, "poisoned data": poisoned_data})
    repair_outputs(model, out, **checks)  # every output checked before any work; again with the model's data files
    loaded = load_model(model, layout=layout)
    checked = repair_outputs(loaded, out, **checks)
    rep = Repairer(loaded, preprocessing=preprocessing, kinds=kinds, include=include, exclude=exclude)
    config = mask_stage_for(config).resolve(config)
    clean = data if isinstance(data, ImageSet) else rep.load_data(data)
    check_classes(clean)  # before any work (the mask stage checks again, and warns about missing classes)
    test, poisoned = _as_images(rep, test_data), _as_images(rep, poisoned_data)
    forced = getattr(config, "target", None)
    if isinstance(forced, int) and rep.model.num_classes and forced >= rep.model.num_classes:
        raise SettingsError(f"ANP target {forced} is not a class of this model ({rep.model.num_classes} classes)")
    val = None
    if holdout:
        clean, val = clean.split(holdout, seed=getattr(config, "seed", 0))
    elif isinstance(pruning, AutoPrune):
        _LOGGER.warning("no held-out clean data: the automatic choice is measured on the optimisation's own images")
    diff = rep.check_parity(clean)
    before = rep.evaluate(test, poisoned=poisoned, target=target) if (test or poisoned) else None
    if before is not None and target is None:
        target = before.target
    learnt = learn_and_choose(rep, clean, val, config, pruning, refinements, poisoned=poisoned, target=target,
                              signal_max_drop=signal_max_drop, progress=progress, cancel=cancel)
    result, plan, curve, initializers = learnt.optimisation, learnt.plan, learnt.curve, learnt.initializers
    return finish(rep.ctx, plan, result.masks, out, optimisation=result, config=config, curve=curve,
                  evaluation=Evaluation(test, poisoned, target, val, before), verify_images=clean,
                  masks_path=masks_path if result.masks else None, report=report, overwrite=overwrite,
                  model_facts=rep.model_facts(), metadata={"data": clean.source}, parity=diff,
                  initializers=initializers, started=start,
                  stages=tuple(stages_ran(diff, result, curve, learnt.order)), outputs=checked,
                  refined=refinement_facts(refinements, learnt.refined))


def prune(model: os.PathLike | str, masks: os.PathLike | str | Mapping[str, np.ndarray], *,
          out: os.PathLike | str, pruning: PruneSpec = PruneSpec.threshold(REFERENCE_THRESHOLD),
          layout: Optional[str] = None, preprocessing: Optional[Preprocessing] = None, overwrite: bool = False,
          verify_data: Optional[ImagesLike] = None, kinds: Optional[Sequence[str]] = None,
          include: Optional[Sequence[str]] = None,
          exclude: Optional[Sequence[str]] = None) -> tuple[PrunePlan, ExportResult]:
    """Prune ``model`` from saved masks (no new optimisation) and write it to ``out``.

    An ``auto`` spec needs ``verify_data`` (clean images); masks saved by :func:`repair` carry the
    suspected target, so the automatic choice uses the backdoor signal as repair's did.
    """
    inputs = {"verification data": verify_data, "masks file": None if isinstance(masks, Mapping) else masks}
    repair_outputs(model, out, report=False, overwrite=overwrite, inputs=inputs)  # before any work
    facts: dict = {}
    if not isinstance(masks, Mapping):
        masks, facts = load_masks(masks)
    loaded = load_model(model, layout=layout)
    repair_outputs(loaded, out, report=False, overwrite=overwrite, inputs=inputs)
    rep = Repairer(loaded, preprocessing=preprocessing, kinds=kinds, include=include, exclude=exclude)
    rep.set_centres(facts.get("centres") or {})
    recorded = (facts.get("model") or {}).get("sha256") if isinstance(facts.get("model"), dict) else None
    if recorded and rep.model.path and recorded != rep.model_facts()["sha256"]:
        _LOGGER.warning("the masks were computed on a different file than %s (sha256 differs)", rep.model.path)
    images = _as_images(rep, verify_data)
    tiebreak = facts.get("mean_masks")
    curve = None
    if isinstance(pruning, AutoPrune):
        if images is None:
            raise SettingsError("automatic pruning needs clean images to measure accuracy on (--data)")
        suspected = facts.get("suspected_target")
        curve = rep.pruning_curve(masks, images, tiebreak=tiebreak, max_drop=pruning.value,
                                  suspected_target=suspected if isinstance(suspected, int) else None)
    plan = rep.plan(masks, pruning, tiebreak=tiebreak, curve=curve)
    return plan, rep.export(plan, out, overwrite=overwrite, verify_images=images)


def evaluate_model(model: os.PathLike | str, data: Optional[os.PathLike | str] = None, *,
                   poisoned: Optional[os.PathLike | str] = None, target: Optional[int] = None,
                   preprocessing: Optional[Preprocessing] = None, layout: Optional[str] = None,
                   progress: Optional[ProgressCallback] = None,
                   original: Optional[os.PathLike | str] = None) -> EvalResult:
    """ACC (and ASR with ``poisoned``) of an ONNX model in onnxruntime; no conversion needed. The default
    ``target``: the majority prediction on ``poisoned`` of the ``original`` model (the one before the
    repair), else of ``model`` unless anp-onnx repaired it (its own predictions no longer show it)."""
    if data is None and poisoned is None:
        raise SettingsError("give clean test data, triggered test data, or both")
    loaded = load_model(model, layout=layout)
    pre = preprocessing or preprocessing_from_metadata(loaded.proto) or Preprocessing()
    spec, classes = loaded.input, loaded.num_classes
    load = lambda p: load_images(p, size=spec.size, channels=spec.channels, num_classes=classes)  # noqa: E731
    triggered, inferred = load(poisoned) if poisoned else None, target is None and original is not None
    if triggered is not None and inferred:
        target = evaluate(load_model(original, layout=layout), None, pre, poisoned=triggered).target
    elif triggered is not None and target is None and "pruned" in read_metadata(loaded.proto):
        raise SettingsError(f"{model} was repaired by anp-onnx: its own predictions do not show the attack's "
                            "target; give the target class (--target) or the model before the repair (--original)")
    result = evaluate(loaded, load(data) if data else None, pre, poisoned=triggered, target=target,
                      progress=progress)
    return replace(result, target_inferred=True) if inferred and triggered is not None else result
