"""Error and confirmation dialogs: plain messages, technical details behind "Show Details"."""

from __future__ import annotations

from typing import Optional

from PySide6.QtWidgets import QMessageBox, QWidget

from .worker import Failure

ERROR_DIALOG = "errorDialog"
CONFIRM_DIALOG = "confirmDialog"


def show_error(parent: Optional[QWidget], title: str, message: str, details: str = "") -> QMessageBox:
    """Show ``message`` in a window-modal box that does not block the event loop; return the box."""
    box = QMessageBox(QMessageBox.Icon.Warning, title, _sentence(message), QMessageBox.StandardButton.Ok, parent)
    box.setObjectName(ERROR_DIALOG)
    if details:
        box.setDetailedText(details)
    box.setModal(True)
    box.open()
    return box


def show_failure(parent: Optional[QWidget], title: str, failure: Failure) -> QMessageBox:
    """A failed task: the user's mistake in plain words; a bug with its traceback under the details."""
    message = failure.message
    if not failure.expected:
        message += ("\n\nThis looks like a bug in anp-onnx. The details below help to report it; the app "
                    "keeps running.")
    return show_error(parent, title, message, failure.details)


def confirm(parent: Optional[QWidget], title: str, message: str, yes: str = "Yes", no: str = "Cancel") -> bool:
    """Ask a yes/no question; the safe answer (no) is the default and what Escape gives."""
    box = QMessageBox(QMessageBox.Icon.Question, title, message, QMessageBox.StandardButton.NoButton, parent)
    box.setObjectName(CONFIRM_DIALOG)
    yes_button = box.addButton(yes, QMessageBox.ButtonRole.AcceptRole)
    yes_button.setObjectName("confirmYes")
    no_button = box.addButton(no, QMessageBox.ButtonRole.RejectRole)
    no_button.setObjectName("confirmNo")
    box.setDefaultButton(no_button)
    box.setEscapeButton(no_button)
    box.exec()
    return box.clickedButton() == yes_button


def _sentence(message: str) -> str:
    message = message.strip()
    return message[:1].upper() + message[1:] if message else "Something went wrong."
