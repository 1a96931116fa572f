"""What the pages share: access to the window's session, runner and settings; small widget helpers."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Iterable, Optional

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFrame, QLabel, QVBoxLayout, QWidget

if TYPE_CHECKING:
    from ..main_window import MainWindow

#: Text colours: a warning (the user should look), an error, a success.
WARN = "#b35900"
ERROR = "#b00020"
GOOD = "#1a7f37"


class Page(QWidget):
    """A step of the workflow. ``ready()`` says whether the step can be opened yet."""

    title = ""
    subtitle = ""

    def __init__(self, window: "MainWindow") -> None:
        super().__init__(window)
        self.win = window
        outer = QVBoxLayout(self)
        outer.setContentsMargins(12, 8, 12, 8)
        head = QLabel(f"<h2 style='margin:0'>{html.escape(self.title)}</h2>"
                      f"<span style='color:#555'>{html.escape(self.subtitle)}</span>", self)
        head.setTextFormat(Qt.TextFormat.RichText)
        head.setWordWrap(True)
        outer.addWidget(head)
        line = QFrame(self)
        line.setFrameShape(QFrame.Shape.HLine)
        line.setFrameShadow(QFrame.Shadow.Sunken)
        outer.addWidget(line)
        self.body = QVBoxLayout()
        outer.addLayout(self.body, 1)

    @property
    def session(self):
        return self.win.session

    @property
    def settings(self):
        return self.win.settings

    def ready(self) -> bool:
        return True

    def refresh(self) -> None:
        """Bring the widgets in line with the session (called when the session changed)."""

    def set_busy(self, busy: bool) -> None:
        """Disable the page's actions while a task runs."""


def rich(parent: Optional[QWidget] = None, text: str = "", name: str = "") -> QLabel:
    label = QLabel(text, parent)
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    if name:
        label.setObjectName(name)
    return label


def esc(value: object) -> str:
    return html.escape(str(value))


def bullet_list(items: Iterable[str]) -> str:
    items = list(items)
    return "<ul style='margin-top:0'>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>" if items else ""


def pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
