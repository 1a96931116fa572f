"""The window as a tool people choose (issue #14): menus and shortcuts, Help and About, remembered
geometry (in the test's own settings file), drag-and-drop of data, plots that follow the palette
with legends beside the curves, and no clipped text at 1024x700."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QColor, QDropEvent, QPalette
from PySide6.QtWidgets import QAbstractButton, QComboBox, QLabel

import anp_onnx
from gui_support import (  # noqa: F401 - fixtures by name
    TIMEOUT, files, linear_masks, load_clean, open_model, prune_page_with_curve, settings, visible_errors, win,
)


def drop(target, path) -> None:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    target.dropEvent(QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                                Qt.KeyboardModifier.NoModifier))


def test_menus_shortcuts_help_and_about(qtbot, win, files):
    work, model, clean = files
    menus = {a.text().replace("&", ""): a.menu() for a in win.menuBar().actions()}
    assert list(menus) == ["File", "Go", "View", "Help"]
    file_items = [a.text().replace("&", "") for a in menus["File"].actions() if a.text()]
    assert file_items == ["Open model…", "Try a sample", "Open recent", "Save masks…", "Export repaired model…",
                          "Quit"]
    assert not win.save_masks_action.isEnabled() and not win.export_action.isEnabled()
    assert [s.toString() for s in win.next_action.shortcuts()] == ["Alt+Right", "Ctrl+PgDown"]
    assert "Alt+Right" in win.next.toolTip()

    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.go_to("model")
    win.activateWindow()
    qtbot.waitUntil(win.isActiveWindow, timeout=TIMEOUT)
    qtbot.keyClick(win, Qt.Key.Key_Right, Qt.KeyboardModifier.AltModifier)
    assert win.steps.currentRow() == 1
    qtbot.keyClick(win, Qt.Key.Key_Left, Qt.KeyboardModifier.AltModifier)
    assert win.steps.currentRow() == 0

    win.run_page.use_masks(linear_masks(win), "test masks")
    win.prune_page.set_spec(anp_onnx.PruneSpec.count(2))
    assert win.save_masks_action.isEnabled() and win.export_action.isEnabled()
    win.export_page.output.setText(str(work / "menu.onnx"))
    with qtbot.waitSignal(win.export_page.exportFinished, timeout=TIMEOUT) as exported:
        win.export_action.trigger()
    assert exported.args == ["done"] and (work / "menu.onnx").is_file()
    assert win.stack.currentWidget() is win.export_page

    qtbot.keyClick(win, Qt.Key.Key_F1)
    help_box = next(b for b in win.dialogs if b.objectName() == "helpDialog")
    assert help_box.isVisible() and "Try a sample" in help_box.text() and "6. Export" in help_box.text()
    about = [a for a in menus["Help"].actions() if "About" in a.text()][0]
    about.trigger()
    box = next(b for b in win.dialogs if b.objectName() == "aboutDialog")
    import onnx
    import torch
    for name, version in (("anp-onnx", anp_onnx.__version__), ("torch", torch.__version__),
                          ("onnx", onnx.__version__)):
        assert f"<td>{name}</td><td>{version}</td>" in box.text()
    assert "<td>Qt</td>" in box.text() and "<td>onnxruntime</td>" in box.text()
    for b in win.dialogs:
        b.close()
    assert not visible_errors(win)


def test_window_geometry_is_remembered_in_the_given_settings(qtbot, settings):
    from gui.main_window import MainWindow

    first = MainWindow(settings)
    qtbot.addWidget(first)
    first.show()
    first.setGeometry(30, 40, 1111, 733)
    qtbot.waitUntil(lambda: first.height() == 733)
    where, saved = first.geometry(), first.saveGeometry()
    first.close()
    settings.sync()
    assert settings.value("window/geometry") == saved  # in the test's own file, never the user's settings
    assert "settings" in settings.fileName()
    again = MainWindow(settings)
    qtbot.addWidget(again)
    again.show()
    # the offscreen screen is 800 pixels wide: Qt fits the restored width and x into it (a real screen keeps
    # them); the vertical geometry comes back as saved
    assert (again.geometry().y(), again.height()) == (where.y(), 733)
    again.close()


def test_data_dropped_on_the_window_or_a_row_is_loaded(qtbot, win, files):
    work, model, clean = files
    drop(win, clean)  # no model open yet: a data file is not taken
    assert not win.runner.busy and win.session.clean is None
    drop(win, model)
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)
    drop(win, clean)  # now: the clean images, shown at the Data step
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)
    assert win.session.clean is not None and len(win.session.clean) == 64
    assert win.stack.currentWidget() is win.data_page
    drop(win.data_page.rows["test"], clean)  # dropped on the clean test row: the test set
    qtbot.waitUntil(lambda: not win.runner.busy, timeout=TIMEOUT)
    assert win.session.test is not None and win.data_page.rows["test"].edit.text() == str(clean)
    assert not visible_errors(win)


def _overlaps_axes(plot) -> bool:
    plot.draw()
    renderer = plot.get_renderer()
    legends = [*plot.figure.legends, *(ax.get_legend() for ax in plot.figure.axes)]
    boxes = [leg.get_window_extent(renderer) for leg in legends if leg is not None]
    assert boxes, "the plot has a legend"
    return any(box.overlaps(ax.get_window_extent(renderer)) for box in boxes for ax in plot.figure.axes
               if ax.get_visible())


def test_plots_follow_the_palette_and_keep_legends_off_the_curves(qtbot, win, files):
    work, model, clean = files
    prune_page_with_curve(qtbot, win, model, clean)
    curve_plot, loss_plot = win.prune_page.plot, win.run_page.loss_plot
    loss_plot.add(1, {"loss_nat": 1.0, "loss_rob": 2.0, "acc_nat": 0.5})
    loss_plot.add(2, {"loss_nat": 0.9, "loss_rob": 1.5, "acc_nat": 0.6})
    loss_plot.redraw()
    assert not _overlaps_axes(curve_plot) and not _overlaps_axes(loss_plot)

    dark = QPalette()
    for role, colour in ((QPalette.ColorRole.Window, "#202124"), (QPalette.ColorRole.Base, "#2b2c30"),
                         (QPalette.ColorRole.WindowText, "#e8eaed"), (QPalette.ColorRole.Mid, "#5f6368")):
        dark.setColor(role, QColor(colour))
    for plot in (curve_plot, loss_plot, win.run_page.mask_plot):
        plot.setPalette(dark)  # a dark theme: the plot restyles itself
        fig = plot.figure
        assert np.allclose(fig.get_facecolor()[:3], QColor("#202124").getRgbF()[:3], atol=0.01)
        ax = fig.axes[0]
        assert np.allclose(ax.get_facecolor()[:3], QColor("#2b2c30").getRgbF()[:3], atol=0.01)
        assert np.allclose(ax.xaxis.label.get_color()[:3] if not isinstance(ax.xaxis.label.get_color(), str)
                           else QColor(ax.xaxis.label.get_color()).getRgbF()[:3],
                           QColor("#e8eaed").getRgbF()[:3], atol=0.01)
    legend = curve_plot.figure.legends[0]
    assert QColor(legend.get_texts()[0].get_color()).name() == "#e8eaed"


def _clipped(win) -> list[str]:
    """Visible text that does not fit: single-line labels and buttons narrower than their text, wrapped
    labels shorter than their text."""
    page = win.stack.currentWidget()
    out = []
    for w in page.findChildren(QLabel) + page.findChildren(QAbstractButton) + page.findChildren(QComboBox):
        if not w.isVisibleTo(win):
            continue
        if isinstance(w, QLabel) and w.wordWrap():
            if w.text() and w.heightForWidth(w.width()) > w.height() + 1:
                out.append(f"{page.objectName()}: {w.objectName() or w.text()[:40]} needs "
                           f"{w.heightForWidth(w.width())} px of height, has {w.height()}")
        elif w.sizeHint().width() > w.width() + 1:
            out.append(f"{page.objectName()}: {w.objectName() or type(w).__name__} needs {w.sizeHint().width()} "
                       f"px, has {w.width()}")
    return out


def test_every_step_fits_a_1024x700_window(qtbot, win, files):
    work, model, clean = files
    win.resize(1024, 700)
    open_model(qtbot, win, model)
    load_clean(qtbot, win, clean)
    win.settings_page.set_values(iterations=4, batch_size=16)
    win.go_to("run")
    with qtbot.waitSignal(win.run_page.runFinished, timeout=TIMEOUT):
        win.run_page.start()
    with qtbot.waitSignal(win.prune_page.curveFinished, timeout=TIMEOUT):
        win.go_to("prune")
    win.go_to("export")
    win.export_page.output.setText(str(work / "r.onnx"))
    with qtbot.waitSignal(win.export_page.exportFinished, timeout=TIMEOUT):
        win.export_page.export()
    problems = []
    for name in ("model", "data", "settings", "run", "prune", "export"):
        win.go_to(name)
        qtbot.wait(10)
        assert (win.width(), win.height()) == (1024, 700), f"the {name} step made the window grow"
        problems += _clipped(win)
    assert problems == []
