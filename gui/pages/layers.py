"""The model view: the neuron layers of the open model in graph order, and what the plan prunes in each.

One row per layer: its name, the kind of its neurons, how many channels it has and, once there
are masks and a pruning choice, a bar of how many of them are pruned and a strip with one bar per
channel (its height the channel's mask, red when pruned). The counts come from the library's
:class:`anp_onnx.PrunePlan`; nothing is recomputed here. Like the plots (gui/plots.py), the
background, text and frames take the palette (a dark theme gives a dark view) and only the data
colours are fixed.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView, QHeaderView, QStyle, QStyledItemDelegate, QStyleOptionViewItem, QTableWidget, QTableWidgetItem,
    QWidget,
)

from ..theme import PRUNED

KEPT = "#1f77b4"  # the plots' blue (the pruned red is theme.PRUNED, the plots' red)
KIND_LABELS = {"batchnorm": "batch norm", "conv": "conv/linear", "affine": "per-channel affine",
               "instancenorm": "instance norm", "layernorm": "layer norm", "groupnorm": "group norm"}
#: Column of each kind of cell; the bars are painted by :class:`BarDelegate` from the item's data.
NAME, KIND, SIZE, PRUNED_COL, CHANNELS = range(5)
BAR_ROLE = Qt.ItemDataRole.UserRole + 1


def view_colours(palette: QPalette) -> dict[str, QColor]:
    """The palette's colours for the bars' frame, empty part and text, with the fixed data colours."""
    return {"frame": palette.color(QPalette.ColorRole.Mid), "empty": palette.color(QPalette.ColorRole.Base),
            "text": palette.color(QPalette.ColorRole.Text), "kept": QColor(KEPT), "pruned": QColor(PRUNED)}


class BarDelegate(QStyledItemDelegate):
    """Paints the "Pruned" bar (share of the layer's channels pruned) and the per-channel strip."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index) -> None:
        data = index.data(BAR_ROLE)
        if data is None:
            super().paint(painter, option, index)
            return
        style = option.widget.style() if option.widget is not None else None
        if style is not None:  # the row's background and selection, as the other cells have it
            plain = QStyleOptionViewItem(option)
            self.initStyleOption(plain, index)
            plain.text = ""
            style.drawControl(QStyle.ControlElement.CE_ItemViewItem, plain, painter, option.widget)
        c = view_colours(option.palette)
        box = QRectF(option.rect).adjusted(3, 4, -3, -4)
        painter.save()
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(c["empty"])
        painter.drawRect(box)
        if index.column() == PRUNED_COL:
            pruned, size = data
            if size:
                painter.setBrush(c["pruned"])
                painter.drawRect(QRectF(box.left(), box.top(), box.width() * pruned / size, box.height()))
            text_colour = option.palette.color(QPalette.ColorRole.HighlightedText) \
                if option.state & QStyle.StateFlag.State_Selected else c["text"]
            painter.setPen(text_colour)
            painter.drawText(box.adjusted(4, 0, -4, 0), Qt.AlignmentFlag.AlignCenter, f"{pruned} of {size}")
        else:
            self._strip(painter, box, *data, c)
        painter.setPen(c["frame"])
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawRect(box)
        painter.restore()

    @staticmethod
    def _strip(painter: QPainter, box: QRectF, cut: np.ndarray, heights: np.ndarray, c: dict) -> None:
        """One bar per channel (several channels share a bar when there are more channels than pixels)."""
        n = len(cut)
        bins = max(1, min(n, int(box.width())))
        edges = np.linspace(0, n, bins + 1).round().astype(int)
        step = box.width() / bins
        gap = 1.0 if step >= 4 else 0.0
        for i in range(bins):
            lo, hi = edges[i], max(edges[i + 1], edges[i] + 1)
            h = max(0.12, float(np.max(heights[lo:hi]))) * box.height()
            painter.setBrush(c["pruned"] if cut[lo:hi].any() else c["kept"])
            painter.drawRect(QRectF(box.left() + i * step, box.bottom() - h, step - gap, h))


class LayerView(QTableWidget):
    """The neuron layers of a model, in graph order; with ``pruning``, what a plan prunes in each.

    :meth:`set_layers` gives the layers (``NeuronLayer`` objects, e.g. ``Repairer.layers``) and
    :meth:`set_plan` a :class:`anp_onnx.PrunePlan` and the masks (either may be None).
    """

    HEADERS = ("Neuron layer", "Kind", "Neurons", "Pruned", "Channels")

    def __init__(self, parent: Optional[QWidget] = None, *, pruning: bool = True, name: str = "layerView") -> None:
        super().__init__(0, len(self.HEADERS), parent)
        self.setObjectName(name)
        self.layers: tuple = ()
        self.plan = None
        self.setHorizontalHeaderLabels(self.HEADERS)
        self.horizontalHeaderItem(PRUNED_COL).setToolTip("How many of the layer's channels the current choice prunes")
        self.horizontalHeaderItem(CHANNELS).setToolTip("One bar per channel, as high as its mask; red: pruned")
        header = self.horizontalHeader()
        header.setSectionResizeMode(NAME, QHeaderView.ResizeMode.Stretch)
        for col in (KIND, SIZE):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(PRUNED_COL, QHeaderView.ResizeMode.Fixed)
        header.setSectionResizeMode(CHANNELS, QHeaderView.ResizeMode.Stretch)
        self.setColumnWidth(PRUNED_COL, 84)
        self.verticalHeader().setDefaultSectionSize(22)  # its numbers: the layers' order in the graph
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setTextElideMode(Qt.TextElideMode.ElideLeft)
        self.setWordWrap(False)
        self.delegate = BarDelegate(self)
        for col in (PRUNED_COL, CHANNELS):
            self.setItemDelegateForColumn(col, self.delegate)
            self.setColumnHidden(col, not pruning)

    def set_layers(self, layers: Sequence) -> None:
        self.layers = tuple(layers)
        self.setRowCount(len(self.layers))
        for r, layer in enumerate(self.layers):
            kind = KIND_LABELS.get(layer.kind, layer.kind)
            cells = (layer.name, kind, str(layer.size))
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == SIZE:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                item.setToolTip(f"{layer.name}: {layer.size} {kind} neurons ({layer.op_type} node "
                                f"{layer.node_name or '?'}, layer {r + 1} of {len(self.layers)} in graph order)")
                self.setItem(r, c, item)
        self.set_plan(None)

    def set_plan(self, plan, masks: Optional[Mapping[str, np.ndarray]] = None) -> None:
        """Show what ``plan`` prunes per layer (nothing shown for a layer the plan does not name)."""
        self.plan = plan
        for r, layer in enumerate(self.layers):
            idx = np.asarray(plan.pruned.get(layer.name, ()), dtype=np.int64) if plan is not None else None
            values = np.asarray(masks[layer.name], dtype=np.float32) if masks and layer.name in masks else None
            cut = np.zeros(layer.size, dtype=bool)
            if idx is not None:
                cut[idx[(idx >= 0) & (idx < layer.size)]] = True
            heights = np.clip(values, 0.0, 1.0) if values is not None and values.size == layer.size else \
                np.ones(layer.size, dtype=np.float32)
            for col in (PRUNED_COL, CHANNELS):
                item = QTableWidgetItem(str(int(cut.sum())) if idx is not None and col == PRUNED_COL else "")
                if idx is not None or values is not None:
                    item.setData(BAR_ROLE, (int(cut.sum()), layer.size) if col == PRUNED_COL else (cut, heights))
                item.setToolTip(self._tooltip(layer, cut if idx is not None else None, values))
                self.setItem(r, col, item)
        self.viewport().update()

    @staticmethod
    def _tooltip(layer, cut: Optional[np.ndarray], values: Optional[np.ndarray]) -> str:
        if cut is None:
            text = f"{layer.name}: {layer.size} channels; no pruning chosen yet"
        else:
            k = int(cut.sum())
            text = f"{layer.name}: {k} of {layer.size} channels pruned ({k / layer.size:.0%}), " \
                   f"{layer.size - k} kept"
            which = np.flatnonzero(cut)
            if len(which):
                text += "\npruned channels: " + ", ".join(str(int(i)) for i in which[:24]) + \
                    (f", … ({len(which) - 24} more)" if len(which) > 24 else "")
        if values is not None and values.size:
            text += f"\nmasks {float(values.min()):.3f} to {float(values.max()):.3f}"
        return text

    def pruned_counts(self) -> dict[str, int]:
        """Layer name -> the pruned count its row shows (0 for every layer before a plan is chosen)."""
        return {layer.name: int(self.item(r, PRUNED_COL).text() or 0) for r, layer in enumerate(self.layers)}
