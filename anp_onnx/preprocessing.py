"""How ``[0, 1]`` pixels become model input: :class:`Preprocessing` and its named :data:`PRESETS`.

A preprocessing is applied per batch to numpy arrays or torch tensors. This module never imports
torch: a tensor can only come from a torch that is already loaded, which is the one used.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .errors import SettingsError

if TYPE_CHECKING:
    import torch

_ArrayT = TypeVar("_ArrayT", np.ndarray, "torch.Tensor")
_PARSE_HINT = "e.g. 'mean=0.5,0.5,0.5;std=0.25,0.25,0.25;scale=1'"


def _torch_if_tensor(x: Any) -> Any:
    """The torch module when ``x`` is a torch tensor, else None (a tensor implies torch is loaded)."""
    th = sys.modules.get("torch")
    return th if th is not None and isinstance(x, th.Tensor) else None


def _floats(value: Any, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in ([value] if isinstance(value, (int, float)) else value))
    except (TypeError, ValueError):
        out = ()
    if not out or not all(math.isfinite(v) for v in out):
        raise SettingsError(f"preprocessing {what} must be one or more finite numbers, got {value!r}")
    return out


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@dataclass(frozen=True)
class Preprocessing:
    """How ``[0, 1]`` pixels become model input: ``(x * scale - mean) / std``, per channel.

    ``mean`` and ``std`` are optional, each with one value (used for every channel) or one per
    channel. ``scale`` is applied first, e.g. 255.0 for models that take 0..255 pixels.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        mean, std = _floats(self.mean, "mean"), _floats(self.std, "std")
        scale = _floats(self.scale, "scale")
        if std is not None and any(v <= 0 for v in std):
            raise SettingsError(f"preprocessing std values must be > 0, got {_fmt(std)}")
        if mean and std and len(mean) > 1 and len(std) > 1 and len(mean) != len(std):
            raise SettingsError(f"preprocessing mean has {len(mean)} values but std has {len(std)}")
        if scale is None or len(scale) != 1 or scale[0] <= 0:
            raise SettingsError(f"preprocessing scale must be one number > 0, got {self.scale!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "scale", scale[0])

    def apply(self, x: _ArrayT) -> _ArrayT:
        """Return ``(x * scale - mean) / std`` for a ``(N, C, H, W)`` numpy array or torch tensor.

        The result is a new object of the input's type (tensors keep device and float dtype); ``x``
        is not modified. :class:`SettingsError` when mean/std have a length other than 1 or C.
        """
        channels = x.shape[1] if x.ndim >= 2 else 1
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if vals is not None and len(vals) not in (1, channels):
                raise SettingsError(
                    f"preprocessing {name} has {len(vals)} values but the images have {channels} channels"
                )
        shape = (1, -1) + (1,) * max(x.ndim - 2, 0)
        th = _torch_if_tensor(x)
        if th is not None:
            out = x if x.is_floating_point() else x.float()
            const = lambda v: th.tensor(v, dtype=out.dtype, device=out.device).reshape(shape)  # noqa: E731
        else:
            out = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
            const = lambda v: np.asarray(v, dtype=out.dtype).reshape(shape)  # noqa: E731
        if self.scale != 1.0:
            out = out * self.scale
        if self.mean is not None:
            out = out - const(self.mean)
        if self.std is not None:
            out = out / const(self.std)
        if out is x:  # identity preprocessing: still hand back a new object
            out = x.clone() if th is not None else x.copy()
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, inverse of :meth:`from_dict`."""
        as_list = lambda v: None if v is None else list(v)  # noqa: E731
        return {"mean": as_list(self.mean), "std": as_list(self.std), "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Build from :meth:`to_dict` output (missing keys take their defaults)."""
        if not isinstance(d, dict) or set(d) - {"mean", "std", "scale"}:
            raise SettingsError(f"preprocessing must be a mapping of mean, std and scale, got {d!r}")
        return cls(mean=d.get("mean"), std=d.get("std"), scale=d.get("scale", 1.0))

    @classmethod
    def parse(cls, text: str) -> Preprocessing:
        """Parse CLI text: a preset name (see :data:`PRESETS`) or ``"mean=...;std=...;scale=..."``."""
        key = (text or "").strip()
        if key.lower() in PRESETS:
            return PRESETS[key.lower()]
        values: dict[str, Any] = {}
        problem = "" if key else "empty"
        for part in filter(None, (p.strip() for p in key.split(";"))):
            name, sep, raw = (s.strip() for s in part.partition("="))
            name = name.lower()
            if not sep or name not in ("mean", "std", "scale") or name in values:
                problem = f"unknown preset or bad part {part!r}"
                break
            try:
                values[name] = [float(v) for v in raw.split(",")]
            except ValueError:
                problem = f"{name} must be comma-separated numbers"
                break
        if not problem:
            try:
                return cls(**values)
            except SettingsError as exc:
                problem = str(exc)
        hint = f"use a preset ({', '.join(PRESETS)}) or {_PARSE_HINT}"
        raise SettingsError(f"invalid preprocessing {text!r} ({problem}); {hint}")

    def describe(self) -> str:
        """Short human text, e.g. ``"imagenet: [0,1] scale, mean (0.485, ...), std (...)"``."""
        parts = [f"[0,{self.scale:g}] scale"]
        parts += [f"mean {_fmt(self.mean)}"] if self.mean is not None else []
        parts += [f"std {_fmt(self.std)}"] if self.std is not None else []
        parts += ["no mean/std"] if self.mean is None and self.std is None else []
        name = next((k for k, v in PRESETS.items() if v == self), None)
        return (f"{name}: " if name else "") + ", ".join(parts)


#: Named presets accepted by :meth:`Preprocessing.parse`. ``minus1_1`` has one mean/std value for
#: every channel, so it fits grayscale models too.
PRESETS: dict[str, Preprocessing] = {
    "unit": Preprocessing(),
    "imagenet": Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "cifar10": Preprocessing(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "minus1_1": Preprocessing(mean=(0.5,), std=(0.5,)),
    "0_255": Preprocessing(scale=255.0),
}
