"""Importing onnx2torch where torchvision is missing or broken.

onnx2torch imports torchvision at module level, but needs it only for its NonMaxSuppression and
RoiAlign converters. CPU machines often have no working torchvision (the registry's build is a CUDA
one, whose import fails against a CPU torch). When that happens a stand-in ``torchvision`` is put in
``sys.modules`` while onnx2torch is imported, and removed afterwards; the two converters then raise a
clear error if a model uses them. A working torchvision is always preferred.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import Any

_LOGGER = logging.getLogger(__name__)
_onnx2torch: Any = None


def _torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision.ops")
        return True
    except Exception:  # noqa: BLE001 - any failure (ImportError, RuntimeError on operator registration)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def _unavailable(*_args: Any, **_kwargs: Any) -> Any:
    raise NotImplementedError(
        "this model uses NonMaxSuppression/RoiAlign, which need a working torchvision; "
        "install a torchvision matching your torch"
    )


def onnx2torch() -> Any:
    """Return the ``onnx2torch`` module, importing it with the torchvision stand-in if needed."""
    global _onnx2torch
    if _onnx2torch is not None:
        return _onnx2torch
    if "onnx2torch" in sys.modules or _torchvision_works():
        _onnx2torch = importlib.import_module("onnx2torch")
        _extend(_onnx2torch)
        return _onnx2torch
    _LOGGER.debug("torchvision unavailable: importing onnx2torch with a stand-in torchvision.ops")
    fake = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = _unavailable  # type: ignore[attr-defined]
    ops.roi_align = _unavailable  # type: ignore[attr-defined]
    ops.box_convert = _unavailable  # type: ignore[attr-defined]
    fake.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"] = fake
    sys.modules["torchvision.ops"] = ops
    try:
        _onnx2torch = importlib.import_module("onnx2torch")
    finally:
        for name in ("torchvision", "torchvision.ops"):
            if sys.modules.get(name) in (fake, ops):
                del sys.modules[name]
    _extend(_onnx2torch)
    return _onnx2torch


def _extend(module: Any) -> None:
    from .onnx2torch_ext import register

    register(module)
