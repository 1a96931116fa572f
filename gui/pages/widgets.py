"""Widgets the pages share: path rows, thumbnail strips, the table of lowest-mask neurons."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PySide6.QtCore import QEvent, QSize, Qt
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLineEdit, QListView, QListWidget, QListWidgetItem,
    QPushButton, QTableWidget, QTableWidgetItem, QToolButton, QVBoxLayout, QWidget,
)

import anp_onnx

from ..theme import pruned_row

ICON = 56


def to_qimage(chw: np.ndarray) -> QImage:
    """A float (C, H, W) image in [0, 1] as a QImage (gray, RGB or RGBA), owning its pixels."""
    hwc = np.ascontiguousarray((np.clip(chw, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))
    h, w, c = hwc.shape
    fmt = {1: QImage.Format.Format_Grayscale8, 3: QImage.Format.Format_RGB888,
           4: QImage.Format.Format_RGBA8888}[c]
    return QImage(hwc.data, w, h, w * c, fmt).copy()


def spread(labels: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` indices, taking classes in turn so that every class shows up."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < n and any(by_class):
        for members in by_class:
            if members and len(out) < n:
                out.append(int(members.pop(0)))
    return out


class ThumbnailStrip(QListWidget):
    """One row of labelled thumbnails, scrolling sideways."""

    def __init__(self, parent: Optional[QWidget] = None, name: str = "") -> None:
        super().__init__(parent)
        if name:
            self.setObjectName(name)
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setFlow(QListView.Flow.LeftToRight)
        self.setWrapping(False)
        self.setMovement(QListView.Movement.Static)
        self.setIconSize(QSize(ICON, ICON))
        self.setGridSize(QSize(ICON + 26, ICON + 34))
        self.setFixedHeight(ICON + 54)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setSelectionMode(QListWidget.SelectionMode.NoSelection)

    def show_images(self, images: Optional[anp_onnx.ImageSet], n: int = 32, prefix: str = "") -> None:
        self.clear()
        if images is None or not len(images):
            return
        names = images.class_names
        for i in spread(images.y, n):
            label = int(images.y[i])
            text = names[label] if names and label < len(names) else str(label)
            pix = QPixmap.fromImage(to_qimage(images.x[i])).scaled(
                ICON, ICON, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.FastTransformation)
            item = QListWidgetItem(QIcon(pix), prefix + text)
            item.setToolTip(f"image {i}: label {label}" + (f" ({text})" if text != str(label) else ""))
            self.addItem(item)


def dropped_paths(event) -> list[str]:
    """The local files and folders a drag carries."""
    mime = event.mimeData()
    return [u.toLocalFile() for u in mime.urls() if u.isLocalFile()] if mime.hasUrls() else []


def is_data_path(path: str) -> bool:
    """An image folder or an .npz file: what a data set is read from."""
    p = Path(path)
    return p.is_dir() or (p.is_file() and p.suffix.lower() == ".npz")


class PathRow(QWidget):
    """A path box with Folder… / .npz… buttons (and Clear for optional sets); a folder or .npz dropped
    on it loads that set."""

    def __init__(self, page, which: str, optional: bool) -> None:
        super().__init__(page)
        self.page, self.which = page, which
        self.setAcceptDrops(True)
        self.edit = QLineEdit(self)
        self.edit.setObjectName(f"{which}Path")
        self.edit.setAcceptDrops(False)  # the row takes the drop: a path, not text pasted into the box
        self.edit.setPlaceholderText("a folder with one sub-folder per class, or an .npz file (x, y); or drop one "
                                     "here")
        self.edit.returnPressed.connect(lambda: page.load(which, self.edit.text().strip()))
        folder = QPushButton("Folder…", self)
        folder.clicked.connect(lambda: page.browse(which, folder=True))
        npz = QPushButton(".npz…", self)
        npz.clicked.connect(lambda: page.browse(which, folder=False))
        for b in (folder, npz):
            b.setMaximumWidth(80)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit, 1)
        row.addWidget(folder)
        row.addWidget(npz)
        self.buttons = [folder, npz]
        if optional:
            clear = QToolButton(self)
            clear.setText("✕")
            clear.setToolTip("Do not use this set")
            clear.clicked.connect(lambda: page.clear_set(which))
            row.addWidget(clear)
            self.buttons.append(clear)

    def _dropped(self, event) -> Optional[str]:
        if not self.edit.isEnabled():  # busy
            return None
        return next((p for p in dropped_paths(event) if is_data_path(p)), None)

    def dragEnterEvent(self, event) -> None:
        if self._dropped(event):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        path = self._dropped(event)
        if path:
            event.acceptProposedAction()
            self.page.load(self.which, path)


class NeuronTable(QWidget):
    """The lowest-mask neurons, all layers or one, marking those the current plan prunes ("yes", on a
    red tint of the palette's base colour with the palette's text colour: readable in a dark theme too)."""

    ROWS = 200

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.ranked: list = []
        self.pruned: set = set()
        v = QVBoxLayout(self)
        v.setContentsMargins(0, 0, 0, 0)
        self.layer_filter = QComboBox(self)
        self.layer_filter.setObjectName("layerFilter")
        self.layer_filter.currentIndexChanged.connect(self.fill)
        v.addWidget(self.layer_filter)
        self.table = QTableWidget(0, 4, self)
        self.table.setObjectName("neuronTable")
        self.table.setHorizontalHeaderLabels(["Layer", "Neuron", "Mask", "Pruned"])
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c in (1, 2, 3):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setTextElideMode(Qt.TextElideMode.ElideLeft)
        self.table.setWordWrap(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        v.addWidget(self.table, 1)

    def set_neurons(self, ranked: list, layers) -> None:
        self.ranked = ranked
        self.layer_filter.blockSignals(True)
        self.layer_filter.clear()
        self.layer_filter.addItem(f"Lowest masks, all layers (first {self.ROWS})", None)
        for name in layers:
            self.layer_filter.addItem(f"Layer {name}", name)
        self.layer_filter.blockSignals(False)
        self.fill()

    def set_plan(self, plan) -> None:
        self.pruned = {(name, int(i)) for name, idx in plan.pruned.items() for i in idx} if plan is not None else set()
        self.fill()

    def changeEvent(self, event: QEvent) -> None:  # noqa: N802 - Qt's name
        super().changeEvent(event)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange) and \
                hasattr(self, "table"):
            self.fill()  # the pruned rows' colours come from the palette

    def fill(self) -> None:
        layer = self.layer_filter.currentData()
        background, foreground = pruned_row(self.palette())  # (the table's is updated after this widget's)
        rows = [n for n in self.ranked if layer is None or n.layer == layer][:self.ROWS]
        self.table.setRowCount(len(rows))
        for r, n in enumerate(rows):
            cut = (n.layer, n.index) in self.pruned
            for c, value in enumerate((n.layer, str(n.index), f"{n.mask:.4f}", "yes" if cut else "")):
                item = QTableWidgetItem(value)
                if c in (1, 2):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if cut:
                    item.setBackground(background)
                    item.setForeground(foreground)
                item.setToolTip(f"{n.layer}, neuron {n.index}: mask {n.mask:.6f}")
                self.table.setItem(r, c, item)
