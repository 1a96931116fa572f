""""Try a sample": the bundled backdoored sample model with its clean data, test set and triggered copy.

The source checkout ships ``sample_models/`` (not part of the installed package): a BadNets
PreAct-ResNet for CIFAR-10, its model card (the attack and its target), 500 clean training images
and 1,000 clean test images. The triggered test set is made here, with the card's trigger from
``sample_models/triggers.py``, in a temporary folder of the app's session. With all of it loaded,
the Data step shows the original model's attack success rate, and the Export step shows it after
the repair.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
SAMPLE_NAME = "badnets_preact"


@dataclass(frozen=True)
class Sample:
    name: str
    model: Path
    clean: Path
    test: Path
    trigger: str       # the name of its trigger in sample_models/triggers.py
    target: int        # the attack's target class (from the model card)
    target_name: str

    def describe(self) -> str:
        return (f"{self.model.name}: a CIFAR-10 classifier with a {self.trigger} backdoor (target class "
                f"{self.target}, {self.target_name})")


def find_sample(folder: Path = SAMPLES, name: str = SAMPLE_NAME) -> Optional[Sample]:
    """The bundled sample, or None when this installation has no sample_models/ folder."""
    files = [folder / f"{name}.onnx", folder / f"{name}.json", folder / "triggers.py",
             folder / "data" / "clean_500.npz", folder / "data" / "test_clean.npz"]
    if not all(f.is_file() for f in files):
        return None
    try:
        attack = json.loads(files[1].read_text(encoding="utf-8"))["attack"]
        return Sample(name, files[0], files[3], files[4], str(attack["name"]), int(attack["target_class"]),
                      str(attack.get("target_name", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def triggered_copy(sample: Sample, folder: Path) -> Path:
    """The sample's clean test set with its trigger applied (true labels kept), written to ``folder``."""
    spec = importlib.util.spec_from_file_location("anp_onnx_sample_triggers", sample.model.parent / "triggers.py")
    triggers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(triggers)
    with np.load(sample.test) as data:
        x, y = data["x"], data["y"]
    out = Path(folder) / f"test_{sample.trigger}.npz"
    with open(out, "wb") as fh:
        np.savez_compressed(fh, x=triggers.get_trigger(sample.trigger)(x), y=y)
    return out


def session_folder() -> Path:
    """A temporary folder for the triggered copy (removed when the window closes)."""
    return Path(tempfile.mkdtemp(prefix="anp-onnx-sample-"))


def load_sample(win, sample: Optional[Sample] = None) -> None:
    """Open the sample in ``win`` and load its sets, one background task after the other: the model,
    the clean images (pixels in [0, 1], as the sample was trained), the clean test set, its triggered
    copy with the card's target; then the original model's accuracy and attack success rate. Emits
    ``win.sampleLoaded`` at the end; a failure stops the chain with the usual error dialog."""
    sample = sample or find_sample()
    if sample is None:
        win.error("No sample here", "the sample models come with the source checkout of anp-onnx "
                  f"(sample_models/ beside gui/), and {SAMPLES} is not there")
        return
    page = win.data_page
    win.log.note(f"trying the sample: {sample.describe()}")

    def opened() -> None:
        page.set_preset("unit")
        win.go_to("data")
        page.load("clean", str(sample.clean), then=lambda: page.load("test", str(sample.test), then=trigger))

    def trigger() -> None:
        if win.sample_dir is None:
            win.sample_dir = session_folder()
        folder = win.sample_dir
        win.runner.start(f"Applying the {sample.trigger} trigger to the test set",
                         lambda progress, cancel: triggered_copy(sample, folder),
                         on_success=lambda path: page.load("poisoned", str(path), then=measure))

    def measure() -> None:
        page.target.setValue(sample.target)
        page.measure_original(then=done)

    def done() -> None:
        win.status.setText(f"Sample loaded: {sample.describe()}. Continue with Next.")
        win.sampleLoaded.emit()

    win.open_model(str(sample.model), then=opened)
