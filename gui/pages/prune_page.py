"""Step 5: choose how many neurons to prune, guided by the pruning curve and the lowest masks."""

from __future__ import annotations

import time

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox, QDoubleSpinBox, QHBoxLayout, QProgressBar, QPushButton, QSlider, QSpinBox, QSplitter, QVBoxLayout,
    QWidget,
)

import anp_onnx
from anp_onnx import DEFAULT_SIGNAL_MAX_DROP, REFERENCE_THRESHOLD, PruneSpec, rank_neurons

from ..plots import PruningCurvePlot
from ..stages import StageClock, duration
from .base import ERROR, WARN, Page, esc, pct, rich
from .layers import LayerView
from .widgets import NeuronTable

THRESHOLD_STEPS = 1000
REFERENCE = PruneSpec.threshold(REFERENCE_THRESHOLD)  # the ANP reference code's choice, until the curve is there


class PrunePage(Page):
    title = "5. Prune"
    subtitle = "Neurons with the lowest masks are pruned (switched off). The automatic choice prunes them in " \
               "order until the backdoor signal of the suspected target is gone or, without one, until clean " \
               "accuracy first falls out of the budget; the slider lets you choose yourself."

    curveFinished = Signal(str)  # "done", "cancelled" or "failed"

    def __init__(self, window) -> None:
        super().__init__(window)
        self._syncing = False
        self._touched = False
        self._curve_running = False
        self._curve_clock = StageClock()
        self._masks = None
        self._ranked: list = []
        row = QHBoxLayout()
        self.mode = QComboBox(self)
        self.mode.setObjectName("pruneMode")
        self.mode.addItem("Automatic", "auto")
        self.mode.addItem("Number of neurons", "count")
        self.mode.addItem("Mask threshold", "threshold")
        self.mode.currentIndexChanged.connect(lambda: self._mode_changed(touched=True))
        self.slider = QSlider(Qt.Orientation.Horizontal, self)
        self.slider.setObjectName("pruneSlider")
        self.slider.setToolTip("How many neurons to prune (lowest masks first). In Automatic mode, moving it "
                               "switches to 'Number of neurons'.")
        self.slider.valueChanged.connect(self._slider_moved)
        self.count = QSpinBox(self)
        self.count.setObjectName("pruneCount")
        self.count.valueChanged.connect(lambda v: self._value_set(v))
        self.threshold = QDoubleSpinBox(self)
        self.threshold.setObjectName("pruneThreshold")
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setDecimals(3)
        self.threshold.setSingleStep(0.01)
        self.threshold.setToolTip("Prune every neuron whose mask is at or below this value "
                                  f"(reference: {REFERENCE_THRESHOLD:g}).")
        self.threshold.valueChanged.connect(lambda v: self._value_set(round(v * THRESHOLD_STEPS)))
        self.budget = QDoubleSpinBox(self)
        self.budget.setObjectName("maxDrop")
        self.budget.setRange(0.0, 50.0)
        self.budget.setDecimals(1)
        self.budget.setSingleStep(0.5)
        self.budget.setPrefix("accuracy budget ")
        self.budget.setSuffix(" points")
        self.budget.setValue(float(self.settings.get("prune/max_drop", 2.0)))
        self.budget.setToolTip("Without a backdoor signal (no suspected target, or it does not go within 10 points), "
                               "the automatic choice prunes until clean accuracy on held-out images first falls more "
                               "than this many percentage points below the original model's.")
        self.budget.editingFinished.connect(self._budget_changed)
        self.drop_label = rich(self, "", "measuredDrop")
        self.drop_label.setToolTip("The held-out clean accuracy the automatic choice costs, as measured on the curve.")
        self.auto = QPushButton("Use automatic choice", self)
        self.auto.setObjectName("autoButton")
        self.auto.clicked.connect(self.use_automatic)
        for w, stretch in ((self.mode, 0), (self.slider, 1), (self.count, 0), (self.threshold, 0), (self.budget, 0),
                           (self.auto, 0)):
            row.addWidget(w, stretch)
        self.body.addLayout(row)
        self.body.addWidget(self.drop_label)
        self.summary = rich(self, "", "pruneSummary")
        self.body.addWidget(self.summary)

        split = QSplitter(Qt.Orientation.Horizontal, self)
        left = QWidget(split)
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        self.plot = PruningCurvePlot(left)
        lv.addWidget(self.plot, 1)
        crow = QHBoxLayout()
        self.curve_button = QPushButton("Compute curve", left)
        self.curve_button.setObjectName("curveButton")
        self.curve_button.clicked.connect(self.compute_curve)
        self.curve_progress = QProgressBar(left)
        self.curve_progress.setObjectName("curveProgress")
        self.curve_cancel = QPushButton("Cancel", left)
        self.curve_cancel.setObjectName("curveCancel")
        self.curve_cancel.setToolTip("Stop measuring the curve; the controls are usable again at once")
        self.curve_cancel.clicked.connect(self.cancel_curve)
        self.curve_cancel.hide()
        crow.addWidget(self.curve_button)
        crow.addWidget(self.curve_progress, 1)
        crow.addWidget(self.curve_cancel)
        lv.addLayout(crow)
        self.curve_info = rich(left, "", "curveInfo")
        lv.addWidget(self.curve_info)
        right = QSplitter(Qt.Orientation.Vertical, split)
        self.layer_view = LayerView(right)  # where the pruned channels sit, layer by layer
        self.neurons = NeuronTable(right)
        self.table = self.neurons.table
        right.addWidget(self.layer_view)
        right.addWidget(self.neurons)
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([560, 440])
        self.body.addWidget(split, 1)
        self._mode_changed()

    def ready(self) -> bool:
        return self.session.masks is not None

    def set_busy(self, busy: bool) -> None:
        for w in (self.mode, self.count, self.threshold, self.budget, self.auto, self.curve_button,
                  self.neurons.layer_filter):
            w.setEnabled(not busy)
        self.slider.setEnabled(not busy and self.session.masks is not None)
        self.auto.setEnabled(not busy and self.session.curve is not None)
        self.curve_cancel.setVisible(self._curve_running)
        self.curve_cancel.setEnabled(self._curve_running and self.win.runner.busy)

    # -- masks and selection ------------------------------------------------------------------
    def refresh(self) -> None:
        s = self.session
        layers = tuple(s.repairer.layers) if s.repairer is not None else ()
        if self.layer_view.layers != layers:
            self.layer_view.set_layers(layers)
        if s.masks is not self._masks:
            self._masks = s.masks
            self._touched = False
            self._ranked = rank_neurons(s.masks, s.mean_masks) if s.masks is not None else []
            self.neurons.set_neurons(self._ranked, list(s.masks or {}))
            self.count.setRange(0, len(self._ranked))
            if s.masks is not None:
                self.set_spec(REFERENCE, touched=False)
            else:
                self.neurons.set_plan(None)
                self.layer_view.set_plan(None)
                self.summary.setText("")
        if s.curve is None:
            self.curve_progress.setRange(0, 1)
            self.curve_progress.setValue(0)
            self.plot.placeholder("The pruning curve appears here once it is computed" if s.masks is not None
                                  else "Run ANP (or load masks) first")
            if not self.win.runner.busy:
                self.curve_info.setText(self._curve_hint())
            if self.mode.currentData() == "auto" and s.masks is not None:
                self.set_spec(REFERENCE, touched=False)
        self.set_busy(self.win.runner.busy)

    def _curve_hint(self) -> str:
        if self.session.curve_set()[0] is None:
            return "<i>Load clean images (Data step) to compute the pruning curve and the automatic choice.</i>"
        return "<i>The curve measures clean accuracy (and ASR with a triggered set) as more neurons are pruned.</i>"

    def activated(self) -> None:
        """The page was opened: compute the curve when there is none yet."""
        s = self.session
        if s.masks is not None and s.curve is None and not self.win.runner.busy and s.curve_set()[0] is not None:
            self.compute_curve()

    def _mode_changed(self, touched: bool = False) -> None:
        mode = self.mode.currentData()
        self.count.setVisible(mode == "count")
        self.threshold.setVisible(mode == "threshold")
        self.budget.setVisible(mode == "auto")
        self.drop_label.setVisible(mode == "auto")
        self._syncing = True
        self.slider.setRange(0, THRESHOLD_STEPS if mode == "threshold" else len(self._ranked))
        self._syncing = False
        self.set_busy(self.win.runner.busy)
        plan = self.session.plan
        if self.session.masks is None:
            return
        if mode == "auto":
            if self.session.curve is None:
                self.summary.setText("The automatic choice needs the pruning curve: click <b>Compute curve</b>.")
            else:
                self._apply(PruneSpec.auto(self.budget.value() / 100), touched)
        elif plan is not None:
            value = plan.count if mode == "count" else round(self._threshold_for(plan.count) * THRESHOLD_STEPS)
            self._value_set(value, touched)

    def _threshold_for(self, count: int) -> float:
        return float(self._ranked[count - 1].mask) if count and self._ranked else 0.0

    def _show_value(self, value: int) -> None:
        self._syncing = True
        try:
            self.slider.setValue(value)
            self.count.setValue(value)
            self.threshold.setValue(value / THRESHOLD_STEPS)
        finally:
            self._syncing = False

    def _slider_moved(self, value: int) -> None:
        """The user moved the slider; in Automatic mode that means "this many neurons" instead."""
        if self._syncing or self.session.masks is None:
            return
        if self.mode.currentData() == "auto":
            self.mode.blockSignals(True)
            self.mode.setCurrentIndex(self.mode.findData("count"))
            self.mode.blockSignals(False)
            self._mode_changed(touched=True)
            self.win.status.setText("Moving the slider switched the choice to 'Number of neurons'.")
        self._value_set(value)

    def _value_set(self, value: int, touched: bool = True) -> None:
        mode = self.mode.currentData()
        if self._syncing or self.session.masks is None or mode == "auto":
            return
        self._show_value(value)
        spec = PruneSpec.count(int(value)) if mode == "count" else PruneSpec.threshold(value / THRESHOLD_STEPS)
        self._apply(spec, touched)

    def set_spec(self, spec: PruneSpec, touched: bool = True) -> None:
        """Select ``spec`` (auto, count or threshold) in the widgets."""
        mode = "count" if spec.mode == "fraction" else spec.mode
        if spec.mode == "auto":
            self.budget.setValue(100 * spec.value)
        self.mode.blockSignals(True)
        self.mode.setCurrentIndex(self.mode.findData(mode))
        self.mode.blockSignals(False)
        self._mode_changed()
        if mode == "threshold":
            self._value_set(round(spec.value * THRESHOLD_STEPS), touched)
        elif mode == "count":
            value = int(spec.value) if spec.mode == "count" else int(spec.value * len(self._ranked))
            self._value_set(value, touched)

    def _apply(self, spec: PruneSpec, touched: bool = True) -> None:
        s = self.session
        self._touched = self._touched or touched
        try:  # with the export's refinements: the library may prune nothing before them (effective_pruning)
            plan = s.repairer.plan(s.masks, spec, tiebreak=s.mean_masks, curve=s.curve, refinements=s.refinements())
        except anp_onnx.AnpOnnxError as exc:
            self.summary.setText(f"<span style='color:{ERROR}'>{esc(exc)}</span>")
            return
        s.plan, s.choice, s.export = plan, spec, None
        if spec.mode == "auto":
            self._show_value(plan.count)
        share = plan.count / plan.total if plan.total else 0
        layers = sum(1 for v in plan.pruned.values() if len(v))
        text = (f"Pruning <b>{plan.count} of {plan.total} neurons</b> ({share:.1%}) in {layers} layer(s): "
                f"{esc(spec.describe())}")
        if s.nothing_pruned_for_refinements():
            text = (f"{nothing_pruned_note()} Without the unlearning, the automatic choice prunes "
                    f"{s.curve.chosen.count} of {plan.total} neurons")
        if plan.count:
            text += f"; highest pruned mask {self._threshold_for(plan.count):.3f}"
        if s.curve is not None and s.curve.points:
            text += self._curve_figures(s.curve, plan.count)
        self.summary.setText(text + ".")
        self._show_drop(spec)
        self.plot.mark(plan.count)
        self.neurons.set_plan(plan)
        self.layer_view.set_plan(plan, s.masks)
        self.win.plan_changed()

    def refinements_changed(self) -> None:
        """The Export step's unlearning was switched on or off: the automatic choice may prune otherwise."""
        s = self.session
        if s.plan is not None and s.choice is not None and \
                anp_onnx.effective_pruning(s.choice, s.refinements()) != s.plan.spec:
            self._apply(s.choice, touched=False)

    @staticmethod
    def _curve_figures(curve, count: int) -> str:
        """What the curve measured for pruning ``count`` neurons; beyond its last point, that it was not measured."""
        last = curve.points[-1]
        if count > last.count:
            return (f". <span style='color:{WARN}'><b>Accuracy not measured</b> for {count} neurons: the curve "
                    f"stops at {last.count} neurons (clean accuracy {pct(last.accuracy)} there); pruning more "
                    f"usually costs more</span>")
        point = curve.at(count)
        where = f"at {count}" if point.count == count else f"at its nearest measured point, {point.count} neurons"
        return (f". Curve {where}: clean accuracy <b>{pct(point.accuracy)}</b> ({drop_text(curve.baseline, point)})"
                + (f", attack success rate <b>{pct(point.asr)}</b>" if point.asr is not None else ""))

    def _show_drop(self, spec: PruneSpec) -> None:
        """Next to the budget: what the automatic choice really costs, warned about when beyond the budget."""
        curve = self.session.curve
        if spec.mode != "auto" or curve is None:
            self.drop_label.setText("")
            return
        drop = curve.baseline - curve.chosen.accuracy
        text = f"The automatic choice, measured: {drop_text(curve.baseline, curve.chosen)}"
        if drop > self.budget.value() / 100 + 1e-9:
            why = (f"the backdoor-signal rule may spend up to {100 * DEFAULT_SIGNAL_MAX_DROP:g} points"
                   if curve.signal_gone else f"the curve was measured with a budget of {100 * curve.max_drop:g}")
            text = f"<span style='color:{WARN}'><b>{text}</b>, more than the budget ({why})</span>"
        if self.session.nothing_pruned_for_refinements():
            text += "; with unlearning on, nothing is pruned, so no accuracy is spent on pruning"
        self.drop_label.setText(text)

    def use_automatic(self) -> None:
        if self.session.curve is not None:
            self.set_spec(PruneSpec.auto(self.budget.value() / 100), touched=False)

    def _budget_changed(self) -> None:
        self.settings.set("prune/max_drop", self.budget.value())
        curve = self.session.curve
        if curve is not None and abs(curve.max_drop - self.budget.value() / 100) > 1e-9:
            self.compute_curve()

    # -- the pruning curve ----------------------------------------------------------------------
    def compute_curve(self) -> None:
        s = self.session
        clean, where = s.curve_set()
        if s.masks is None or clean is None or self.win.runner.busy:
            return
        rep, masks, tiebreak, poisoned, target = s.repairer, s.masks, s.mean_masks, s.poisoned, s.target
        suspected, signal_data = s.suspected_target, s.train
        max_drop = self.budget.value() / 100
        device = s.anp_config.device if s.anp_config is not None else "cpu"
        self._curve_where = where
        self._curve_clock.reset()
        self.curve_info.setText(f"<b>Measuring the pruning curve</b> on {esc(where)}: clean accuracy"
                                + (" and the backdoor signal" if suspected is not None else "")
                                + " as more neurons are pruned. The controls come back when it is done, or "
                                  "press Cancel.")
        self.curve_progress.setRange(0, 0)
        self.curve_progress.setFormat("%v of %m points")

        def job(progress, cancel):
            return rep.pruning_curve(masks, clean, tiebreak=tiebreak, poisoned=poisoned, target=target,
                                     max_drop=max_drop, suspected_target=suspected, signal_data=signal_data,
                                     device=device, progress=progress, cancel=cancel)

        task = self.win.runner.start(
            "Pruning curve", job, on_success=lambda curve: self._curve_done(curve, where),
            on_progress=self._curve_progress, on_failure=lambda f: self._curve_stopped("failed"),
            on_cancel=lambda: self._curve_stopped("cancelled"))
        self._curve_running = task is not None
        self.set_busy(self.win.runner.busy)

    def cancel_curve(self) -> None:
        if self._curve_running:
            self.curve_cancel.setEnabled(False)
            self.curve_info.setText("Cancelling the pruning curve…")
            self.win.runner.cancel()

    def _curve_progress(self, event: anp_onnx.ProgressEvent) -> None:
        if not self._curve_running:
            return
        self._curve_clock.update(event)
        self.curve_progress.setRange(0, event.total)
        self.curve_progress.setValue(event.step)
        self.curve_info.setText(f"<b>Measuring the pruning curve</b> on {esc(self._curve_where)}: "
                                + self._curve_clock.running_text(upper_bound=True)
                                + " (it stops early once accuracy has fallen far).")

    def _curve_stopped(self, state: str) -> None:
        self._curve_running = False
        self.curve_progress.setRange(0, 1)
        self.curve_progress.setValue(0)
        self.curve_progress.setFormat("%p%")
        kept = " The earlier curve is kept." if self.session.curve is not None else \
            " Click <b>Compute curve</b> to measure it again."
        self.curve_info.setText(f"The pruning curve was {state}.{kept}")
        self.set_busy(self.win.runner.busy)
        self.curveFinished.emit(state)

    def _curve_done(self, curve, where: str) -> None:
        s = self.session
        self._curve_running = False
        self.curve_progress.setRange(0, 1)
        self.curve_progress.setValue(1)
        self.curve_progress.setFormat(f"measured in {duration(time.perf_counter() - self._curve_clock.started)}")
        s.curve, s.curve_where = curve, where
        self.plot.show_curve(curve.points, curve.chosen, len(self._ranked), baseline=curve.baseline,
                             max_drop=curve.max_drop)
        chosen = curve.chosen
        if curve.signal_gone:
            how = (f"the fewest neurons whose pruning removes the backdoor signal of suspected target "
                   f"{curve.suspected_target}")
        else:
            how = (f"the pruning just before clean accuracy first drops by more than {100 * curve.max_drop:g} points"
                   + (f" (the backdoor signal of suspected target {curve.suspected_target} did not go)"
                      if curve.signal_gone is False else ""))
        self.curve_info.setText(
            f"Accuracy measured on {esc(where)}; unpruned: {pct(curve.baseline)}. Automatic choice: "
            f"<b>{chosen.count} neurons</b> (mask ≤ {chosen.threshold:.3f}), {esc(how)}: {pct(chosen.accuracy)}"
            + (f", attack success rate {pct(chosen.asr)}" if chosen.asr is not None else "") + ".")
        if self._touched and s.choice is not None:
            self._apply(s.choice, touched=False)  # keep the user's choice, now with curve figures
        else:
            self.use_automatic()
        self.set_busy(self.win.runner.busy)
        self.curveFinished.emit("done")


def nothing_pruned_note() -> str:
    """Why the automatic choice prunes nothing before the unlearning (the library's effective_pruning), in HTML."""
    return (f"<span style='color:{WARN}'><b>With unlearning on (Export step), the automatic choice prunes "
            "nothing</b></span>: on the development bench, unlearning the unpruned model kept more accuracy "
            "than pruning first (if the unlearning changes no weight and the backdoor signal went on the "
            "curve, the automatic choice's neurons are pruned after all). Choose a count or a threshold to "
            "prune anyway.")


def drop_text(baseline: float, point) -> str:
    """How far ``point``'s clean accuracy is below the unpruned ``baseline``, in percentage points."""
    drop = 100 * (baseline - point.accuracy)
    if abs(drop) < 0.05:
        return "no accuracy drop"
    return f"{drop:.1f} points below the unpruned {pct(baseline)}" if drop > 0 else \
        f"{-drop:.1f} points above the unpruned {pct(baseline)}"
