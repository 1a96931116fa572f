"""The Export step: a valid file and a good repair are two verdicts; folders; the files written (issue #14)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PySide6.QtCore import Qt, QUrl

import anp_onnx
from gui_support import (  # noqa: F401 - fixtures by name
    TIMEOUT, answer_next_dialog, backdoored, files, linear_masks, load_clean, load_set, open_model,
    prune_page_with_curve, settings, visible_errors, win, zero_scales,
)
from gui.theme import WARN
from gui.verdict import judge


def export_backdoored(qtbot, win, backdoored, out, count: int, unlearn: bool = False):
    """Open the backdoored model with its clean, test and triggered sets; prune ``count`` neurons of
    seeded random masks (the curve is measured); export to ``out`` (with the unlearning if ``unlearn``)."""
    open_model(qtbot, win, backdoored["model"])
    load_clean(qtbot, win, backdoored["clean"])
    load_set(qtbot, win, "test", backdoored["test"])
    load_set(qtbot, win, "poisoned", backdoored["poisoned"])
    win.data_page.target.setValue(0)
    rng = np.random.default_rng(0)
    win.run_page.use_masks({layer.name: rng.random(layer.size).astype(np.float32)
                            for layer in win.session.info.neurons.layers}, "random masks")
    with qtbot.waitSignal(win.prune_page.curveFinished, timeout=TIMEOUT):
        win.go_to("prune")
    win.prune_page.set_spec(anp_onnx.PruneSpec.count(count))
    win.go_to("export")
    assert win.export_page.unlearn.isChecked()  # the default
    win.export_page.unlearn.setChecked(unlearn)
    win.export_page.output.setText(str(out))
    with qtbot.waitSignal(win.export_page.exportFinished, timeout=4 * TIMEOUT if unlearn else TIMEOUT) as exported:
        win.export_page.export()
    assert exported.args == ["done"]
    return win.export_page


def test_a_valid_file_and_a_bad_repair_are_two_verdicts(qtbot, win, backdoored, tmp_path):
    page = export_backdoored(qtbot, win, backdoored, tmp_path / "bad.onnx", count=30)
    assert "valid" in page.file_verdict.text() and "PASSED" in page.file_verdict.text()
    repair = page.repair_verdict.text()
    assert page.verdict.good is False and "check before use" in repair
    assert "points lost, more than the budget of 2 points" in repair  # 30 random neurons cost accuracy
    assert WARN in repair and "PASSED" not in repair  # the warning colour (as is in a light theme), not the green
    assert not visible_errors(win)


def test_the_repair_verdict_reads_what_was_measured(qtbot, win, backdoored, tmp_path):
    """The same export read with other figures: ASR gone and accuracy kept, or nothing about the backdoor."""
    export_backdoored(qtbot, win, backdoored, tmp_path / "none.onnx", count=0)
    result = win.export_page.last_result
    assert judge(result).good is False  # nothing pruned: the attack still works
    removed = replace(result, after=replace(result.after, asr=0.0))
    verdict = judge(removed)
    assert verdict.good is True and verdict.headline == "looks good" and not verdict.warnings
    assert any("no longer works" in f for f in verdict.findings)
    unmeasured = replace(result, before=None, after=None, curve=None)
    verdict = judge(unmeasured)
    assert verdict.good is None and "not measured" in verdict.warnings[0]


def test_export_unlearns_the_suspected_trigger_when_asked(qtbot, win, backdoored, tmp_path):
    """With the unlearning (the default) the export changes weights, the attack fails, the page says so."""
    page = export_backdoored(qtbot, win, backdoored, tmp_path / "unlearnt.onnx", count=0, unlearn=True)
    result = page.last_result
    assert "unlearn" in result.stages and result.refinements["unlearn"]["initializers"] > 0
    assert result.before.asr > 0.9 and result.after.asr < 0.5 * result.before.asr
    assert "Unlearning (unlearn):" in page.result.text() and "PASSED" in page.file_verdict.text()


def test_with_unlearning_the_automatic_choice_prunes_nothing(qtbot, win, files):
    """As on the command line (anp_onnx.effective_pruning): nothing pruned, said on both pages, then unlearning."""
    work, model, clean = files
    curve = prune_page_with_curve(qtbot, win, model, clean)
    prune, export = win.prune_page, win.export_page
    assert prune.mode.currentData() == "auto" and curve.signal_gone is None and curve.chosen.count > 0
    assert export.unlearn.isChecked()  # the default
    assert win.session.plan.count == 0 and prune.slider.value() == 0
    assert sum(prune.layer_view.pruned_counts().values()) == 0
    summary = prune.summary.text()
    assert "With unlearning on (Export step), the automatic choice prunes nothing" in summary
    assert f"the automatic choice prunes {curve.chosen.count} of 24 neurons" in summary

    # without the unlearning the automatic choice prunes its neurons, at once on both pages
    win.go_to("export")
    export.unlearn.setChecked(False)
    assert win.session.plan.count == curve.chosen.count == sum(prune.layer_view.pruned_counts().values())
    assert "With unlearning on" not in prune.summary.text() and "With unlearning on" not in export.plan_label.text()
    assert f"Will prune <b>{curve.chosen.count} of 24 neurons</b>" in export.plan_label.text()
    # a suspected target whose signal went: the same rule (unlearning alone kept more accuracy on the bench)
    win.session.curve = replace(curve, suspected_target=0, signal_gone=True)
    export.unlearn.setChecked(True)
    assert win.session.plan.count == 0 and sum(prune.layer_view.pruned_counts().values()) == 0
    label = export.plan_label.text()
    assert "the automatic choice prunes nothing" in label
    assert "Will prune <b>0 of 24 neurons</b>" in label

    out = work / "unlearnt.onnx"
    export.output.setText(str(out))
    with qtbot.waitSignal(export.exportFinished, timeout=4 * TIMEOUT) as exported:
        export.export()
    assert exported.args == ["done"]
    result = export.last_result
    # on this toy the unlearning skips itself (nothing suspected by its scan): it changed no weight, and
    # the backdoor signal went on the curve, so the automatic choice prunes after all (pruning_after_refinements)
    assert result.refinements["unlearn"]["initializers"] == 0 and "unlearn" in result.stages
    assert result.plan.count == curve.chosen.count == zero_scales(out)
    assert f"pruned its {curve.chosen.count} neurons" in export.result.text()
    assert not visible_errors(win)


def masks_and_plan(qtbot, win, model, clean, spec):
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.run_page.use_masks(linear_masks(win), "test masks")
    win.prune_page.set_spec(spec)
    win.go_to("export")
    win.export_page.unlearn.setChecked(False)  # these tests are about the files, not the weights


def export_to(qtbot, win, out):
    win.export_page.output.setText(str(out))
    with qtbot.waitSignal(win.export_page.exportFinished, timeout=TIMEOUT) as exported:
        win.export_page.export()
    assert exported.args == ["done"]


def test_a_missing_folder_is_created_when_accepted_and_then_opened(qtbot, win, files):
    work, model, clean = files
    masks_and_plan(qtbot, win, model, clean, anp_onnx.PruneSpec.count(3))
    page = win.export_page
    out = work / "new" / "sub" / "r.onnx"
    page.output.setText(str(out))
    seen = answer_next_dialog(qtbot, "confirmNo")
    page.export()
    assert seen and "does not exist" in seen[0] and not (work / "new").exists() and not win.runner.busy
    assert not page.open_folder_button.isVisible()

    seen = answer_next_dialog(qtbot, "confirmYes")
    with qtbot.waitSignal(page.exportFinished, timeout=TIMEOUT) as exported:
        page.export()
    assert exported.args == ["done"] and seen and out.is_file()
    assert page.open_folder_button.isVisible()
    opened = []
    page.open_url = lambda url: opened.append(url) or True  # record instead of starting a file manager
    qtbot.mouseClick(page.open_folder_button, Qt.MouseButton.LeftButton)
    assert opened == [QUrl.fromLocalFile(str(out.parent.resolve()))]
    assert not visible_errors(win)


def test_a_re_export_without_a_curve_leaves_no_stale_curve_plot(qtbot, win, files, tmp_path):
    work, model, clean = files
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.run_page.use_masks(linear_masks(win), "test masks")
    saved = win.run_page.save_masks(str(tmp_path / "m.masks.json"))
    with qtbot.waitSignal(win.prune_page.curveFinished, timeout=TIMEOUT):
        win.go_to("prune")  # the first export has a pruning curve
    win.go_to("export")
    out = work / "r.onnx"
    export_to(qtbot, win, out)
    plot = work / "r.curve.png"
    assert plot.is_file() and "r.curve.png" in (work / "r.report.md").read_text()

    win.run_page.load_masks(str(saved[0]))  # masks from a file: no curve until the Prune step measures one
    win.prune_page.set_spec(anp_onnx.PruneSpec.count(2))
    assert win.session.curve is None
    win.go_to("export")
    seen = answer_next_dialog(qtbot, "confirmYes")
    export_to(qtbot, win, out)
    assert seen and "will be removed" in seen[0] and str(plot) in seen[0].split("removed")[1]
    assert not plot.exists() and "curve.png" not in (work / "r.report.md").read_text()
    assert str(plot) not in win.export_page.result.text()
    assert not visible_errors(win)
