"""Step 1: open a model and say, in plain words, what anp-onnx found in it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLineEdit, QListWidget, QListWidgetItem, QPushButton, QScrollArea,
    QSplitter, QVBoxLayout, QWidget,
)

import anp_onnx
from anp_onnx import ConversionError

from .base import ERROR, GOOD, MUTED, Page, bullet_list, esc, rich
from .layers import LayerView

KIND_NAMES = {"batchnorm": "batch normalisation channels", "conv": "convolution/linear output channels"}
RANDOM_IMAGES = 8


def random_images(spec: anp_onnx.InputSpec) -> anp_onnx.ImageSet:
    h, w = spec.size or (32, 32)
    x = np.random.default_rng(0).random((RANDOM_IMAGES, spec.channels, h, w), dtype=np.float32)
    return anp_onnx.ImageSet(x, np.zeros(RANDOM_IMAGES, dtype=np.int64), source="random images")


def open_job(path: str, layout, kinds, include, exclude):
    """Worker job: convert the model and check the conversion on random images."""
    def job(progress, cancel):
        rep = anp_onnx.Repairer.open(path, layout=layout, kinds=kinds, include=include, exclude=exclude)
        cancel.check()
        try:
            parity, problem = rep.check_parity(random_images(rep.model.input)), ""
        except ConversionError as exc:
            parity, problem = None, str(exc)
        return rep, parity, problem
    return job


class ModelPage(Page):
    title = "1. Model"
    subtitle = "Open the ONNX image classifier to repair: File > Open, drag a .onnx file onto the window, " \
               "or pick a recent one."

    def __init__(self, window) -> None:
        super().__init__(window)
        row = QHBoxLayout()
        self.open_button = QPushButton("Open model…", self)
        self.open_button.setObjectName("openModelButton")
        self.open_button.clicked.connect(self.win.open_model_dialog)
        self.sample_button = QPushButton("Try a sample", self)
        self.sample_button.setObjectName("sampleButton")
        if self.win.sample is not None:
            self.sample_button.setToolTip(f"Open {self.win.sample.describe()}, with its clean images, its test "
                                          "set and a triggered copy: see the attack work, then repair it.")
        else:
            self.sample_button.setToolTip("The sample models come with the source checkout (sample_models/).")
        self.sample_button.clicked.connect(self.win.try_sample)
        self.path_label = rich(self, "<i>No model open.</i>", "modelPath")
        row.addWidget(self.open_button)
        row.addWidget(self.sample_button)
        row.addWidget(self.path_label, 1)
        self.body.addLayout(row)

        split = QSplitter(Qt.Orientation.Horizontal, self)
        left = QWidget(split)
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        recent_box = QGroupBox("Recent models (double-click to open)", left)
        self.recent = QListWidget(recent_box)
        self.recent.setObjectName("recentList")
        self.recent.itemActivated.connect(lambda item: self.win.open_model(item.data(Qt.ItemDataRole.UserRole)))
        QVBoxLayout(recent_box).addWidget(self.recent)
        lv.addWidget(recent_box, 1)
        adv = QGroupBox("Options (as on the command line)", left)
        form = QFormLayout(adv)
        self.layout_combo = QComboBox(adv)
        self.layout_combo.setObjectName("layoutCombo")
        self.layout_combo.addItem("Guess from the model", None)
        self.layout_combo.addItem("Channels first (NCHW)", "NCHW")
        self.layout_combo.addItem("Channels last (NHWC)", "NHWC")
        self.layout_combo.setToolTip("How the model expects image pixels to be ordered. Leave on 'guess' "
                                     "unless the summary shows the wrong image size.")
        self.kinds = QComboBox(adv)
        self.kinds.setObjectName("kindsCombo")
        self.kinds.addItem("Automatic (normalisation layers, else conv.)", None)
        self.kinds.addItem("Batch normalisation channels", "batchnorm")
        self.kinds.addItem("Convolution/linear output channels", "conv")
        self.kinds.addItem("Both", "batchnorm,conv")
        self.kinds.setToolTip("Which units count as neurons. Automatic uses the channels of normalisation layers "
                              "(batch normalisation, as the ANP paper does, or its per-channel Mul/Add form, "
                              "instance, group and layer normalisation), and convolution output channels for "
                              "models without them.")
        self.include = QLineEdit(adv)
        self.include.setPlaceholderText("all layers")
        self.include.setToolTip("Only prune in layers whose name matches one of these patterns "
                                "(space separated, * and ? allowed).")
        self.exclude = QLineEdit(adv)
        self.exclude.setPlaceholderText("none")
        self.exclude.setToolTip("Never prune in layers whose name matches one of these patterns.")
        self.reopen = QPushButton("Re-open with these options", adv)
        self.reopen.setObjectName("reopenButton")
        self.reopen.clicked.connect(self.reopen_model)
        form.addRow("Image layout", self.layout_combo)
        form.addRow("Neurons", self.kinds)
        form.addRow("Only layers", self.include)
        form.addRow("Skip layers", self.exclude)
        form.addRow(self.reopen)
        lv.addWidget(adv)

        right = QWidget(split)
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea(right)
        scroll.setWidgetResizable(True)
        self.summary = rich(None, "", "modelSummary")
        self.summary.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.summary.setMargin(6)
        scroll.setWidget(self.summary)
        rv.addWidget(scroll, 3)
        self.layers = LayerView(right, pruning=False, name="layersTable")  # the neuron layers, in graph order
        rv.addWidget(self.layers, 2)
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(1, 3)
        split.setSizes([300, 700])
        self.body.addWidget(split, 1)
        self.refresh_recent()
        self.refresh()

    def reopen_model(self) -> None:
        if self.session.model_path is not None:
            self.win.open_model(str(self.session.model_path))

    def options(self) -> dict:
        split = lambda text: text.split() or None  # noqa: E731
        kinds = self.kinds.currentData()
        return {"layout": self.layout_combo.currentData(), "kinds": kinds.split(",") if kinds else None,
                "include": split(self.include.text()),
                "exclude": split(self.exclude.text())}

    def refresh_recent(self) -> None:
        self.recent.clear()
        for path in self.settings.recent_files():
            item = QListWidgetItem(Path(path).name)
            item.setData(Qt.ItemDataRole.UserRole, path)
            item.setToolTip(path)
            if not Path(path).exists():
                item.setText(item.text() + "  (missing)")
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEnabled)
            self.recent.addItem(item)

    def set_busy(self, busy: bool) -> None:
        for w in (self.open_button, self.recent, self.reopen):
            w.setEnabled(not busy)
        self.sample_button.setEnabled(not busy and self.win.sample is not None)

    def refresh(self) -> None:
        info = self.session.info
        if info is None:
            self.path_label.setText("<i>No model open.</i>")
            self.summary.setText("<p>Open a model to see its inputs, classes and the neurons that ANP can prune."
                                 "</p><p>anp-onnx repairs image classifiers that contain batch normalisation "
                                 "layers. The file you open is never modified.</p>")
            self.layers.set_layers(())
            return
        self.path_label.setText(f"<b>{esc(info.path.name)}</b> &nbsp; <span style='color:{MUTED}'>"
                                f"{esc(info.path.parent)}</span>")
        self.summary.setText(summary_html(info, self.session.random_parity, self.session.conversion_problem,
                                          self.session.data_parity))
        if self.layers.layers != tuple(info.neurons.layers):
            self.layers.set_layers(info.neurons.layers)


def summary_html(info: anp_onnx.ModelInfo, parity, problem: str, data_parity=None) -> str:
    spec = info.input
    size = f"{spec.height}×{spec.width} pixels" if spec.size else "any size"
    order = "channels first (NCHW)" if spec.layout == "NCHW" else "channels last (NHWC)"
    batch = "any number of images at once" if spec.batch is None else f"exactly {spec.batch} image(s) at once"
    mb = info.path.stat().st_size / 1e6 if info.path and info.path.exists() else 0
    rows = [
        ("File", f"{esc(info.path.name)} ({mb:.1f} MB), ONNX opset {info.opset}, IR {info.ir_version}"
                 + (f", made with {esc(info.producer)}" if info.producer else "")),
        ("Input", f"<b>{spec.channels}-channel images of {size}</b>, {order}; {batch} "
                  f"(input '{esc(spec.name)}', {esc(spec.dtype)})"),
        ("Classes", f"<b>{info.num_classes}</b>"),
    ]
    kinds = ", ".join(f"{KIND_NAMES.get(k, k)}: {n} in {layers} layer{'s' * (layers != 1)}"
                      for k, (layers, n) in info.neurons.by_kind().items())
    rows.append(("Neurons", f"<b>{info.neurons.total}</b> that ANP can prune ({esc(kinds)})"))
    if problem:
        check = f"<b style='color:{ERROR}'>FAILED</b>: {esc(problem)}. The model cannot be repaired reliably."
    else:
        check = (f"<b style='color:{GOOD}'>passed</b>: the PyTorch copy anp-onnx works on and onnxruntime give "
                 f"the same outputs (largest difference {parity:.1e} on {RANDOM_IMAGES} random images).")
        if data_parity is not None:
            check += f" On your data: largest difference {data_parity:.1e}."
        else:
            check += " It is checked again on your images at the Data step."
    rows.append(("Conversion check", check))
    text = "<table cellspacing='4'>" + "".join(
        f"<tr><td valign='top'><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows) + "</table>"
    notes = list(info.notes)
    if info.neurons.excluded:
        notes.append(f"{len(info.neurons.excluded)} layers left out by the layer options: "
                     + ", ".join(info.neurons.excluded[:8]))
    if notes:
        text += "<p><b>Good to know</b> (parts anp-onnx does not use or had to adapt):</p>" + bullet_list(notes)
    meta = info.metadata
    if meta.get("pruned"):
        pruned = meta["pruned"] if isinstance(meta["pruned"], dict) else {}
        text += (f"<p><b>Already repaired</b> by anp-onnx {esc(meta.get('version', ''))} on "
                 f"{esc(meta.get('date', '?'))}: {esc(pruned.get('count', '?'))} neurons pruned.</p>")
    if isinstance(meta.get("preprocessing"), dict):
        text += "<p>The model records the preprocessing it was repaired with; the Data step uses it by default.</p>"
    return text
