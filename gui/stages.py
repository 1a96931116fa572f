"""Names and clocks for the stages a long task reports (the library's ``ProgressEvent.stage``).

A :class:`StageClock` follows one task's events: it notes when each stage starts and ends and says,
in words, which stages are done (and how long each took), which one runs, how far it is and about
how long it has left, estimated from that stage's own pace.
"""

from __future__ import annotations

import time
from typing import Optional

from anp_onnx import ProgressEvent

#: stage -> (what it is called on screen, what one step of it is)
STAGES = {
    "calibrate": ("Calibration of renormalised neurons", "batch"),
    "probe": ("Collapse probe", "batch"),
    "optimise": ("ANP optimisation", "iteration"),
    "sweep": ("Pruning curve", "point"),
    "refine": ("Trigger scan and unlearning", "step"),
    "evaluate": ("Evaluation", "batch"),
}


def duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def stage_name(stage: str) -> str:
    return STAGES.get(str(stage), (str(stage).capitalize(), "step"))[0]


class StageClock:
    """The stages of one task so far: which are done and how long they took, which runs now."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.stage: Optional[str] = None
        self.stage_started = self.started
        self.done: list[tuple[str, float]] = []   # (stage, seconds), in order
        self.step = self.total = 0
        self.last_event = self.started

    def update(self, event: ProgressEvent) -> None:
        """Events come after each step: a new stage began when the previous one's last step ended."""
        stage = str(event.stage)
        if stage != self.stage:
            if self.stage is not None:
                self.done.append((self.stage, self.last_event - self.stage_started))
            self.stage, self.stage_started = stage, self.last_event
        self.step, self.total = event.step, event.total
        self.last_event = time.perf_counter()

    def finish(self) -> None:
        """The task ended: the running stage counts as done."""
        if self.stage is not None:
            self.done.append((self.stage, self.last_event - self.stage_started))
            self.stage = None

    def left(self) -> Optional[float]:
        """Seconds the running stage has left at its pace so far (None before its first step)."""
        if self.stage is None or not self.step:
            return None
        elapsed = self.last_event - self.stage_started
        return elapsed / self.step * max(0, self.total - self.step)

    def done_text(self) -> str:
        return ", ".join(f"{stage_name(s)} {duration(t)}" for s, t in self.done)

    def running_text(self, upper_bound: bool = False) -> str:
        """The running stage's step, time so far and (``upper_bound``: at most) time left, in HTML."""
        if self.stage is None:
            return ""
        unit = STAGES.get(self.stage, ("", "step"))[1]
        text = f"{unit} {self.step:,} of {self.total:,} · {duration(time.perf_counter() - self.stage_started)}"
        left = self.left()
        if left is not None:
            text += f" · <b>{'at most' if upper_bound else 'about'} {duration(left)} left</b>"
        return text

    def text(self, upper_bound: bool = False) -> str:
        """One line (HTML): stages done with their times, the running one with its step and time left."""
        parts = [f"✓ {stage_name(s)} {duration(t)}" for s, t in self.done]
        if self.stage is not None:
            parts.append(f"<b>{stage_name(self.stage)}</b>: {self.running_text(upper_bound)}")
        return " &nbsp;·&nbsp; ".join(parts)
