"""The Export step: a valid file and a good repair are two verdicts; folders; the files written (issue #14)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

import anp_onnx
from gui_support import (  # noqa: F401 - fixtures by name
    TIMEOUT, backdoored, files, load_clean, load_set, open_model, settings, visible_errors, win,
)
from gui.verdict import judge


def export_backdoored(qtbot, win, backdoored, out, count: int):
    """Open the backdoored model with its clean, test and triggered sets; prune ``count`` neurons of
    seeded random masks (the curve is measured); export to ``out``."""
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
    win.export_page.output.setText(str(out))
    with qtbot.waitSignal(win.export_page.exportFinished, timeout=TIMEOUT) as exported:
        win.export_page.export()
    assert exported.args == ["done"]
    return win.export_page


def test_a_valid_file_and_a_bad_repair_are_two_verdicts(qtbot, win, backdoored, tmp_path):
    page = export_backdoored(qtbot, win, backdoored, tmp_path / "bad.onnx", count=30)
    assert "valid" in page.file_verdict.text() and "PASSED" in page.file_verdict.text()
    repair = page.repair_verdict.text()
    assert page.verdict.good is False and "check before use" in repair
    assert "points lost, more than the budget of 2 points" in repair  # 30 random neurons cost accuracy
    assert "#b35900" in repair and "PASSED" not in repair  # the warning colour, not the file's green
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
