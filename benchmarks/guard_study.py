"""What the unlearning's accuracy guard could measure instead of 100 held-out images (diagnosis).

For each model: the rounds of the default unlearning (the card's target, which a defender does not
have: this isolates the guard from the choice of the target), and at EVERY round every learning rate
the guard's retries would try (lr, lr/3, lr/9 from the round's current lr), each from the last kept
weights. Every candidate gets the test ACC / ASR (the truth, never available to a repair) and a set
of clean-data proxies measured on the repair's held-out images and the training images:

* ``acc_h``: held-out accuracy (the held-out guard's figure), ``acc_h_aug``: the same over 8 fixed augmented views
  (crop + flip) of each held-out image, ``acc_t``: accuracy on the training images;
* ``agree_h`` / ``agree_h_aug``: agreement with the original model's predictions on them;
* ``agree_mix``: agreement with the original on 1,000 fixed mixtures of two clean images (0.3-0.7);
* ``ce_h``: held-out cross-entropy, ``kl_h``: KL(original || candidate) on the held-out images.

The next round continues from the candidate the held-out guard keeps (held-out drop <= 3 points, first
lr that passes), so the default's own path is among the candidates. One JSON line per candidate:

    python benchmarks/guard_study.py ibau_trojan_vgg sash_badnet_cifar --out /tmp/guard.jsonl
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import anp_onnx  # noqa: E402
from anp_onnx.augment import augment_batch, default_crop_padding  # noqa: E402
from anp_onnx.convert import torch_logits  # noqa: E402
from anp_onnx.unlearn import (MAX_DROP_POINTS, UnlearnSettings, _restore, reconstruct_trigger,  # noqa: E402
                              trainable_initializers, unlearn)
from bench_models import bench_models  # noqa: E402
from unlearn_study import acc_asr  # noqa: E402

VIEWS = 8
MIXES = 1000


def logits(net, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return torch.from_numpy(torch_logits(net, x))


def probe_sets(train, hold, seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed inputs every candidate is measured on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(hold.x)
    pad = default_crop_padding(x.shape[2], x.shape[3])
    aug = torch.cat([augment_batch(x, g, padding=pad) for _ in range(VIEWS)]).numpy()
    rng = np.random.default_rng(seed)
    allx = np.concatenate([train.x, hold.x])
    i, j = rng.integers(0, len(allx), MIXES), rng.integers(0, len(allx), MIXES)
    lam = rng.uniform(0.3, 0.7, MIXES).astype(np.float32)[:, None, None, None]
    return {"h": hold.x, "h_aug": aug, "t": train.x, "mix": lam * allx[i] + (1 - lam) * allx[j]}


def proxies(net, sets, ref, hold, train) -> dict[str, float]:
    out = {k: logits(net, v) for k, v in sets.items()}
    pred = {k: v.argmax(1).numpy() for k, v in out.items()}
    y_aug = np.tile(hold.y, VIEWS)
    lp = F.log_softmax(out["h"], 1)
    return {
        "acc_h": 100 * float((pred["h"] == hold.y).mean()),
        "acc_h_aug": 100 * float((pred["h_aug"] == y_aug).mean()),
        "acc_t": 100 * float((pred["t"] == train.y).mean()),
        "agree_h": 100 * float((pred["h"] == ref["h"].argmax(1).numpy()).mean()),
        "agree_h_aug": 100 * float((pred["h_aug"] == ref["h_aug"].argmax(1).numpy()).mean()),
        "agree_mix": 100 * float((pred["mix"] == ref["mix"].argmax(1).numpy()).mean()),
        "ce_h": float(F.nll_loss(lp, torch.from_numpy(hold.y)).item()),
        "kl_h": float(F.kl_div(lp, F.log_softmax(ref["h"], 1), log_target=True, reduction="batchmean").item()),
    }


def study(m, tmp: Path, s: UnlearnSettings, emit) -> None:
    sets = m.write_sets(tmp / m.name)
    rep = anp_onnx.Repairer.open(m.path, preprocessing=m.preprocessing)
    train, hold = rep.load_data(sets.clean).split(0.2, seed=0)
    test = rep.load_data(sets.test)
    triggered = rep.load_data(sets.triggered) if sets.triggered else None
    target = m.target if m.target is not None else 0
    with rep.ctx.on_device("cpu", channels_last=s.channels_last) as net:
        net.eval()
        probe = probe_sets(train, hold)
        ref = {k: logits(net, v) for k, v in probe.items()}
        start = {**proxies(net, probe, ref, hold, train), "acc_asr": acc_asr(net, test, triggered, m.target)}
        emit({"model": m.name, "round": 0, "start": start})
        trainable = trainable_initializers(rep.ctx)
        kept = [t.tensor.detach().clone() for t in trainable]
        teacher, triggers, lr = copy.deepcopy(net).eval(), [], s.lr
        for r in range(s.rounds):
            triggers.append(reconstruct_trigger(net, train, target, steps=s.steps, l1=s.l1, seed=r))
            chosen = None
            for attempt in range(s.retries + 1):
                a_lr = lr / 3 ** attempt
                _restore(trainable, kept)
                t0 = time.time()
                unlearn(net, trainable, train, triggers, teacher=teacher, epochs=s.epochs, lr=a_lr,
                        stamped=s.stamped, seed=r)
                row = {"model": m.name, "round": r + 1, "attempt": attempt, "lr": a_lr,
                       "seconds": round(time.time() - t0, 1), **proxies(net, probe, ref, hold, train),
                       "acc_asr": acc_asr(net, test, triggered, m.target)}
                row["default_keeps"] = chosen is None and row["acc_h"] >= start["acc_h"] - MAX_DROP_POINTS
                emit(row)
                if row["default_keeps"]:
                    chosen = ([t.tensor.detach().clone() for t in trainable], a_lr)
            if chosen is None:
                break
            kept, lr = chosen
            _restore(trainable, kept)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models, missing = bench_models().select(args.models)
    for name, why in missing.items():
        print(f"skipped {name}: {why}", file=sys.stderr)

    def emit(row):
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            study(m, Path(tmp), UnlearnSettings(), emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
