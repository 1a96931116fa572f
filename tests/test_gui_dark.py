"""Dark mode (issue #14, "plots and colours follow the palette"): the colours the widgets and the plots
really use, measured in a light and in dark palettes. Text must have a WCAG contrast of at least 4.5:1
against the background it is drawn on (the ratio is computed here, independently of gui.theme), the
pruned neurons' rows must be a tint of the palette's base colour, and every plot's rendered plot area
must be dark under a dark palette and light under a light one, also when the application's palette
changes after the window was made (a desktop switching themes)."""

from __future__ import annotations

import logging
import re

import matplotlib.colors as mcolors
import numpy as np
import pytest
from PySide6.QtCore import QPoint
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

import anp_onnx
from gui_support import (  # noqa: F401 - fixtures by name
    TIMEOUT, files, linear_masks, load_clean, open_model, prune_page_with_curve, settings, visible_errors, win,
)

from gui.pages.base import RichLabel
from gui.theme import dark_palette

Role = QPalette.ColorRole
TEXT = 4.5  # WCAG AA for body text; the secondary text (subtitles, paths, notes) is held to it too


def relative_luminance(colour) -> float:
    """WCAG 2.x relative luminance of an sRGB colour."""
    c = QColor(colour)

    def linear(v: int) -> float:
        s = v / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    return 0.2126 * linear(c.red()) + 0.7152 * linear(c.green()) + 0.0722 * linear(c.blue())


def contrast_ratio(a, b) -> float:
    la, lb = relative_luminance(a), relative_luminance(b)
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def test_the_contrast_formula():
    assert contrast_ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast_ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # the classic just-failing grey
    assert contrast_ratio("#ffffff", "#ffffff") == pytest.approx(1.0)


def palettes() -> dict[str, QPalette]:
    """Qt's light default, the dark theme of the screenshots, and a dark palette Qt derives from one colour."""
    return {"light": QPalette(QApplication.palette()), "dark": dark_palette(), "derived dark": QPalette(QColor("#353535"))}


@pytest.fixture
def app_palette(qtbot, win):
    """Set the application's palette (as a desktop theme does: Qt hands it to the widgets in posted
    events); the original comes back afterwards."""
    app = QApplication.instance()
    original = QPalette(app.palette())

    def set_palette(palette: QPalette) -> None:
        app.setPalette(palette)
        qtbot.waitUntil(lambda: win.model_page.palette().color(Role.Base) == palette.color(Role.Base))
        qtbot.wait(20)

    yield set_palette
    app.setPalette(original)
    QApplication.processEvents()


def html_colours(html: str) -> list[str]:
    return re.findall(r"color\s*:\s*(#[0-9a-fA-F]{6})", html)


def test_pruned_neuron_rows_are_a_readable_tint_of_the_palette(qtbot, win, files):
    work, model, clean = files
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.run_page.use_masks(linear_masks(win), "test masks")
    win.go_to("prune")
    win.prune_page.set_spec(anp_onnx.PruneSpec.count(5))
    table = win.prune_page.table
    for name, palette in palettes().items():
        win.setPalette(palette)  # the table fills its rows again in the new palette
        base, text = table.palette().color(Role.Base), table.palette().color(Role.Text)
        pruned = [r for r in range(table.rowCount()) if table.item(r, 3).text() == "yes"]
        assert len(pruned) == 5
        for r in pruned:
            bg, fg = table.item(r, 0).background().color(), table.item(r, 2).foreground().color()
            assert fg == text, name
            assert contrast_ratio(fg, bg) >= TEXT, f"{name}: {fg.name()} on {bg.name()}"
            assert bg.red() > bg.green() and bg.red() > bg.blue(), f"{name}: a red tint, not {bg.name()}"
            # a tint of the base colour: dark in a dark theme (no light pink there), light in a light one
            assert (relative_luminance(bg) < 0.2) == (relative_luminance(base) < 0.2), name
        table.scrollToTop()
        qtbot.wait(10)
        image = table.viewport().grab().toImage()
        cell = table.visualItemRect(table.item(pruned[0], 1))
        painted = image.pixelColor(QPoint(cell.left() + 3, cell.top() + 3))
        assert painted.name() == table.item(pruned[0], 1).background().color().name(), name
        kept = next(r for r in range(table.rowCount()) if table.item(r, 3).text() == "")
        assert table.item(kept, 0).background().style().name == "NoBrush"
    assert not visible_errors(win)


def test_subtitles_paths_and_status_text_are_readable_in_light_and_dark(qtbot, win, files, app_palette):
    """Every rich-text label of every step (subtitles, the model's folder, the red/orange/green status
    words), the log's warnings and the default text, against the background they are drawn on."""
    work, model, clean = files
    prune_page_with_curve(qtbot, win, model, clean)  # the tiny model has no backdoor signal: a warning shows
    win.log.append("12:00:00  WARNING a warning", logging.WARNING)
    win.log.append("12:00:00  ERROR   an error", logging.ERROR)
    seen = set()
    for name, palette in palettes().items():
        app_palette(palette)
        labels = [lab for lab in win.findChildren(RichLabel) if lab.text()]
        heads = [lab for lab in labels if lab.objectName() == "pageHead"]
        assert len(heads) == 6
        for label in labels:
            window, plain = label.palette().color(Role.Window), label.palette().color(Role.WindowText)
            assert contrast_ratio(plain, window) >= TEXT
            for colour in html_colours(label.text()):
                seen.add(colour)
                assert contrast_ratio(colour, window) >= TEXT, \
                    f"{name}: {label.objectName() or label.text()[:40]!r} has {colour} on {window.name()}"
        for head in heads:  # the subtitle: secondary, so neither the text colour nor hard to read
            (subtitle,) = html_colours(head.text())
            assert QColor(subtitle) != head.palette().color(Role.WindowText)
        path = win.model_page.path_label
        assert str(model.parent) in path.text() and len(html_colours(path.text())) == 1
        assert html_colours(win.prune_page.summary.text()), "the warning is coloured"
        log_base = win.log.text.palette().color(Role.Base)
        log_colours = html_colours(win.log.text.document().toHtml())
        assert len(set(log_colours)) >= 2, "the warning and the error are coloured"
        for colour in log_colours:
            assert contrast_ratio(colour, log_base) >= TEXT, f"{name}: log {colour} on {log_base.name()}"
    assert len(seen) >= 8  # light and dark versions of the subtitle, warning and success colours at least
    assert not visible_errors(win)


def _plot_area_pixel(plot) -> QColor:
    """The most frequent colour the widget shows inside the axes (the plot area, not a curve)."""
    plot.draw()
    image = plot.grab().toImage()
    box = plot.ax.get_window_extent()
    ratio = plot.devicePixelRatioF()
    x0, x1 = int(box.x0 / ratio) + 3, int(box.x1 / ratio) - 3
    y0, y1 = int(plot.height() - box.y1 / ratio) + 3, int(plot.height() - box.y0 / ratio) - 3
    assert x1 - x0 > 50 and y1 - y0 > 50, "the axes are visible"
    colours: dict[str, int] = {}
    for x in range(x0, x1, 4):
        for y in range(y0, y1, 4):
            key = image.pixelColor(x, y).name()
            colours[key] = colours.get(key, 0) + 1
    return QColor(max(colours, key=colours.get))


def _text_contrasts(plot) -> list[tuple[str, float]]:
    """Each visible text of the figure with its contrast against what it is drawn on."""
    fig, ax = plot.figure, plot.ax
    figure_bg, axes_bg = QColor.fromRgbF(*fig.get_facecolor()[:3]), QColor.fromRgbF(*ax.get_facecolor()[:3])

    def colour(artist) -> QColor:
        return QColor.fromRgbF(*mcolors.to_rgb(artist.get_color()))

    out = []
    texts = [ax.xaxis.label, ax.yaxis.label, ax.title, *ax.get_xticklabels(), *ax.get_yticklabels()]
    for extra in fig.axes[1:]:  # the loss plot's accuracy axis
        texts += [extra.yaxis.label, *extra.get_yticklabels()]
    for legend in [*fig.legends, *(a.get_legend() for a in fig.axes)]:
        if legend is not None:
            texts += legend.get_texts()
    for text in texts + list(fig.texts):
        if text.get_visible() and text.get_text():
            out.append((text.get_text(), contrast_ratio(colour(text), figure_bg)))
    for text in ax.texts:  # notes inside the plot area
        out.append((text.get_text(), contrast_ratio(colour(text), axes_bg)))
    return out


def test_every_plot_follows_the_palette_when_drawn_and_rendered(qtbot, win, files, app_palette):
    """The loss plot, the mask histogram and the pruning curve (and their placeholders): background,
    plot area, text, ticks, grid and legend in the palette's colours, re-styled when the application's
    palette changes, and the rendered plot area dark in a dark theme."""
    work, model, clean = files
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    run = win.run_page
    placeholders = {"loss": run.loss_plot.note.get_text()}
    run.use_masks(linear_masks(win), "test masks")
    with qtbot.waitSignal(win.prune_page.curveFinished, timeout=TIMEOUT):
        win.go_to("prune")
    win.prune_page.set_spec(anp_onnx.PruneSpec.count(win.session.curve.points[-1].count + 3))  # the shaded note
    assert win.prune_page.plot.unmeasured_note.get_visible()
    for step, (nat, rob, acc) in enumerate(((2.3, 2.9, 0.2), (1.6, 2.4, 0.5), (1.1, 1.9, 0.7)), start=1):
        run.loss_plot.add(step, {"loss_nat": nat, "loss_rob": rob, "acc_nat": acc})
    run.loss_plot.redraw()
    run.mask_plot.show_masks({k: np.ones_like(v) for k, v in linear_masks(win).items()}, threshold=0.2)
    plots = {"loss": run.loss_plot, "masks": run.mask_plot, "curve": win.prune_page.plot}
    assert placeholders["loss"], "the loss plot had a placeholder note before the run"
    for name, palette in palettes().items():
        app_palette(palette)  # after the plots were made and drawn: they re-style themselves
        dark = relative_luminance(palette.color(Role.Base)) < 0.2
        for which, plot in plots.items():
            win.go_to("prune" if which == "curve" else "run")  # the plot shown, at its size in the window
            qtbot.wait(10)
            area = _plot_area_pixel(plot)
            assert area.name() == plot.palette().color(Role.Base).name(), f"{name} {which}: {area.name()}"
            assert (relative_luminance(area) < 0.2) == dark, f"{name} {which}: plot area {area.name()}"
            corner = plot.grab().toImage().pixelColor(2, 2)
            assert corner.name() == plot.palette().color(Role.Window).name(), f"{name} {which}: {corner.name()}"
            for text, ratio in _text_contrasts(plot):
                assert ratio >= TEXT, f"{name} {which}: {text!r} has contrast {ratio:.2f}"
            ax = plot.ax
            grid = [line for line in ax.get_xgridlines() + ax.get_ygridlines() if line.get_visible()]
            assert grid, f"{which} has a grid"
            text_rgb = QColor(plot.palette().color(Role.WindowText)).getRgbF()[:3]
            for line in grid:
                assert np.allclose(mcolors.to_rgb(line.get_color()), text_rgb, atol=0.01)
            assert np.allclose(mcolors.to_rgb(ax.xaxis.get_ticklines()[0].get_color()), text_rgb, atol=0.01)
    # a placeholder's note, on the figure's background, in the palette's secondary text colour
    app_palette(dark_palette())
    run.loss_plot.reset()
    run.loss_plot.draw()
    (ratio,) = [r for t, r in _text_contrasts(run.loss_plot) if t == placeholders["loss"]]
    assert ratio >= TEXT
    assert not visible_errors(win)
