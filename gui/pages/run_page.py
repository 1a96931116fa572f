"""Step 4: run the ANP optimisation in the background, with live plots and a working Cancel."""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFileDialog, QHBoxLayout, QProgressBar, QPushButton, QSplitter

import anp_onnx
from anp_onnx import REFERENCE_THRESHOLD, PruneSpec

from ..plots import LossPlot, MaskHistogram
from ..stages import StageClock, duration, stage_name
from .base import ERROR, Page, esc, rich

REDRAW_SECONDS = 0.5  # live plots: at most two redraws a second


class RunPage(Page):
    title = "4. Run"
    subtitle = "ANP learns a mask value for every neuron: neurons the backdoor depends on get low values. " \
               "You can cancel at any time; nothing is written until the Export step."

    runFinished = Signal(str)  # "done", "cancelled" or "failed"

    def __init__(self, window) -> None:
        super().__init__(window)
        self.state = "idle"
        self.summary = rich(self, "", "runSummary")
        self.body.addWidget(self.summary)
        row = QHBoxLayout()
        self.start_button = QPushButton("Start ANP", self)
        self.start_button.setObjectName("startButton")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setObjectName("cancelButton")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar(self)
        self.progress.setObjectName("runProgress")
        self.progress.setFormat("%p%")
        self.eta = rich(self, "", "etaLabel")
        self.load_button = QPushButton("Load masks…", self)
        self.load_button.setObjectName("loadMasksButton")
        self.load_button.setToolTip("Use masks saved earlier (masks JSON or the reference mask_values.txt) "
                                    "instead of running ANP again.")
        self.load_button.clicked.connect(self.browse_masks)
        self.save_button = QPushButton("Save masks…", self)
        self.save_button.setObjectName("saveMasksButton")
        self.save_button.clicked.connect(self.browse_save_masks)
        for w in (self.start_button, self.cancel_button):
            row.addWidget(w)
        row.addWidget(self.progress, 1)
        row.addWidget(self.load_button)
        row.addWidget(self.save_button)
        self.body.addLayout(row)
        self.body.addWidget(self.eta)
        self.result = rich(self, "", "runResult")
        self.body.addWidget(self.result)
        split = QSplitter(self)
        self.loss_plot = LossPlot(split)
        self.mask_plot = MaskHistogram(split)
        split.addWidget(self.loss_plot)
        split.addWidget(self.mask_plot)
        self.body.addWidget(split, 1)
        self._started = 0.0
        self._drawn = 0.0
        self.clock = StageClock()
        self._kept_centres = None  # the renormalised layers' centres before a run (put back if it does not finish)
        self.refresh()

    def ready(self) -> bool:
        return self.session.model_usable

    def set_busy(self, busy: bool) -> None:
        running = self.state == "running"
        self.start_button.setEnabled(not busy and self.session.train is not None)
        self.cancel_button.setEnabled(busy and running)
        self.load_button.setEnabled(not busy and self.session.repairer is not None)
        self.save_button.setEnabled(not busy and self.session.masks is not None)

    def refresh(self) -> None:
        s = self.session
        try:
            config = s.run_config()
        except anp_onnx.AnpOnnxError as exc:
            self.summary.setText(f"<span style='color:{ERROR}'>{esc(exc)}</span>")
            return
        if s.train is None:
            self.summary.setText("<i>Load clean images at the Data step first (or load saved masks).</i>")
        else:
            neurons = s.info.neurons
            self.summary.setText(
                f"Ready: <b>{len(s.train)} clean images</b>, <b>{neurons.total} neurons</b> in "
                f"{len(neurons.layers)} layers, <b>{config.iterations} iterations</b> of {config.batch_size} "
                f"images (eps {config.eps:g}, alpha {config.alpha:g}) on <b>{esc(config.device)}</b>.")
        if s.masks is None and self.state not in ("running", "cancelling", "cancelled", "failed"):
            self.result.setText("")
        self.set_busy(self.win.runner.busy)

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.session
        if s.train is None or self.win.runner.busy:
            return
        try:
            config = s.run_config()
        except anp_onnx.AnpOnnxError as exc:
            self.win.error("Cannot start", str(exc))
            return
        rep, train = s.repairer, s.train
        # the last finished result (masks, curve, choice) stays until this run finishes: a cancel or a
        # failure keeps it; the run only changes the renormalised layers' centres, saved to put back
        self._kept_centres = rep.centres
        self.state = "running"
        self.progress.setRange(0, config.iterations)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self.eta.setText(f"Starting: the calibration of renormalised neurons and the collapse probe (where they "
                         f"apply) run first, then {config.iterations:,} ANP iterations.")
        self.result.setText("")
        self.loss_plot.reset(config.iterations)
        self.clock.reset()
        self._started = time.perf_counter()
        self._drawn = 0.0
        self.win.runner.start(
            "ANP optimisation", lambda progress, cancel: rep.optimize(train, config, progress=progress, cancel=cancel),
            on_success=lambda result: self._done(result, config), on_progress=self._progress,
            on_cancel=self._cancelled, on_failure=self._failed)
        self.set_busy(True)

    def cancel(self) -> None:
        if self.state == "running":
            self.state = "cancelling"
            self.eta.setText("Cancelling…")
            self.cancel_button.setEnabled(False)
            self.win.runner.cancel()

    def _progress(self, event: anp_onnx.ProgressEvent) -> None:
        if self.state != "running":
            return
        self.clock.update(event)
        if self.progress.maximum() != event.total:
            self.progress.setRange(0, event.total)
        self.progress.setFormat(f"{stage_name(event.stage)}: %p%")
        self.progress.setValue(event.step)
        self.eta.setText(self.clock.text())
        if event.stage != "optimise":
            return
        self.loss_plot.add(event.step, event.metrics)
        now = time.perf_counter()
        if self.isVisible() and (now - self._drawn >= REDRAW_SECONDS or event.step == event.total):
            self.loss_plot.redraw()
            if event.payload and "masks" in event.payload:
                self.mask_plot.show_masks(event.payload["masks"], step=event.step)
            self._drawn = time.perf_counter()

    def _done(self, result: anp_onnx.MaskResult, config: anp_onnx.ANPConfig) -> None:
        self.state = "done"
        self._kept_centres = None
        self.use_masks(result.masks, f"ANP run ({result.iterations} iterations)", result, result.mean_masks,
                       result.target, config)
        self.clock.finish()
        self.progress.setFormat("%p%")
        self.progress.setRange(0, result.iterations)
        self.progress.setValue(result.iterations)
        self.eta.setText(f"Finished {result.iterations:,} iterations; {self.clock.done_text()} "
                         f"(total {duration(time.perf_counter() - self._started)}).")
        self.loss_plot.set_history(result.history)
        self.runFinished.emit("done")

    def _cancelled(self) -> None:
        self.state = "cancelled"
        self.eta.setText(f"Cancelled during the {stage_name(self.clock.stage or 'optimise').lower()}.")
        self.result.setText("<b>Cancelled.</b> The masks of the stopped run were discarded; nothing was written."
                            + self._keep_previous())
        self.set_busy(False)
        self.runFinished.emit("cancelled")

    def _failed(self, failure) -> None:
        self.state = "failed"
        self.eta.setText("Failed.")
        self.result.setText(f"<span style='color:{ERROR}'><b>Failed:</b> {esc(failure.message)}</span>"
                            + self._keep_previous())
        self.set_busy(False)
        self.runFinished.emit("failed")

    def _keep_previous(self) -> str:
        """After a run that did not finish: the previous result is still the session's; say so, show it again."""
        s = self.session
        if self._kept_centres is not None:
            s.repairer.set_centres(self._kept_centres)  # as the kept masks were learnt
            self._kept_centres = None
        if s.masks is None:
            self.loss_plot.reset()
            return ""
        self.mask_plot.show_masks(s.masks, threshold=REFERENCE_THRESHOLD)
        if s.mask_result is not None:
            self.loss_plot.set_history(s.mask_result.history)
        else:
            self.loss_plot.reset()
        choice = f" and the choice of {s.plan.count} neurons" if s.plan is not None else ""
        return (f"<br>The previous masks ({esc(s.masks_source)}){choice} are kept: <b>Prune</b> and <b>Export</b> "
                "work on them.")

    def use_masks(self, masks: dict, source: str, result=None, mean_masks=None, suspected_target=None,
                  config=None) -> None:
        """Make ``masks`` the session's; ``result`` and ``config`` (the resolved ANPConfig) when learnt here."""
        s = self.session
        s.reset_from("masks")
        s.masks, s.mask_result, s.masks_source = masks, result, source
        s.masks_config = config if result is not None else None
        s.mean_masks = dict(mean_masks) if mean_masks else None
        s.suspected_target = suspected_target
        values = [float(v) for m in masks.values() for v in m]
        low = sum(v <= REFERENCE_THRESHOLD for v in values)
        seconds = f" in {duration(result.seconds)} on {esc(result.device)}" if result is not None else ""
        probe = ""
        if result is not None and result.probe is not None:
            probe = f" Collapse probe: {esc(result.probe.describe())}."
        noise = (f" Neuron noise targeted at class {suspected_target}." if suspected_target is not None
                 else " Neuron noise untargeted (the reference's).") if result is not None else ""
        self.result.setText(f"<b>Masks ready</b> ({esc(source)}{seconds}): {low} of {len(values)} neurons have a "
                            f"mask of {REFERENCE_THRESHOLD:g} or less.{probe}{noise} Continue with <b>Prune</b>.")
        self.mask_plot.show_masks(masks, threshold=REFERENCE_THRESHOLD)
        self.win.session_changed()

    # -- mask files -----------------------------------------------------------------------------
    def browse_masks(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load masks", self.settings.last_folder("masks"),
                                              "Masks (*.json *.txt);;All files (*)")
        if path:
            self.load_masks(path)

    def load_masks(self, path: str) -> None:
        rep = self.session.repairer
        try:
            masks, facts = anp_onnx.load_masks(path)
            rep.plan(masks, PruneSpec.count(0))  # checks that they fit this model
            rep.set_centres(facts.get("centres") or {})  # renormalised layers, as when the masks were learnt
        except anp_onnx.AnpOnnxError as exc:
            self.win.error("Cannot use these masks", str(exc))
            return
        self.settings.remember_folder("masks", path)
        self.state = "idle"
        self.loss_plot.reset()
        target = facts.get("suspected_target")
        self.use_masks(dict(masks), f"loaded from {Path(path).name}", mean_masks=facts.get("mean_masks"),
                       suspected_target=target if isinstance(target, int) else None)

    def browse_save_masks(self) -> None:
        s = self.session
        start = str(Path(self.settings.last_folder("masks")) / (s.model_path.stem + ".masks.json"))
        path, _ = QFileDialog.getSaveFileName(self, "Save masks", start, "Masks JSON (*.json)")
        if path:
            self.save_masks(path)

    def save_masks(self, path: str) -> list[Path]:
        s = self.session
        extra = {"preprocessing": s.repairer.preprocessing.to_dict()}
        if s.masks_config is not None:
            extra["config"] = s.masks_config.to_dict()
        extra["suspected_target"] = s.suspected_target
        try:
            files = s.repairer.save_masks(s.masks, path, extra, mean_masks=s.mean_masks)
        except (OSError, anp_onnx.AnpOnnxError) as exc:
            self.win.error("Cannot save the masks", str(exc))
            return []
        self.settings.remember_folder("masks", path)
        self.win.log.note("saved masks: " + ", ".join(str(f) for f in files))
        return files
