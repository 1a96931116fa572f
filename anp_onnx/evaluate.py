"""Clean accuracy and attack success rate, measured with onnxruntime on the ONNX model itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .data import ImageSet
from .errors import DataError
from .model import LoadedModel
from .preprocessing import Preprocessing
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check, emit
from .runtime import ort_logits, to_model_input


@dataclass(frozen=True)
class EvalResult:
    """Accuracy on clean images, and ASR on triggered ones when given.

    ASR is the fraction of triggered images whose true label is not the target that are predicted
    as the target. ``target_inferred`` tells whether the target was the majority prediction on the
    triggered set rather than given.
    """

    accuracy: Optional[float] = None
    n_clean: int = 0
    asr: Optional[float] = None
    n_poisoned: int = 0
    target: Optional[int] = None
    target_inferred: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def predict(model: LoadedModel, images: ImageSet, preprocessing: Preprocessing, *, batch_size: int = 256,
            session=None, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
            stage: Stage = Stage.EVALUATE) -> np.ndarray:
    """Predicted class per image, from onnxruntime."""
    session = session or model.session()
    preds = []
    total = max(1, -(-len(images) // batch_size))
    for step, start in enumerate(range(0, len(images), batch_size), start=1):
        check(cancel)
        x = to_model_input(model, images.x[start:start + batch_size], preprocessing)
        preds.append(ort_logits(model, x, session).argmax(1))
        emit(progress, ProgressEvent(stage, step, total))
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def infer_target(predictions: np.ndarray) -> int:
    """The majority prediction: a backdoored model sends triggered images to its target."""
    return int(np.bincount(predictions).argmax())


def attack_success_rate(predictions: np.ndarray, labels: np.ndarray, target: int) -> tuple[float, int]:
    keep = labels != target
    n = int(keep.sum())
    if n == 0:
        raise DataError(f"every triggered image has the target label {target}: ASR is undefined")
    return float((predictions[keep] == target).mean()), n


def evaluate(model: LoadedModel, clean: Optional[ImageSet], preprocessing: Preprocessing, *,
             poisoned: Optional[ImageSet] = None, target: Optional[int] = None, batch_size: int = 256,
             progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> EvalResult:
    """Clean accuracy on ``clean`` and ASR on ``poisoned`` (either may be None)."""
    if target is not None and not 0 <= target < model.num_classes:
        raise DataError(f"target class {target} is outside the model's {model.num_classes} classes")
    session = model.session()
    acc, n_clean = None, 0
    if clean is not None and len(clean):
        pred = predict(model, clean, preprocessing, batch_size=batch_size, session=session,
                       progress=progress, cancel=cancel)
        acc, n_clean = float((pred == clean.y).mean()), len(clean)
    asr, n_poisoned, inferred = None, 0, False
    if poisoned is not None and len(poisoned):
        pred = predict(model, poisoned, preprocessing, batch_size=batch_size, session=session,
                       progress=progress, cancel=cancel)
        if target is None:
            target, inferred = infer_target(pred), True
        asr, n_poisoned = attack_success_rate(pred, poisoned.y, target)
    return EvalResult(acc, n_clean, asr, n_poisoned, target, inferred)
