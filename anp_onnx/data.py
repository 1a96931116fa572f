"""Image data: loading and saving clean/test sets.

Images are held as :class:`ImageSet` (float32 ``(N, C, H, W)`` in ``[0, 1]`` plus int64 labels).
What the model wants on top of that (scaling to 0..255, mean/std normalisation) is a
:class:`~anp_onnx.preprocessing.Preprocessing`, applied per batch, so the data
itself stays model-independent. Training augmentation is in :mod:`anp_onnx.augment`.

:func:`load_images` reads an ImageFolder-style directory (one sub-folder per class) or an ``.npz``
file. In an ``.npz``, ``x`` (or ``images``) is uint8 ``(N, H, W, C)``, ``(N, H, W)`` or
``(N, C, H, W)`` (when axis 1 is 1/3/4 and the last axis is not), or float in [0, 1] ``(N, C, H, W)``
or ``(N, H, W, C)`` (when the last axis is 1/3/4 and axis 1 is not); ``y`` (or ``labels``) is 1-D
integer or one-hot 2-D; an optional ``class_names`` string array is read too (by
:mod:`anp_onnx.npz_io`, which checks each array's size before reading it). Every problem with the
data raises :class:`~anp_onnx.errors.DataError`, bad option values :class:`SettingsError`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import DataError, SettingsError
from .npz_io import load_npz

_LOGGER = logging.getLogger(__name__)
_RESIZE_CHUNK_BYTES = 64 * 1024 * 1024
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_LUMA = (0.299, 0.587, 0.114)
#: Largest image file decoded (pixels; 8192 x 8192), checked from its header before decoding.
MAX_IMAGE_PIXELS = 2**26
@dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled images: ``x`` float32 ``(N, C, H, W)`` in ``[0, 1]``, ``y`` int64 ``(N,)``.

    ``class_names[i]`` names label ``i`` when known; ``source`` says where the data came from.
    Shapes are checked; the value range of ``x`` is not (the loaders guarantee it).
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        x, y = np.asarray(self.x), np.asarray(self.y)
        where = self.source or "image set"
        if x.ndim != 4:
            raise DataError(f"{where}: images must be (N, C, H, W), got shape {x.shape}")
        if 0 in x.shape[1:]:
            raise DataError(f"{where}: images of shape {x.shape} have zero channels, height or width")
        if y.ndim != 1 or len(y) != len(x) or (y.size and not np.issubdtype(y.dtype, np.integer)):
            raise DataError(f"{where}: labels must be {len(x)} integers, got {y.dtype} shape {y.shape}")
        object.__setattr__(self, "x", x.astype(np.float32, copy=False))
        object.__setattr__(self, "y", y.astype(np.int64, copy=False))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes_seen(self) -> int:
        """Largest label plus one (0 for an empty set)."""
        return int(self.y.max()) + 1 if len(self.y) else 0

    def subset(self, idx: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``idx`` (indices, in that order, or a boolean mask)."""
        idx = np.asarray(idx)
        idx = idx if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        return ImageSet(self.x[idx], self.y[idx], self.class_names, self.source)

    def split(self, holdout: float | int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
        """Deterministic stratified split into ``(train, holdout)``, both in file order.

        ``holdout`` is a fraction in (0, 1) (rounded, at least one image) or a count. Each class
        gives a share proportional to its size and keeps at least one image in train when possible.
        :class:`SettingsError` if train would be empty.
        """
        n = len(self)
        if isinstance(holdout, (float, np.floating)):
            if not 0 < holdout < 1:
                raise SettingsError(f"holdout fraction must be in (0, 1), got {holdout}")
            n_hold = max(1, int(math.floor(holdout * n + 0.5)))
        elif isinstance(holdout, (int, np.integer)) and not isinstance(holdout, bool) and holdout >= 0:
            n_hold = int(holdout)
        else:
            raise SettingsError(f"holdout must be a fraction in (0, 1) or a count >= 0, got {holdout!r}")
        if n_hold >= n:
            raise SettingsError(f"a holdout of {n_hold} leaves no training images out of {n} ({self.source})")
        classes, counts = np.unique(self.y, return_counts=True)
        quota = n_hold * counts / n
        take = np.minimum(np.floor(quota).astype(np.int64), counts - 1)
        while take.sum() < n_hold:  # hand out the rest by largest unmet quota, sparing one per class
            spare = take < counts - 1
            spare = spare if spare.any() else take < counts
            take[np.argmax(np.where(spare, quota - take, -np.inf))] += 1
        rng = np.random.default_rng(seed)
        hold = np.zeros(n, dtype=bool)
        for cls, k in zip(classes, take):
            hold[rng.permutation(np.flatnonzero(self.y == cls))[:k]] = True
        return self.subset(~hold), self.subset(hold)

    def take_per_class(self, n: int, seed: int = 0) -> ImageSet:
        """At most ``n`` images per class, the first ones after a seeded shuffle; file order kept."""
        if n < 1:
            raise SettingsError(f"images per class must be >= 1, got {n}")
        order = np.random.default_rng(seed).permutation(len(self))
        rank = np.empty(len(self), dtype=np.int64)  # position of each image within its class
        for cls in np.unique(self.y):
            members = order[self.y[order] == cls]
            rank[members] = np.arange(len(members))
        return self.subset(rank < n)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _folder_files(root: Path) -> tuple[list[tuple[int, Path]], tuple[str, ...] | None]:
    """(label, file) pairs in label then path order, and the class names."""
    exts = {e.lower() for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not dirs:
        loose = sum(p.is_file() and p.suffix.lower() in exts for p in root.iterdir())
        found = f"{loose} images but no class sub-folders" if loose else "no class sub-folders"
        raise DataError(f"{root} contains {found}; expected one sub-folder per class with images inside")
    names: tuple[str, ...] | None = tuple(dirs)
    labels = list(range(len(dirs)))
    if all(re.fullmatch(r"\d+", d) for d in dirs):
        dirs.sort(key=int)
        labels = [int(d) for d in dirs]
        if len(set(labels)) != len(labels):
            raise DataError(f"class folders in {root} repeat a label number ({', '.join(dirs)})")
        names = tuple(dirs) if labels == list(range(len(dirs))) else None
    files: list[tuple[int, Path]] = []
    for label, d in zip(labels, dirs):
        found = []
        for here, subdirs, filenames in os.walk(root / d):
            subdirs[:] = [s for s in subdirs if _visible(s)]
            found += [Path(here, f) for f in filenames if _visible(f) and Path(f).suffix.lower() in exts]
        if not found:
            _LOGGER.warning("class folder %s has no images", root / d)
        files += [(label, p) for p in sorted(found, key=lambda p: p.relative_to(root).parts)]
    if not files:
        raise DataError(f"{root} has {len(dirs)} class folders but no image files in them (.png, .jpg, ...)")
    return files, names


def _decode(path: Path, channels: int) -> np.ndarray:
    try:
        if path.stat().st_size == 0:
            raise DataError(f"image file {path} is empty (0 bytes); expected a readable image file")
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # the header's size, before decoding
                raise DataError(f"image {path} is {im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS} "
                                "anp-onnx decodes")
            arr = np.asarray(im.convert(_PIL_MODES[channels]), dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many kinds on damaged files
        text = str(exc).strip().splitlines()
        raise DataError(f"cannot decode image {path}: {text[0] if text else type(exc).__name__}; "
                        "expected a readable image file") from None
    if arr.size == 0:
        raise DataError(f"image {path} has zero width or height ({arr.shape[1]}x{arr.shape[0]} pixels)")
    return arr[:, :, None] if arr.ndim == 2 else arr


def _load_folder(root: Path, size: tuple[int, int] | None, channels: int, limit: int | None) -> ImageSet:
    """Images decoded and resized one at a time: memory holds the result and one decoded file."""
    files, names = _folder_files(root)
    files = files[:limit]
    x: np.ndarray | None = None
    for i, (_, path) in enumerate(files):
        image = _decode(path, channels)
        if x is None:
            first = (path, image.shape[:2])
            x = np.empty((len(files), channels, *(size or image.shape[:2])), dtype=np.float32)
        elif size is None and image.shape[:2] != first[1]:
            (h0, w0), (h1, w1) = first[1], image.shape[:2]
            raise DataError(
                f"images in {root} differ in size ({path} is {h1}x{w1}, the first is {h0}x{w0}); "
                "give an image size to resize them"
            )
        x[i] = _resize(image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0, size)[0]
    return ImageSet(x, np.asarray([label for label, _ in files], dtype=np.int64), names, str(root))


def _convert_channels(x: np.ndarray, channels: int, source: str) -> np.ndarray:
    """RGBA->RGB drops alpha, RGB->gray by luminance, gray->RGB repeats; (RGB->RGBA adds opaque)."""
    c = x.shape[1]
    if c == 4 and channels != 4:
        x, c = x[:, :3], 3
    if c == 3 and channels == 1:
        return np.tensordot(np.asarray(_LUMA, np.float32), x, axes=([0], [1]))[:, None].astype(np.float32)
    if c == 1 and channels in (3, 4):
        x, c = np.repeat(x, 3, axis=1), 3
    if c == 3 and channels == 4:
        x, c = np.concatenate([x, np.ones_like(x[:, :1])], axis=1), 4
    if c != channels:
        raise DataError(f"images in {source} have {c} channels; cannot convert them to {channels}")
    return x


def _resize(x: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Antialiased bilinear resize of float (N, C, H, W) to ``size`` in chunks, clipped to [0, 1]."""
    if size is None or tuple(x.shape[2:]) == tuple(size):
        return x
    import torch  # only when resizing (torch's antialiased bilinear filter): loading stays torch-free
    import torch.nn.functional as F

    n, c, h, w = x.shape
    chunk = max(1, _RESIZE_CHUNK_BYTES // (4 * c * max(h * w, size[0] * size[1])))
    out = np.empty((n, c, *size), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, n, chunk):
            part = torch.from_numpy(np.ascontiguousarray(x[i : i + chunk], dtype=np.float32))
            res = F.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
            out[i : i + chunk] = res.clamp_(0.0, 1.0).numpy()
    return out


def load_images(
    path: str | os.PathLike[str],
    *,
    size: tuple[int, int] | None,
    channels: int,
    num_classes: int | None = None,
    limit: int | None = None,
) -> ImageSet:
    """Load labelled images from an ImageFolder-style directory or an ``.npz`` file.

    Folders: one sub-folder per class (nested folders inside are searched; hidden and non-image
    files skipped). If every class-folder name is a non-negative integer the label is that integer
    and ``class_names`` the folder names when they are exactly 0..K-1, else None; otherwise the
    sorted folder names get labels 0..K-1. Files come in label, then path order. ``.npz`` layouts:
    see the module docstring. Images are converted to ``channels``, resized to ``size`` = (H, W)
    when given, and ``limit`` keeps the first images in file order. :class:`DataError` for any
    problem with the data, including labels outside ``0..num_classes-1``.
    """
    p = Path(path)
    if size is not None and (len(size) != 2 or any(int(s) < 1 for s in size)):
        raise SettingsError(f"image size must be (height, width) with positive values, got {size!r}")
    size = None if size is None else (int(size[0]), int(size[1]))
    if limit is not None and limit < 1:
        raise SettingsError(f"image limit must be >= 1, got {limit}")
    if channels not in _PIL_MODES:
        raise DataError(f"the model takes {channels!r}-channel images; images convert only to 1, 3 or 4")
    if not p.exists():
        raise DataError(f"data path {p} does not exist; expected a folder of class sub-folders or .npz")
    try:
        if p.is_dir():
            images = _load_folder(p, size, channels, limit)
        elif p.suffix.lower() == ".npz":
            x, y, names = load_npz(p, limit)
            images = ImageSet(_resize(_convert_channels(x, channels, str(p)), size), y, names, str(p))
        else:
            raise DataError(f"{p} is neither a folder nor an .npz file; expected class sub-folders or .npz")
    except MemoryError:
        raise DataError(f"not enough memory to load the images of {p}; use fewer images") from None
    if images.y.min() < 0:
        raise DataError(f"labels in {p} include negative values ({images.y.min()}); expected 0 or more")
    if num_classes is not None and images.y.max() >= num_classes:
        raise DataError(
            f"labels in {p} go up to {images.y.max()} but the model has {num_classes} classes "
            f"(expected labels 0..{num_classes - 1})"
        )
    _LOGGER.info(
        "loaded %d images (%d classes seen, %dx%dx%d) from %s",
        len(images), len(np.unique(images.y)), *images.x.shape[1:], p,
    )
    return images


def _to_uint8_nhwc(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _folder_names(images: ImageSet) -> list[str]:
    """Class-folder name per label: class_names when they reload as the same labels, else numbers."""
    names, k = images.class_names, images.num_classes_seen
    if names and len(names) >= k and len(set(names)) == len(names):
        safe = all(n and _visible(n) and not re.search(r"[\\/:*?\"<>|]", n) for n in names)
        numeric = all(re.fullmatch(r"\d+", n) for n in names)
        same = all(int(n) == i for i, n in enumerate(names)) if numeric else list(names) == sorted(names)
        if safe and same:
            return list(names)
        _LOGGER.warning("class names %s would not reload in label order; using label numbers", names[:5])
    return [str(i) for i in range(k)]


def save_image_folder(images: ImageSet, folder: str | os.PathLike[str], *, fmt: str = "png") -> None:
    """Write ``images`` as uint8 files in class sub-folders named by class_names or label.

    ``folder`` must not exist or be empty. Files are named by index, so :func:`load_images` gives
    them back in the same order within each class (grouped by class). Class names are used only
    when loading would map them to the same labels (sorted, unique, safe as folder names).
    """
    root = Path(folder)
    ext = "." + fmt.lower().lstrip(".")
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise SettingsError(f"cannot save images as {fmt!r}; use png, jpg, bmp, ...")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} already exists and is not an empty folder; expected a new folder")
    if images.x.shape[1] not in _PIL_MODES:
        raise DataError(f"cannot save {images.x.shape[1]}-channel images ({images.source}) as image files")
    names = _folder_names(images)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for label in range(len(names)) if images.class_names else np.unique(images.y):
            (root / names[label]).mkdir()  # empty class folders keep string labels stable
        for i, (img, label) in enumerate(zip(_to_uint8_nhwc(images.x), images.y)):
            pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
            pil.save(root / names[label] / f"{i:06d}{ext}")
    except OSError as exc:
        raise DataError(f"cannot write images to {root}: {exc}") from None


def save_npz(images: ImageSet, path: str | os.PathLike[str]) -> None:
    """Write ``x`` as uint8 NHWC (``round(x*255)``), ``y`` int64 and any class names, compressed."""
    arrays = {"x": _to_uint8_nhwc(images.x), "y": images.y.astype(np.int64)}
    if images.class_names is not None:
        arrays["class_names"] = np.asarray(images.class_names, dtype=str)
    try:
        with open(path, "wb") as fh:  # a file object: numpy must not append ".npz" to the name
            np.savez_compressed(fh, **arrays)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc}") from None
