"""The public Python API: a stepwise :class:`Repairer` and the one-call :func:`repair`.

>>> import anp_onnx
>>> result = anp_onnx.repair("model.onnx", "clean/", out="repaired.onnx")
>>> result.plan.count, result.output

The CLI and the desktop app are thin layers over these functions.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from . import __version__
from .anp import ANPConfig, MaskResult, calibrate, current_centres, optimize_masks, resolve_device
from .convert import ClassifierNet, convert, install_neurons, ort_logits, parity, to_model_input, torch_logits
from .convert import PARITY_ATOL, PARITY_RTOL
from .data import ImageSet, Preprocessing, load_images
from .errors import DataError, ModelError, SettingsError, UnsupportedModelError
from .evaluate import EvalResult, evaluate
from .fold import (
    check_data_path, check_output_path, check_written, external_names_for, fold_plan, read_metadata, save_model,
)
from .model import InputSpec, LoadedModel, load_model
from .neurons import NeuronLayer, NeuronSearch, find_neurons
from .progress import CancelToken, ProgressCallback
from .report import report_paths, write_report
from .collapse import MIN_PULL, PROBE_EPS, CollapseProbe, find_target, probe_pull, probe_supported
from .curve import DEFAULT_MAX_DROP, DEFAULT_MAX_FRACTION, DEFAULT_SIGNAL_MAX_DROP, PruningCurve, compute_curve
from .evaluate import infer_target
from .prune import (
    PrunePlan, PruneSpec, file_sha256, match_masks, plan_from_neurons, plan_pruning, rank_neurons,
    save_mask_values_txt, save_masks_json,
)

_LOGGER = logging.getLogger(__name__)
PARITY_IMAGES = 32
#: Fraction of the clean data held out (stratified) for the pruning curve and automatic choice.
DEFAULT_HOLDOUT = 0.2


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`inspect_model` found: input, classes, neurons, and the conversion check."""

    path: Optional[Path]
    input: InputSpec
    num_classes: int
    opset: int
    ir_version: int
    producer: str
    neurons: NeuronSearch
    parity: Optional[float]
    notes: tuple[str, ...]
    metadata: Mapping[str, object]
    probe: Optional[CollapseProbe] = None

    def to_dict(self) -> dict:
        return {
            "path": str(self.path) if self.path else None, "input": self.input.describe(),
            "layout": self.input.layout, "num_classes": self.num_classes, "opset": self.opset,
            "ir_version": self.ir_version, "producer": self.producer,
            "neurons": self.neurons.total, "layers": [layer.to_dict() for layer in self.neurons.layers],
            "excluded_layers": list(self.neurons.excluded), "parity_max_abs_diff": self.parity,
            "notes": list(self.notes), "collapse_probe": self.probe.to_dict() if self.probe else None,
        }


@dataclass
class ExportResult:
    """A written repaired model, verified by onnx.checker and onnxruntime."""

    path: Path
    files: list[Path]
    changed_initializers: list[str]
    max_abs_diff: float


@dataclass
class RepairResult:
    """Everything :func:`repair` did: masks, pruned neurons, figures and output path."""

    output: Path
    masks: dict[str, np.ndarray]
    plan: PrunePlan
    layers: tuple[NeuronLayer, ...]
    config: ANPConfig
    preprocessing: Preprocessing
    optimisation: MaskResult
    export: ExportResult
    parity: float
    before: Optional[EvalResult] = None
    after: Optional[EvalResult] = None
    holdout_before: Optional[EvalResult] = None
    holdout_after: Optional[EvalResult] = None
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    curve: Optional[PruningCurve] = None

    @property
    def pruned(self) -> dict[str, list[int]]:
        return {k: [int(i) for i in v] for k, v in self.plan.pruned.items() if len(v)}


def preprocessing_from_metadata(model: LoadedModel) -> Optional[Preprocessing]:
    """The preprocessing an earlier anp-onnx run recorded in the model, if any."""
    entry = read_metadata(model.proto).get("preprocessing")
    if isinstance(entry, dict):
        try:
            return Preprocessing.from_dict(entry)
        except Exception:  # noqa: BLE001 - metadata written by another version: ignore it
            return None
    return None


class Repairer:
    """A model opened for repair: converted to torch with perturbable neurons installed.

    Steps, each usable on its own (the GUI calls them one by one):
    :meth:`load_data` -> :meth:`check_parity` -> :meth:`optimize` -> :meth:`plan` -> :meth:`export`.
    """

    def __init__(self, model: LoadedModel, *, preprocessing: Optional[Preprocessing] = None,
                 kinds: Optional[Sequence[str]] = None, include: Optional[Sequence[str]] = None,
                 exclude: Optional[Sequence[str]] = None) -> None:
        self.model = model
        self.neurons = find_neurons(model.proto, kinds, include, exclude)
        if not self.neurons.layers:
            raise UnsupportedModelError(_no_neurons_message(model, self.neurons))
        converted = convert(model)
        self.modules = install_neurons(converted, self.neurons.layers)
        pre = preprocessing or preprocessing_from_metadata(model) or Preprocessing()
        self.net = ClassifierNet(converted.graph, model.input.layout, pre, converted.output_activation)
        self.parity: Optional[float] = None
        self._sha256: Optional[str] = None

    @classmethod
    def open(cls, path: os.PathLike | str, *, layout: Optional[str] = None, **kwargs) -> "Repairer":
        return cls(load_model(path, layout=layout), **kwargs)

    @property
    def layers(self) -> tuple[NeuronLayer, ...]:
        return self.neurons.layers

    @property
    def preprocessing(self) -> Preprocessing:
        return self.net.preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing) -> None:
        self.net.preprocessing = value
        self.parity = None

    def load_data(self, path: os.PathLike | str, *, limit: Optional[int] = None) -> ImageSet:
        """Images from a folder or .npz, resized and converted to what the model takes."""
        spec = self.model.input
        return load_images(path, size=spec.size, channels=spec.channels,
                           num_classes=self.model.num_classes, limit=limit)

    def check_parity(self, images: ImageSet) -> float:
        """Max |torch - onnxruntime| on up to 32 of ``images``; ConversionError when they disagree."""
        self.reset_masks()
        self.parity = parity(self.model, self.net, images.x[:PARITY_IMAGES], self.preprocessing)
        _LOGGER.info("conversion parity: max |torch - onnxruntime| = %.2e on %d images",
                     self.parity, min(len(images), PARITY_IMAGES))
        return self.parity

    def reset_masks(self) -> None:
        for m in self.modules.values():
            m.set_mask(np.ones(m.neuron_mask.numel(), dtype=np.float32))

    def optimize(self, clean: ImageSet, config: ANPConfig = ANPConfig(), *,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> MaskResult:
        """Learn ANP masks on ``clean``; the torch model is left with all masks at 1."""
        try:
            return optimize_masks(self.net, self.modules, clean, config, progress=progress, cancel=cancel)
        finally:
            self.net.to("cpu")
            self.reset_masks()

    def plan(self, masks: Mapping[str, np.ndarray], spec: PruneSpec = PruneSpec.threshold(0.2), *,
             tiebreak: Optional[Mapping[str, np.ndarray]] = None, curve: Optional[PruningCurve] = None) -> PrunePlan:
        """Neurons to prune. ``auto`` specs need the ``curve`` (see :meth:`pruning_curve`)."""
        masks = match_masks(masks, self.layers)
        if spec.mode == "auto":
            if curve is None:
                raise SettingsError("automatic pruning needs a pruning curve on held-out clean data")
            return plan_from_neurons(masks, curve.ranking[:curve.chosen.count], spec)
        return plan_pruning(masks, spec, tiebreak)

    def pruning_curve(self, masks: Mapping[str, np.ndarray], clean: ImageSet, *,
                      tiebreak: Optional[Mapping[str, np.ndarray]] = None, poisoned: Optional[ImageSet] = None,
                      target: Optional[int] = None, max_drop: float = DEFAULT_MAX_DROP,
                      max_fraction: float = DEFAULT_MAX_FRACTION, suspected_target: Optional[int] = None,
                      signal_data: Optional[ImageSet] = None, signal_max_drop: float = DEFAULT_SIGNAL_MAX_DROP,
                      device: str = "cpu", progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelToken] = None) -> PruningCurve:
        """Clean accuracy on ``clean`` against neurons pruned in mask order, and the automatic choice.

        With a ``suspected_target`` (``MaskResult.target``) the backdoor signal is measured too, by
        the collapse probe on ``signal_data`` (default ``clean``), and the automatic choice is the
        fewest neurons that make it go (see :mod:`anp_onnx.curve`). ``poisoned`` (triggered images,
        true labels) adds ASR to each point for display only; its ``target`` defaults to the
        unpruned model's majority prediction on it.
        """
        masks = match_masks(masks, self.layers)
        ranking = rank_neurons(masks, tiebreak)
        device = resolve_device(device)
        self.net.to(device).eval()
        keep = None
        if poisoned is not None and len(poisoned):
            if target is None:
                self.reset_masks()
                target = infer_target(torch_logits(self.net, poisoned.x, device).argmax(1))
            keep = poisoned.y != target
        probe_set = signal_data if signal_data is not None else clean
        signal_eps: list[float] = []  # the probe's noise, fixed on the first (unpruned) measurement

        def evaluate_prefix(chosen, signal):
            self.apply_plan(plan_from_neurons(masks, chosen, PruneSpec.count(len(chosen))))
            acc = float((torch_logits(self.net, clean.x, device).argmax(1) == clean.y).mean())
            asr = share = None
            if keep is not None and keep.any():
                pred = torch_logits(self.net, poisoned.x[keep], device).argmax(1)
                asr = float((pred == target).mean())
            if signal and suspected_target is not None:
                modules = self.modules.values()
                if not signal_eps:  # a weak pull says too little: then all points use twice the noise
                    share = probe_pull(self.net, modules, probe_set, suspected_target, device=device)
                    signal_eps.append(PROBE_EPS if share >= MIN_PULL else 2 * PROBE_EPS)
                if share is None or signal_eps[0] != PROBE_EPS:
                    share = probe_pull(self.net, modules, probe_set, suspected_target, eps=signal_eps[0],
                                       device=device)
            return acc, asr, share

        try:
            return compute_curve(ranking, evaluate_prefix, n_images=len(clean), max_drop=max_drop,
                                 max_fraction=max_fraction, suspected_target=suspected_target,
                                 signal_max_drop=signal_max_drop, progress=progress, cancel=cancel)
        finally:
            self.reset_masks()
            self.net.to("cpu")

    @property
    def centres(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Renormalised layers' clean (mean, spread) per neuron (set by :meth:`optimize`; see ANPConfig)."""
        return current_centres(self.modules)

    def set_centres(self, centres: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Renormalise exactly the layers named in ``centres`` (as saved with masks), the others not."""
        unknown = [name for name in centres if name not in self.modules]
        if unknown:
            raise DataError(f"the saved centres name layers this model does not have: {', '.join(unknown[:5])}")
        for name, m in self.modules.items():
            if name in centres:
                if m.normalises or not m.centreable:
                    raise DataError(f"layer {name} cannot be renormalised, but the saved masks say it was")
                try:
                    m.set_centres(*centres[name])
                except ValueError as exc:
                    raise DataError(f"saved centres of {name}: {exc}") from None
            else:
                m.set_centres(None, None)

    def apply_plan(self, plan: PrunePlan) -> None:
        """Set the torch model's masks to the plan (0 pruned, 1 kept): the repaired model in torch."""
        for name, m in self.modules.items():
            values = np.ones(m.neuron_mask.numel(), dtype=np.float32)
            values[np.asarray(plan.pruned.get(name, ()), dtype=np.int64)] = 0.0
            m.set_mask(values)

    def save_masks(self, masks: Mapping[str, np.ndarray], path: os.PathLike | str,
                   extra: Optional[Mapping[str, object]] = None,
                   mean_masks: Optional[Mapping[str, np.ndarray]] = None) -> list[Path]:
        """Masks as JSON at ``path`` and as the reference's mask_values.txt beside it."""
        path = Path(path)
        facts = {"model": self._model_facts(), **(dict(extra) if extra else {})}
        save_masks_json(path, masks, self.layers, facts, mean_masks, self.centres)
        txt = mask_values_path(path)
        save_mask_values_txt(txt, masks)
        return [path, txt]

    def export(self, plan: PrunePlan, out: os.PathLike | str, *, overwrite: bool = False,
               verify_images: Optional[ImageSet] = None,
               metadata: Optional[Mapping[str, object]] = None) -> ExportResult:
        """Fold ``plan`` into the original ONNX and write it atomically once verified.

        The written model must pass onnx.checker and give, in onnxruntime, the logits of the pruned
        torch model on ``verify_images`` (random images when None); otherwise nothing is written.
        """
        out = check_output_path(out, self.model.path, overwrite)
        meta = {
            "version": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source_sha256": self._model_facts().get("sha256"),
            "preprocessing": self.preprocessing.to_dict(),
            "layout": self.model.input.layout,
            "pruned": plan.to_dict(),
            **(dict(metadata) if metadata else {}),
        }
        centres = {name: centre for name, (centre, _) in self.centres.items()}
        folded, editor = fold_plan(self.model.proto, self.layers, plan, meta, centres)
        external = external_names_for(folded, self.model.external_tensors, editor.copies)
        if external:
            check_data_path(out, self.model.external_files, overwrite)
        images = verify_images if verify_images is not None else _random_images(self.model.input)
        diffs: list[float] = []

        def validate(path: Path) -> None:
            check_written(path)
            diffs.append(self._verify(path, plan, images))

        files = save_model(folded, out, external, validate=validate)
        return ExportResult(out, files, sorted(editor.changed), diffs[0])

    def _verify(self, path: Path, plan: PrunePlan, images: ImageSet) -> float:
        """Max |onnxruntime(path) - pruned torch model| on up to 32 images; ModelError beyond tolerance."""
        written = load_model(path, layout=self.model.input.layout)
        x = images.x[:PARITY_IMAGES]
        ref = ort_logits(written, to_model_input(written, x, self.preprocessing))
        self.apply_plan(plan)
        try:
            self.net.eval()
            got = self.net.to_model_output(torch_logits(self.net, x))
        finally:
            self.reset_masks()
        diff = float(np.max(np.abs(ref - got)))
        limit = PARITY_ATOL + PARITY_RTOL * float(np.max(np.abs(ref)))
        if not np.isfinite(diff) or diff > limit:
            raise ModelError(f"verification failed: the repaired model differs from the pruned torch model "
                             f"by {diff:.3g} (> {limit:.3g}); nothing was written")
        _LOGGER.info("verified in onnxruntime: max |diff| vs pruned torch model = %.2e", diff)
        return diff

    def evaluate(self, clean: Optional[ImageSet], *, poisoned: Optional[ImageSet] = None,
                 target: Optional[int] = None, model: Optional[LoadedModel] = None) -> EvalResult:
        """ACC/ASR of ``model`` (default: the original) in onnxruntime with this preprocessing."""
        return evaluate(model or self.model, clean, self.preprocessing, poisoned=poisoned, target=target)

    def _model_facts(self) -> dict:
        """Path and SHA-256 of the input file (hashed once)."""
        path = self.model.path
        if path is None:
            return {}
        if self._sha256 is None:
            self._sha256 = file_sha256(path)
        return {"path": str(path), "sha256": self._sha256}

    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(m.path, m.input, m.num_classes, m.opset, m.ir_version,
                         f"{m.proto.producer_name} {m.proto.producer_version}".strip(), self.neurons,
                         self.parity, m.notes + self.neurons.notes, read_metadata(m.proto))


def _no_neurons_message(model: LoadedModel, search: NeuronSearch) -> str:
    ops: dict[str, int] = {}
    for node in model.proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    top = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
    why = f" ({'; '.join(search.notes[:3])})" if search.notes else ""
    if search.excluded:
        why += f"; {len(search.excluded)} layers were excluded by the layer filters"
    from .neurons import get_kind

    kinds = "; ".join(f"{k}: {get_kind(k).description}" for k in search.kinds) or "batchnorm"
    return (f"no neurons to prune: the model has no usable layer of the kinds searched ({kinds}){why}. "
            f"It contains: {top}")


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
    images = rep.load_data(data) if data is not None else _random_images(rep.model.input)
    rep.check_parity(images)
    info = rep.info()
    if data is not None and renormalise:
        calibrate(rep.net, rep.modules.values(), images)
    if data is not None and probe_supported(rep.modules.values()):
        info = replace(info, probe=find_target(rep.net, rep.modules.values(), images))
    return info


def _random_images(spec: InputSpec, n: int = 8) -> ImageSet:
    h, w = spec.size or (32, 32)
    rng = np.random.default_rng(0)
    x = rng.random((n, spec.channels, h, w), dtype=np.float32)
    return ImageSet(x, np.zeros(n, dtype=np.int64), source="random")


def mask_values_path(masks_json: os.PathLike | str) -> Path:
    """The reference-format mask_values.txt written beside a masks JSON."""
    p = Path(masks_json)
    return p.with_name(p.name.removesuffix(".json").removesuffix(".masks") + ".mask_values.txt")


def default_masks_path(out: os.PathLike | str) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".onnx") + ".masks.json")


def repair(
    model: os.PathLike | str,
    data: os.PathLike | str | ImageSet,
    *,
    out: os.PathLike | str,
    config: ANPConfig = ANPConfig(),
    pruning: PruneSpec = PruneSpec(),
    preprocessing: Optional[Preprocessing] = None,
    layout: Optional[str] = None,
    holdout: float = DEFAULT_HOLDOUT,
    test_data: Optional[os.PathLike | str | ImageSet] = None,
    poisoned_data: Optional[os.PathLike | str | ImageSet] = None,
    target: Optional[int] = None,
    masks_out: Optional[os.PathLike | str] = None,
    overwrite: bool = False,
    kinds: Optional[Sequence[str]] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    report: bool = True,
    signal_max_drop: float = DEFAULT_SIGNAL_MAX_DROP,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> RepairResult:
    """Repair a backdoored ONNX classifier with ANP and write the pruned model to ``out``.

    ``data`` is the clean set (folder or .npz, or an :class:`ImageSet`); ``holdout`` (fraction < 1
    or a count) of it is kept aside, stratified by class: the pruning curve and the automatic choice
    (the default ``pruning``) are measured on it. With the default ``config`` (``target="auto"``) ANP
    first probes where clean images collapse under neuron noise; a suspected backdoor target makes
    the noise targeted and lets the automatic choice prune until its signal goes, spending at most
    ``signal_max_drop`` of held-out accuracy (see anp_onnx.collapse and anp_onnx.curve). ``test_data`` and ``poisoned_data`` (triggered
    images with their true labels) add ACC/ASR before and after, measured in onnxruntime; they never
    influence what is pruned. Masks are saved as JSON and mask_values.txt next to the output unless
    ``masks_out`` says where.
    """
    start = time.perf_counter()
    out = check_output_path(out, model, overwrite)
    masks_path = Path(masks_out) if masks_out else default_masks_path(out)
    extras = [masks_path, mask_values_path(masks_path)] + (list(report_paths(out).values()) if report else [])
    for extra in extras:
        check_output_path(extra, model, overwrite)
    config = config.resolve()
    rep = Repairer.open(model, layout=layout, preprocessing=preprocessing, kinds=kinds, include=include,
                        exclude=exclude)
    clean = data if isinstance(data, ImageSet) else rep.load_data(data)
    test = _as_images(rep, test_data)
    poisoned = _as_images(rep, poisoned_data)
    val = None
    if isinstance(config.target, int) and rep.model.num_classes and config.target >= rep.model.num_classes:
        raise SettingsError(f"ANP target {config.target} is not a class of this model "
                            f"({rep.model.num_classes} classes)")
    if holdout:
        clean, val = clean.split(holdout, seed=config.seed)
    elif pruning.mode == "auto":
        _LOGGER.warning("no held-out clean data: the automatic choice is measured on the optimisation's own images")
    diff = rep.check_parity(clean)
    before = rep.evaluate(test, poisoned=poisoned, target=target) if (test or poisoned) else None
    if before is not None and target is None:
        target = before.target
    result = rep.optimize(clean, config, progress=progress, cancel=cancel)
    curve = None
    if val is not None or pruning.mode == "auto":
        curve = rep.pruning_curve(
            result.masks, val if val is not None else clean, tiebreak=result.mean_masks, poisoned=poisoned,
            target=target, max_drop=pruning.value if pruning.mode == "auto" else DEFAULT_MAX_DROP,
            suspected_target=result.target, signal_data=clean, signal_max_drop=signal_max_drop,
            device=config.device,
            progress=progress, cancel=cancel)
    plan = rep.plan(result.masks, pruning, tiebreak=result.mean_masks, curve=curve)
    _LOGGER.info("pruning %d of %d neurons (%s)", plan.count, plan.total, pruning.describe())
    export = rep.export(plan, out, overwrite=overwrite, verify_images=clean,
                        metadata={"anp": config.to_dict(), "data": clean.source})
    files = list(export.files)
    files += rep.save_masks(result.masks, masks_path, {
        "config": config.to_dict(), "preprocessing": rep.preprocessing.to_dict(),
        "suspected_target": result.target, "probe": result.probe.to_dict() if result.probe else None},
        mean_masks=result.mean_masks)
    after_model = load_model(out, layout=rep.model.input.layout) if (test or poisoned or val) else None
    after = holdout_before = holdout_after = None
    if before is not None:
        after = rep.evaluate(test, poisoned=poisoned, target=before.target, model=after_model)
    if val is not None:
        holdout_before = rep.evaluate(val)
        holdout_after = rep.evaluate(val, model=after_model)
    repaired = RepairResult(out, result.masks, plan, rep.layers, config, rep.preprocessing, result, export, diff,
                            before, after, holdout_before, holdout_after, files, time.perf_counter() - start, curve)
    if report:
        repaired.files += write_report(repaired)
    return repaired


def _as_images(rep: Repairer, data: Optional[os.PathLike | str | ImageSet]) -> Optional[ImageSet]:
    if data is None or isinstance(data, ImageSet):
        return data
    return rep.load_data(data)


def prune(model: os.PathLike | str, masks: os.PathLike | str | Mapping[str, np.ndarray], *,
          out: os.PathLike | str, pruning: PruneSpec = PruneSpec.threshold(0.2), layout: Optional[str] = None,
          preprocessing: Optional[Preprocessing] = None, overwrite: bool = False,
          verify_data: Optional[os.PathLike | str | ImageSet] = None, kinds: Optional[Sequence[str]] = None,
          include: Optional[Sequence[str]] = None,
          exclude: Optional[Sequence[str]] = None) -> tuple[PrunePlan, ExportResult]:
    """Prune ``model`` from saved masks (no new optimisation) and write it to ``out``.

    An ``auto`` spec needs ``verify_data`` (clean images); masks saved by :func:`repair` carry the
    suspected target, so the automatic choice uses the backdoor signal as repair's did.
    """
    from .prune import load_masks

    out = check_output_path(out, model, overwrite)
    facts: dict = {}
    if not isinstance(masks, Mapping):
        masks, facts = load_masks(masks)
    rep = Repairer.open(model, layout=layout, preprocessing=preprocessing, kinds=kinds, include=include,
                        exclude=exclude)
    rep.set_centres(facts.get("centres") or {})
    recorded = (facts.get("model") or {}).get("sha256") if isinstance(facts.get("model"), dict) else None
    if recorded and rep.model.path and recorded != file_sha256(rep.model.path):
        _LOGGER.warning("the masks were computed on a different file than %s (sha256 differs)", rep.model.path)
    images = _as_images(rep, verify_data)
    tiebreak = facts.get("mean_masks")
    curve = None
    if pruning.mode == "auto":
        if images is None:
            raise SettingsError("automatic pruning needs clean images to measure accuracy on (--data)")
        suspected = facts.get("suspected_target")
        curve = rep.pruning_curve(masks, images, tiebreak=tiebreak, max_drop=pruning.value,
                                  suspected_target=suspected if isinstance(suspected, int) else None)
    plan = rep.plan(masks, pruning, tiebreak=tiebreak, curve=curve)
    export = rep.export(plan, out, overwrite=overwrite, verify_images=images)
    return plan, export


def evaluate_model(model: os.PathLike | str, data: Optional[os.PathLike | str] = None, *,
                   poisoned: Optional[os.PathLike | str] = None, target: Optional[int] = None,
                   preprocessing: Optional[Preprocessing] = None, layout: Optional[str] = None,
                   progress: Optional[ProgressCallback] = None) -> EvalResult:
    """ACC (and ASR with ``poisoned``) of an ONNX model in onnxruntime; no conversion needed."""
    if data is None and poisoned is None:
        raise SettingsError("give clean test data, triggered test data, or both")
    loaded = load_model(model, layout=layout)
    pre = preprocessing or preprocessing_from_metadata(loaded) or Preprocessing()
    spec = loaded.input
    load = lambda p: load_images(p, size=spec.size, channels=spec.channels, num_classes=loaded.num_classes)  # noqa: E731
    return evaluate(loaded, load(data) if data else None, pre, poisoned=load(poisoned) if poisoned else None,
                    target=target, progress=progress)
