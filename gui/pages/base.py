"""What the pages share: access to the window's session, runner and settings; small widget helpers."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Iterable, Optional

from PySide6.QtCore import QEvent, Qt
from PySide6.QtWidgets import QFrame, QLabel, QVBoxLayout, QWidget

from ..theme import ERROR, GOOD, MUTED, WARN, themed_html

if TYPE_CHECKING:
    from ..main_window import MainWindow

__all__ = ["ERROR", "GOOD", "MUTED", "WARN", "Page", "RichLabel", "bullet_list", "esc", "pct", "rich"]


class Page(QWidget):
    """A step of the workflow. ``ready()`` says whether the step can be opened yet."""

    title = ""
    subtitle = ""

    def __init__(self, window: "MainWindow") -> None:
        super().__init__(window)
        self.win = window
        outer = QVBoxLayout(self)
        outer.setContentsMargins(12, 8, 12, 8)
        head = RichLabel(f"<h2 style='margin:0'>{html.escape(self.title)}</h2>"
                         f"<span style='color:{MUTED}'>{html.escape(self.subtitle)}</span>", self)
        head.setObjectName("pageHead")
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


class RichLabel(QLabel):
    """A rich-text label whose status and secondary-text colours (``WARN``, ``ERROR``, ``GOOD``,
    ``MUTED`` in ``style='color:…'``) are shown in the palette's readable version of them, and
    re-shown when the palette changes (a dark theme gets light text colours)."""

    def __init__(self, text: str = "", parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self._source = ""
        self.setTextFormat(Qt.TextFormat.RichText)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt's name
        self._source = text
        super().setText(themed_html(text, self.palette()))

    def source(self) -> str:
        """The text as the page gave it, before the palette's colours."""
        return self._source

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 - Qt's name
        super().changeEvent(event)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange) and \
                hasattr(self, "_source"):
            super().setText(themed_html(self._source, self.palette()))


def rich(parent: Optional[QWidget] = None, text: str = "", name: str = "") -> QLabel:
    label = RichLabel(text, parent)
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
