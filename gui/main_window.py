"""The main window: a list of steps on the left, one page per step, the library's log at the bottom."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from PySide6.QtCore import QByteArray, QSettings, Qt, Signal
from PySide6.QtGui import QCloseEvent, QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import (
    QDockWidget, QFileDialog, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QMainWindow, QMessageBox,
    QProgressBar, QPushButton, QStackedWidget, QVBoxLayout, QWidget,
)

import anp_onnx

from .dialogs import show_error, show_failure
from .log import LogPanel
from .menus import build_menus
from .pages import DataPage, ExportPage, ModelPage, PrunePage, RunPage, SettingsPage
from .pages.model_page import open_job
from .pages.widgets import dropped_paths, is_data_path
from .sample import find_sample, load_sample
from .state import Session, Settings
from .worker import Failure, TaskRunner

STEPS = ("model", "data", "settings", "run", "prune", "export")


class MainWindow(QMainWindow):
    sampleLoaded = Signal()  # "Try a sample" has loaded the model and every data set

    def __init__(self, settings: Optional[Settings | QSettings] = None) -> None:
        super().__init__()
        self.setObjectName("mainWindow")
        self.settings = settings if isinstance(settings, Settings) else Settings(settings)
        self.session = Session()
        self.runner = TaskRunner(self)
        self.runner.busyChanged.connect(self._busy_changed)
        self.runner.taskFailed.connect(self._task_failed)
        self.errors: list[QMessageBox] = []
        self.dialogs: list[QMessageBox] = []  # Help and About, non-modal
        self.sample = find_sample()  # the bundled sample model (None outside a source checkout)
        self.setWindowTitle("anp-onnx: repair backdoored image classifiers")
        self.setAcceptDrops(True)

        self.log = LogPanel(self)
        self.log.attach()
        dock = QDockWidget("Log", self)
        dock.setObjectName("logDock")
        dock.setWidget(self.log)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable |
                         QDockWidget.DockWidgetFeature.DockWidgetClosable)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, dock)
        self.log_dock = dock

        self.steps = QListWidget(self)
        self.steps.setObjectName("stepList")
        self.steps.setFixedWidth(120)
        self.stack = QStackedWidget(self)
        self.stack.setObjectName("pages")
        self.model_page = ModelPage(self)
        self.data_page = DataPage(self)
        self.settings_page = SettingsPage(self)
        self.run_page = RunPage(self)
        self.prune_page = PrunePage(self)
        self.export_page = ExportPage(self)
        self.pages = [self.model_page, self.data_page, self.settings_page, self.run_page, self.prune_page,
                      self.export_page]
        for name, page in zip(STEPS, self.pages):
            page.setObjectName(f"{name}Page")
            self.stack.addWidget(page)
            self.steps.addItem(QListWidgetItem(page.title))
        self.steps.currentRowChanged.connect(self._step_changed)
        self.settings_page.configChanged.connect(self.run_page.refresh)
        self.back = QPushButton("← Back", self)
        self.back.setObjectName("backButton")
        self.back.clicked.connect(lambda: self.go(self.steps.currentRow() - 1))
        self.next = QPushButton("Next →", self)
        self.next.setObjectName("nextButton")
        self.next.clicked.connect(lambda: self.go(self.steps.currentRow() + 1))
        nav = QHBoxLayout()
        nav.addStretch(1)
        nav.addWidget(self.back)
        nav.addWidget(self.next)
        right = QVBoxLayout()
        right.addWidget(self.stack, 1)
        right.addLayout(nav)
        central = QWidget(self)
        row = QHBoxLayout(central)
        row.addWidget(self.steps)
        row.addLayout(right, 1)
        self.setCentralWidget(central)

        self.status = QLabel("Open a model to begin.", self)
        self.status.setObjectName("statusLabel")
        self.busy_bar = QProgressBar(self)
        self.busy_bar.setRange(0, 0)
        self.busy_bar.setMaximumWidth(140)
        self.busy_bar.hide()
        self.stop_button = QPushButton("Stop", self)
        self.stop_button.setObjectName("stopButton")
        self.stop_button.setToolTip("Stop the task that is running")
        self.stop_button.clicked.connect(self.runner.cancel)
        self.stop_button.hide()
        self.statusBar().addWidget(self.status, 1)
        self.statusBar().addPermanentWidget(self.busy_bar)
        self.statusBar().addPermanentWidget(self.stop_button)
        self._closing = False
        self.sample_dir: Optional[Path] = None  # the triggered copy of "Try a sample" (removed on close)
        self._build_menus()
        geometry = self.settings.get("window/geometry")
        if not (isinstance(geometry, QByteArray) and self.restoreGeometry(geometry)):
            self.resize(1200, 820)
        self.resizeDocks([dock], [150], Qt.Orientation.Vertical)
        self.steps.setCurrentRow(0)
        self.session_changed()

    # -- menus ----------------------------------------------------------------------------------
    def _build_menus(self) -> None:
        build_menus(self)
        self._fill_recent()

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        files = self.settings.recent_files()
        for path in files:
            action = self.recent_menu.addAction(Path(path).name)
            action.setToolTip(path)
            action.setEnabled(Path(path).exists())
            action.triggered.connect(lambda checked=False, p=path: self.open_model(p))
        if files:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear list", self._clear_recent)
        else:
            self.recent_menu.addAction("(none)").setEnabled(False)
        self.model_page.refresh_recent()

    def _clear_recent(self) -> None:
        self.settings.clear_recent()
        self._fill_recent()

    # -- opening a model ------------------------------------------------------------------------
    def open_model_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open an ONNX model", self.settings.last_folder("model"),
                                              "ONNX models (*.onnx);;All files (*)")
        if path:
            self.open_model(path)

    def open_model(self, path: str, then: Optional[Callable[[], None]] = None) -> None:
        """Open ``path`` in the background; ``then`` runs once it is open and its conversion check passed."""
        if self.runner.busy:
            self.status.setText("Busy: wait for the current task or cancel it first.")
            return
        opts = self.model_page.options()
        self.settings.remember_folder("model", path)
        self.log.note(f"opening {path}")

        def opened(result) -> None:
            self._opened(*result)
            if then is not None and not result[2]:
                then()

        self.runner.start(f"Opening {Path(path).name}", open_job(path, **opts), on_success=opened)

    def try_sample(self) -> None:
        """One click: the bundled sample model, its clean data, its test set and the triggered copy."""
        if self.runner.busy:
            self.status.setText("Busy: wait for the current task or cancel it first.")
            return
        load_sample(self, self.sample)

    def _opened(self, rep: anp_onnx.Repairer, parity: Optional[float], problem: str) -> None:
        self.session.reset_from("model")
        self.session.repairer, self.session.random_parity = rep, parity
        self.session.info = rep.info()
        self.session.conversion_problem = problem
        self.settings.add_recent(rep.model.path)
        self._fill_recent()
        self.data_page.model_opened()
        self.setWindowTitle(f"anp-onnx: {rep.model.path.name}")
        self.go(0)
        self.session_changed()
        if problem:
            self.error("The conversion check failed", problem)

    # -- navigation and state -------------------------------------------------------------------
    def go(self, index: int) -> None:
        if 0 <= index < len(self.pages) and self._reachable(index):
            self.steps.setCurrentRow(index)

    def go_to(self, name: str) -> None:
        self.go(STEPS.index(name))

    def _reachable(self, index: int) -> bool:
        return all(page.ready() for page in self.pages[1:index + 1])

    def _step_changed(self, index: int) -> None:
        if index < 0:
            return
        self.stack.setCurrentIndex(index)
        self._update_nav()
        activated = getattr(self.pages[index], "activated", None)
        if activated is not None:
            activated()

    def _update_nav(self) -> None:
        for i in range(len(self.pages)):
            item = self.steps.item(i)
            flags = item.flags() | Qt.ItemFlag.ItemIsEnabled
            item.setFlags(flags if self._reachable(i) else flags & ~Qt.ItemFlag.ItemIsEnabled)
        row = self.steps.currentRow()
        self.back.setEnabled(row > 0)
        self.next.setEnabled(row + 1 < len(self.pages) and self._reachable(row + 1))
        if hasattr(self, "next_action"):
            busy = self.runner.busy
            self.back_action.setEnabled(self.back.isEnabled())
            self.next_action.setEnabled(self.next.isEnabled())
            self.save_masks_action.setEnabled(not busy and self.session.masks is not None)
            self.export_action.setEnabled(not busy and self.session.plan is not None)

    def session_changed(self) -> None:
        for page in self.pages:
            page.refresh()
            page.set_busy(self.runner.busy)
        self._update_nav()

    def plan_changed(self) -> None:
        self.export_page.refresh()
        self._update_nav()

    def export_now(self) -> None:
        """File > Export: go to the Export step and write the repaired model there."""
        if self.export_page.ready() and not self.runner.busy:
            self.go_to("export")
            self.export_page.export()

    # -- tasks and errors -----------------------------------------------------------------------
    def _busy_changed(self, busy: bool) -> None:
        task = self.runner.current
        self.busy_bar.setVisible(busy)
        self.stop_button.setVisible(busy)
        if not busy and self._closing:
            self.close()
            return
        self.status.setText(f"{task.name}…" if busy and task is not None else "Ready.")
        self.open_action.setEnabled(not busy)
        self.sample_action.setEnabled(not busy and self.sample is not None)
        self.recent_menu.setEnabled(not busy)
        for page in self.pages:
            page.set_busy(busy)
        self._update_nav()

    def _task_failed(self, name: str, failure: Failure) -> None:
        self.log.note(f"{name} failed: {failure.message}")
        self.status.setText(f"{name} failed.")
        self.errors.append(show_failure(self, f"{name} failed", failure))

    def error(self, title: str, message: str, details: str = "") -> None:
        self.log.note(f"{title}: {message}")
        self.errors.append(show_error(self, title, message, details))

    # -- drag and drop, closing -----------------------------------------------------------------
    def _dropped(self, event) -> Optional[tuple[str, str]]:
        """What a drop would do: ("model", path) for an .onnx file; ("clean", path) for an image folder or
        an .npz once a usable model is open (its clean images); None for anything else."""
        paths = dropped_paths(event)
        model = next((p for p in paths if p.lower().endswith(".onnx")), None)
        if model is not None:
            return "model", model
        data = next((p for p in paths if is_data_path(p)), None)
        if data is not None and self.session.model_usable:
            return "clean", data
        return None

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if not self.runner.busy and self._dropped(event):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        what = self._dropped(event)
        if what is None or self.runner.busy:
            return
        event.acceptProposedAction()
        kind, path = what
        if kind == "model":
            self.open_model(path)
        else:
            self.go_to("data")
            self.data_page.load("clean", path)

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.runner.busy and not self.runner.wait(3000):
            self._closing = True  # close once the task has stopped; never leave a thread running
            self.status.setText("Stopping the current task before closing…")
            event.ignore()
            return
        self.runner.wait(3000)  # a task that has reported but not yet ended: no thread outlives the window
        self.settings.set("window/geometry", self.saveGeometry())
        self.settings.sync()
        self.log.detach()
        if self.sample_dir is not None:
            shutil.rmtree(self.sample_dir, ignore_errors=True)
        super().closeEvent(event)
