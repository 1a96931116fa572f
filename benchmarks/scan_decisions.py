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

Models that stop before the scan (an error, or no unlearning run) show the quality row's error.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anp_onnx.unlearn as unlearn_module  # noqa: E402
from benchmarks import quality  # noqa: E402

MARK = "SCAN "


class _ScanDone(Exception):
    """Raised by the wrapped scan with its result, to end the repair there."""


@contextlib.contextmanager
def stopped_after_scan() -> Iterator[None]:
    """Every unlearning ends right after its scan, raising ``RuntimeError(MARK + facts as JSON)``."""
    scan_targets, run = unlearn_module.scan_targets, unlearn_module.TriggerUnlearning.run

    def scan(*args, **kwargs):
        raise _ScanDone(scan_targets(*args, **kwargs))

    def stopped_run(self, ctx, plan, clean, *, target=None, **kwargs):
        try:
            return run(self, ctx, plan, clean, target=target, **kwargs)
        except _ScanDone as done:
            facts = {"target": target, "scan_steps": self.settings.scan_steps, **done.args[0].to_dict()}
            raise RuntimeError(MARK + json.dumps(facts)) from None

    unlearn_module.scan_targets, unlearn_module.TriggerUnlearning.run = scan, stopped_run
    try:
        yield
    finally:
        unlearn_module.scan_targets, unlearn_module.TriggerUnlearning.run = scan_targets, run


def main(argv=None) -> int:
    err = io.StringIO()
    # quality.py prints one JSON row per model (and the tracebacks) on stderr, its table on stdout
    with stopped_after_scan(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = quality.main(argv)
    for line in err.getvalue().splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        error = row.get("error", "")
        if MARK not in error:
            print(f"{row['model']}: no scan ({error or 'the repair ended without one'})")
            continue
        s = json.loads(error.split(MARK, 1)[1])
        print(f"{row['model']}: probe {s['target']}, scan smallest {s['smallest']}, anomaly {s['anomaly']:.2f} "
              f"({s['scan_steps']} steps)")
    return code


if __name__ == "__main__":
    sys.exit(main())
