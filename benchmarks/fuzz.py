"""A long run of the property-based fuzz tests (tests/test_fuzz.py), counted and saved.

    python benchmarks/fuzz.py                    # 2,500 inputs per target: 10,000 in all
    python benchmarks/fuzz.py --examples 10000   # 40,000 in all

Runs pytest on tests/test_fuzz.py with ``ANP_ONNX_FUZZ_EXAMPLES`` (inputs per target, random
seeds) and ``ANP_ONNX_FUZZ_REPORT``, then prints and saves (``--out``, default
benchmarks/results/fuzz.json) how many inputs each target (model files, .npz data, image folders,
masks files) tried, how many loaded and how many were refused with anp-onnx's one-line error, and
whether pytest passed (any other exception fails the run, with the shrunk input in pytest's output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2500, help="inputs per target (default 2500)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "ANP_ONNX_FUZZ_EXAMPLES": str(args.examples), "ANP_ONNX_FUZZ_REPORT": str(report),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
                             cwd=ROOT, env=env)
        seconds = time.perf_counter() - start
        counts = json.loads(report.read_text()) if report.exists() else {"targets": {}}
    targets = counts["targets"]
    result = {"command": f"python benchmarks/fuzz.py --examples {args.examples}", "pytest_exit_code": rc,
              "passed": rc == 0, "seconds": round(seconds, 1), "examples_per_target": args.examples,
              "tried": sum(t.get("tried", 0) for t in targets.values()), "targets": targets,
              "python": platform.python_version(), "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'target':<8} {'tried':>7} {'loaded':>7} {'refused':>8}")
    for name, t in targets.items():
        print(f"{name:<8} {t.get('tried', 0):>7} {t.get('loaded', 0):>7} {t.get('refused', 0):>8}")
    print(f"{result['tried']} inputs in {seconds:.0f} s: {'PASSED' if rc == 0 else 'FAILED'} (saved to {args.out})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
