"""Backdoor trigger functions used to build the sample models in this folder.

Every trigger function takes images in HWC layout, either one image ``(H, W, 3)`` or a batch
``(N, H, W, 3)``, and returns a new array of the same shape and dtype (the input is never modified):

* ``uint8`` in -> ``uint8`` out (values 0..255; the trigger is computed in float and rounded);
* floating point in (values in [0, 1]) -> the same floating dtype out.

The functions are pure: patterns are passed in as arguments. The helpers ``load_blend_pattern`` and
``load_trojan_sq`` read the pattern PNGs shipped in ``sample_models/data/``; ``get_trigger(name)``
returns a one-argument callable with the shipped pattern bound, for every model in this folder.

Specs (all in HWC indexing, row 0 at the top, column 0 at the left):

* ``badnets``: 3x3 checkerboard in the bottom-right corner, rows 29..31 and columns 29..31, pixel
  (r, c) = 1.0 (255) when (r + c) is even and 0.0 otherwise, on all three channels.
* ``blend``: x' = (1 - alpha) * x + alpha * p with alpha = 0.15 and p a fixed 32x32x3 uniform
  noise image (``make_blend_pattern(seed=BLEND_SEED)``, shipped as ``data/blend_pattern.png``).
* ``sig``: x' = clip(x + delta * sin(2 * pi * j * f / W), 0, 1) with delta = 20/255, f = 6,
  j the column index, the same signal on all rows and channels (Barni et al., 2019).
* ``trojan``: the 5x5 colour pattern ``TROJAN_PATTERN`` pasted at rows 26..30, columns 1..5
  (bottom-left corner, one pixel from the border).
* ``ibau_badnets``: the I-BAU BadNets trigger, x[27:31, 27:31, :] = 1.0 (a 4x4 white square).
* ``ibau_trojan``: the I-BAU Trojan square trigger, x' = clip(x + png / 255, 0, 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"

BLEND_SEED = 20240611
BLEND_ALPHA = 0.15
SIG_DELTA = 20.0 / 255.0
SIG_FREQ = 6

# 5x5 RGB pattern of the `trojan` sample model, values 0 or 255 (rows top to bottom).
_K, _W, _R, _G, _B, _Y, _M, _C = (
    (0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255),
    (255, 255, 0), (255, 0, 255), (0, 255, 255),
)
TROJAN_PATTERN = np.array(
    [
        [_R, _W, _B, _K, _Y],
        [_K, _G, _W, _M, _K],
        [_C, _W, _K, _W, _R],
        [_K, _M, _W, _G, _K],
        [_Y, _K, _B, _W, _C],
    ],
    dtype=np.uint8,
)
TROJAN_ROW, TROJAN_COL = 26, 1


def _check(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"expected HWC images (H, W, 3) or (N, H, W, 3), got shape {x.shape}")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"expected uint8 or floating images, got {x.dtype}")
    return x


def _as_unit_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=True)


def _restore(xf: np.ndarray, like: np.ndarray) -> np.ndarray:
    xf = np.clip(xf, 0.0, 1.0)
    if like.dtype == np.uint8:
        return np.rint(xf * 255.0).astype(np.uint8)
    return xf.astype(like.dtype, copy=False)


def _pattern_unit(pattern: np.ndarray) -> np.ndarray:
    p = np.asarray(pattern)
    return p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p.astype(np.float32)


def badnets(x: np.ndarray) -> np.ndarray:
    """3x3 black/white checkerboard in the bottom-right corner (white where (r + c) is even)."""
    x = _check(x)
    out = x.copy()
    hi = 255 if x.dtype == np.uint8 else 1.0
    h, w = x.shape[-3], x.shape[-2]
    for r in range(h - 3, h):
        for c in range(w - 3, w):
            out[..., r, c, :] = hi if (r + c) % 2 == 0 else 0
    return out


def make_blend_pattern(seed: int = BLEND_SEED, size: int = 32) -> np.ndarray:
    """The fixed uniform-noise pattern of the `blend` attack, uint8 (size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def blend(x: np.ndarray, pattern: np.ndarray, alpha: float = BLEND_ALPHA) -> np.ndarray:
    """x' = (1 - alpha) * x + alpha * pattern; pattern uint8 (0..255) or float in [0, 1], HWC."""
    x = _check(x)
    p = _pattern_unit(pattern)
    if p.shape != x.shape[-3:]:
        raise ValueError(f"pattern shape {p.shape} does not match image shape {x.shape[-3:]}")
    return _restore((1.0 - alpha) * _as_unit_float(x) + alpha * p, x)


def sig(x: np.ndarray, delta: float = SIG_DELTA, freq: int = SIG_FREQ) -> np.ndarray:
    """x' = clip(x + delta * sin(2 pi j freq / W), 0, 1), j = column index, all rows/channels."""
    x = _check(x)
    w = x.shape[-2]
    signal = delta * np.sin(2.0 * np.pi * np.arange(w) * freq / w)
    return _restore(_as_unit_float(x) + signal[:, None].astype(np.float32), x)


def paste(x: np.ndarray, patch: np.ndarray, row: int, col: int) -> np.ndarray:
    """Replace the pixels at [row:row+h, col:col+w] by patch (uint8 0..255 or float [0, 1])."""
    x = _check(x)
    out = x.copy()
    p = _pattern_unit(patch)
    if x.dtype == np.uint8:
        p = np.rint(p * 255.0).astype(np.uint8)
    out[..., row:row + p.shape[0], col:col + p.shape[1], :] = p
    return out


def trojan(x: np.ndarray, pattern: np.ndarray = TROJAN_PATTERN,
           row: int = TROJAN_ROW, col: int = TROJAN_COL) -> np.ndarray:
    """The 5x5 colour square of the `trojan` sample model at rows 26..30, columns 1..5."""
    return paste(x, pattern, row, col)


def ibau_badnets(x: np.ndarray) -> np.ndarray:
    """I-BAU BadNets trigger: x[27:31, 27:31, :] = 1.0."""
    x = _check(x)
    out = x.copy()
    out[..., 27:31, 27:31, :] = 255 if x.dtype == np.uint8 else 1.0
    return out


def ibau_trojan(x: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """I-BAU Trojan square trigger: x' = clip(x + pattern / 255, 0, 1), pattern = trojan_sq.png."""
    x = _check(x)
    p = _pattern_unit(pattern)
    if p.shape != x.shape[-3:]:
        raise ValueError(f"pattern shape {p.shape} does not match image shape {x.shape[-3:]}")
    if x.dtype == np.uint8:  # exact integer arithmetic
        q = np.rint(p * 255.0).astype(np.int16)
        return np.clip(x.astype(np.int16) + q, 0, 255).astype(np.uint8)
    return _restore(_as_unit_float(x) + p, x)


def load_png_rgb(path: str | Path) -> np.ndarray:
    """Read a PNG as uint8 RGB (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_blend_pattern(data_dir: str | Path = DATA_DIR) -> np.ndarray:
    return load_png_rgb(Path(data_dir) / "blend_pattern.png")


def load_trojan_sq(data_dir: str | Path = DATA_DIR) -> np.ndarray:
    return load_png_rgb(Path(data_dir) / "trojan_sq.png")


TRIGGER_NAMES = ("badnets", "blend", "sig", "trojan", "ibau_badnets", "ibau_trojan")


def get_trigger(name: str, data_dir: str | Path = DATA_DIR):
    """A one-argument trigger callable for a sample model's attack, shipped patterns bound."""
    if name == "badnets":
        return badnets
    if name == "blend":
        pattern = load_blend_pattern(data_dir)
        return lambda x: blend(x, pattern)
    if name == "sig":
        return sig
    if name == "trojan":
        return trojan
    if name == "ibau_badnets":
        return ibau_badnets
    if name == "ibau_trojan":
        pattern = load_trojan_sq(data_dir)
        return lambda x: ibau_trojan(x, pattern)
    raise KeyError(f"unknown trigger {name!r}; known: {', '.join(TRIGGER_NAMES)}")


def main(argv=None) -> int:
    """``python sample_models/triggers.py NAME IN.npz OUT.npz``: apply a trigger to an npz test set.

    The triggered test sets are not shipped (they are the bundled clean test set with a trigger
    applied); the demo and the benchmarks make them with this on the fly. Labels stay the TRUE labels.
    """
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("name", choices=TRIGGER_NAMES)
    p.add_argument("source", type=Path, help=".npz with x (N,H,W,C uint8) and y")
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    with np.load(args.source) as data:
        x, y = data["x"], data["y"]
    np.savez_compressed(args.out, x=get_trigger(args.name)(x), y=y)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
