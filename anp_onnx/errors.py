"""Exceptions raised by anp_onnx.

Every exception that is the user's to fix derives from :class:`AnpOnnxError`; its message is one
line, written for the person running the tool. The CLI prints it without a traceback and exits 1;
the GUI shows it in a dialog. Anything else escaping the library is a bug.
"""

from __future__ import annotations


class AnpOnnxError(Exception):
    """Base class for errors caused by the user's input (model, data, settings, paths)."""


class ModelError(AnpOnnxError):
    """The ONNX file cannot be read, validated or run."""


class UnsupportedModelError(ModelError):
    """The model is valid ONNX but anp-onnx cannot repair it (no image input, no neurons, ...)."""


class ConversionError(ModelError):
    """onnx2torch could not convert the model, or the converted graph disagrees with onnxruntime."""


class DataError(AnpOnnxError):
    """The clean or test data cannot be read or does not fit the model."""


class SettingsError(AnpOnnxError, ValueError):
    """An option has an invalid value."""


class OutputError(AnpOnnxError):
    """The output path is unusable (same as the input, missing folder, ...)."""


class Cancelled(AnpOnnxError):
    """Long work was stopped through its cancellation token."""
