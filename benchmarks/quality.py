"""Repair quality on every sample model: ACC/ASR before and after, neurons pruned, time.

    python benchmarks/quality.py                      # all sample models, default settings
    python benchmarks/quality.py --models ibau_badnets_vgg --iterations 2000
    python benchmarks/quality.py --reference --pruning threshold=0.2   # the reference ANP throughout

Each model's card (sample_models/<model>.json) names its trigger and target class; the triggered
test set is made on the fly from the bundled clean test set with sample_models/triggers.py. The
repair itself uses only the bundled clean set (sample_models/data/clean_500.npz); the triggered
set is used for measuring ASR, never for a decision. Prints a Markdown table and writes the
figures as JSON (default benchmarks/results/quality.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anp_onnx  # noqa: E402
from anp_onnx.prune import PruneSpec  # noqa: E402

SAMPLES = ROOT / "sample_models"
DATA = SAMPLES / "data"


def make_triggered(name: str, source: Path, out: Path) -> None:
    """The triggered test set: the bundled clean test images with the model's trigger, true labels."""
    sys.path.insert(0, str(SAMPLES))
    import numpy as np
    from triggers import get_trigger

    with np.load(source) as data:
        np.savez_compressed(out, x=get_trigger(name)(data["x"]), y=data["y"])


def cards(names: list[str] | None) -> list[dict]:
    out = []
    for path in sorted(SAMPLES.glob("*.json")):
        card = json.loads(path.read_text())
        if "file" in card and (not names or path.stem in names):
            out.append({**card, "name": path.stem})
    return out


def parse_spec(text: str) -> PruneSpec:
    mode, _, value = text.partition("=")
    return PruneSpec(mode, float(value)) if value else PruneSpec(mode)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="sample model names (default: all)")
    p.add_argument("--iterations", type=int, help="ANP iterations (default: anp-onnx's default for the device)")
    p.add_argument("--eps", type=float, help="ANP eps (default: anp-onnx's default)")
    p.add_argument("--batch-size", type=int, help="ANP batch size (default: anp-onnx's default, 128)")
    p.add_argument("--alpha", type=float, help="ANP clean-loss weight (default: anp-onnx's default, 0.2)")
    p.add_argument("--reference", action="store_true", help="the reference ANP loop (untargeted noise)")
    p.add_argument("--pruning", type=parse_spec, default=PruneSpec(), help="auto[=budget], threshold=T, count=K")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    args = p.parse_args(argv)

    config = (anp_onnx.ANPConfig.reference if args.reference else anp_onnx.ANPConfig)(device=args.device,
                                                                                      seed=args.seed)
    if args.iterations:
        config = replace(config, iterations=args.iterations)
    if args.eps is not None:
        config = replace(config, eps=args.eps)
    if args.batch_size:
        config = replace(config, batch_size=args.batch_size)
    if args.alpha is not None:
        config = replace(config, alpha=args.alpha)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for card in cards(args.models):
            metrics = card["metrics"]["bundled_1k"]
            trigger = Path(metrics["triggered_set"]).stem.removeprefix("test_")
            poisoned = Path(tmp) / f"test_{trigger}.npz"
            make_triggered(trigger, DATA / "test_clean.npz", poisoned)
            t0 = time.perf_counter()
            result = anp_onnx.repair(
                SAMPLES / card["file"], DATA / "clean_500.npz", out=Path(tmp) / f"{card['name']}.onnx",
                config=config, pruning=args.pruning, test_data=SAMPLES / metrics["clean_set"],
                poisoned_data=poisoned, target=card["attack"]["target_class"],
                masks_out=Path(tmp) / f"{card['name']}.masks.json", report=False,
            )
            row = {
                "model": card["name"], "attack": card["attack"]["name"], "neurons": result.plan.total,
                "acc_before": result.before.accuracy, "acc_after": result.after.accuracy,
                "asr_before": result.before.asr, "asr_after": result.after.asr,
                "pruned": result.plan.count, "pruning": result.plan.spec.describe(),
                "iterations": result.optimisation.iterations, "seconds": round(time.perf_counter() - t0, 1),
                "device": result.optimisation.device,
                "noise_target": result.optimisation.target,
                "probe": result.optimisation.probe.to_dict() if result.optimisation.probe else None,
                "signal_gone": result.curve.signal_gone if result.curve is not None else None,
                "rule": result.curve.rule if result.curve is not None else None,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| model | attack | ACC before → after | ASR before → after | neurons pruned | time "
          "| noise target (probe) | backdoor signal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        signal = {True: "gone", False: "stayed", None: "-"}[r["signal_gone"]]
        print(f"| {r['model']} | {r['attack']} | {100 * r['acc_before']:.1f}% → {100 * r['acc_after']:.1f}% | "
              f"{100 * r['asr_before']:.1f}% → {100 * r['asr_after']:.1f}% | {r['pruned']} / {r['neurons']} | "
              f"{r['seconds']:.0f} s ({r['iterations']} it, {r['device']}) | "
              f"{'-' if r['noise_target'] is None else r['noise_target']} | {signal} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/quality.py"] + (argv if argv is not None else sys.argv[1:])),
        "settings": config.to_dict(), "pruning": args.pruning.to_dict(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "rows": rows,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
