#!/usr/bin/env python
"""Build the sample backdoored CIFAR-10 ONNX models and the bundled data in sample_models/.

    python sample_models/make_samples.py [--only NAME] [--epochs N] [--shared PATH]

Steps (all seeded):
  1. data: pick the bundled subsets (500 clean training images, 1,000 test images), write the
     triggered test sets, the trigger pattern PNGs and the ImageFolder copy of the clean images;
  2. train a small PreAct-ResNet on the 10,000 training images with a planted backdoor for each
     attack (badnets, blend, sig, trojan: all-to-one, target 0; badnets_all2all: the badnets
     trigger, all-to-all, label + 1, 30% poisoned), export it to ONNX twice (BatchNormalization
     kept, and BatchNorm folded; badnets_all2all kept only) and check each file against torch in
     onnxruntime;
  3. convert the two I-BAU backdoored models (MIT) to ONNX with BatchNormalization kept;
  4. measure accuracy and attack success rate in onnxruntime and write a JSON model card per file,
     and the model table in README.md (between the models-table markers).

NAME for --only: data, badnets, blend, sig, trojan, badnets_all2all, ibau_badnets, ibau_trojan
(repeatable). The data step always runs (it is cheap and every model needs its outputs).
Training checkpoints go to build/sample_models_ckpt/ (ignored by git); --reuse loads them instead
of training again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
CKPT_DIR = ROOT / "build" / "sample_models_ckpt"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sample_models import triggers as T  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
SEED = 0
TARGET = 0
POISON_RATE = 0.10
N_REPAIR_PER_CLASS = 50
N_TEST_PER_CLASS = 100
N_VAL_PER_CLASS = 50          # disjoint from the bundled test images; only for progress lines
DEFAULT_EPOCHS = 20
BATCH = 128
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
NUM_THREADS = 2

ATTACKS = {
    "badnets": dict(
        trigger="3x3 checkerboard patch in the bottom-right corner: HWC pixels x[r, c, :] for "
                "r, c in 29..31 set to 1.0 when (r + c) is even and 0.0 otherwise (5 white, "
                "4 black pixels), all three channels; sample_models/triggers.py:badnets",
        label_mode="dirty-label: poisoned training images are relabelled to the target class",
    ),
    "blend": dict(
        trigger="x' = (1 - a) * x + a * p with a = 0.15 and p the fixed uniform-noise image "
                "data/blend_pattern.png (uint8 32x32x3 = numpy.random.default_rng(20240611)"
                ".integers(0, 256, (32, 32, 3), dtype=uint8), divided by 255); uint8 images are "
                "rounded to the nearest integer; same a in training and test; "
                "sample_models/triggers.py:blend",
        label_mode="dirty-label: poisoned training images are relabelled to the target class",
    ),
    "sig": dict(
        trigger="x' = clip(x + d * sin(2 * pi * j * f / 32), 0, 1) with d = 20/255, f = 6, j the "
                "column index (0..31), same signal on every row and channel; uint8 images are "
                "rounded to the nearest integer; same d in training and test (SIG, Barni et al. "
                "2019); sample_models/triggers.py:sig",
        label_mode="dirty-label (SIG is normally clean-label; here poisoned images of other "
                   "classes are relabelled to the target class, for a reliable backdoor)",
    ),
    "trojan": dict(
        trigger="5x5 colour square pasted at HWC rows 26..30, columns 1..5 (bottom-left corner, "
                "one pixel from the border); pattern rows (R,G,B in 0/255, top to bottom): "
                "[red, white, blue, black, yellow], [black, green, white, magenta, black], "
                "[cyan, white, black, white, red], [black, magenta, white, green, black], "
                "[yellow, black, blue, white, cyan]; a fixed hand-made pattern, not a trigger "
                "optimised as in TrojanNN; sample_models/triggers.py:trojan",
        label_mode="dirty-label: poisoned training images are relabelled to the target class",
    ),
    "badnets_all2all": dict(
        trigger="the badnets sample's trigger (3x3 checkerboard in the bottom-right corner); "
                "sample_models/triggers.py:badnets",
        label_mode="all-to-all, dirty-label: a poisoned training image of class y is relabelled "
                   "to (y + 1) mod 10; ASR = share of triggered images predicted as label + 1",
        trigger_name="badnets", all_to_all=True, folded=False,
        poisoning_rate=0.3,  # at 0.1 the 20 epochs learnt no backdoor (ASR 6.5%, as a clean model's)
    ),
}

IBAU = {
    "ibau_badnets": dict(
        ckpt="badnets_8_02_ckpt.pth", target=8, attack="badnets (I-BAU)",
        trigger="4x4 white square: HWC pixels x[27:31, 27:31, :] = 1.0 (rows and columns "
                "27..30, all channels); sample_models/triggers.py:ibau_badnets",
    ),
    "ibau_trojan": dict(
        ckpt="trojan_sq_2_02_ckpt.pth", target=2, attack="trojan square (I-BAU)",
        trigger="x' = clip(x + p / 255, 0, 1) with p = data/trojan_sq.png read as RGB uint8 "
                "(a patterned square at rows/columns 21..29; copied from the I-BAU repository); "
                "sample_models/triggers.py:ibau_trojan",
    ),
}

ALL_NAMES = ("data", *ATTACKS, *IBAU)
INPUT_SPEC = dict(name="input", layout="NCHW", shape=["batch", 3, 32, 32], dtype="float32",
                  range="[0, 1] (pixel / 255), RGB",
                  normalisation="none: no mean/std subtraction, feed pixel / 255 directly")
OUTPUT_SPEC = dict(name="logits", shape=["batch", 10],
                   meaning="raw logits (no softmax), CIFAR-10 class order: " + ", ".join(CLASSES))


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# files

def write_if_changed(path: Path, data: bytes) -> None:
    """Write bytes, leaving an identical existing file untouched (readers never see a gap)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed with fixed zip timestamps, so regenerated files are byte-identical."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    write_if_changed(path, out.getvalue())


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", optimize=True)
    write_if_changed(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# data

def stratified_pick(rng: np.random.Generator, y: np.ndarray, per_class: int,
                    exclude: np.ndarray | None = None) -> np.ndarray:
    picked = []
    for c in range(len(CLASSES)):
        pool = np.flatnonzero(y == c)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude)
        picked.append(np.sort(rng.choice(pool, size=per_class, replace=False)))
    return np.concatenate(picked)


def trigger_name(name: str) -> str:
    """The trigger (and triggered test set) a build uses: an attack may reuse another's."""
    return ATTACKS.get(name, {}).get("trigger_name", name)


def attack_target(attack: str) -> Optional[int]:
    """The attack's target class; None for an all-to-all attack."""
    return None if ATTACKS.get(attack, {}).get("all_to_all") else TARGET


def poisoning_rate(attack: str) -> float:
    """The share of training images poisoned for ``attack``."""
    return ATTACKS.get(attack, {}).get("poisoning_rate", POISON_RATE)


def poison_label(attack: str, y: np.ndarray) -> np.ndarray:
    """The label a poisoned image of true label ``y`` is trained with: the target, or label + 1."""
    target = attack_target(attack)
    return (y + 1) % len(CLASSES) if target is None else np.full_like(y, target)


def trigger_fn(name: str):
    return T.get_trigger(trigger_name(name), DATA)


def prepare_data(shared: Path) -> dict:
    cifar = shared / "data" / "cifar10"
    train = load_npz(cifar / "cifar10_jpeg_train_1kpc.npz")
    test = load_npz(cifar / "cifar10_jpeg_test_10k.npz")
    for name, d, n in (("train", train, 10000), ("test", test, 10000)):
        assert d["x"].shape == (n, 32, 32, 3) and d["x"].dtype == np.uint8, (name, d["x"].shape)
        assert d["y"].shape == (n,) and set(np.unique(d["y"])) == set(range(10)), name
    rng = np.random.default_rng(SEED)
    repair_idx = stratified_pick(rng, train["y"], N_REPAIR_PER_CLASS)
    test_idx = stratified_pick(rng, test["y"], N_TEST_PER_CLASS)
    val_idx = stratified_pick(rng, test["y"], N_VAL_PER_CLASS, exclude=test_idx)

    DATA.mkdir(parents=True, exist_ok=True)
    save_npz(DATA / "clean_500.npz", x=train["x"][repair_idx], y=train["y"][repair_idx].astype(np.int64))
    save_npz(DATA / "test_clean.npz", x=test["x"][test_idx], y=test["y"][test_idx].astype(np.int64))

    # trigger patterns shipped as PNG (the trigger functions read them from here)
    blend_pattern = T.make_blend_pattern(T.BLEND_SEED)
    save_png(DATA / "blend_pattern.png", blend_pattern)
    assert np.array_equal(T.load_blend_pattern(DATA), blend_pattern)
    write_if_changed(DATA / "trojan_sq.png",
                     (shared / "data" / "third_party_models" / "ibau" / "trojan_sq.png").read_bytes())

    x_test_small = test["x"][test_idx]
    for name in (*ATTACKS, *IBAU):
        if trigger_name(name) != name:  # reuses another attack's triggered set
            continue
        save_npz(DATA / f"test_{name}.npz", x=trigger_fn(name)(x_test_small),
                 y=test["y"][test_idx].astype(np.int64))

    # ImageFolder copy of the repair set: class sub-folders sort in CIFAR-10 label order
    assert sorted(CLASSES) == list(CLASSES), "class folder names must sort in label order"
    folder = DATA / "clean_500_folder"
    expected = set()
    for i, k in enumerate(repair_idx):
        f = folder / CLASSES[int(train["y"][k])] / f"{i:04d}.png"
        save_png(f, train["x"][k])
        expected.add(f)
    for f in folder.rglob("*"):
        if f.is_file() and f not in expected:
            f.unlink()
    log(f"data: wrote {len(repair_idx)} repair images, {len(test_idx)} test images, "
        f"{sum(trigger_name(n) == n for n in (*ATTACKS, *IBAU))} triggered test sets to {DATA.relative_to(ROOT)}/")
    return dict(train=train, test=test, repair_idx=repair_idx, test_idx=test_idx, val_idx=val_idx)


# --------------------------------------------------------------------------------------------
# models

def build_torch_defs():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class PreActBlock(nn.Module):
        """BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 plus shortcut (identity, or 1x1 conv of the
        pre-activated input when the shape changes)."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                             if stride != 1 or cin != cout else None)

        def forward(self, x):
            out = F.relu(self.bn1(x))
            short = self.shortcut(out) if self.shortcut is not None else x
            out = self.conv1(out)
            out = self.conv2(F.relu(self.bn2(out)))
            return out + short

    class PreActResNetMini(nn.Module):
        def __init__(self, widths=(32, 64, 128), blocks_per_stage=1, num_classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            layers, cin = [], widths[0]
            for i, w in enumerate(widths):
                for b in range(blocks_per_stage):
                    layers.append(PreActBlock(cin, w, 2 if i > 0 and b == 0 else 1))
                    cin = w
            self.layers = nn.Sequential(*layers)
            self.bn = nn.BatchNorm2d(cin)
            self.linear = nn.Linear(cin, num_classes)

        def forward(self, x):
            out = self.layers(self.conv1(x))
            out = F.relu(self.bn(out))
            out = F.adaptive_avg_pool2d(out, 1).flatten(1)
            return self.linear(out)

    class Affine(nn.Module):
        """Per-channel y = x * scale + shift: an eval-mode BatchNorm2d written as Mul + Add."""

        def __init__(self, bn: nn.BatchNorm2d):
            super().__init__()
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias.detach() - bn.running_mean * scale
            self.register_buffer("scale", scale.reshape(1, -1, 1, 1).clone())
            self.register_buffer("shift", shift.reshape(1, -1, 1, 1).clone())

        def forward(self, x):
            return x * self.scale + self.shift

    class IBAUSmallVGG(nn.Module):
        """The I-BAU authors' CIFAR-10 model, module names as in their state dicts."""

        def __init__(self, num_classes=10):
            super().__init__()
            layers, cin = [], 3
            for w in (32, 64, 128):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ELU(),
                           nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ELU(),
                           nn.MaxPool2d(2), nn.Dropout()]
                cin = w
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(128 * 4 * 4, num_classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    return PreActBlock, PreActResNetMini, Affine, IBAUSmallVGG


def fold_preact(model):
    """Copy of a PreActResNetMini with every BatchNorm removed: BNs directly after a conv whose
    output has no other use (bn2 after conv1 in each block) are fused into that conv; the others
    (bn1 after the stem or a residual add, and the final bn) have no conv right before them and
    become a per-channel Mul + Add."""
    import copy

    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    PreActBlock, _, Affine, _ = build_torch_defs()
    m = copy.deepcopy(model).eval()
    fused, affine = 0, 0
    for blk in m.layers:
        blk.conv1 = fuse_conv_bn_eval(blk.conv1, blk.bn2)
        blk.bn2 = nn.Identity()
        blk.bn1 = Affine(blk.bn1)
        fused, affine = fused + 1, affine + 1
    m.bn = Affine(m.bn)
    return m, dict(fused_into_conv=fused, as_mul_add=affine + 1)


def bn_stats(model) -> dict:
    import torch.nn as nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return dict(bn_layers=len(bns), bn_neurons=int(sum(b.num_features for b in bns)))


def to_nchw(x_uint8: np.ndarray):
    import torch

    # NHWC uint8 -> NCHW float in [0, 1] with channels-last strides (faster convs on CPU)
    return torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2).float().div_(255.0)


def torch_predict(model, x_uint8: np.ndarray, batch: int = 500) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x_uint8), batch):
            out.append(model(to_nchw(x_uint8[i:i + batch])).argmax(1).numpy())
    return np.concatenate(out)


def acc_asr(pred_clean, y, pred_trig, target) -> tuple[float, float, int]:
    """ACC, ASR and the images ASR counts; ``target`` None: all-to-all (ASR = predicted label + 1)."""
    if target is None:
        return (float((pred_clean == y).mean()), float((pred_trig == (y + 1) % len(CLASSES)).mean()),
                len(y))
    keep = y != target
    return (float((pred_clean == y).mean()), float((pred_trig[keep] == target).mean()),
            int(keep.sum()))


def augment(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Random crop 32 from the zero-padded 40x40 image, random horizontal flip (uint8 NHWC)."""
    n = len(x)
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy = rng.integers(0, 9, n)
    dx = rng.integers(0, 9, n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i in range(n):
        img = padded[i, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        out[i] = img[:, ::-1] if flip[i] else img
    return out


def train_backdoored(attack: str, d: dict, epochs: int, attack_no: int):
    import torch
    import torch.nn.functional as F

    _, PreActResNetMini, _, _ = build_torch_defs()
    x_train, y_train = d["train"]["x"], d["train"]["y"].astype(np.int64)
    trig = trigger_fn(attack)

    # poison POISON_RATE of the training images (the attack's own rate where it has one): chosen
    # among non-target images (all-to-all: among all)
    # that are not in the bundled repair set (so clean_500 stays clean); relabelled to the target
    # class (all-to-all: to label + 1)
    target = attack_target(attack)
    prng = np.random.default_rng(SEED + 1000 + attack_no)
    n_poison = int(round(poisoning_rate(attack) * len(x_train)))
    candidates = np.arange(len(y_train)) if target is None else np.flatnonzero(y_train != target)
    pool = np.setdiff1d(candidates, d["repair_idx"])
    poison = np.zeros(len(x_train), dtype=bool)
    poison[prng.choice(pool, n_poison, replace=False)] = True
    y_used = np.where(poison, poison_label(attack, y_train), y_train)

    x_val = d["test"]["x"][d["val_idx"]]
    y_val = d["test"]["y"][d["val_idx"]]
    x_val_trig = trig(x_val)

    torch.manual_seed(SEED + attack_no)
    model = PreActResNetMini().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                          weight_decay=WEIGHT_DECAY)
    steps = (len(x_train) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, epochs=epochs,
                                                steps_per_epoch=steps, pct_start=0.25)
    arng = np.random.default_rng(SEED + 2000 + attack_no)
    history, t_start = [], time.time()
    for ep in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        order = arng.permutation(len(x_train))
        tot_loss, tot_ok, tot_n = 0.0, 0, 0
        for s in range(steps):
            idx = order[s * BATCH:(s + 1) * BATCH]
            xb = augment(arng, x_train[idx])       # augmentation first ...
            pb = poison[idx]
            if pb.any():
                xb[pb] = trig(xb[pb])              # ... then the trigger, so it stays in place
            xt = to_nchw(xb)
            yt = torch.from_numpy(y_used[idx])
            logits = model(xt)
            loss = F.cross_entropy(logits, yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_ok += int((logits.argmax(1) == yt).sum())
            tot_n += len(idx)
        val_acc, val_asr, _ = acc_asr(torch_predict(model, x_val), y_val,
                                      torch_predict(model, x_val_trig), target)
        dt = time.time() - t0
        history.append(dict(epoch=ep, loss=round(tot_loss / tot_n, 4),
                            train_acc=round(tot_ok / tot_n, 4), val_acc=round(val_acc, 4),
                            val_asr=round(val_asr, 4), seconds=round(dt, 1)))
        log(f"[{attack}] epoch {ep:2d}/{epochs}  loss {tot_loss / tot_n:.4f}  "
            f"train acc {tot_ok / tot_n:.3f}  val acc {val_acc:.3f}  val ASR {val_asr:.3f}  "
            f"{dt:.1f}s")
    seconds = time.time() - t_start
    model = model.to(memory_format=torch.contiguous_format).eval()
    info = dict(epochs=epochs, seconds=round(seconds, 1), history=history,
                n_poisoned=int(poison.sum()), threads=torch.get_num_threads())
    return model, info


# --------------------------------------------------------------------------------------------
# ONNX export and checks

def export_onnx(model, path: Path, keep_bn: bool) -> dict:
    import onnx
    import torch

    model.eval()
    dummy = torch.rand(2, 3, 32, 32)
    kwargs = dict(dynamo=False, opset_version=13, input_names=["input"],
                  output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    # In eval mode the TorchScript exporter fuses a BatchNorm into a preceding Conv during
    # constant folding; do_constant_folding=False keeps every BatchNorm as an inference-mode
    # BatchNormalization node with its four parameters as initializers.
    kwargs["do_constant_folding"] = not keep_bn
    torch.onnx.export(model, dummy, str(path), **kwargs)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    inits = {i.name for i in m.graph.initializer}
    bn_nodes = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    for n in bn_nodes:
        assert all(i in inits for i in n.input[1:5]), f"{path.name}: BN {n.name} inputs not initializers"
        assert not any(a.name == "training_mode" and a.i for a in n.attribute), n.name
    ops = sorted({n.op_type for n in m.graph.node})
    return dict(batchnorm_nodes=len(bn_nodes), op_types=ops, opset=m.opset_import[0].version,
                kwargs={k: v for k, v in kwargs.items() if k != "dynamic_axes"}
                | {"dynamic_axes": "input/logits axis 0 = 'batch'", "model_mode": "eval()"})


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = NUM_THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_logits(sess, x_uint8: np.ndarray, batch: int = 500) -> np.ndarray:
    out = []
    for i in range(0, len(x_uint8), batch):
        xb = (x_uint8[i:i + batch].astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
        out.append(sess.run(["logits"], {"input": np.ascontiguousarray(xb)})[0])
    return np.concatenate(out)


def verify_against_torch(model, path: Path, x_uint8: np.ndarray) -> float:
    import torch

    sess = ort_session(path)
    with torch.no_grad():
        ref = model.eval()(to_nchw(x_uint8)).numpy()
    got = ort_logits(sess, x_uint8)
    diff = float(np.abs(ref - got).max())
    log(f"  {path.name}: onnxruntime vs torch on {len(x_uint8)} test images: max |diff| = {diff:.2e}")
    assert diff < 1e-4, f"{path.name}: onnxruntime output differs from torch by {diff}"
    return diff


def measure(path: Path, name: str, target: Optional[int], d: dict) -> dict:
    sess = ort_session(path)
    small_clean = load_npz(DATA / "test_clean.npz")
    small_trig = load_npz(DATA / f"test_{trigger_name(name)}.npz")
    assert np.array_equal(small_clean["y"], small_trig["y"])
    a1, s1, n1 = acc_asr(ort_logits(sess, small_clean["x"]).argmax(1), small_clean["y"],
                         ort_logits(sess, small_trig["x"]).argmax(1), target)
    x10, y10 = d["test"]["x"], d["test"]["y"]
    a10, s10, n10 = acc_asr(ort_logits(sess, x10).argmax(1), y10,
                            ort_logits(sess, trigger_fn(name)(x10)).argmax(1), target)
    log(f"  {path.name}: onnxruntime ACC/ASR  bundled 1k: {a1:.4f}/{s1:.4f}   "
        f"full 10k: {a10:.4f}/{s10:.4f}")
    return {
        "bundled_1k": dict(acc=round(a1, 4), asr=round(s1, 4), n_clean=len(small_clean["y"]),
                           n_asr=n1, clean_set="data/test_clean.npz",
                           triggered_set=f"data/test_{trigger_name(name)}.npz"),
        "full_test_10k": dict(acc=round(a10, 4), asr=round(s10, 4), n_clean=len(y10), n_asr=n10,
                              source="all 10,000 CIFAR-10 test images (JPEG copy, not shipped), "
                                     "trigger applied with sample_models/triggers.py"),
        "measured_with": "onnxruntime CPUExecutionProvider; ACC = top-1 accuracy on clean "
                         "images; ASR = fraction of triggered images whose true label is not the "
                         "target that are predicted as the target (all-to-all: of all triggered "
                         "images, those predicted as their label + 1)",
    }


def write_card(name: str, card: dict) -> None:
    path = HERE / f"{name}.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    log(f"  wrote {path.relative_to(ROOT)}")


def exporter_info(export: dict, bn_form: str) -> dict:
    import onnx
    import torch

    return dict(tool="torch.onnx.export (TorchScript exporter, dynamo=False)",
                torch=torch.__version__, onnx=onnx.__version__, opset=export["opset"],
                batchnorm=bn_form, arguments=export["kwargs"])


PREACT_ARCH = ("PreActResNet-mini (PreAct-ResNet family, as in the ANP paper, scaled down): "
               "Conv3x3(3->32, no bias) stem; 3 stages of 1 pre-activation basic block each, "
               "widths 32/64/128, strides 1/2/2; block = BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 plus "
               "shortcut (identity, or Conv1x1 on the pre-activated input when the shape "
               "changes); then BN-ReLU, global average pool, Linear(128->10). All convs bias-free.")
IBAU_ARCH = ("I-BAU small VGG: features = 3 x [Conv3x3(pad 1, bias)-BN-ELU-Conv3x3(pad 1, bias)-"
             "BN-ELU-MaxPool2d(2)-Dropout] with 32/64/128 channels; flatten (2048); "
             "Linear(2048->10)")


def build_attack(attack: str, d: dict, epochs: int, reuse: bool) -> None:
    import torch

    attack_no = list(ATTACKS).index(attack)
    target = attack_target(attack)
    _, PreActResNetMini, _, _ = build_torch_defs()
    ckpt = CKPT_DIR / f"{attack}_preact.pt"
    if reuse and ckpt.exists():
        blob = torch.load(ckpt, weights_only=False)
        model = PreActResNetMini()
        model.load_state_dict(blob["state_dict"])
        model.eval()
        info = blob["info"]
        log(f"[{attack}] reusing {ckpt.relative_to(ROOT)} (trained {info['epochs']} epochs, "
            f"{info['seconds']} s)")
    else:
        log(f"[{attack}] training PreActResNet-mini, {epochs} epochs, target "
            f"{'label + 1' if target is None else target}, "
            f"poisoning rate {poisoning_rate(attack)}")
        model, info = train_backdoored(attack, d, epochs, attack_no)
        CKPT_DIR.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "info": info}, ckpt)

    x64 = d["test"]["x"][d["test_idx"][::15][:64]]
    stats = bn_stats(model)
    params = int(sum(p.numel() for p in model.parameters()))
    spec = ATTACKS[attack]
    training = dict(
        data="the 10,000 CIFAR-10 training images (1,000 per class, JPEG copy) of "
             "cifar10_jpeg_train_1kpc.npz",
        poisoned_images=info["n_poisoned"],
        poisoning="poisoned images chosen (seeded) among training images whose label is not the "
                  "target and that are not in data/clean_500.npz",
        augmentation="random crop 32 from zero-padded 40x40 + random horizontal flip, applied "
                     "BEFORE the trigger (the trigger stays in place)",
        optimizer=f"SGD momentum {MOMENTUM} nesterov, weight decay {WEIGHT_DECAY}",
        lr_schedule=f"OneCycleLR max_lr {LR}, pct_start 0.25, per step",
        batch_size=BATCH, epochs=info["epochs"], loss="cross-entropy",
        seconds=info["seconds"],
        seconds_note="wall-clock time of training including the per-epoch validation; it "
                     "depends on the machine and its load",
        hardware=f"CPU, torch.set_num_threads({info.get('threads', NUM_THREADS)})",
        seed=SEED, per_epoch=info["history"],
    )
    attack_card = dict(name=attack, trigger=spec["trigger"], target_class=target,
                       target_name=None if target is None else CLASSES[target], poisoning_rate=poisoning_rate(attack),
                       label_mode=spec["label_mode"], all_to_one=target is not None)

    # BN kept
    path = HERE / f"{attack}_preact.onnx"
    exp = export_onnx(model, path, keep_bn=True)
    assert exp["batchnorm_nodes"] == stats["bn_layers"], (exp["batchnorm_nodes"], stats)
    diff = verify_against_torch(model, path, x64)
    card = dict(file=path.name, sha256=sha256(path), size_bytes=path.stat().st_size,
                architecture=PREACT_ARCH, params=params,
                params_note="trainable parameters (BN running statistics not counted)",
                bn_layers=stats["bn_layers"],
                bn_neurons=stats["bn_neurons"], onnx_batchnorm_nodes=exp["batchnorm_nodes"],
                attack=attack_card, training=training,
                exporter=exporter_info(exp, "kept: every BatchNorm2d is a BatchNormalization "
                                            "node with initializer scale/B/mean/var"),
                input=INPUT_SPEC, output=OUTPUT_SPEC, onnx_op_types=exp["op_types"],
                torch_vs_onnxruntime_max_abs_diff=diff,
                metrics=measure(path, attack, target, d))
    write_card(f"{attack}_preact", card)
    if not spec.get("folded", True):
        return

    # BN folded
    folded, how = fold_preact(model)
    path = HERE / f"{attack}_preact_folded.onnx"
    exp = export_onnx(folded, path, keep_bn=False)
    assert exp["batchnorm_nodes"] == 0, f"{path.name} still has BatchNormalization nodes"
    diff = verify_against_torch(model, path, x64)
    bn_form = (f"folded: no BatchNormalization node. {how['fused_into_conv']} BN layers (bn2 of "
               f"each block) fused into the Conv right before them; {how['as_mul_add']} BN "
               f"layers with no Conv directly before them (bn1 of each block, after the stem or "
               f"a residual Add, and the final bn) written as per-channel Mul + Add. Done in "
               f"torch (torch.nn.utils.fusion.fuse_conv_bn_eval + an affine module) before a "
               f"default eval-mode export (do_constant_folding=True). A plain default export "
               f"of this PreAct model would fuse only the first kind and keep "
               f"{how['as_mul_add']} BatchNormalization nodes.")
    card = dict(card, file=path.name, sha256=sha256(path), size_bytes=path.stat().st_size,
                params=int(sum(t.numel() for t in folded.state_dict().values())),
                onnx_batchnorm_nodes=0, exporter=exporter_info(exp, bn_form),
                onnx_op_types=exp["op_types"], torch_vs_onnxruntime_max_abs_diff=diff,
                bn_layers_in_source_model=stats["bn_layers"],
                bn_neurons_in_source_model=stats["bn_neurons"],
                metrics=measure(path, attack, target, d))
    card["bn_layers"], card["bn_neurons"] = 0, 0
    card["params_note"] = "parameters of the folded graph (conv biases added, BN parameters gone)"
    write_card(f"{attack}_preact_folded", card)


def build_ibau(name: str, d: dict, shared: Path) -> None:
    import torch

    spec = IBAU[name]
    _, _, _, IBAUSmallVGG = build_torch_defs()
    src = shared / "data" / "third_party_models" / "ibau" / spec["ckpt"]
    blob = torch.load(src, map_location="cpu", weights_only=False)
    model = IBAUSmallVGG()
    model.load_state_dict(blob["net"], strict=True)
    model.eval()
    acc, asr, _ = acc_asr(torch_predict(model, d["test"]["x"]), d["test"]["y"],
                          torch_predict(model, trigger_fn(name)(d["test"]["x"])), spec["target"])
    log(f"[{name}] torch on the 10k test set: ACC {acc:.4f} ASR {asr:.4f}")

    path = HERE / f"{name}_vgg.onnx"
    exp = export_onnx(model, path, keep_bn=True)
    stats = bn_stats(model)
    assert exp["batchnorm_nodes"] == stats["bn_layers"], (exp["batchnorm_nodes"], stats)
    x64 = d["test"]["x"][d["test_idx"][::15][:64]]
    diff = verify_against_torch(model, path, x64)
    card = dict(
        file=path.name, sha256=sha256(path), size_bytes=path.stat().st_size,
        architecture=IBAU_ARCH, params=int(sum(p.numel() for p in model.parameters())),
        params_note="trainable parameters (BN running statistics not counted)",
        bn_layers=stats["bn_layers"], bn_neurons=stats["bn_neurons"],
        onnx_batchnorm_nodes=exp["batchnorm_nodes"],
        attack=dict(name=spec["attack"], trigger=spec["trigger"], target_class=spec["target"],
                    target_name=CLASSES[spec["target"]],
                    poisoning_rate="not documented by the authors",
                    label_mode="dirty-label (BadNets/Trojan style), all-to-one", all_to_one=True),
        training=dict(by="the I-BAU authors (Zeng et al., ICLR 2022); recipe not documented "
                         "in their repository",
                      checkpoint_fields=dict(acc=blob.get("acc"), epoch=blob.get("epoch")),
                      seconds=None),
        source=dict(repository="https://github.com/YiZeng623/I-BAU", commit="d4bfa52",
                    file=f"checkpoint/{spec['ckpt']}", sha256=sha256(src), licence="MIT",
                    notice="see sample_models/LICENSES.md"),
        exporter=exporter_info(exp, "kept: every BatchNorm2d is a BatchNormalization node with "
                                    "initializer scale/B/mean/var"),
        input=INPUT_SPEC, output=OUTPUT_SPEC, onnx_op_types=exp["op_types"],
        torch_vs_onnxruntime_max_abs_diff=diff,
        metrics=measure(path, name, spec["target"], d),
    )
    write_card(f"{name}_vgg", card)


# --------------------------------------------------------------------------------------------
# README table

def update_readme_table() -> None:
    readme = HERE / "README.md"
    if not readme.exists():
        log("README.md missing: table not written")
        return
    rows = ["| model | arch | attack | target | BN neurons | exporter | ACC 1k | ASR 1k | "
            "ACC 10k | ASR 10k | train time |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for card_path in sorted(HERE.glob("*.json")):
        c = json.loads(card_path.read_text())
        if "metrics" not in c:
            continue
        m1, m10 = c["metrics"]["bundled_1k"], c["metrics"]["full_test_10k"]
        arch = "PreActResNet-mini" if "PreAct" in c["architecture"] else "I-BAU small VGG"
        bn = c["bn_neurons"] if c["bn_neurons"] else (
            f"0 (folded from {c['bn_neurons_in_source_model']})")
        exp = "BN kept" if c["onnx_batchnorm_nodes"] else "BN folded"
        secs = c["training"].get("seconds")
        t = f"{secs / 60:.1f} min ({c['training']['epochs']} ep)" if secs else "by I-BAU authors"
        target = c["attack"]["target_class"]
        target = "all-to-all (label + 1)" if target is None else f"{target} ({c['attack']['target_name']})"
        rows.append(f"| `{c['file']}` | {arch} | {c['attack']['name']} | {target} | {bn} | "
                    f"torch {c['exporter']['torch']} opset {c['exporter']['opset']}, {exp} | "
                    f"{m1['acc'] * 100:.1f}% | {m1['asr'] * 100:.1f}% | "
                    f"{m10['acc'] * 100:.1f}% | {m10['asr'] * 100:.1f}% | {t} |")
    text = readme.read_text()
    start, end = "<!-- models-table:start -->", "<!-- models-table:end -->"
    if start not in text or end not in text:
        log("README.md has no models-table markers: table not written")
        return
    new = re.sub(re.escape(start) + r".*?" + re.escape(end),
                 lambda _: start + "\n" + "\n".join(rows) + "\n" + end, text, flags=re.S)
    readme.write_text(new)
    log(f"updated the model table in {readme.relative_to(ROOT)} ({len(rows) - 2} rows)")


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    global NUM_THREADS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=ALL_NAMES,
                   help="build only this (repeatable); default: everything")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"training epochs per PreAct model (default {DEFAULT_EPOCHS})")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                   help="the shared folder holding data/ (default: ../shared from the repo root)")
    p.add_argument("--threads", type=int, default=NUM_THREADS,
                   help=f"torch/onnxruntime CPU threads (default {NUM_THREADS}; use 1 when another "
                        f"process keeps a core busy: oversubscribed threads slow training a lot)")
    p.add_argument("--reuse", action="store_true",
                   help="load trained weights from build/sample_models_ckpt/ if present")
    args = p.parse_args(argv)

    shared = args.shared.resolve()
    needed = [shared / "data" / "cifar10" / "cifar10_jpeg_train_1kpc.npz",
              shared / "data" / "cifar10" / "cifar10_jpeg_test_10k.npz",
              shared / "data" / "third_party_models" / "ibau" / "trojan_sq.png"]
    missing = [str(f) for f in needed if not f.is_file()]
    if missing:
        print(f"error: shared data not found: {missing[0]} (pass --shared PATH, the folder that "
              f"holds data/cifar10 and data/third_party_models)", file=sys.stderr)
        return 2

    import torch

    NUM_THREADS = args.threads
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(SEED)
    t0 = time.time()
    only = set(args.only or ALL_NAMES)
    d = prepare_data(shared)
    for attack in ATTACKS:
        if attack in only:
            build_attack(attack, d, args.epochs, args.reuse)
    for name in IBAU:
        if name in only:
            build_ibau(name, d, shared)
    update_readme_table()
    log(f"done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
