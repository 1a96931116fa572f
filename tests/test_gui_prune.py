"""The Prune step tells the truth about its numbers: outside the measured curve, the accuracy the
automatic choice really costs, and what the slider does in Automatic mode (issue #14)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PySide6.QtCore import Qt

import anp_onnx
from gui_support import (  # noqa: F401 - fixtures by name
    TIMEOUT, backdoored, files, linear_masks, load_clean, open_model, prune_page_with_curve, settings,
    visible_errors, win,
)


def test_a_choice_beyond_the_measured_curve_says_it_is_not_measured(qtbot, win, files):
    work, model, clean = files
    curve = prune_page_with_curve(qtbot, win, model, clean)
    page = win.prune_page
    last = curve.points[-1].count
    assert last < curve.total
    page.set_spec(anp_onnx.PruneSpec.count(last + 5))
    assert win.session.plan.count == last + 5
    summary = page.summary.text()
    assert "not measured" in summary and f"stops at {last} neurons" in summary
    assert "near" not in summary  # no figure of another point presented as this one's
    # the marker stays on the plot, in a region marked as not measured
    left, right = page.plot.ax.get_xlim()
    assert page.plot.current_line.get_visible() and left <= last + 5 <= right
    assert page.plot.unmeasured is not None and page.plot.unmeasured_note.get_visible()
    # inside the measured range, a point between grid points names the point it shows
    page.set_spec(anp_onnx.PruneSpec.count(last))
    assert f"at {last}:" in page.summary.text() and "not measured" not in page.summary.text()
    assert page.plot.unmeasured is None and not page.plot.unmeasured_note.get_visible()


def test_the_automatic_choice_shows_its_measured_accuracy_drop(qtbot, win, backdoored):
    rng = np.random.default_rng(0)
    open_model(qtbot, win, backdoored["model"])
    masks = {layer.name: rng.random(layer.size).astype(np.float32) for layer in win.session.info.neurons.layers}
    curve = prune_page_with_curve(qtbot, win, backdoored["model"], backdoored["clean"], masks)
    page = win.prune_page
    win.export_page.unlearn.setChecked(False)  # with the unlearning the automatic choice prunes nothing
    page.budget.setValue(10.0)
    with qtbot.waitSignal(page.curveFinished, timeout=TIMEOUT):
        page.budget.editingFinished.emit()  # a new budget: the curve is measured again
    curve = win.session.curve
    assert page.mode.currentData() == "auto" and curve.max_drop == pytest.approx(0.10)
    drop = curve.baseline - curve.chosen.accuracy
    assert drop > 0.005 and f"{100 * drop:.1f} points" in page.drop_label.text()
    assert "budget" in page.budget.prefix() and "may drop" not in page.budget.prefix()
    assert "more than the budget" not in page.drop_label.text()

    # a choice that spends more than the budget (as the backdoor-signal rule may) says so, in a warning colour
    beyond = [p for p in curve.points if curve.baseline - p.accuracy > curve.max_drop + 0.01]
    costly = min(beyond, key=lambda p: p.count)
    win.session.curve = replace(curve, chosen=costly, signal_gone=True, suspected_target=0)
    page.use_automatic()
    assert win.session.plan.count == costly.count
    text = page.drop_label.text()
    assert f"{100 * (curve.baseline - costly.accuracy):.1f} points" in text and "more than the budget" in text
    assert "color:" in text
    assert f"{100 * (curve.baseline - costly.accuracy):.1f} points" in page.summary.text()
    assert not visible_errors(win)


def test_the_slider_in_automatic_mode_switches_to_a_number_of_neurons(qtbot, win, files):
    work, model, clean = files
    curve = prune_page_with_curve(qtbot, win, model, clean)
    page = win.prune_page
    assert page.mode.currentData() == "auto"
    assert page.slider.isEnabled() and "Number of neurons" in page.slider.toolTip()
    shown = page.slider.value()  # what the automatic choice prunes (0 here, with the unlearning and no signal)
    assert shown == win.session.plan.count
    page.slider.setFocus()
    qtbot.keyClick(page.slider, Qt.Key.Key_Right)  # the user moves it
    assert page.mode.currentData() == "count"
    assert win.session.plan.count == shown + 1 == page.count.value()
