"""Reading image sets from ``.npz`` archives, which may come from anyone (:func:`load_npz`).

An archive is read without pickles, and each array's ``.npy`` header is read before its data: an
array whose header claims more than :data:`MAX_ARRAY_BYTES` is refused before anything is
allocated (a damaged or hostile header can claim terabytes, a compressed member can expand a
thousandfold). Whatever else is wrong with the file (a damaged zip, compressed data that does not
decompress, an encrypted member, arrays of the wrong kind) is a one-line
:class:`~anp_onnx.errors.DataError` naming the file. The layouts accepted are described in
:mod:`anp_onnx.data`.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

#: Largest array (bytes, as stored) read from an archive: far above any clean set ANP needs.
MAX_ARRAY_BYTES = 2**32
#: Exceptions numpy, zipfile and zlib raise on damaged archives.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, NotImplementedError,
                RuntimeError, KeyError, TypeError)
_LABEL_LIMIT = 2**53  # float labels are exact integers below this


def load_npz(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Images (N, C, H, W) float32 in [0, 1], labels and class names from an .npz file."""
    x, y, names = _read(path)
    if y.ndim == 2:
        if y.shape[1] == 0:
            raise DataError(f"labels in {path} are one-hot rows of length 0, got shape {y.shape}")
        y = y[:, 0] if y.shape[1] == 1 else y.argmax(axis=1)
    with np.errstate(all="ignore"):  # float16 labels meet the limit as infinity
        integral = y.dtype.kind in "iu" or (y.dtype.kind == "f" and bool(np.all(np.abs(y) < _LABEL_LIMIT))
                                           and bool(np.all(y == np.round(y))))
    if y.ndim != 1 or not integral:
        raise DataError(f"labels in {path} must be 1-D integers (or one-hot 2-D), got {y.dtype} {y.shape}")
    x = x[:, :, :, None] if x.ndim == 3 else x
    if x.ndim != 4:
        raise DataError(f"images in {path} must be (N, H, W, C), (N, C, H, W) or (N, H, W), got {x.shape}")
    if len(x) and 0 in x.shape[1:]:
        raise DataError(f"images in {path} have shape {x.shape}: zero height, width or channels")
    if len(x) != len(y):
        raise DataError(f"{path} has {len(x)} images and {len(y)} labels; expected one label per image")
    if len(x) == 0:
        raise DataError(f"{path} contains no images")
    x, y = x[:limit], y[:limit]
    c_first, c_last = x.shape[1] in (1, 3, 4), x.shape[-1] in (1, 3, 4)
    if x.dtype.kind in "iu":
        if x.dtype != np.uint8 and (x.min() < 0 or x.max() > 255):
            raise DataError(f"integer images in {path} must be in 0..255, got {x.min()}..{x.max()}")
        nchw = c_first and not c_last
        x = x.astype(np.float32)
        x /= 255.0
    elif x.dtype.kind == "f":
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (-0.01 <= lo and hi <= 1.01):  # also catches NaN
            raise DataError(
                f"float images in {path} range {lo:g}..{hi:g} but floats must be in [0,1] "
                "(or store uint8 0..255; mean/std belong in the preprocessing setting)"
            )
        nchw = not (c_last and not c_first)
        x = np.clip(x.astype(np.float32), 0.0, 1.0)
    else:
        raise DataError(f"images in {path} have dtype {x.dtype}; expected uint8 or float")
    return np.ascontiguousarray(x if nchw else x.transpose(0, 3, 1, 2)), y.astype(np.int64), names


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """The images, labels and class names arrays as stored."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # an .npy (one array) named .npz
            raise DataError(f"{path} holds one array, not an .npz archive of 'x' (images) and 'y' (labels)")
        with loaded as npz:
            keys = list(npz.keys())
            xk = next((k for k in ("x", "images") if k in npz), None)
            yk = next((k for k in ("y", "labels") if k in npz), None)
            if xk is None or yk is None:
                found = f"has arrays {keys}" if keys else "contains no arrays"
                raise DataError(f"{path} {found} but needs 'x' (or 'images') and 'y' (or 'labels')")
            x, y = _array(npz, xk, path), _array(npz, yk, path)
            names = None
            if "class_names" in npz:
                stored = _array(npz, "class_names", path)
                if stored.ndim != 1:
                    raise DataError(f"class_names in {path} must be a 1-D array of names, got shape {stored.shape}")
                names = tuple(str(n) for n in stored)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"not enough memory to read {path}") from None
    except _READ_ERRORS as exc:
        text = str(exc).strip().splitlines()
        raise DataError(f"cannot read {path} as .npz: {text[0] if text else type(exc).__name__}") from None
    return x, y, names


def _array(npz, key: str, path: Path) -> np.ndarray:
    """``npz[key]``, once its header shows a size that may be read."""
    member = f"{key}.npy" if f"{key}.npy" in npz.zip.namelist() else key
    with npz.zip.open(member) as f:
        version = np.lib.format.read_magic(f)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is not None:
            shape, _, dtype = reader(f)
            size = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if size > MAX_ARRAY_BYTES:
                raise DataError(f"array {key} in {path} declares {shape} {dtype}, {size / 2**30:.3g} GiB: more than "
                                f"the {MAX_ARRAY_BYTES // 2**30} GiB anp-onnx reads from one array (a few thousand "
                                "clean images are enough for ANP)")
    return npz[key]
