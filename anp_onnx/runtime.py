"""Running the ONNX model in onnxruntime, and the tolerance its logits are compared against.

Only numpy and onnxruntime are needed here (no torch), so evaluation and export verification can
use it without the torch side of the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .errors import ModelError
from .model import LoadedModel

if TYPE_CHECKING:
    from .preprocessing import Preprocessing

#: Parity tolerance between two runs' logits: |diff| <= ATOL + RTOL * max|reference logit|.
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-3


def ort_logits(model: LoadedModel, x: np.ndarray, session: Optional[Any] = None) -> np.ndarray:
    """Logits from onnxruntime for already-preprocessed inputs in the model's layout.

    :class:`ModelError` when any is NaN or infinite (the inputs are finite: the model is at fault),
    so that no NaN is ever scored as a prediction or compared as a conversion difference.
    """
    logits = _run(model, x, session or model.session())
    bad = ~np.isfinite(logits).all(axis=1) if logits.size else np.zeros(0, bool)
    if bad.any():
        raise ModelError(f"{model.path or 'the model'}: onnxruntime gives NaN or infinite outputs for "
                         f"{int(bad.sum())} of {len(logits)} images; the model itself is broken")
    return logits


def _run(model: LoadedModel, x: np.ndarray, session: Any) -> np.ndarray:
    try:
        return _run_batches(model, x, session)
    except Exception as exc:  # onnxruntime's own exception classes (a graph that fails on these inputs)
        text = str(exc).strip().splitlines()
        raise ModelError(f"{model.path or 'the model'}: onnxruntime fails to run the model on "
                         f"{len(x)} images: {text[0] if text else type(exc).__name__}") from exc


def _run_batches(model: LoadedModel, x: np.ndarray, session: Any) -> np.ndarray:
    batch = model.input.batch
    if batch is None:
        out = session.run([model.output_name], {model.input.name: x.astype(model.input.dtype)})[0]
        return out.reshape(out.shape[0], -1)
    chunks = []
    for start in range(0, len(x), batch):
        part = x[start:start + batch]
        pad = batch - len(part)
        if pad:
            part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
        out = session.run([model.output_name], {model.input.name: part.astype(model.input.dtype)})[0]
        chunks.append(out.reshape(out.shape[0], -1)[: batch - pad])
    return np.concatenate(chunks)


def to_model_input(model: LoadedModel, images: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """[0,1] NCHW images -> the array the ONNX input takes (preprocessed, in the model's layout)."""
    x = preprocessing.apply(images.astype(np.float32, copy=False))
    if model.input.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x, dtype=model.input.dtype)


def max_abs_diff(ref: np.ndarray, got: np.ndarray) -> float:
    """Largest |got - ref| over all entries (0.0 for empty arrays; NaN when either has NaN)."""
    return float(np.max(np.abs(got - ref))) if ref.size else 0.0


def parity_limit(ref: np.ndarray) -> float:
    """The largest difference allowed from the reference logits ``ref``: ATOL + RTOL * max|ref|."""
    return PARITY_ATOL + PARITY_RTOL * float(np.max(np.abs(ref)) if ref.size else 0.0)


def within_parity(diff: float, limit: float) -> bool:
    """Whether ``diff`` is finite and at most ``limit``."""
    return bool(np.isfinite(diff)) and diff <= limit
