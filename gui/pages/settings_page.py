"""Step 3: the ANP hyperparameters (reference defaults, explained) and where to run."""

from __future__ import annotations

from dataclasses import replace

import torch
from PySide6.QtCore import QEvent, QObject, Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QPushButton, QSpinBox, QVBoxLayout,
    QWidget,
)

import anp_onnx
from anp_onnx import ANPConfig

from .base import ERROR, Page, esc, rich

HELP = {
    "iterations": "How many optimisation steps to take; each looks at one batch of clean images. More steps "
                  "give cleaner masks but take longer. Automatic: the reference's 2000 on a GPU, 300 on a CPU "
                  "(2000 take half an hour or more there).",
    "batch_size": "How many clean images each step looks at. Reference: 128.",
    "eps": "How hard the neurons are shaken (relative perturbation of their weights) to expose the ones the "
           "backdoor relies on. Larger values find more, but also hurt clean accuracy. Reference: 0.4.",
    "target": "Automatic: first check where clean images go when the neurons are shaken; if most errors land "
              "in one class (the suspected backdoor target), shake the neurons "
              "towards that class, and prune until the pull towards it is gone. None: the reference's "
              "untargeted shaking.",
    "targeted_eps": "Perturbation strength when the shaking is aimed at the suspected target. Default 0.2.",
    "steps": "How many times per step the perturbation is sharpened to do the most damage. Reference: 1.",
    "alpha": "Balance between keeping clean accuracy (1) and resisting perturbation (0). Reference: 0.2.",
    "mask_lr": "How fast the neuron masks move per step. Reference: 0.2.",
    "momentum": "Smoothing of the mask updates across steps. Reference: 0.9.",
    "bn_mode": "Batch normalisation during optimisation: 'batch statistics' as in the reference code, or the "
               "model's stored running statistics.",
    "augment": "Randomly crop and mirror the clean images during optimisation, as the reference code does.",
    "crop_padding": "Padding in pixels for the random crop; automatic is 4 pixels for 32×32 images, scaled "
                    "with the image size.",
    "project_noise": "Keep the perturbation within ±eps after sharpening it (the reference does not).",
    "renormalise": "For neurons in layers that do not normalise (convolutions whose BatchNorm the exporter "
                   "folded away, or per-channel scale and shift): treat each as a BatchNorm channel measured "
                   "on the clean images, so it is shaken as in a BatchNorm network and a pruned neuron outputs "
                   "its average. Off: scale the weights directly. No effect on BatchNorm layers. Default on.",
    "seed": "Starting point of the random choices. The same seed on the same data gives the same masks.",
    "device": "Where the optimisation runs. A CUDA GPU is much faster on large models.",
}


INTRO = ("ANP gently shakes each neuron of the model and learns, for every neuron, a mask value between 0 and 1. "
         "Neurons that a backdoor relies on are fragile: their mask drops towards 0, and the next steps prune them. "
         "Point at a setting to read what it does.")


def detected_device() -> str:
    if torch.cuda.is_available():
        return f"CUDA GPU: {torch.cuda.get_device_name(0)}"
    return "CPU only (torch sees no CUDA GPU)"


class SettingsPage(Page):
    title = "3. Settings"
    subtitle = "The defaults are those of the ANP reference code, but for aiming the perturbation at a suspected " \
               "target; hover over a setting to see what it does. Fewer iterations are fine for a first look."

    configChanged = Signal()  # the session's anp_config (or anp_problem) changed

    def __init__(self, window) -> None:
        super().__init__(window)
        row = QHBoxLayout()
        main = QGroupBox("Optimisation", self)
        form = QFormLayout(main)
        self.fields: dict[str, QWidget] = {}
        self.forms: dict[str, QFormLayout] = {}  # the form each field is in (its label is there)
        self._spin("iterations", 0, 1_000_000, form, "Iterations")
        self.fields["iterations"].setSpecialValueText("automatic")
        self._spin("batch_size", 2, 65536, form, "Images per step (batch size)")
        target = QComboBox(self)
        target.addItem("Automatic (suspected target)", "auto")
        target.addItem("None: untargeted (reference)", "none")
        self._add("target", target, form, "Aim the perturbation", target.currentIndexChanged)
        self._double("eps", 0.0, 5.0, 0.05, form, "Perturbation strength (eps)")
        self._double("targeted_eps", 0.0, 5.0, 0.05, form, "Aimed perturbation strength")
        self._spin("steps", 1, 100, form, "Perturbation steps")
        self._double("alpha", 0.0, 1.0, 0.05, form, "Clean-loss weight (alpha)")
        self._double("mask_lr", 0.0001, 10.0, 0.05, form, "Mask learning rate", decimals=4)
        self._double("momentum", 0.0, 0.999, 0.05, form, "Momentum", decimals=3)
        row.addWidget(main, 1)
        more = QGroupBox("Details and device", self)
        more_box = QVBoxLayout(more)
        form2 = QFormLayout()
        more_box.addLayout(form2)
        bn = QComboBox(more)
        bn.addItem("Batch statistics (reference)", "train")
        bn.addItem("Stored running statistics", "eval")
        self._add("bn_mode", bn, form2, "Normalisation", bn.currentIndexChanged)
        aug = QCheckBox("Random crop and flip", more)
        self._add("augment", aug, form2, "Augmentation", aug.toggled)
        self._spin("crop_padding", -1, 256, form2, "Crop padding")
        self.fields["crop_padding"].setSpecialValueText("automatic")
        proj = QCheckBox("Clip the perturbation to ±eps", more)
        self._add("project_noise", proj, form2, "Projection", proj.toggled)
        renorm = QCheckBox("As BatchNorm (clean statistics)", more)
        self._add("renormalise", renorm, form2, "Layers without normalisation", renorm.toggled)
        self._spin("seed", 0, 2**31 - 1, form2, "Random seed")
        device = QComboBox(more)
        device.addItem("Automatic", "auto")
        device.addItem("CPU", "cpu")
        device.addItem("CUDA GPU", "cuda")
        if not torch.cuda.is_available():
            device.model().item(2).setEnabled(False)
        self._add("device", device, form2, "Device", device.currentIndexChanged)
        self.device_label = rich(more, f"Detected: <b>{esc(detected_device())}</b>", "deviceLabel")
        more_box.addWidget(self.device_label)  # below the form: a wrapping label in a form row gets clipped
        more_box.addStretch(1)
        row.addWidget(more, 1)
        self.body.addLayout(row)
        buttons = QHBoxLayout()
        self.defaults = QPushButton("Restore defaults", self)
        self.defaults.setObjectName("defaultsButton")
        self.defaults.clicked.connect(lambda: self.set_config(ANPConfig()))
        buttons.addWidget(self.defaults)
        self.reference = QPushButton("Reference ANP", self)
        self.reference.setObjectName("referenceButton")
        self.reference.setToolTip("The reference code's settings exactly: untargeted perturbation.")
        self.reference.clicked.connect(lambda: self.set_config(ANPConfig.reference()))
        buttons.addWidget(self.reference)
        buttons.addStretch(1)
        self.body.addLayout(buttons)
        self.problem = rich(self, "", "settingsProblem")
        self.body.addWidget(self.problem)
        box = QGroupBox("What does it do?", self)
        self.help = rich(box, INTRO, "settingsHelp")
        QHBoxLayout(box).addWidget(self.help)
        self.body.addWidget(box)
        self.body.addStretch(1)
        self._loading = False
        self.set_config(self.settings.anp_config())

    def _add(self, key: str, widget: QWidget, form: QFormLayout, label: str, signal) -> None:
        widget.setObjectName(f"anp_{key}")
        widget.setToolTip(HELP[key])
        self.fields[key] = widget
        self.forms[key] = form
        form.addRow(label, widget)
        form.labelForField(widget).setToolTip(HELP[key])
        widget.setProperty("helpKey", key)
        widget.installEventFilter(self)
        signal.connect(self._changed)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        """Explain the setting under the mouse or with the keyboard focus."""
        if event.type() in (QEvent.Type.FocusIn, QEvent.Type.Enter) and hasattr(self, "help"):
            key = watched.property("helpKey")
            if key in HELP:
                label = self.forms[key].labelForField(self.fields[key])
                self.help.setText(f"<b>{esc(label.text() if label else key)}</b>: {esc(HELP[key])}")
        return super().eventFilter(watched, event)

    def _spin(self, key: str, lo: int, hi: int, form: QFormLayout, label: str) -> None:
        box = QSpinBox(self)
        box.setRange(lo, hi)
        box.setGroupSeparatorShown(True)
        self._add(key, box, form, label, box.valueChanged)

    def _double(self, key: str, lo: float, hi: float, step: float, form, label: str, decimals: int = 2) -> None:
        box = QDoubleSpinBox(self)
        box.setRange(lo, hi)
        box.setDecimals(decimals)
        box.setSingleStep(step)
        self._add(key, box, form, label, box.valueChanged)

    def set_config(self, config: ANPConfig) -> None:
        self._loading = True
        try:
            for key, widget in self.fields.items():
                value = getattr(config, key)
                if key == "device":
                    value = value.split(":")[0] if torch.cuda.is_available() else "auto"
                if key == "target":
                    value = "none" if value is None else "auto"
                if isinstance(widget, QComboBox):
                    widget.setCurrentIndex(max(0, widget.findData(value)))
                elif isinstance(widget, QCheckBox):
                    widget.setChecked(bool(value))
                elif key == "crop_padding":
                    widget.setValue(-1 if value is None else int(value))
                elif key == "iterations":
                    widget.setValue(0 if value is None else int(value))
                else:
                    widget.setValue(value)
        finally:
            self._loading = False
        self._changed()

    def set_values(self, **values) -> None:
        """Change some settings, e.g. ``set_values(iterations=20, batch_size=16)``."""
        self.set_config(replace(self.config(), **values))

    def config(self) -> ANPConfig:
        values = {}
        for key, widget in self.fields.items():
            if isinstance(widget, QComboBox):
                values[key] = widget.currentData()
            elif isinstance(widget, QCheckBox):
                values[key] = widget.isChecked()
            else:
                values[key] = widget.value()
        values["crop_padding"] = None if values["crop_padding"] < 0 else values["crop_padding"]
        values["iterations"] = values["iterations"] or None
        values["target"] = None if values["target"] == "none" else values["target"]
        return ANPConfig(**values)

    def _changed(self, *args) -> None:
        if self._loading:
            return
        s = self.session
        try:
            config = self.config()
        except anp_onnx.AnpOnnxError as exc:
            self.problem.setText(f"<span style='color:{ERROR}'>{esc(exc)}</span>")
            s.anp_config, s.anp_problem = None, str(exc)
            self.configChanged.emit()
            return
        self.problem.setText("")
        s.anp_config, s.anp_problem = config, ""
        self.settings.set_anp_config(config)
        try:
            resolved = config.resolve()
            where = f"{resolved.iterations:,} iterations on {resolved.device}"
        except anp_onnx.AnpOnnxError as exc:
            where = f"<span style='color:{ERROR}'>{esc(exc)}</span>"
        self.device_label.setText(f"Detected: <b>{esc(detected_device())}</b><br>This run: {where}")
        self.configChanged.emit()

    def set_busy(self, busy: bool) -> None:
        for widget in [*self.fields.values(), self.defaults, self.reference]:
            widget.setEnabled(not busy)
