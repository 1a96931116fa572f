"""Write back -> verify -> save: the repaired model as a file, checked before it lands.

:func:`export` writes the plan into a copy of the original ONNX model (:mod:`anp_onnx.writeback`),
saves it to a temporary name, and moves it into place only when onnx.checker passes and
onnxruntime gives the pruned torch model's outputs (:func:`verify`); otherwise nothing is written.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from . import __version__
from .calibrate import current_centres
from .context import RepairContext
from .convert import torch_logits
from .data import ImageSet
from .errors import ModelError, OutputError
from .model import InputSpec, LoadedModel, load_model
from .outputs import OutputSet, check_written, external_names_for, save_model
from .prune import PrunePlan
from .results import ExportResult
from .runtime import max_abs_diff, ort_logits, parity_limit, to_model_input, within_parity
from .writeback import write_back

_LOGGER = logging.getLogger(__name__)
#: Images compared between onnxruntime and torch (conversion parity and export verification).
PARITY_IMAGES = 32


def random_images(spec: InputSpec, n: int = 8) -> ImageSet:
    """``n`` seeded random images of the model's input size (when no real images are at hand)."""
    h, w = spec.size or (32, 32)
    rng = np.random.default_rng(0)
    x = rng.random((n, spec.channels, h, w), dtype=np.float32)
    return ImageSet(x, np.zeros(n, dtype=np.int64), source="random")


def export(ctx: RepairContext, plan: PrunePlan, out: os.PathLike | str, *, overwrite: bool = False,
           verify_images: Optional[ImageSet] = None, metadata: Optional[Mapping[str, object]] = None,
           source_sha256: Optional[str] = None, initializers: Optional[Mapping[str, np.ndarray]] = None,
           replace_input: bool = False, outputs: Optional[OutputSet] = None) -> ExportResult:
    """Write ``plan`` into the original ONNX model and save it at ``out`` once verified.

    The written model must pass onnx.checker and give, in onnxruntime, the logits of the pruned
    torch model on ``verify_images`` (random images when None); otherwise nothing is written.
    ``initializers`` are a refinement's new weights (see :mod:`anp_onnx.stages`). ``out`` may be
    the input model itself only with ``replace_input`` (the desktop app asks first; the file is
    replaced atomically, and never when its weights live in external data). With ``outputs`` (the
    set of a whole repair, see :func:`model_outputs`, already checked) the files stay at the set's
    temporary names until it is committed; without, they are checked and moved into place here.
    """
    model = ctx.model
    if outputs is None:
        with model_outputs(model, out, overwrite=overwrite, replace_input=replace_input).check() as own:
            result = export(ctx, plan, out, verify_images=verify_images, metadata=metadata,
                            source_sha256=source_sha256, initializers=initializers, outputs=own)
            own.commit()
        return result
    out = Path(out)
    meta = {
        "version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_sha256": source_sha256,
        "preprocessing": ctx.preprocessing.to_dict(),
        "layout": model.input.layout,
        "pruned": plan.to_dict(),
        **(dict(metadata) if metadata else {}),
    }
    centre_of = {name: centre for name, (centre, _) in current_centres(ctx.modules).items()}
    written, editor = write_back(model.proto, ctx.layers, plan, meta, centre_of, initializers)
    external = external_names_for(written, model.external_tensors, editor.copies)
    images = verify_images if verify_images is not None else random_images(model.input)
    diffs: list[float] = []

    def validate(path: Path) -> None:
        check_written(path)
        diffs.append(verify(ctx, path, plan, images))

    files = save_model(written, out, external, validate=validate, outputs=outputs)
    return ExportResult(out, files, sorted(editor.changed), diffs[0])


def model_outputs(model: LoadedModel | os.PathLike | str, out: os.PathLike | str, *, overwrite: bool = False,
                  replace_input: bool = False, outputs: Optional[OutputSet] = None) -> OutputSet:
    """The output set for a repaired ``model`` at ``out`` (its ``<out>.data`` too when the model keeps
    weights in external data), with the model and its data files as inputs; not yet checked.

    ``model`` is a path before the model is loaded (its external data files are not known yet).
    ``replace_input`` lets ``out`` replace the input model (never one with external data).
    """
    outputs = outputs if outputs is not None else OutputSet(overwrite)
    loaded = model if isinstance(model, LoadedModel) else None
    path = loaded.path if loaded is not None else model
    if replace_input and loaded is not None and loaded.external_tensors:
        raise OutputError("the input model keeps its weights in a separate data file: save the repaired "
                          "model under a new name")
    outputs.add_input(path, "input model")
    out = Path(out)
    outputs.add_output(out, "repaired model", may_replace=path if replace_input else None)
    if loaded is not None:
        outputs.add_inputs(sorted(loaded.external_files), "input model's external data")
        if loaded.external_tensors:
            outputs.add_output(out.with_name(out.name + ".data"), "repaired model's external data", optional=True)
    return outputs


def verify(ctx: RepairContext, path: Path, plan: PrunePlan, images: ImageSet) -> float:
    """Max |onnxruntime(path) - pruned torch model| on up to 32 images; ModelError beyond tolerance."""
    written = load_model(path, layout=ctx.model.input.layout)
    x = images.x[:PARITY_IMAGES]
    ref = ort_logits(written, to_model_input(written, x, ctx.preprocessing))
    with ctx.pruned(plan) as net:
        got = net.to_model_output(torch_logits(net, x))
    diff, limit = max_abs_diff(ref, got), parity_limit(ref)
    if not within_parity(diff, limit):
        raise ModelError(f"verification failed: the repaired model differs from the pruned torch model "
                         f"by {diff:.3g} (> {limit:.3g}); nothing was written")
    _LOGGER.info("verified in onnxruntime: max |diff| vs pruned torch model = %.2e", diff)
    return diff
