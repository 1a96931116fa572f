"""The unlearning's scan decisions on the development bench, without the rest of the repair (diagnosis).

Runs ``benchmarks/quality.py`` with the same arguments, but each repair stops right after the
unlearning's trigger scan (:func:`anp_onnx.unlearn.scan_targets`), so the scan sees exactly what a
default repair's scan sees (the same repair images, held-out split, preprocessing, seed, memory
format and threads). One line per model: the probe's target, the scan's smallest class and its
anomaly index. Those are the only parts of the scan a repair uses (whether to unlearn: a probe
target or anomaly >= ``ANOMALY_MIN``; which classes: the probe's and the smallest), so two scan
settings with the same lines on every model give bit-identical repaired models.

    python benchmarks/scan_decisions.py --no-oracle --unlearn scan_steps=200 --out /tmp/scan200.json
    python benchmarks/scan_decisions.py --no-oracle --models clean --seed 1 --unlearn scan_steps=200

Models that stop before the scan (an error, or no unlearning run) print no line; quality.py's
rows (on stderr, and in ``--out``) say why.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anp_onnx.unlearn as unlearn_module  # noqa: E402
from benchmarks import quality  # noqa: E402


class _ScanDone(Exception):
    """Ends a repair right after its scan; ``args[0]``: the scan's decisions (a dict)."""


@contextlib.contextmanager
def stopped_after_scan(decisions: list[tuple[str, dict]]) -> Iterator[None]:
    """Every bench repair ends right after its unlearning's scan; ``(model name, decisions)`` is
    appended to ``decisions`` and the row is an error row ("stopped after the scan")."""
    scan_targets, run, run_model = (unlearn_module.scan_targets, unlearn_module.TriggerUnlearning.run,
                                    quality.run_model)

    def scan(*args, **kwargs):
        raise _ScanDone(scan_targets(*args, **kwargs).to_dict())

    def stopped_run(self, ctx, plan, clean, *, target=None, **kwargs):
        try:
            return run(self, ctx, plan, clean, target=target, **kwargs)
        except _ScanDone as done:  # the probe's target is known here, not in the scan
            raise _ScanDone({"target": target, "scan_steps": self.settings.scan_steps, **done.args[0]}) from None

    def stopped_model(model, *args, **kwargs):
        try:
            return run_model(model, *args, **kwargs)
        except _ScanDone as done:
            decisions.append((model.name, done.args[0]))
            return {"model": model.name, "source": model.source, "error": "stopped after the scan"}

    unlearn_module.scan_targets, unlearn_module.TriggerUnlearning.run, quality.run_model = (
        scan, stopped_run, stopped_model)
    try:
        yield
    finally:
        unlearn_module.scan_targets, unlearn_module.TriggerUnlearning.run, quality.run_model = (
            scan_targets, run, run_model)


def main(argv=None) -> int:
    decisions: list[tuple[str, dict]] = []
    with stopped_after_scan(decisions), contextlib.redirect_stdout(io.StringIO()):  # not quality.py's table
        code = quality.main(argv)
    for name, s in decisions:
        print(f"{name}: probe {s['target']}, scan smallest {s['smallest']}, anomaly {s['anomaly']:.2f} "
              f"({s['scan_steps']} steps)")
    return code


if __name__ == "__main__":
    sys.exit(main())
