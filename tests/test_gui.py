"""The desktop app (gui/), driven with pytest-qt on the offscreen platform.

The whole workflow on a tiny model (open -> data -> run -> prune -> export), cancelling a run,
errors shown as dialogs (bad model, bad data, a bug), the confirmation before replacing the input,
an export from saved masks, the entry points, and that importing the whole library loads no Qt
(which imports the GUI may use is tests/test_architecture.py's business).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDropEvent  # noqa: E402

import anp_onnx  # noqa: E402
from gui_support import (  # noqa: E402,F401 - fixtures by name
    ROOT, TIMEOUT, answer_next_dialog, files, load_clean, open_model, settings, visible_errors, win, zero_scales,
)


def test_full_workflow_exports_a_verified_model(qtbot, win, files, settings):
    work, model, clean = files
    open_model(qtbot, win, model)
    info = win.session.info
    assert info is not None and info.neurons.total == 24
    summary = win.model_page.summary.text()
    assert "24" in summary and "passed" in summary and "16×16" in summary
    assert win.model_page.layers.rowCount() == 2

    load_clean(qtbot, win, clean)
    assert win.data_page.strips["clean"].count() > 0
    assert win.session.data_parity is not None and win.session.data_parity < 1e-4

    win.go_to("settings")
    win.settings_page.set_values(iterations=7, eps=0.1)
    qtbot.mouseClick(win.settings_page.defaults, Qt.MouseButton.LeftButton)
    assert win.settings_page.config() == anp_onnx.ANPConfig()  # the defaults
    qtbot.mouseClick(win.settings_page.reference, Qt.MouseButton.LeftButton)
    assert win.settings_page.config() == anp_onnx.ANPConfig.reference()  # untargeted noise
    assert win.settings_page.fields["target"].currentData() == "none"
    renorm = win.settings_page.fields["renormalise"]
    assert renorm.isChecked()
    qtbot.mouseClick(renorm, Qt.MouseButton.LeftButton)  # a real click on the checkbox
    assert win.settings_page.config().renormalise is False
    qtbot.mouseClick(win.settings_page.defaults, Qt.MouseButton.LeftButton)
    assert win.settings_page.config().target == "auto" and win.settings_page.config().renormalise
    win.settings_page.set_values(iterations=20, batch_size=16)
    win.go_to("run")
    with qtbot.waitSignal(win.run_page.runFinished, timeout=TIMEOUT) as finished:
        qtbot.mouseClick(win.run_page.start_button, Qt.MouseButton.LeftButton)
    assert finished.args == ["done"]
    assert win.run_page.progress.value() == 20
    masks = win.session.masks
    assert set(masks) == {layer.name for layer in info.neurons.layers}
    assert len(win.run_page.loss_plot.steps) >= 2

    with qtbot.waitSignal(win.prune_page.curveFinished, timeout=TIMEOUT) as curve_done:
        win.go_to("prune")  # opening the page computes the pruning curve
    assert curve_done.args == ["done"]
    curve = win.session.curve
    assert len(curve.points) >= 2 and curve.points[0].count == 0 and curve.points[0].accuracy is not None
    assert win.prune_page.mode.currentData() == "auto"  # the automatic choice is selected once known
    # with the unlearning on (the default), the automatic choice prunes nothing first
    assert win.session.plan.count == 0 and win.prune_page.slider.value() == 0
    win.prune_page.mode.setCurrentIndex(win.prune_page.mode.findData("count"))
    win.prune_page.count.setValue(5)
    assert win.session.plan.count == 5
    assert win.prune_page.table.rowCount() == 24
    assert [win.prune_page.table.item(r, 3).text() for r in range(6)] == ["yes"] * 5 + [""]

    win.go_to("export")
    out = work / "repaired.onnx"
    win.export_page.output.setText(str(out))
    with qtbot.waitSignal(win.export_page.exportFinished, timeout=4 * TIMEOUT) as exported:  # with the unlearning
        qtbot.mouseClick(win.export_page.export_button, Qt.MouseButton.LeftButton)
    assert exported.args == ["done"]
    assert out.is_file() and "PASSED" in win.export_page.file_verdict.text()
    assert win.session.export.max_abs_diff is not None and win.session.export.max_abs_diff < 1e-3
    loaded = anp_onnx.load_model(out)
    assert loaded.num_classes == 10
    assert zero_scales(out) == 5 and zero_scales(model) == 0
    assert (work / "repaired.masks.json").is_file() and (work / "repaired.mask_values.txt").is_file()
    assert "5 of 24 neurons" in (work / "repaired.report.md").read_text()
    assert (work / "repaired.report.json").is_file() and (work / "repaired.curve.png").is_file()
    assert not visible_errors(win)
    assert "conversion parity" in win.log.text.toPlainText()  # the library's log reaches the panel

    # what is remembered for next time
    from gui.main_window import MainWindow

    settings.sync()
    again = MainWindow(settings)
    qtbot.addWidget(again)
    assert again.settings.recent_files()[0] == str(model.resolve())
    assert again.model_page.recent.count() == 1
    assert again.settings_page.config().iterations == 20
    assert again.settings.last_folder("data") == str(work)
    again.close()


def test_cancel_stops_within_a_second_and_writes_nothing(qtbot, win, files):
    work, model, clean = files
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.settings_page.set_values(iterations=1_000_000, batch_size=16)
    win.go_to("run")
    before = sorted(work.rglob("*"))
    win.run_page.start()
    assert win.run_page.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: win.run_page.progress.value() >= 20, timeout=TIMEOUT)
    start = time.perf_counter()
    with qtbot.waitSignal(win.run_page.runFinished, timeout=2000) as finished:
        qtbot.mouseClick(win.run_page.cancel_button, Qt.MouseButton.LeftButton)
    assert time.perf_counter() - start < 1.5
    assert finished.args == ["cancelled"]
    assert win.run_page.state == "cancelled" and win.session.masks is None
    assert not win.prune_page.ready() and not win.runner.busy
    assert win.run_page.start_button.isEnabled() and not win.run_page.cancel_button.isEnabled()
    assert sorted(work.rglob("*")) == before
    assert not visible_errors(win)


def test_bad_model_file_gives_a_dialog_and_the_window_stays_usable(qtbot, win, files, tmp_path, monkeypatch):
    work, model, _ = files
    bad = tmp_path / "x.onnx"
    bad.write_text("this is not an ONNX model\n")
    open_model(qtbot, win, bad)
    errors = visible_errors(win)
    assert len(errors) == 1 and errors[0].objectName() == "errorDialog"
    assert "x.onnx" in errors[0].text() and "Traceback" in errors[0].detailedText()
    assert win.session.repairer is None
    errors[0].close()

    # a bug (not the user's fault) also ends in a dialog, with the traceback under the details
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(anp_onnx.Repairer, "open", broken)
    open_model(qtbot, win, model)
    errors = visible_errors(win)
    assert len(errors) == 1 and "unexpected error" in errors[0].text().lower() and "boom" in errors[0].detailedText()
    errors[0].close()
    monkeypatch.undo()

    # still usable: drop the good model onto the window
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(model))])
    event = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    win.dropEvent(event)
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)
    assert win.session.info is not None and win.session.info.neurons.total == 24
    assert win.data_page.ready()

    # the Options: re-open with conv/linear output channels as the neurons
    win.model_page.kinds.setCurrentIndex(win.model_page.kinds.findData("conv"))
    qtbot.mouseClick(win.model_page.reopen, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)
    assert {layer.kind for layer in win.session.info.neurons.layers} == {"conv"}
    assert not visible_errors(win)


def test_bad_data_folder_gives_a_dialog(qtbot, win, files, tmp_path):
    work, model, _ = files
    folder = tmp_path / "data"
    (folder / "0").mkdir(parents=True)
    (folder / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    open_model(qtbot, win, model)
    win.go_to("data")
    win.data_page.load("clean", str(folder))
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)
    errors = visible_errors(win)
    assert len(errors) == 1 and "broken.png" in errors[0].text()
    assert win.session.clean is None and win.data_page.rows["clean"].edit.text() == ""
    assert not win.run_page.start_button.isEnabled()

    # an invalid custom preprocessing is explained next to the field, not a crash
    win.data_page.set_preset("custom")
    win.data_page.custom.setText("mean=oops")
    win.data_page.custom.editingFinished.emit()
    assert "invalid preprocessing" in win.data_page.pre_label.text()


def test_saved_masks_and_export_over_the_input_needs_confirmation(qtbot, win, files, tmp_path):
    work, model, _ = files
    open_model(qtbot, win, model)
    layers = win.session.info.neurons.layers
    masks = {layer.name: np.linspace(0.0, 1.0, layer.size, dtype=np.float32) for layer in layers}
    means = {name: values[::-1].copy() for name, values in masks.items()}  # tie-breakers to keep
    win.run_page.use_masks(masks, "test masks", mean_masks=means)
    saved = win.run_page.save_masks(str(tmp_path / "m.masks.json"))
    assert [p.name for p in saved] == ["m.masks.json", "m.mask_values.txt"]
    win.run_page.use_masks({k: np.ones_like(v) for k, v in masks.items()}, "other")
    win.run_page.load_masks(str(saved[0]))  # prune from saved masks, as `anp-onnx prune` does
    assert all(np.allclose(win.session.masks[k], v, atol=1e-5) for k, v in masks.items())
    assert win.prune_page.ready()
    win.go_to("prune")
    win.prune_page.set_spec(anp_onnx.PruneSpec.count(3))
    assert win.session.plan.count == 3
    win.go_to("export")
    win.export_page.save_masks.setChecked(False)
    win.export_page.save_report.setChecked(False)
    win.export_page.output.setText(str(model))
    original = model.read_bytes()
    listing = sorted(work.iterdir())

    seen = answer_next_dialog(qtbot, "confirmNo")
    win.export_page.export()
    assert seen and "model you opened" in seen[0]
    assert not win.runner.busy
    assert model.read_bytes() == original and sorted(work.iterdir()) == listing

    seen = answer_next_dialog(qtbot, "confirmYes")
    with qtbot.waitSignal(win.export_page.exportFinished, timeout=TIMEOUT) as exported:
        win.export_page.export()
    assert exported.args == ["done"] and seen
    assert zero_scales(model) == 3 and sorted(work.iterdir()) == listing
    assert not visible_errors(win)


def test_library_never_imports_qt():
    code = (
        "import importlib, pkgutil, sys, anp_onnx\n"
        "for m in pkgutil.walk_packages(anp_onnx.__path__, 'anp_onnx.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in "
        "('PySide6', 'PySide2', 'PyQt5', 'PyQt6', 'shiboken6', 'gui')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    qt = re.compile(r"^\s*(import|from)\s+(PySide\d|PyQt\d|shiboken\d|gui)\b", re.MULTILINE)
    offenders = [str(p) for p in (ROOT / "anp_onnx").rglob("*.py") if qt.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_entry_points():
    """``anp-onnx-gui`` (the gui-script in pyproject.toml) and ``python -m gui`` run the same main."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    from importlib.metadata import EntryPoint

    import gui.app

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["gui-scripts"]
    assert EntryPoint("anp-onnx-gui", declared["anp-onnx-gui"], "gui_scripts").load() is gui.app.main
    # python -m gui calls gui.app.main with the command line (a stand-in records the call)
    code = ("import runpy, sys, gui.app\n"
            "gui.app.main = lambda argv=None: print('main called', argv, sys.argv[1:]) or 3\n"
            "sys.argv = ['gui', 'model.onnx']\n"
            "runpy.run_module('gui', run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=60)
    assert run.returncode == 3 and run.stdout.strip() == "main called None ['model.onnx']", run.stderr
    run = subprocess.run([sys.executable, "-m", "gui", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert run.returncode == 0 and "anp-onnx-gui" in run.stdout


def test_export_from_loaded_masks_reports_where_they_came_from(qtbot, win, files, tmp_path):
    work, model, clean = files
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.data_page.load("test", str(clean))
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)
    layers = win.session.info.neurons.layers
    masks = {layer.name: np.linspace(0.0, 1.0, layer.size, dtype=np.float32) for layer in layers}
    means = {name: values[::-1].copy() for name, values in masks.items()}  # tie-breakers to keep
    win.run_page.use_masks(masks, "test masks", mean_masks=means)
    saved = win.run_page.save_masks(str(tmp_path / "m.masks.json"))
    win.run_page.load_masks(str(saved[0]))
    assert win.session.mask_result is None and win.session.masks_config is None
    win.prune_page.set_spec(anp_onnx.PruneSpec.threshold(anp_onnx.REFERENCE_THRESHOLD))
    win.go_to("export")
    out = work / "from_masks.onnx"
    win.export_page.output.setText(str(out))
    with qtbot.waitSignal(win.export_page.exportFinished, timeout=TIMEOUT) as exported:
        win.export_page.export()
    assert exported.args == ["done"]
    report = (work / "from_masks.report.md").read_text()
    assert "masks loaded from m.masks.json" in report and "ANP neuron noise" not in report
    assert "Stages run: convert -> parity -> rank -> unlearn -> write-back" in report  # unlearning: the default
    plan = win.session.plan
    assert f"{plan.count} of {plan.total} neurons" in report and zero_scales(out) == plan.count
    shown = win.export_page.result.text()
    assert "from_masks.report.json" in shown and "test accuracy" in shown
    facts = json.loads((work / "from_masks.report.json").read_text())
    assert facts["conversion_parity_max_abs_diff"] == pytest.approx(win.session.data_parity)
    # the masks file written beside the export keeps the loaded tie-breakers
    resaved = anp_onnx.load_masks(work / "from_masks.masks.json")[1]["mean_masks"]
    for name, values in means.items():
        np.testing.assert_allclose(resaved[name], values, atol=1e-6)
    assert not visible_errors(win)
