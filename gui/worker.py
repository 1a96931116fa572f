"""Long work off the GUI thread: a QThread runs one callable, results come back as signals.

The callable gets ``(progress, cancel)``: a function to pass the library as its ``progress``
callback, and the :class:`anp_onnx.CancelToken` to pass as ``cancel``. Every signal is emitted from
the worker thread and delivered, queued, to receivers living in the GUI thread, so no widget is
ever touched from the worker.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, QThread, Signal

from anp_onnx import AnpOnnxError, CancelToken, ProgressEvent
from anp_onnx import Cancelled

Job = Callable[[Callable[[ProgressEvent], None], CancelToken], Any]


@dataclass(frozen=True)
class Failure:
    """Why a task failed: a one-line message for people, and the traceback for the curious."""

    message: str
    details: str
    expected: bool  # an AnpOnnxError (the user's to fix) rather than a bug


class Task(QThread):
    """One run of ``job`` in its own thread; emits exactly one of succeeded, failed, cancelled."""

    progressed = Signal(object)    # ProgressEvent
    succeeded = Signal(object)     # the job's return value
    failed = Signal(object)        # Failure
    cancelled = Signal()

    def __init__(self, name: str, job: Job, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.name = name
        self.job = job
        self.token = CancelToken()
        self.started_at = 0.0

    def cancel(self) -> None:
        self.token.cancel()

    def _progress(self, event: ProgressEvent) -> None:
        self.progressed.emit(event)
        self.token.check()  # stop as soon as possible once cancelled

    def run(self) -> None:  # runs in the worker thread
        self.started_at = time.perf_counter()
        try:
            result = self.job(self._progress, self.token)
            if self.token.cancelled:
                raise Cancelled("cancelled by the user")
        except Cancelled:
            self.cancelled.emit()
        except AnpOnnxError as exc:
            self.failed.emit(Failure(str(exc), traceback.format_exc(), True))
        except MemoryError:
            self.failed.emit(Failure("out of memory: try fewer images or a smaller batch size",
                                     traceback.format_exc(), True))
        except Exception as exc:  # noqa: BLE001 - a bug: report it, never crash the app
            self.failed.emit(Failure(f"unexpected error: {type(exc).__name__}: {exc}", traceback.format_exc(), False))
        else:
            self.succeeded.emit(result)


class TaskRunner(QObject):
    """Runs one :class:`Task` at a time and tells the window when it is busy."""

    busyChanged = Signal(bool)
    taskFailed = Signal(str, object)   # task name, Failure

    def __init__(self, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.current: Optional[Task] = None
        self._finishing: set[Task] = set()

    @property
    def busy(self) -> bool:
        return self.current is not None

    def start(self, name: str, job: Job, *, on_success: Optional[Callable[[Any], None]] = None,
              on_progress: Optional[Callable[[ProgressEvent], None]] = None,
              on_cancel: Optional[Callable[[], None]] = None,
              on_failure: Optional[Callable[[Failure], None]] = None) -> Optional[Task]:
        """Start ``job``; None when another task is still running."""
        if self.current is not None:
            return None
        task = Task(name, job, self)
        self.current = task

        def done(callback: Optional[Callable], *args: Any) -> None:
            self._release(task)
            if callback is not None:
                callback(*args)

        if on_progress is not None:
            task.progressed.connect(lambda event: self.current is task and on_progress(event))
        task.succeeded.connect(lambda result: done(on_success, result))
        task.cancelled.connect(lambda: done(on_cancel))
        task.failed.connect(lambda failure: self._failed(task, failure, on_failure))
        task.finished.connect(lambda: self._forget(task))
        self.busyChanged.emit(True)
        task.start()
        return task

    def cancel(self) -> None:
        if self.current is not None:
            self.current.cancel()

    def wait(self, ms: int = 5000) -> bool:
        """Cancel and wait for the running task, and for tasks that have reported but not yet ended
        (used when the window closes: no thread may outlive it)."""
        task = self.current
        if task is not None:
            task.cancel()
        return all(t.wait(ms) for t in [*([task] if task is not None else []), *self._finishing])

    def _failed(self, task: Task, failure: Failure, callback: Optional[Callable[[Failure], None]]) -> None:
        self._release(task)
        if callback is not None:
            callback(failure)
        self.taskFailed.emit(task.name, failure)

    def _release(self, task: Task) -> None:
        if self.current is task:
            self.current = None
            self._finishing.add(task)
            self.busyChanged.emit(False)

    def _forget(self, task: Task) -> None:
        if self.current is task:  # ended without a result signal (should not happen)
            self._release(task)
        self._finishing.discard(task)
        task.deleteLater()
