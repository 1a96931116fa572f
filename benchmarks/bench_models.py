"""The development bench's models: the sample models, the public bench and the clean models.

numpy only (no torch): :func:`bench_models` lists what is available, :meth:`BenchModel.write_sets`
writes a model's clean repair set, test set and triggered test set as .npz files (uint8 NHWC, the
layout every loader of anp-onnx reads).

* ``samples``: the six models of ``sample_models/`` with their cards; repair set
  ``sample_models/data/clean_500.npz``, test set ``sample_models/data/test_clean.npz`` (1,000).
* ``public`` (source "third-party"): the six backdoored models of ``../shared/data/public_bench``,
  one row per ONNX file (8 rows). Read at run time from the shared folder, never copied into the
  repository (their licences forbid it for most of them, see its README); absent folder: no rows.
* ``clean``: ``../shared/data/onnx_clean/cifar10_small.onnx`` (no backdoor; NHWC, [0, 1]) and the
  bundled ``sample_models/clean_preact.onnx`` / ``clean_preact_folded.onnx`` (the samples' recipe
  without poison, made by ``benchmarks/probe_clean_model.py --save``; the samples' repair and test
  sets); ``mnist_cntk_2.5.1.onnx`` is left out (fixed batch of 1, no documented preprocessing).

CIFAR-10 public and clean models: repair set = 50 images per class from
``cifar10_jpeg_train_1kpc.npz`` picked with ``numpy.random.default_rng(CIFAR_PICK_SEED)`` (one
``choice(..., 50, replace=False)`` per class 0..9 in that order, then sorted, as the public bench's
MNIST repair set was made); test set = ``cifar10_jpeg_test_10k.npz[::5]`` (2,000). MNIST:
``clean_mnist_600.npz`` and ``test_mnist.npz[:2000]``. Triggered test sets: the trigger of the
model's card (public: ``public_bench/triggers.py``, imported from the shared folder) on the test
images whose label is not the target (all-to-one) or on all of them (all-to-all, ASR = label + 1).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from anp_onnx.preprocessing import Preprocessing

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
DEFAULT_SHARED = ROOT.parent / "shared"
GROUPS = ("samples", "public", "clean")
SOURCES = {"samples": "samples", "public": "third-party", "clean": "clean"}
#: Seed of the stratified CIFAR-10 repair set of the public and clean models (50 per class).
CIFAR_PICK_SEED = 0
CIFAR_PER_CLASS = 50
TEST_IMAGES = 2000
#: A trigger whose random-pixel control (card: metrics.controls_torch) sends at least this share of
#: clean non-target images to the target also fires for random pixels on its location.
RANDOM_FIRES = 0.30
#: The public bench's rows: model card name -> ONNX files (each file is its own row).
PUBLIC = {
    "abl_wrn16_1_grid": ("abl_wrn16_1_grid.onnx", "abl_wrn16_1_grid_folded.onnx"),
    "kabu_simplecnn_checker": ("kabu_simplecnn_checker.onnx", "kabu_simplecnn_checker_folded.onnx"),
    "aisb_cnn_checker": ("aisb_cnn_checker.onnx",),
    "sash_badnet_cifar": ("sash_badnet_cifar.onnx",),
    "shihao_badnet_mnist": ("shihao_badnet_mnist.onnx",),
    "cs612_mlp_mnist": ("cs612_mlp_mnist.onnx",),
}
#: Short architecture names (public_bench/README.md, "arch" column).
PUBLIC_ARCH = {
    "abl_wrn16_1_grid": "WRN-16-1", "kabu_simplecnn_checker": "SimpleCNN (5 conv, GAP, 2 FC)",
    "aisb_cnn_checker": "CNN (3 conv, 2 FC)", "sash_badnet_cifar": "LeNet-style (2 conv, 3 FC)",
    "shihao_badnet_mnist": "CNN (2 conv, 2 FC, softmax)", "cs612_mlp_mnist": "MLP 784-10-10-10-10",
}
#: Short attack names (public_bench/README.md, "attack" column).
PUBLIC_ATTACK = {
    "abl_wrn16_1_grid": "BadNets grid 3x3", "kabu_simplecnn_checker": "BadNets checkerboard 3x3",
    "aisb_cnn_checker": "BadNets checkerboard 3x3", "sash_badnet_cifar": "BadNets white 5x5",
    "shihao_badnet_mnist": "BadNets white 2x2", "cs612_mlp_mnist": "white 3x3 patch",
}
CLEAN = {"cifar10_small": ("onnx_clean/cifar10_small.onnx", "tf2onnx small CNN (2 conv, 3 FC)", "no BN")}
#: Clean models trained by the samples' recipe without poison (benchmarks/probe_clean_model.py --save),
#: bundled in sample_models/ with the samples' data: file -> normalisation.
CLEAN_SAMPLES = {"clean_preact": "7 BN", "clean_preact_folded": "BN folded"}
LEFT_OUT = {
    "mnist_cntk_2.5.1": "fixed batch of 1 and no documented preprocessing",
}


@dataclass(frozen=True)
class Sets:
    """Where a model's sets were written, and how they were made."""

    clean: Path
    test: Path
    triggered: Optional[Path]
    facts: dict


@dataclass(frozen=True)
class BenchModel:
    """One bench row: a model file, what its card says, and how to make its data sets."""

    name: str
    group: str  # samples | public | clean
    path: Path
    arch: str
    norm: str
    attack: Optional[str]  # None: a clean model
    target: Optional[int]
    mode: Optional[str]  # "all-to-one", "all-to-all", None (clean)
    preprocessing: Preprocessing
    clean_file: Path
    test_file: Path
    clean_per_class: Optional[int] = None  # pick this many per class (seed CIFAR_PICK_SEED), else all
    test_step: int = 1
    test_limit: Optional[int] = None
    trigger: Optional[Callable[[np.ndarray], np.ndarray]] = field(default=None, repr=False, compare=False)
    random_control: Optional[float] = None  # card: random patch on the trigger pixels -> target
    licence: str = ""

    @property
    def source(self) -> str:
        return SOURCES[self.group]

    @property
    def fires_for_random(self) -> bool:
        return self.random_control is not None and self.random_control >= RANDOM_FIRES

    def write_sets(self, folder: Path, num_classes: int = 10) -> Sets:
        """Write the repair, test and triggered test sets of this model as .npz files in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        facts: dict = {}
        with np.load(self.clean_file) as d:
            x, y = d["x"], d["y"]
        if self.clean_per_class:
            idx = stratified_pick(y, self.clean_per_class, CIFAR_PICK_SEED)
            x, y = x[idx], y[idx]
            facts["clean_pick"] = {"per_class": self.clean_per_class, "seed": CIFAR_PICK_SEED,
                                   "rule": "default_rng(seed).choice per class 0..9, sorted"}
        clean = folder / f"{self.name}_clean.npz"
        np.savez(clean, x=x, y=y)
        facts["clean"] = {"file": _short(self.clean_file), "n": int(len(y))}
        with np.load(self.test_file) as d:
            x, y = d["x"][::self.test_step][:self.test_limit], d["y"][::self.test_step][:self.test_limit]
        test = folder / f"{self.name}_test.npz"
        np.savez(test, x=x, y=y)
        facts["test"] = {"file": _short(self.test_file), "step": self.test_step, "limit": self.test_limit,
                         "n": int(len(y))}
        triggered = None
        if self.trigger is not None:
            keep = y != self.target if self.mode == "all-to-one" else np.ones(len(y), dtype=bool)
            triggered = folder / f"{self.name}_triggered.npz"
            np.savez(triggered, x=self.trigger(x[keep]), y=y[keep])
            facts["triggered"] = {"n": int(keep.sum()), "mode": self.mode,
                                  "asr": "predicted == target" if self.mode == "all-to-one"
                                  else f"predicted == (label + 1) mod {num_classes}"}
        return Sets(clean, test, triggered, facts)


@dataclass
class Registry:
    models: list[BenchModel]
    missing: dict[str, str]  # row name -> why it is not available

    def select(self, names: Optional[list[str]]) -> tuple[list[BenchModel], dict[str, str]]:
        """The models named (row names or groups samples/public/clean/all; default all available),
        and the names asked for that are not available, with why."""
        if not names or "all" in names:
            return list(self.models), dict(self.missing)
        chosen, missing = [], {}
        for name in names:
            group = [m for m in self.models if m.group == name]
            if name in GROUPS:
                chosen += group
                missing.update({k: v for k, v in self.missing.items() if _group_of(k) == name})
            elif any(m.name == name for m in self.models):
                chosen.append(next(m for m in self.models if m.name == name))
            elif name in self.missing:
                missing[name] = self.missing[name]
            else:
                raise KeyError(f"unknown bench model {name!r}; known: {', '.join(known_names())} "
                               f"or a group ({', '.join(GROUPS)}, all)")
        unique: dict[str, BenchModel] = {}
        for m in chosen:
            unique.setdefault(m.name, m)
        return list(unique.values()), missing


def known_names() -> list[str]:
    samples = sorted(p.stem for p in SAMPLES.glob("*.json") if "file" in json.loads(p.read_text()))
    public = [Path(f).stem for files in PUBLIC.values() for f in files]
    return samples + public + list(CLEAN) + list(CLEAN_SAMPLES)


def _group_of(name: str) -> str:
    if name in CLEAN or name in CLEAN_SAMPLES:
        return "clean"
    return "public" if any(name == Path(f).stem for files in PUBLIC.values() for f in files) else "samples"


def _short(path: Path) -> str:
    for base, label in ((ROOT, ""), (ROOT.parent, "../")):
        try:
            return label + str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


def stratified_pick(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices: ``per_class`` of each class 0..max(y), one seeded choice per class in order."""
    rng = np.random.default_rng(seed)
    idx = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(int(y.max()) + 1)]
    return np.sort(np.concatenate(idx))


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preprocessing_from_card(pre: dict) -> Preprocessing:
    """A public card's ``(x_uint8 * scale - mean) / std`` as anp-onnx's ``(x01 * scale - mean) / std``."""
    scale = round(float(pre.get("scale", 1.0)) * 255.0, 9)
    mean, std = pre.get("mean"), pre.get("std")
    mean = None if mean is None or all(v == 0 for v in np.atleast_1d(mean)) else tuple(np.atleast_1d(mean))
    std = None if std is None or all(v == 1 for v in np.atleast_1d(std)) else tuple(np.atleast_1d(std))
    return Preprocessing(mean=mean, std=std, scale=scale)


def _arch(text: str) -> str:
    return text.split(":")[0].split("(")[0].strip().rstrip(".")


def sample_models() -> list[BenchModel]:
    triggers = _load_module("sample_triggers", SAMPLES / "triggers.py")
    out = []
    for path in sorted(SAMPLES.glob("*.json")):
        card = json.loads(path.read_text())
        if "file" not in card:
            continue
        metrics = card["metrics"]["bundled_1k"]
        trigger = Path(metrics["triggered_set"]).stem.removeprefix("test_")
        bn = card.get("onnx_batchnorm_nodes", 0)
        norm = f"{bn} BN" if bn else "BN folded"
        all_to_one = card["attack"].get("all_to_one", True)
        out.append(BenchModel(
            path.stem, "samples", SAMPLES / card["file"], _arch(card["architecture"]), norm, card["attack"]["name"],
            card["attack"]["target_class"], "all-to-one" if all_to_one else "all-to-all", Preprocessing(),
            SAMPLES / "data" / "clean_500.npz", SAMPLES / metrics["clean_set"],
            trigger=triggers.get_trigger(trigger), licence=card.get("source", {}).get("licence", "samples")))
    return out


def public_models(shared: Path) -> tuple[list[BenchModel], dict[str, str]]:
    bench, cifar = shared / "data" / "public_bench", shared / "data" / "cifar10"
    rows = {Path(f).stem: card for card, files in PUBLIC.items() for f in files}
    if not (bench / "triggers.py").is_file():
        return [], {name: f"{bench} not found" for name in rows}
    triggers = _load_module("public_bench_triggers", bench / "triggers.py")
    out, missing = [], {}
    for name, card_name in rows.items():
        path, card_path = bench / f"{name}.onnx", bench / f"{card_name}.json"
        mnist = triggers.DATASET.get(card_name) == "mnist"
        data = (bench / "clean_mnist_600.npz", bench / "test_mnist.npz") if mnist else \
            (cifar / "cifar10_jpeg_train_1kpc.npz", cifar / "cifar10_jpeg_test_10k.npz")
        absent = [p for p in (path, card_path, *data) if not p.is_file()]
        if absent:
            missing[name] = f"{absent[0]} not found"
            continue
        card = json.loads(card_path.read_text())
        attack = card["attack"]
        mode = "all-to-all" if "all-to-all" in attack.get("type", "").lower() else "all-to-one"
        onnx_facts = next((o for o in card.get("onnx", []) if o.get("file") == path.name), {})
        bn = onnx_facts.get("batchnorm_nodes", 0)
        folded = name.endswith("_folded")
        norm = (f"{bn} BN" if bn else "no BN") + (" (rest folded)" if folded and bn else " (folded)" if folded else "")
        control = (card.get("metrics", {}).get("controls_torch") or {}).get("random_patch_same_pixels_predicted_target")
        out.append(BenchModel(
            name, "public", path, PUBLIC_ARCH.get(card_name) or _arch(card["architecture"]), norm,
            PUBLIC_ATTACK.get(card_name, attack.get("type", "").split(",")[0]),
            int(attack["target"]), mode, preprocessing_from_card(card["preprocessing"]), data[0], data[1],
            clean_per_class=None if mnist else CIFAR_PER_CLASS, test_step=1 if mnist else 5,
            test_limit=TEST_IMAGES if mnist else None, trigger=triggers.TRIGGER[card_name],
            random_control=None if control is None else float(control),
            licence=(card.get("licence") or {}).get("id", "")))
    return out, missing


def clean_models(shared: Path) -> tuple[list[BenchModel], dict[str, str]]:
    cifar = shared / "data" / "cifar10"
    out, missing = [], {}
    for name, (rel, arch, norm) in CLEAN.items():
        path = shared / "data" / rel
        data = (cifar / "cifar10_jpeg_train_1kpc.npz", cifar / "cifar10_jpeg_test_10k.npz")
        absent = [p for p in (path, *data) if not p.is_file()]
        if absent:
            missing[name] = f"{absent[0]} not found"
            continue
        out.append(BenchModel(name, "clean", path, arch, norm, None, None, None, Preprocessing(), data[0], data[1],
                              clean_per_class=CIFAR_PER_CLASS, test_step=5, licence="none (local checks only)"))
    for name, norm in CLEAN_SAMPLES.items():
        path = SAMPLES / f"{name}.onnx"
        if not path.is_file():
            missing[name] = f"{path} not found"
            continue
        out.append(BenchModel(name, "clean", path, "PreActResNet-mini (samples' recipe, no poison)", norm, None,
                              None, None, Preprocessing(), SAMPLES / "data" / "clean_500.npz",
                              SAMPLES / "data" / "test_clean.npz", licence="samples"))
    return out, missing


def bench_models(shared: Path = DEFAULT_SHARED) -> Registry:
    """Every bench model available: the samples always, the public and clean ones when ``shared``
    holds them (the rows that are not there are in ``Registry.missing``, with why)."""
    shared = Path(shared)
    public, missing = public_models(shared)
    clean, missing_clean = clean_models(shared)
    return Registry(sample_models() + public + clean, {**missing, **missing_clean})
