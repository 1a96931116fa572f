"""Step 2: the clean images ANP learns from, how pixels are preprocessed, and optional test sets."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from PySide6.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QScrollArea, QSpinBox, QVBoxLayout,
    QWidget,
)

import anp_onnx
from anp_onnx import DEFAULT_HOLDOUT, PRESETS

from .base import ERROR, GOOD, MUTED, Page, esc, pct, rich
from .widgets import PathRow, ThumbnailStrip

PRESET_LABELS = {
    "model": "From the model (recorded by anp-onnx)",
    "unit": "Pixels in [0, 1], no normalisation",
    "imagenet": "ImageNet mean/std",
    "cifar10": "CIFAR-10 mean/std",
    "minus1_1": "Pixels in [-1, 1] (mean 0.5, std 0.5)",
    "0_255": "Pixels in 0..255",
    "custom": "Custom…",
}
SETS = ("clean", "test", "poisoned")


class DataPage(Page):
    title = "2. Data"
    subtitle = "A few hundred clean, correctly labelled images are enough for ANP (the paper used 1% of the " \
               "training set). A triggered test set is optional: with it the app measures how often the " \
               "backdoor still works (attack success rate, ASR)."

    def __init__(self, window) -> None:
        super().__init__(window)
        top = QHBoxLayout()
        left = QGroupBox("Clean images (required)", self)
        form = QFormLayout(left)
        self.rows = {"clean": PathRow(self, "clean", False)}
        form.addRow("Images", self.rows["clean"])
        self.holdout = QSpinBox(left)
        self.holdout.setObjectName("holdoutSpin")
        self.holdout.setRange(0, 50)
        self.holdout.setSuffix(" %")
        self.holdout.setValue(int(self.settings.get("data/holdout", round(100 * DEFAULT_HOLDOUT))))
        self.holdout.setToolTip("Keep this share of the clean images aside (ANP does not see them): the pruning "
                                "curve and the automatic choice measure clean accuracy on them. 0 = ANP uses "
                                "all images and the curve is measured on the same ones.")
        self.holdout.valueChanged.connect(self._split)
        form.addRow("Keep aside for the curve", self.holdout)
        self.preset = QComboBox(left)
        self.preset.setObjectName("presetCombo")
        for key in ("unit", "imagenet", "cifar10", "minus1_1", "0_255", "custom"):
            self.preset.addItem(PRESET_LABELS[key], key)
        self.preset.setToolTip("How the model expects pixel values. Use what the model was trained with; a "
                               "wrong choice shows as a low clean accuracy.")
        self.preset.currentIndexChanged.connect(self._preset_changed)
        form.addRow("Preprocessing", self.preset)
        self.custom = QLineEdit(left)
        self.custom.setObjectName("customPreprocessing")
        self.custom.setPlaceholderText("mean=0.5,0.5,0.5;std=0.25,0.25,0.25;scale=1")
        self.custom.editingFinished.connect(self._preset_changed)
        form.addRow("Custom values", self.custom)
        self.pre_label = rich(left, "", "preprocessingLabel")
        form.addRow("", self.pre_label)
        self.clean_info = rich(left, "", "cleanInfo")
        form.addRow("", self.clean_info)
        top.addWidget(left, 1)

        right = QGroupBox("Test sets (optional)", self)
        form2 = QFormLayout(right)
        self.rows["test"] = PathRow(self, "test", True)
        self.rows["poisoned"] = PathRow(self, "poisoned", True)
        form2.addRow("Clean test", self.rows["test"])
        form2.addRow("Triggered test", self.rows["poisoned"])
        self.target = QSpinBox(right)
        self.target.setObjectName("targetSpin")
        self.target.setRange(-1, 9999)
        self.target.setSpecialValueText("guess (most frequent prediction)")
        self.target.setValue(-1)
        self.target.setToolTip("The class the backdoor sends triggered images to. Leave on 'guess' if you do "
                               "not know it: the backdoored model's most frequent prediction is used.")
        self.target.valueChanged.connect(self._target_changed)
        form2.addRow("Target class", self.target)
        self.test_info = rich(right, f"<span style='color:{MUTED}'>Triggered images keep their true labels; the "
                                     "trigger is already applied.</span>", "testInfo")
        form2.addRow("", self.test_info)
        top.addWidget(right, 1)
        self.body.addLayout(top)

        self.strips = {name: ThumbnailStrip(self, f"{name}Thumbs") for name in SETS}
        self.strip_labels = {name: QLabel(self) for name in SETS}
        strips = QWidget(self)
        strip_box = QVBoxLayout(strips)
        strip_box.setContentsMargins(0, 0, 0, 0)
        for name, text in (("clean", "Clean images as read (label below each)"),
                           ("test", "Clean test images"), ("poisoned", "Triggered test images (true label)")):
            self.strip_labels[name].setText(f"<b>{text}</b>")
            strip_box.addWidget(self.strip_labels[name])
            strip_box.addWidget(self.strips[name])
        strip_box.addStretch(1)
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(strips)
        self.body.addWidget(scroll, 1)
        self.busy_widgets = [self.holdout, self.preset, self.custom, self.target] + \
            [w for row in self.rows.values() for w in [row.edit, *row.buttons]]
        self.refresh()

    def ready(self) -> bool:
        return self.session.model_usable

    def set_busy(self, busy: bool) -> None:
        for w in self.busy_widgets:
            w.setEnabled(not busy)

    # -- preprocessing --------------------------------------------------------------------------
    def model_opened(self) -> None:
        """A new model: offer its recorded preprocessing, else keep the user's last choice."""
        recorded = isinstance(self.session.info.metadata.get("preprocessing"), dict)
        has_item = self.preset.findData("model") >= 0
        self.preset.blockSignals(True)
        if recorded and not has_item:
            self.preset.insertItem(0, PRESET_LABELS["model"], "model")
        elif not recorded and has_item:
            self.preset.removeItem(self.preset.findData("model"))
        key = "model" if recorded else str(self.settings.get("data/preset", "unit"))
        self.custom.setText(str(self.settings.get("data/custom", "")))
        self.preset.setCurrentIndex(max(0, self.preset.findData(key)))
        self.preset.blockSignals(False)
        self._preset_changed()
        for name in SETS:
            self.rows[name].edit.clear()
        self.target.setRange(-1, self.session.info.num_classes - 1)
        self.target.setValue(-1)

    def set_preset(self, key: str) -> None:
        self.preset.setCurrentIndex(max(0, self.preset.findData(key)))

    def preprocessing(self) -> Optional[anp_onnx.Preprocessing]:
        key = self.preset.currentData()
        self.custom.setEnabled(key == "custom")
        if key == "model":
            return anp_onnx.Preprocessing.from_dict(self.session.info.metadata["preprocessing"])
        if key == "custom":
            return anp_onnx.Preprocessing.parse(self.custom.text())
        return PRESETS[key]

    def _preset_changed(self) -> None:
        rep = self.session.repairer
        try:
            pre = self.preprocessing()
        except anp_onnx.AnpOnnxError as exc:
            self.pre_label.setText(f"<span style='color:{ERROR}'>{esc(exc)}</span>")
            return
        self.pre_label.setText(f"<span style='color:{MUTED}'>{esc(pre.describe())}</span>")
        if self.preset.currentData() != "model":
            self.settings.set("data/preset", self.preset.currentData())
        self.settings.set("data/custom", self.custom.text())
        if rep is None or rep.preprocessing == pre:
            return
        rep.preprocessing = pre
        if self.session.masks is not None:
            self.win.log.note("preprocessing changed: the masks learnt with the old one were discarded")
        self.session.reset_from("masks")
        if self.session.train is not None:
            self.session.data_parity = None
            train = self.session.train
            self.win.runner.start("Checking the conversion", lambda progress, cancel: rep.check_parity(train),
                                  on_success=self._parity_done)
        self.win.session_changed()

    def _parity_done(self, value: float) -> None:
        self.session.data_parity = value
        self.win.session_changed()

    # -- loading --------------------------------------------------------------------------------
    def browse(self, which: str, folder: bool) -> None:
        start = self.settings.last_folder("data")
        if folder:
            path = QFileDialog.getExistingDirectory(self, "Choose an image folder (one sub-folder per class)", start)
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Choose an .npz file", start, "NumPy archives (*.npz)")
        if path:
            self.load(which, path)

    def load(self, which: str, path: str, then: Optional[Callable[[], None]] = None) -> None:
        """Load the set ``which`` from ``path`` in the background; ``then`` runs once it is loaded."""
        rep = self.session.repairer
        if rep is None or not path or self.win.runner.busy:
            return
        self.rows[which].edit.setText(path)
        self.settings.remember_folder("data", path)
        try:
            pre = self.preprocessing()
        except anp_onnx.AnpOnnxError as exc:
            self.win.error("Invalid preprocessing", str(exc))
            return
        if rep.preprocessing != pre:  # setting it forgets the conversion check the export reports
            rep.preprocessing = pre

        def job(progress, cancel):
            images = rep.load_data(path)
            parity = rep.check_parity(images) if which == "clean" else None
            return images, parity

        def loaded(result) -> None:
            self._loaded(which, *result)
            if then is not None:
                then()

        self.win.runner.start(f"Loading {Path(path).name}", job, on_success=loaded,
                              on_failure=lambda failure: self._load_failed(which))

    def measure_original(self, then: Optional[Callable[[], None]] = None) -> None:
        """The original model's clean test accuracy and attack success rate, shown under the test sets."""
        s = self.session
        if s.repairer is None or (s.test is None and s.poisoned is None) or self.win.runner.busy:
            return
        rep, test, poisoned, target = s.repairer, s.test, s.poisoned, s.target
        self.test_info.setText("<i>measuring the original model on the test sets…</i>")

        def measured(result: anp_onnx.EvalResult) -> None:
            self.show_original(result)
            if then is not None:
                then()

        self.win.runner.start("Measuring the original model",
                              lambda progress, cancel: rep.evaluate(test, poisoned=poisoned, target=target),
                              on_success=measured)

    def show_original(self, result: anp_onnx.EvalResult) -> None:
        parts = []
        if result.accuracy is not None:
            parts.append(f"clean test accuracy <b>{pct(result.accuracy)}</b> ({result.n_clean} images)")
        if result.asr is not None:
            guess = ", guessed" if result.target_inferred else ""
            parts.append(f"<b>attack success rate {pct(result.asr)}</b> (target {result.target}{guess}; "
                         f"{result.n_poisoned} triggered images)")
        self.test_info.setText("The original model: " + "; ".join(parts) + ".")

    def _loaded(self, which: str, images: anp_onnx.ImageSet, parity: Optional[float]) -> None:
        s = self.session
        if which == "clean":
            s.reset_from("masks")
            s.clean, s.data_parity = images, parity
            self._split()
        else:
            setattr(s, which, images)
            s.curve = None
        self.win.session_changed()

    def _load_failed(self, which: str) -> None:
        self.clear_set(which)

    def clear_set(self, which: str) -> None:
        self.rows[which].edit.clear()
        if which == "clean":
            self.session.reset_from("data")
            self.session.test = self.session.poisoned = None
            for name in SETS:
                self.rows[name].edit.clear()
        else:
            setattr(self.session, which, None)
            self.session.curve = None
        self.win.session_changed()

    def _split(self) -> None:
        s = self.session
        if s.clean is None:
            return
        share = self.holdout.value() / 100
        self.settings.set("data/holdout", self.holdout.value())
        try:
            s.train, s.holdout = s.clean.split(share) if share else (s.clean, None)
        except anp_onnx.AnpOnnxError as exc:
            self.win.error("Cannot keep images aside", str(exc))
            self.holdout.setValue(0)
            return
        s.curve = None
        self.win.session_changed()

    def _target_changed(self, value: int) -> None:
        self.session.target = None if value < 0 else value
        self.session.curve = None
        self.win.session_changed()

    def refresh(self) -> None:
        s = self.session
        for name in SETS:
            images = getattr(s, name)
            self.strips[name].show_images(images)
            self.strips[name].setVisible(images is not None or name == "clean")
            self.strip_labels[name].setVisible(images is not None or name == "clean")
        if s.clean is None:
            self.clean_info.setText("<i>No clean images loaded.</i>")
            return
        x = s.clean.x
        classes = len(set(s.clean.y.tolist()))
        text = (f"<b>{len(s.clean)} images</b>, {classes} classes, {x.shape[2]}×{x.shape[3]} pixels, "
                f"{x.shape[1]} channel(s)")
        if s.holdout is not None:
            text += f"; ANP uses {len(s.train)}, {len(s.holdout)} kept aside"
        if s.data_parity is not None:
            text += (f"<br>Conversion check on these images: <b style='color:{GOOD}'>passed</b> "
                     f"(largest difference {s.data_parity:.1e})")
        self.clean_info.setText(text)
