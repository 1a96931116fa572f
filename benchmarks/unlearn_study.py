"""Study of the "unlearn" refinement's parts on the development bench (diagnosis; not the method).

Two modes, one JSON line per model on stdout:

* ``unlearn``: reconstruct a trigger for a GIVEN class (the card's true target by default, which a
  defender does not have: this isolates the unlearning from the choice of the target) and unlearn
  it for ``--rounds`` rounds, printing test ACC/ASR after each round (torch, the bench's sets);
* ``scan``: :func:`anp_onnx.unlearn.scan_targets` over every class: the smallest patch's class
  and its anomaly index, against the card's target.

    python benchmarks/unlearn_study.py unlearn ibau_badnets_vgg kabu_simplecnn_checker --rounds 3 --epochs 21
    python benchmarks/unlearn_study.py unlearn cifar10_small --target 1 --rounds 3 --epochs 21
    python benchmarks/unlearn_study.py scan abl_wrn16_1_grid cifar10_small --steps 100
    python benchmarks/unlearn_study.py scan aisb_cnn_checker --seed 1 --precision bf16
    python benchmarks/unlearn_study.py scan abl_wrn16_1_grid --steps 300 --channels-last --batch-size 16

The figures of benchmarks/README.md ("Unlearning") came from these commands, one thread
(``torch.set_num_threads(1)``), repair set = the bench's clean set minus a 20% stratified holdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import anp_onnx  # noqa: E402
from anp_onnx.precision import autocast  # noqa: E402
from anp_onnx.unlearn import reconstruct_trigger, scan_targets, trainable_initializers, unlearn  # noqa: E402
from bench_models import bench_models  # noqa: E402


def predictions(net, images) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([net(torch.from_numpy(images.x[s:s + 500])).argmax(1)
                          for s in range(0, len(images), 500)]).numpy()


def acc_asr(net, test, triggered, target) -> tuple[float, float]:
    acc = 100 * float((predictions(net, test) == test.y).mean())
    asr = 100 * float((predictions(net, triggered) == target).mean()) if triggered is not None else float("nan")
    return round(acc, 2), round(asr, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["unlearn", "scan"])
    p.add_argument("models", nargs="+")
    p.add_argument("--target", type=int, help="class to reconstruct (unlearn mode; default: the card's target)")
    p.add_argument("--steps", type=int, default=None, help="reconstruction steps (default 300; scan: 100 per class)")
    p.add_argument("--epochs", type=int, default=21, help="unlearning epochs in all, split over the rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--l1", type=float, default=1e-2)
    p.add_argument("--stamped", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="scan: the reconstructions' seed")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="scan: float32 or bfloat16 autocast (anp_onnx.precision)")
    p.add_argument("--batch-size", type=int, default=32, help="scan: images per reconstruction step")
    p.add_argument("--channels-last", action="store_true",
                   help="scan: on channels-last tensors, as the default repair computes it")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models, missing = bench_models().select(args.models)
    for name, why in missing.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            t0 = time.time()
            sets = m.write_sets(Path(tmp) / m.name)
            rep = anp_onnx.Repairer.open(m.path, preprocessing=m.preprocessing)
            train, _ = rep.load_data(sets.clean).split(0.2, seed=0)
            net = rep.ctx.net.eval()
            row: dict = {"model": m.name, "true_target": m.target}
            if args.mode == "scan":
                with rep.ctx.on_device("cpu", channels_last=args.channels_last) as net, \
                        autocast(args.precision, "cpu"):
                    scan = scan_targets(net.eval(), train, list(range(rep.model.num_classes)),
                                        steps=args.steps or 100, batch_size=args.batch_size, seed=args.seed)
                row.update({**scan.to_dict(), "seed": args.seed, "precision": args.precision,
                            "batch_size": args.batch_size, "channels_last": args.channels_last})
            else:
                test = rep.load_data(sets.test)
                triggered = rep.load_data(sets.triggered) if sets.triggered else None
                target = args.target if args.target is not None else m.target
                row.update({"target": target, "before": acc_asr(net, test, triggered, m.target), "rounds": []})
                trainable = trainable_initializers(rep.ctx)
                teacher, triggers = copy.deepcopy(net), []
                for r in range(args.rounds):
                    triggers.append(reconstruct_trigger(net, train, target, steps=args.steps or 300, l1=args.l1,
                                                        seed=r))
                    unlearn(net, trainable, train, triggers, teacher=teacher, epochs=args.epochs // args.rounds,
                            lr=args.lr, stamped=args.stamped, seed=r)
                    row["rounds"].append({"trigger_success": round(triggers[-1].success, 3),
                                          "trigger_area": round(triggers[-1].area, 1),
                                          "acc_asr": acc_asr(net, test, triggered, m.target)})
                row["weights"] = len(trainable)
            row["seconds"] = round(time.time() - t0)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
