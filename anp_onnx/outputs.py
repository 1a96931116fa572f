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
from typing import Callable, Iterable, Mapping, Optional, Sequence

import onnx
from onnx.external_data_helper import set_external_data

from .errors import ModelError, OutputError

def save_model(model: onnx.ModelProto, out: os.PathLike | str, external: Sequence[str] = (),
               validate: Optional[Callable[[Path], None]] = None,
               outputs: Optional["OutputSet"] = None) -> list[Path]:
    """Write ``model`` atomically; tensors named in ``external`` go to ``<out>.data``.

    The files are written to a temporary folder beside ``out``; ``validate(path)`` (if given) runs on
    the temporary copy, and only when it passes are the files moved into place. On any failure
    nothing is left behind. Returns the files written. With ``outputs`` the files are written to
    the set's temporary names and stay there: :meth:`OutputSet.commit` moves them with the others.
    """
    out = Path(out)
    if outputs is not None:
        return _save_staged(model, out, external, validate, outputs)
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


def _with_external(model: onnx.ModelProto, data_name: str, external: Sequence[str]) -> onnx.ModelProto:
    model = copy.copy(model) if not external else copy.deepcopy(model)
    names = set(external)
    for t in model.graph.initializer:
        if t.name in names:
            set_external_data(t, location=data_name)
    return model


def _save_staged(model: onnx.ModelProto, out: Path, external: Sequence[str],
                 validate: Optional[Callable[[Path], None]], outputs: "OutputSet") -> list[Path]:
    staged = outputs.temp(out)
    data_name = out.name + ".data"
    model = _with_external(model, data_name, external)
    try:
        onnx.save_model(model, str(staged))
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    if validate is not None:
        validate(staged)
    return [out] + ([out.parent / data_name] if (staged.parent / data_name).exists() else [])


def external_names_for(model: onnx.ModelProto, original_external: frozenset[str], copies: Mapping[str, str]) -> list[str]:
    """Initializers to store externally: those the original stored so, and copies made of them."""
    names = set(original_external) | {new for old, new in copies.items() if old in original_external}
    return [t.name for t in model.graph.initializer if t.name in names]


def check_written(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"the written model {path} fails onnx.checker: {str(exc).splitlines()[0]}") from exc


def _resolved(path: os.PathLike | str) -> str:
    return str(Path(path).resolve())


class OutputSet:
    """Every file one command writes, checked before any work and written as one set.

    :meth:`add_input` names the files read (never written), :meth:`add_output` the files to write;
    :meth:`check` refuses, before any work, an output that is a folder, in a missing or unwritable
    folder, equal to another output or to an input (after resolving symlinks), or existing without
    ``overwrite``. The writers write to :meth:`temp` (a temporary folder beside each output);
    :meth:`commit` moves them all into place once all were written. Used as a context manager, any
    exception before the commit deletes the temporaries: nothing of the set remains.
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._inputs: dict[str, str] = {}        # resolved path -> what it is
        self._outputs: list[tuple[Path, str, bool, Optional[str]]] = []  # (path, what, optional, may replace)
        self._staging: dict[Path, Path] = {}     # output folder -> temporary folder

    def add_input(self, path: object, what: str) -> None:
        """A file (or folder) read by the command; ``path`` that is no path (an ImageSet, None) is skipped."""
        if isinstance(path, (str, os.PathLike)):
            self._inputs.setdefault(_resolved(path), what)

    def add_inputs(self, paths: Iterable[object], what: str) -> None:
        for path in paths:
            self.add_input(path, what)

    def add_output(self, path: os.PathLike | str, what: str, *, optional: bool = False,
                   may_replace: Optional[os.PathLike | str] = None) -> Path:
        """A file to write (``optional``: it may not be written); ``may_replace`` is the one input it may replace."""
        path = Path(path)
        self._outputs.append((path, what, optional, None if may_replace is None else _resolved(may_replace)))
        return path

    @property
    def paths(self) -> list[Path]:
        return [entry[0] for entry in self._outputs]

    def check(self) -> "OutputSet":
        """Refuse unusable outputs (see the class); returns the set."""
        seen: dict[str, str] = {}
        folders: list[Path] = []
        for path, what, _, may_replace in self._outputs:
            key = _resolved(path)
            if key in self._inputs and key != may_replace:
                kind = self._inputs[key]
                if kind == "input model":
                    raise OutputError(f"the output {path} is the input model; choose another path "
                                      "(the input is never overwritten)")
                raise OutputError(f"the {what} {path} is the {kind}, an input; choose another path "
                                  "(inputs are never overwritten)")
            if key in seen:
                raise OutputError(f"{path} would be written twice, as the {seen[key]} and the {what}; "
                                  "choose another path")
            seen[key] = what
            if path.is_dir():
                raise OutputError(f"the output {path} is a folder; give a file name ending in .onnx"
                                  if what == "repaired model" else f"the {what} {path} is a folder")
            if not path.parent.exists():
                raise OutputError(f"the output folder {path.parent} does not exist")
            if not path.parent.is_dir():
                raise OutputError(f"the output folder {path.parent} is not a folder")
            if (path.exists() or path.is_symlink()) and not self.overwrite and key != may_replace:
                raise OutputError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
            if path.parent.resolve() not in folders:
                folders.append(path.parent.resolve())
        for folder in folders:
            _check_writable(folder)
        return self

    def temp(self, path: os.PathLike | str) -> Path:
        """Where the writer writes ``path`` (one of the outputs) until :meth:`commit`."""
        path = Path(path)
        if path not in self.paths:
            raise OutputError(f"{path} is not one of the outputs")  # a bug in the caller
        folder = path.parent.resolve()
        if folder not in self._staging:
            try:
                self._staging[folder] = Path(tempfile.mkdtemp(prefix=".anp_onnx_", dir=folder))
            except OSError as exc:
                raise OutputError(f"cannot write to the folder {path.parent}: {exc.strerror or exc}") from exc
        return self._staging[folder] / path.name

    def commit(self) -> list[Path]:
        """Move every written output into place (all or none); returns the files moved.

        An optional output that was not written this time but exists from an earlier run (a
        report's curve plot when there is no curve now) is removed with the others' old versions,
        so the set on disk is exactly this run's; a failure puts it back too.
        """
        staged: dict[Path, Optional[Path]] = {}   # output -> its new version (None: not written, old one goes)
        for path, what, optional, _ in self._outputs:
            tmp = self._staging.get(path.parent.resolve())
            tmp = tmp / path.name if tmp is not None else None
            if tmp is not None and tmp.exists():
                staged[path] = tmp
            elif not optional:
                raise OutputError(f"the {what} {path} was not written; nothing was written")
            elif path.exists() or path.is_symlink():
                staged[path] = None
        moved: list[tuple[Path, Optional[Path]]] = []
        try:
            for path, tmp in staged.items():
                backup = self.temp(path).with_name(f".old.{path.name}") if path.exists() or path.is_symlink() else None
                moved.append((path, backup))  # before the move: an interrupt may come just after it
                if backup is not None:
                    os.replace(path, backup)
                if tmp is not None:
                    os.replace(tmp, path)
        except BaseException as exc:  # also Ctrl-C between two moves: the old files sit in the temporaries
            for path, backup in reversed(moved):
                if staged[path] is not None and not staged[path].exists():  # ours was moved there: take it back
                    path.unlink(missing_ok=True)
                if backup is not None and (backup.exists() or backup.is_symlink()):
                    os.replace(backup, path)
            if not isinstance(exc, OSError):
                raise
            raise OutputError(f"cannot move the outputs into place ({exc.strerror or exc}); nothing was "
                              "written") from exc
        return [path for path, tmp in staged.items() if tmp is not None]

    def discard(self) -> None:
        """Delete the temporaries (after a commit: only the replaced files' backups)."""
        for tmp in self._staging.values():
            shutil.rmtree(tmp, ignore_errors=True)
        self._staging.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def _check_writable(folder: Path) -> None:
    """A test file in ``folder``: refuse, before any work, a folder that cannot be written."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the folder {folder}: permission denied")
    try:
        fd, name = tempfile.mkstemp(prefix=".anp_onnx_check_", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write to the folder {folder}: {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(name)
