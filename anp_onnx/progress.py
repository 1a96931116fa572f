"""Typed progress events and cooperative cancellation for long work.

Long operations (ANP optimisation, the pruning sweep, evaluation) take an optional ``progress``
callback that receives :class:`ProgressEvent` objects, and an optional :class:`CancelToken`. The
CLI renders events as a progress bar, the GUI forwards them through Qt signals. The library never
blocks on the callback's behalf and checks the token between steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Mapping, Optional

from .errors import Cancelled


class Stage(str, Enum):
    """The pipeline stages that report progress (a ``str`` enum: ``Stage.OPTIMISE == "optimise"``)."""

    CONVERT = "convert"
    CALIBRATE = "calibrate"
    PROBE = "probe"
    OPTIMISE = "optimise"
    SWEEP = "sweep"
    WRITE_BACK = "write-back"
    VERIFY = "verify"
    EVALUATE = "evaluate"
    REFINE = "refine"
    REPORT = "report"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long operation.

    ``stage`` names the operation (a :class:`Stage`); ``step`` counts from 1 up to ``total``. ``metrics`` carries stage-specific figures (losses, accuracy, ...), and ``payload``
    optional heavier data (for example the current mask values) for live plots.
    """

    stage: Stage
    step: int
    total: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    payload: Optional[Mapping[str, object]] = None
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Thread-safe flag that long work polls; :meth:`cancel` makes the next check raise."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`~anp_onnx.errors.Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def emit(progress: Optional[ProgressCallback], event: ProgressEvent) -> None:
    """Send ``event`` to ``progress`` when a callback was given."""
    if progress is not None:
        progress(event)


def check(cancel: Optional[CancelToken]) -> None:
    """Raise if ``cancel`` was triggered; no-op when ``cancel`` is None."""
    if cancel is not None:
        cancel.check()
