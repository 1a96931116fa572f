"""The window's menus and keyboard shortcuts, the Help page (F1) and About (with versions).

File: open a model, try the sample, open a recent one, save the masks, export, quit. Go: the
previous and next step (Alt+Left / Alt+Right, also Ctrl+PgUp / Ctrl+PgDown). View: the log.
Help: what each step does, and About with the versions of everything that does the work.
"""

from __future__ import annotations

import html
import platform
from importlib import metadata
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, qVersion
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMessageBox

import anp_onnx

if TYPE_CHECKING:
    from .main_window import MainWindow

HELP_DIALOG = "helpDialog"
ABOUT_DIALOG = "aboutDialog"


def _action(win: "MainWindow", text: str, slot, *shortcuts, tip: str = "") -> QAction:
    action = QAction(text, win)
    if shortcuts:
        action.setShortcuts([QKeySequence(s) for s in shortcuts])
    if tip:
        action.setToolTip(tip)
    action.triggered.connect(slot)
    return action


def build_menus(win: "MainWindow") -> None:
    """File, Go, View and Help; the actions that depend on the session are kept on ``win``."""
    file_menu = win.menuBar().addMenu("&File")
    win.open_action = _action(win, "&Open model…", win.open_model_dialog, QKeySequence.StandardKey.Open)
    win.sample_action = _action(win, "Try a &sample", win.try_sample,
                                tip="Open the bundled backdoored sample model with its clean data and test sets")
    win.sample_action.setEnabled(win.sample is not None)
    file_menu.addAction(win.open_action)
    file_menu.addAction(win.sample_action)
    win.recent_menu = file_menu.addMenu("Open &recent")
    win.recent_menu.setObjectName("recentMenu")
    file_menu.addSeparator()
    win.save_masks_action = _action(win, "&Save masks…", win.run_page.browse_save_masks, QKeySequence.StandardKey.Save,
                                    tip="Save the masks to reuse them without running ANP again")
    win.export_action = _action(win, "&Export repaired model…", win.export_now, "Ctrl+E",
                                tip="Go to the Export step and write the repaired model")
    file_menu.addAction(win.save_masks_action)
    file_menu.addAction(win.export_action)
    file_menu.addSeparator()
    file_menu.addAction(_action(win, "&Quit", win.close, QKeySequence.StandardKey.Quit))

    go = win.menuBar().addMenu("&Go")
    win.back_action = _action(win, "&Back", lambda: win.go(win.steps.currentRow() - 1), "Alt+Left", "Ctrl+PgUp")
    win.next_action = _action(win, "&Next", lambda: win.go(win.steps.currentRow() + 1), "Alt+Right", "Ctrl+PgDown")
    go.addAction(win.back_action)
    go.addAction(win.next_action)
    win.back.setToolTip("Previous step (Alt+Left)")
    win.next.setToolTip("Next step (Alt+Right)")

    view = win.menuBar().addMenu("&View")
    view.addAction(win.log_dock.toggleViewAction())

    help_menu = win.menuBar().addMenu("&Help")
    help_menu.addAction(_action(win, "&Help", lambda: show_help(win), "F1"))
    help_menu.addAction(_action(win, "&About anp-onnx", lambda: show_about(win)))


def versions() -> dict[str, str]:
    """The versions of what does the work (packages not installed are left out)."""
    out = {"anp-onnx": anp_onnx.__version__, "Python": platform.python_version(), "Qt": qVersion()}
    for name, dist in (("PySide6", "PySide6-Essentials"), ("PySide6", "PySide6"), ("torch", "torch"),
                       ("onnx", "onnx"), ("onnxruntime", "onnxruntime-training"), ("onnxruntime", "onnxruntime"),
                       ("onnx2torch", "onnx2torch"), ("numpy", "numpy"), ("matplotlib", "matplotlib")):
        if name in out:
            continue
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _box(win: "MainWindow", name: str, title: str, text: str) -> QMessageBox:
    box = QMessageBox(QMessageBox.Icon.Information, title, text, QMessageBox.StandardButton.Close, win)
    box.setObjectName(name)
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setModal(False)
    box.show()
    win.dialogs.append(box)
    return box


def show_about(win: "MainWindow") -> QMessageBox:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in versions().items())
    return _box(win, ABOUT_DIALOG, "About anp-onnx",
                f"<b>anp-onnx {html.escape(anp_onnx.__version__)}</b><p>Removes backdoors from ONNX image "
                "classifiers with Adversarial Neuron Pruning (Wu &amp; Wang, NeurIPS 2021), using a little clean "
                f"data and no knowledge of the trigger.</p><table cellspacing='4'>{rows}</table>")


def show_help(win: "MainWindow") -> QMessageBox:
    steps = "".join(f"<li><b>{html.escape(page.title)}</b>: {html.escape(page.subtitle)}</li>" for page in win.pages)
    current = win.pages[win.steps.currentRow()].title if win.steps.currentRow() >= 0 else ""
    return _box(win, HELP_DIALOG, "Help",
                "<p>anp-onnx repairs a backdoored ONNX image classifier step by step; the steps on the left open "
                "in turn as each is done (Alt+Left / Alt+Right move between them). New here? <b>File > Try a "
                "sample</b> loads a backdoored model with everything it needs.</p>"
                f"<ol>{steps}</ol><p>You are at <b>{html.escape(current)}</b>. Point at a control to read what it "
                "does; the README's 'Desktop app' section has more.</p>")
