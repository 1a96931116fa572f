"""The library's log messages, shown in a panel: a logging.Handler that emits a Qt signal.

Records may come from the worker thread; the signal is delivered queued to the panel in the GUI
thread, so the panel is only touched there.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from PySide6.QtCore import QEvent, QObject, Qt, Signal, Slot
from PySide6.QtGui import QColor, QFontDatabase, QPalette
from PySide6.QtWidgets import QHBoxLayout, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

from .theme import ERROR, WARN, readable

LIBRARY_LOGGER = "anp_onnx"


class QtLogHandler(logging.Handler):
    """Formats records and hands them to :attr:`emitter` ``.message`` (thread-safe)."""

    class Emitter(QObject):
        message = Signal(str, int)

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.emitter = QtLogHandler.Emitter()
        self.setFormatter(logging.Formatter("%(asctime)s  %(levelname)-7s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.emitter.message.emit(self.format(record), record.levelno)
        except RuntimeError:  # the panel is gone (app closing)
            pass
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class LogPanel(QWidget):
    """Read-only text of what the library (and the app) logged, newest at the bottom; warnings and
    errors in colours readable on the palette's background (re-coloured when the palette changes)."""

    LINES = 5000

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("logPanel")
        self.lines: deque = deque(maxlen=self.LINES)  # (line, level): to show them again in a new palette
        self.text = QPlainTextEdit(self)
        self.text.setObjectName("logText")
        self.text.setReadOnly(True)
        self.text.setMaximumBlockCount(self.LINES)
        self.text.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        clear = QPushButton("Clear", self)
        clear.clicked.connect(self.clear)
        side = QVBoxLayout()
        side.addWidget(clear)
        side.addStretch(1)
        row = QHBoxLayout(self)
        row.setContentsMargins(4, 4, 4, 4)
        row.addWidget(self.text, 1)
        row.addLayout(side)
        self.handler = QtLogHandler()
        self.handler.emitter.message.connect(self.append, Qt.ConnectionType.QueuedConnection)

    def attach(self, name: str = LIBRARY_LOGGER) -> None:
        logger = logging.getLogger(name)
        if self.handler not in logger.handlers:
            logger.addHandler(self.handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)

    def detach(self, name: str = LIBRARY_LOGGER) -> None:
        logging.getLogger(name).removeHandler(self.handler)

    def clear(self) -> None:
        self.lines.clear()
        self.text.clear()

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 - Qt's name
        super().changeEvent(event)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange) and \
                hasattr(self, "text") and self.lines:
            lines = list(self.lines)
            self.clear()
            for line, level in lines:
                self.append(line, level)

    @Slot(str, int)
    def append(self, line: str, level: int = logging.INFO) -> None:
        self.lines.append((line, level))
        style = "white-space:pre"
        if level >= logging.WARNING:
            colour = QColor(ERROR if level >= logging.ERROR else WARN)  # readable on the text's background
            # (the panel's palette: in a palette change it is new before the text box's is)
            background = self.palette().color(QPalette.ColorRole.Base)
            style += "; font-weight:bold; color:" + readable(colour, background).name()
        self.text.appendHtml(f"<span style='{style}'>{_escape(line)}</span>")

    def note(self, message: str) -> None:
        """A line from the app itself (not the library)."""
        self.append(f"{time.strftime('%H:%M:%S')}  {'APP':<7} {message}")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
