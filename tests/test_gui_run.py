"""The Run step: a new run keeps the last finished result until it finishes, and every stage of a
run (calibration, collapse probe, ANP) is named on screen with its progress (issue #14)."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt

import anp_onnx
from anp_onnx.data import save_npz
from builders import random_images, tiny_model
from gui_support import (  # noqa: F401 - fixtures by name
    TIMEOUT, files, linear_masks, load_clean, open_model, settings, visible_errors, win,
)


def run_to_end(qtbot, win) -> None:
    with qtbot.waitSignal(win.run_page.runFinished, timeout=TIMEOUT) as finished:
        win.run_page.start()
    assert finished.args == ["done"]


def test_a_cancelled_run_keeps_the_previous_result(qtbot, win, files):
    work, _, clean = files
    model = tiny_model(work / "folded.onnx", fold_bn=True)  # renormalised conv neurons: the run sets centres
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.settings_page.set_values(iterations=6, batch_size=16)
    win.go_to("run")
    run_to_end(qtbot, win)
    s = win.session
    masks, result, centres = s.masks, s.mask_result, s.repairer.centres
    assert centres  # the first run renormalised the conv neurons
    with qtbot.waitSignal(win.prune_page.curveFinished, timeout=TIMEOUT):
        win.go_to("prune")
    win.prune_page.set_spec(anp_onnx.PruneSpec.count(3))
    curve, plan = s.curve, s.plan
    assert win.export_page.ready()

    # a second run with other settings (no renormalisation: the centres are cleared when it starts) ...
    win.settings_page.set_values(iterations=1_000_000, renormalise=False)
    win.go_to("run")
    win.run_page.start()
    assert s.masks is masks and s.plan is plan  # nothing is thrown away when a run starts
    qtbot.waitUntil(lambda: win.run_page.progress.value() >= 20, timeout=TIMEOUT)
    assert not s.repairer.centres  # the running stage cleared them
    with qtbot.waitSignal(win.run_page.runFinished, timeout=5000) as finished:
        qtbot.mouseClick(win.run_page.cancel_button, Qt.MouseButton.LeftButton)
    assert finished.args == ["cancelled"]
    # ... is cancelled: the earlier masks, centres, curve and choice are all still there and usable
    assert s.masks is masks and s.mask_result is result and s.curve is curve and s.plan is plan
    assert set(s.repairer.centres) == set(centres)
    for name, (mean, spread) in centres.items():
        np.testing.assert_array_equal(s.repairer.centres[name][0], mean)
        np.testing.assert_array_equal(s.repairer.centres[name][1], spread)
    assert win.prune_page.ready() and win.export_page.ready()
    assert "previous masks" in win.run_page.result.text() and "kept" in win.run_page.result.text()
    assert win.steps.item(5).flags() & Qt.ItemFlag.ItemIsEnabled
    assert not visible_errors(win)


def test_every_stage_of_a_run_is_named_with_its_progress(qtbot, win, files):
    work, _, clean = files
    open_model(qtbot, win, tiny_model(work / "folded.onnx", fold_bn=True))
    load_clean(qtbot, win, clean)
    win.settings_page.set_values(iterations=12, batch_size=16)
    win.go_to("run")
    shown: list[tuple[str, str, str]] = []  # (stage, what the label said, the bar's format) after each event
    page = win.run_page
    with qtbot.waitSignal(page.runFinished, timeout=TIMEOUT):
        page.start()
        assert "calibration" in page.eta.text().lower() and "collapse probe" in page.eta.text().lower()
        win.runner.current.progressed.connect(
            lambda e: shown.append((str(e.stage), page.eta.text(), page.progress.format())))
    stages = [s for s, _, _ in shown]
    assert stages[0] == "calibrate" and "probe" in stages and stages[-1] == "optimise"
    by_stage = {s: (text, fmt) for s, text, fmt in shown}
    assert "Calibration of renormalised neurons</b>: batch 1 of 1" in by_stage["calibrate"][0]
    assert "Collapse probe</b>: batch 4 of 4" in by_stage["probe"][0]
    assert "✓ Calibration of renormalised neurons" in by_stage["probe"][0]  # done stages stay named
    assert "ANP optimisation</b>: iteration 12 of 12" in by_stage["optimise"][0] and "left" in by_stage["optimise"][0]
    assert by_stage["probe"][1].startswith("Collapse probe")
    done = page.eta.text()
    assert "Finished 12 iterations" in done and "Collapse probe 0:0" in done and "ANP optimisation 0:0" in done


def test_the_pruning_curve_shows_it_is_running_and_can_be_cancelled(qtbot, win, files):
    work, model, _ = files
    clean = work / "more.npz"
    save_npz(random_images(1000, seed=3), clean)
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    # a suspected target: every point also measures the backdoor signal, so the curve takes a few seconds
    win.run_page.use_masks(linear_masks(win), "test masks", suspected_target=0)
    page = win.prune_page
    with qtbot.waitSignal(page.curveFinished, timeout=TIMEOUT) as stopped:
        win.go_to("prune")  # opening the page starts the curve ...
        assert win.runner.busy and page.curve_cancel.isVisible() and page.curve_cancel.isEnabled()
        assert "Measuring the pruning curve" in page.curve_info.text() and not page.mode.isEnabled()
        qtbot.mouseClick(page.curve_cancel, Qt.MouseButton.LeftButton)  # ... and its own button stops it
    assert stopped.args == ["cancelled"]
    assert win.session.curve is None and not page.curve_cancel.isVisible()
    assert page.mode.isEnabled() and page.curve_button.isEnabled() and "cancelled" in page.curve_info.text()
    with qtbot.waitSignal(page.curveFinished, timeout=TIMEOUT) as done:
        qtbot.mouseClick(page.curve_button, Qt.MouseButton.LeftButton)
    assert done.args == ["done"] and "measured in" in page.curve_progress.format()
    assert not visible_errors(win)
