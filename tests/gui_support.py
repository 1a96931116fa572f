"""What the desktop-app tests share: the window fixture (with settings in a temporary file), tiny
model files, a small backdoored model with its test sets, and helpers to drive the window.

Test modules import the fixtures by name (``from gui_support import win, files  # noqa: F401``).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import numpy_helper  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QSettings, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication, QMessageBox  # noqa: E402

from anp_onnx.data import save_npz  # noqa: E402
from builders import add_trigger, random_images, synthetic_images, tiny_model, train_backdoored  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 30_000  # ms


@pytest.fixture
def settings(tmp_path) -> QSettings:
    return QSettings(str(tmp_path / "settings" / "anp-onnx-gui.ini"), QSettings.Format.IniFormat)


@pytest.fixture
def win(qtbot, settings):
    from gui.main_window import MainWindow

    window = MainWindow(settings)
    qtbot.addWidget(window)
    window.show()
    yield window
    window.runner.wait(5000)
    for box in window.errors:
        box.close()
    window.close()


@pytest.fixture
def files(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    model = tiny_model(work / "model.onnx")
    save_npz(random_images(64, seed=1), work / "clean.npz")
    return work, model, work / "clean.npz"


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory) -> dict[str, Path]:
    """A small network trained with a planted backdoor (target 0; clean accuracy and ASR near 100%),
    its clean data, a clean test set and the test set's triggered copy (true labels)."""
    root = tmp_path_factory.mktemp("backdoored")
    paths = {"model": train_backdoored(root / "backdoored.onnx", n=2000, epochs=3)}
    test = synthetic_images(200, seed=6)
    for name, images in (("clean", synthetic_images(300, seed=5)), ("test", test), ("poisoned", add_trigger(test))):
        paths[name] = root / f"{name}.npz"
        save_npz(images, paths[name])
    return paths


def open_model(qtbot, win, path) -> None:
    win.open_model(str(path))
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)


def load_set(qtbot, win, which: str, path) -> None:
    win.data_page.load(which, str(path))
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)
    assert getattr(win.session, which) is not None


def load_clean(qtbot, win, path) -> None:
    win.go_to("data")
    load_set(qtbot, win, "clean", path)
    assert win.session.train is not None


def linear_masks(win) -> dict:
    """Masks 0..1 in each layer (no optimisation needed), as if loaded from a file."""
    layers = win.session.info.neurons.layers
    return {layer.name: np.linspace(0.0, 1.0, layer.size, dtype=np.float32) for layer in layers}


def prune_page_with_curve(qtbot, win, model, clean, masks=None, opener=open_model):
    """Open ``model`` (with ``opener``), load ``clean``, use ``masks`` (default :func:`linear_masks`) and open
    the Prune step; returns the pruning curve it measured."""
    opener(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.run_page.use_masks(masks or linear_masks(win), "test masks")
    with qtbot.waitSignal(win.prune_page.curveFinished, timeout=TIMEOUT) as done:
        win.go_to("prune")
    assert done.args == ["done"]
    return win.session.curve


def visible_errors(win) -> list[QMessageBox]:
    return [box for box in win.errors if box.isVisible()]


def zero_scales(path: Path) -> int:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return int(sum((inits[n.input[1]] == 0).sum() for n in model.graph.node if n.op_type == "BatchNormalization"))


def answer_next_dialog(qtbot, button_name: str) -> list[str]:
    """Click ``button_name`` in the next modal dialog; returns the texts of the dialogs seen."""
    seen: list[str] = []

    def click() -> None:
        box = QApplication.activeModalWidget()
        if box is None:
            QTimer.singleShot(20, click)
            return
        seen.append(box.text())
        for button in box.buttons():
            if button.objectName() == button_name:
                button.click()
                return
        box.reject()

    QTimer.singleShot(0, click)
    return seen
