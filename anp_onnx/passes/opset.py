"""Down-conversion to an older opset when that makes every op convertible."""

from __future__ import annotations

import copy
import logging
from typing import Callable

import onnx

from ..model import default_opset
from .chain import Pass

_LOGGER = logging.getLogger(__name__)


def lower_opset(unsupported: Callable[[onnx.ModelProto], list[str]], opset: int = 17) -> Pass:
    """The pass that down-converts a model newer than ``opset`` when it has ops ``unsupported`` names.

    The lowered copy is taken only when ``unsupported`` then names none; otherwise (or when onnx's
    version converter fails) the model stays as it is. onnx2torch 1.5 lacks several opset-18+
    converters; opset 17 keeps node names.
    """

    def lower_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        if default_opset(model) <= opset or not unsupported(model):
            return model, False
        try:
            lowered = onnx.version_converter.convert_version(copy.deepcopy(model), opset)
            if not unsupported(lowered):
                _LOGGER.info("converted through an in-memory opset-%d copy for onnx2torch", opset)
                return lowered, True
        except Exception as exc:  # version conversion is best effort
            _LOGGER.debug("opset %d down-conversion failed: %s", opset, exc)
        return model, False

    return lower_opset
