"""Writing output files safely: paths checked up front, temporary files, verified, then moved.

Tensors the original kept in external data go to an external data file next to the output
(``<output>.data``), the rest stay inline. Files are written to a temporary folder beside the
target and moved into place only once verified, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import onnx
from onnx.external_data_helper import set_external_data

from .errors import ModelError, OutputError

def check_output_path(out: os.PathLike | str, source: Optional[os.PathLike | str], overwrite: bool) -> Path:
    """Refuse an output equal to the input, in a missing folder, or existing without ``overwrite``."""
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise OutputError(f"the output {out} is the input model; choose another path (the input is never overwritten)")
    if out.is_dir():
        raise OutputError(f"the output {out} is a folder; give a file name ending in .onnx")
    if not out.parent.exists():
        raise OutputError(f"the output folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    return out


def save_model(model: onnx.ModelProto, out: os.PathLike | str, external: Sequence[str] = (),
               validate: Optional[Callable[[Path], None]] = None) -> list[Path]:
    """Write ``model`` atomically; tensors named in ``external`` go to ``<out>.data``.

    The files are written to a temporary folder beside ``out``; ``validate(path)`` (if given) runs on
    the temporary copy, and only when it passes are the files moved into place. On any failure
    nothing is left behind. Returns the files written.
    """
    out = Path(out)
    data_name = out.name + ".data"
    model = copy.copy(model) if not external else copy.deepcopy(model)
    names = set(external)
    if names:
        for t in model.graph.initializer:
            if t.name in names:
                set_external_data(t, location=data_name)
    tmpdir = Path(tempfile.mkdtemp(prefix=".anp_onnx_", dir=out.parent))
    try:
        onnx.save_model(model, str(tmpdir / out.name))
        if validate is not None:
            validate(tmpdir / out.name)
        written = [out]
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, out.parent / data_name)
            written.append(out.parent / data_name)
        os.replace(tmpdir / out.name, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return written


def check_data_path(out: Path, source_files: frozenset[str], overwrite: bool) -> None:
    """Refuse an external-data file ``<out>.data`` that is the input's, or exists without overwrite."""
    data = out.with_name(out.name + ".data")
    if str(data.resolve()) in source_files:
        raise OutputError(f"{data} holds the input model's weights; write the output elsewhere")
    if data.exists() and not overwrite:
        raise OutputError(f"{data} exists; pass --overwrite (overwrite=True) to replace it")


def external_names_for(model: onnx.ModelProto, original_external: frozenset[str], copies: Mapping[str, str]) -> list[str]:
    """Initializers to store externally: those the original stored so, and copies made of them."""
    names = set(original_external) | {new for old, new in copies.items() if old in original_external}
    return [t.name for t in model.graph.initializer if t.name in names]


def check_written(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"the written model {path} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
