"""benchmarks/scan_decisions.py: a bench run whose repairs stop right after the unlearning's scan."""

from __future__ import annotations

import anp_onnx.unlearn as unlearn_module
from anp_onnx.unlearn import TriggerUnlearning
from benchmarks import scan_decisions


def test_each_repair_stops_after_its_scan_and_reports_its_decisions(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TriggerUnlearning, "settings", TriggerUnlearning.settings)  # quality.py sets --unlearn's
    scan, run = unlearn_module.scan_targets, TriggerUnlearning.run
    code = scan_decisions.main(["--no-oracle", "--models", "badnets_preact", "--unlearn", "scan_steps=2",
                                "--shared", str(tmp_path / "none"), "--out", str(tmp_path / "q.json")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith("badnets_preact: probe ") and lines[0].endswith("(2 steps)")
    assert "scan smallest " in lines[0] and "anomaly " in lines[0]
    assert unlearn_module.scan_targets is scan and TriggerUnlearning.run is run  # put back
