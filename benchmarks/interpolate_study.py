"""Study: the weights on the line from the original model to its repair (diagnosis; not the method).

For each model, the weights ``w0 + a * (w1 - w0)`` for every ``a`` of ``--alphas``, where ``w0`` is the
original ONNX file's initializers and ``w1`` the repaired file's (kept by ``quality.py --keep DIR``);
with several ``--keep`` folders (repairs at other seeds), ``w1`` is their mean: a "soup" of repairs.
Per point, one JSON line on stdout: test ACC / ASR (the triggered TEST set: diagnosis only) and what
a defender can measure without poisoned data: accuracy on all clean images and on the held-out
split the repair used, agreement with the original's predictions, and a trigger reconstructed
afresh for each class the repair unlearnt (area and success of the smallest patch; the backdoor's
patch is small before the repair and grows as it goes).

    python benchmarks/quality.py --no-oracle --models sash_badnet_cifar --keep /tmp/keep --out /tmp/q.json
    python benchmarks/interpolate_study.py --keep /tmp/keep --rows /tmp/q.json --models sash_badnet_cifar

The question it answers (benchmarks/README.md, "Unlearning"): whether a point short of the repair
keeps its ASR and wins back accuracy, and whether a poison-free signal says where that point is.
Torch, one thread; the held-out split is seed 0's (rows of ``quality.py --seed 0``). At ``a = 1`` the
row's onnxruntime accuracy is printed beside the torch figure (``row_acc_after``) to compare (with a
soup, that is the ``--rows`` repair's, one of the soup's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import anp_onnx  # noqa: E402
from anp_onnx.convert import torch_logits  # noqa: E402
from anp_onnx.options import DEFAULT_HOLDOUT  # noqa: E402
from anp_onnx.trigger import reconstruct_trigger  # noqa: E402
from anp_onnx.unlearn import trainable_initializers  # noqa: E402
from bench_models import bench_models  # noqa: E402
from unlearn_study import predictions  # noqa: E402

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def read_rows(paths: list[Path]) -> dict[str, dict]:
    """quality.py rows by model name, from its --out JSON files or its stderr logs (one JSON row a line)."""
    rows: dict[str, dict] = {}
    for path in paths:
        text = path.read_text()
        try:
            found = json.loads(text)["rows"]
        except (json.JSONDecodeError, KeyError, TypeError):
            found = [json.loads(line[line.index("{"):]) for line in text.splitlines() if '"model"' in line]
        rows.update({r["model"]: r for r in found if "error" not in r})
    return rows


def fixed_success(net, trigger, images) -> float:
    """Share of ``images`` of other classes that ``trigger`` (reconstructed once) sends to its target."""
    with torch.inference_mode():
        pred = torch_logits(lambda x: net(trigger.stamp(x)), images.x[images.y != trigger.target]).argmax(1)
    return round(100 * float((pred == trigger.target).mean()), 2)


def mean_initializers(paths: list[Path]) -> dict[str, np.ndarray]:
    """Each initializer's mean over the ONNX files ``paths`` (the same graph repaired at several seeds)."""
    files = [{i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer} for p in paths]
    shared = [n for n in files[0] if all(n in f and f[n].shape == files[0][n].shape for f in files[1:])]
    return {n: np.mean([f[n] for f in files], axis=0).astype(files[0][n].dtype)
            if files[0][n].dtype.kind == "f" else files[0][n] for n in shared}


def study(model, row: dict, repaired: list[Path], alphas, steps: int, tmp: Path, fixed: bool = False) -> list[dict]:
    sets = model.write_sets(tmp / model.name)
    rep = anp_onnx.Repairer.open(model.path, preprocessing=model.preprocessing)
    clean = rep.load_data(sets.clean)
    train, held = clean.split(DEFAULT_HOLDOUT, seed=0)
    test, triggered = rep.load_data(sets.test), rep.load_data(sets.triggered)
    net = rep.ctx.net.eval()
    trainable = {t.name: t for t in trainable_initializers(rep.ctx)}
    after = mean_initializers(repaired)
    start = {name: t.tensor.detach().clone() for name, t in trainable.items()}
    changed = [n for n, t in trainable.items() if n in after and not np.array_equal(after[n], start[n].numpy())]
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(model.path)).graph.initializer}
    unmatched = [n for n, v in after.items() if n in original and n not in trainable
                 and (v.shape != original[n].shape or not np.array_equal(v, original[n]))]
    metrics = row.get("refinements", {}).get("unlearn", {}).get("metrics", {})
    targets = [int(metrics[k]) for k in ("target_1", "target_2") if k in metrics]
    base_pred = predictions(net, clean)
    ends = {n: torch.from_numpy(np.array(after[n])).to(start[n].dtype) for n in changed}
    # --fixed: the patches round 1 unlearns (same images, steps and seed), on the original weights
    once = [reconstruct_trigger(net, train, t, steps=steps, seed=0) for t in targets] if fixed else []
    out = []
    for a in alphas:
        t0 = time.time()
        with torch.no_grad():
            for n, w1 in ends.items():
                trainable[n].tensor.copy_(start[n] + a * (w1 - start[n]))
        pt, pc, ph = predictions(net, test), predictions(net, clean), predictions(net, held)
        point = {"model": model.name, "alpha": a, "acc": round(100 * float((pt == test.y).mean()), 2),
                 "asr": round(100 * float((predictions(net, triggered) == model.target).mean()), 2),
                 "clean_acc": round(100 * float((pc == clean.y).mean()), 2),
                 "held_acc": round(100 * float((ph == held.y).mean()), 2),
                 "agree": round(100 * float((pc == base_pred).mean()), 2), "patches": []}
        for trig in once:
            point["patches"].append({"target": trig.target, "fixed_train": fixed_success(net, trig, train),
                                     "fixed_held": fixed_success(net, trig, held)})
        for t in [] if fixed else targets:
            trig = reconstruct_trigger(net, train, t, steps=steps, seed=0)
            point["patches"].append({"target": t, "area": round(trig.area, 1), "success": round(trig.success, 3)})
        point["seconds"] = round(time.time() - t0, 1)
        if a == 1.0:
            point["row_acc_after"] = round(100 * row["acc_after"], 2)
        point.update({"changed": len(changed), "unmatched": unmatched})
        print(json.dumps(point), flush=True)
        out.append(point)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=Path, nargs="+", required=True,
                   help="the folder of quality.py --keep (repaired files); several: their mean is the repair")
    p.add_argument("--rows", type=Path, nargs="+", required=True, help="quality.py --out JSON or stderr logs")
    p.add_argument("--models", nargs="+", help="rows to study (default: every row with a repaired file)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS))
    p.add_argument("--steps", type=int, default=300, help="reconstruction steps per class and point (with --fixed: per class, once)")
    p.add_argument("--fixed", action="store_true",
                   help="reconstruct each class's patch once on the original weights (round 1's patch) and "
                        "report its success at every point on the training and held-out splits, instead of "
                        "reconstructing afresh at each point (forward passes only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = read_rows(args.rows)
    names = args.models or [n for n in rows if all((k / f"{n}.onnx").exists() for k in args.keep)]
    models, missing = bench_models().select(names)
    for name, why in missing.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            repaired = [k / f"{m.name}.onnx" for k in args.keep]
            if m.name not in rows or not all(r.exists() for r in repaired) or m.mode != "all-to-one":
                print(f"skipped {m.name}: no row, no repaired file or not all-to-one", file=sys.stderr)
                continue
            study(m, rows[m.name], repaired, args.alphas, args.steps, Path(tmp), fixed=args.fixed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
