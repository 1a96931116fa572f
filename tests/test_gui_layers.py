"""The model view: the neuron layers of the open model in graph order, and per layer the channels the
library's plan prunes, live on the Prune step (issue: "Desktop app: honest numbers, nothing lost, polish")."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QColor, QPalette

import anp_onnx
from gui_support import (  # noqa: F401 - fixtures by name
    TIMEOUT, files, linear_masks, load_clean, open_model, prune_page_with_curve, settings, visible_errors, win,
)
from gui.pages.layers import BAR_ROLE, CHANNELS, KIND, NAME, PRUNED, PRUNED_COL, SIZE, LayerView


def open_both_kinds(qtbot, win, model) -> None:
    """Open the tiny model with batch-norm and conv neurons: conv 8, bn 8, conv 16, bn 16 in graph order."""
    kinds = win.model_page.kinds
    kinds.setCurrentIndex(kinds.findData("batchnorm,conv"))
    open_model(qtbot, win, model)


def rows(view) -> list[tuple[str, str, int]]:
    return [(view.item(r, NAME).text(), view.item(r, KIND).text(), int(view.item(r, SIZE).text()))
            for r in range(view.rowCount())]


def test_the_model_page_lists_the_neuron_layers_in_graph_order(qtbot, win, files):
    work, model, clean = files
    open_both_kinds(qtbot, win, model)
    view = win.model_page.layers
    layers = win.session.repairer.layers
    assert [(layer.kind, layer.size) for layer in layers] == [("conv", 8), ("batchnorm", 8), ("conv", 16),
                                                              ("batchnorm", 16)]
    shown = rows(view)
    assert [name for name, _, _ in shown] == [layer.name for layer in layers]
    assert [size for _, _, size in shown] == [8, 8, 16, 16]
    assert [kind for _, kind, _ in shown] == ["conv/linear", "batch norm"] * 2
    assert "BatchNormalization node" in view.item(1, KIND).toolTip() and "layer 2 of 4" in view.item(1, KIND).toolTip()
    assert sum(size for _, _, size in shown) == win.session.info.neurons.total == 48
    # the Model step shows the layers only; the Prune step the same layers with their pruning
    assert view.isColumnHidden(PRUNED_COL) and view.isColumnHidden(CHANNELS)
    prune_view = win.prune_page.layer_view
    assert rows(prune_view) == shown and not prune_view.isColumnHidden(PRUNED_COL)
    assert not visible_errors(win)


def test_the_prune_page_shows_the_plans_pruned_channels_per_layer(qtbot, win, files):
    work, model, clean = files
    prune_page_with_curve(qtbot, win, model, clean, opener=open_both_kinds)
    page, view = win.prune_page, win.prune_page.layer_view
    for k in (0, 3, 11, 20, 48):
        page.set_spec(anp_onnx.PruneSpec.count(k))
        plan = win.session.plan
        assert plan.count == k
        counts = view.pruned_counts()
        assert counts == plan.per_layer()
        assert sum(counts.values()) == plan.count == k
        assert sum(int(view.item(r, SIZE).text()) for r in range(view.rowCount())) == plan.total
        for r, layer in enumerate(win.session.repairer.layers):
            cut, heights = view.item(r, CHANNELS).data(BAR_ROLE)
            assert list(np.flatnonzero(cut)) == [int(i) for i in plan.pruned[layer.name]]
            np.testing.assert_allclose(heights, win.session.masks[layer.name])  # the masks as bar heights
            assert view.item(r, PRUNED_COL).data(BAR_ROLE) == (counts[layer.name], layer.size)
            assert f"{counts[layer.name]} of {layer.size} channels pruned" in view.item(r, PRUNED_COL).toolTip()
    # live: the slider and the threshold mode move the bars with the plan
    page.slider.setFocus()
    qtbot.keyClick(page.slider, Qt.Key.Key_Left)
    assert win.session.plan.count == 47 and sum(view.pruned_counts().values()) == 47
    assert view.pruned_counts() == win.session.plan.per_layer()
    page.set_spec(anp_onnx.PruneSpec.threshold(0.5))
    assert view.pruned_counts() == win.session.plan.per_layer() and 0 < win.session.plan.count < 48
    # new masks: no plan is left on the view from the old ones
    win.run_page.use_masks(linear_masks(win), "other masks")
    assert view.pruned_counts() == win.session.plan.per_layer()
    assert not visible_errors(win)


def test_the_layer_view_follows_the_palette(qtbot, win, files):
    """The bars' empty part is the palette's base colour (dark in a dark theme); pruned channels are red."""
    work, model, clean = files
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    masks = {name: np.ones_like(values) for name, values in linear_masks(win).items()}
    masks[next(iter(masks))][0] = 0.99  # the lowest mask, and a full-height bar: channel 0 of the first layer
    win.run_page.use_masks(masks, "test masks")
    win.prune_page.set_spec(anp_onnx.PruneSpec.count(1))
    view = LayerView()  # the Prune step's view, at a known size
    qtbot.addWidget(view)
    view.resize(700, 200)
    view.show()
    view.set_layers(win.session.repairer.layers)
    view.set_plan(win.session.plan, win.session.masks)
    assert view.pruned_counts() == win.prune_page.layer_view.pruned_counts()
    for base in ("#ffffff", "#1e1e1e"):
        palette = QPalette(view.palette())
        palette.setColor(QPalette.ColorRole.Base, QColor(base))
        view.setPalette(palette)
        image = view.viewport().grab().toImage()
        last = view.visualItemRect(view.item(view.rowCount() - 1, PRUNED_COL))  # nothing pruned in that layer
        empty = QPoint(last.right() - 6, last.center().y())
        assert image.pixelColor(empty).name() == base
        strip = view.visualItemRect(view.item(0, CHANNELS))
        first_channel = QPoint(strip.left() + 5, strip.center().y())
        assert image.pixelColor(first_channel).name() == PRUNED
