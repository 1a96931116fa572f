"""Training augmentation on torch batches: random crop with zero padding and horizontal flip."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import SettingsError


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, *, padding: int, flip: bool = True
) -> torch.Tensor:
    """Random crop after zero-padding ``padding`` pixels per side, then random horizontal flip.

    Offsets and flips (p=0.5) are drawn per image on the CPU from ``generator``, so a seed gives
    the same result on any device. ``padding=0`` skips the crop; with ``flip=False`` too, ``x``
    itself is returned. ``x`` is never modified.
    """
    if padding < 0:
        raise SettingsError(f"crop padding must be >= 0, got {padding}")
    if padding == 0 and not flip:
        return x
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu")
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu")
    rows = dy[:, None] + torch.arange(h)[None, :]
    cols = dx[:, None] + torch.arange(w)[None, :]
    if flip:  # flipping the crop = reading its columns backwards
        flipped = torch.rand(n, generator=generator, device="cpu") < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    dev = x.device
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows.to(dev)[:, None, :, None],
        cols.to(dev)[:, None, None, :],
    ]


def default_crop_padding(height: int, width: int) -> int:
    """Crop padding for :func:`augment_batch`: 4 at 32x32 (ANP's reference), min(h, w)/8 rounded, >= 1."""
    if height < 1 or width < 1:
        raise SettingsError(f"image size must be positive, got {height}x{width}")
    return max(1, int(math.floor(min(height, width) / 8 + 0.5)))
