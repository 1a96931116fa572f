"""Matplotlib canvases (Qt backend): ANP losses, mask distribution, and the pruning curve.

Their background, plot area, text, ticks, grid and frames take the widget's palette (a dark desktop
theme gives dark plots, and a palette change, the application's included, restyles them); only the
data colours are fixed. The legends sit outside the axes, never over a curve.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from PySide6.QtCore import QEvent
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QSizePolicy, QWidget

from .theme import muted_text

_BLUE, _ORANGE, _GREEN, _RED, _GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#7f7f7f"


class PlotCanvas(FigureCanvasQTAgg):
    """A figure with one axes, no pyplot state involved.

    Live plots use fixed margins (``margins``): a layout engine would cost more than the drawing itself.
    """

    def __init__(self, parent: Optional[QWidget] = None, *, width: float = 5.0, height: float = 3.0,
                 margins: Optional[dict] = None) -> None:
        self.figure = Figure(figsize=(width, height), dpi=90, layout=None if margins else "constrained")
        if margins:
            self.figure.subplots_adjust(**margins)
        super().__init__(self.figure)
        self.setPalette(QPalette())  # matplotlib gives the canvas a white palette of its own: inherit instead
        self.setParent(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(260, 180)
        self.ax = self.figure.add_subplot(1, 1, 1)
        self.note = self.figure.text(0.5, 0.5, "", ha="center", va="center", wrap=True)
        self.style()

    def colours(self) -> dict[str, str]:
        """The palette's colours for the figure: background, plot area, text, the light lines (frames,
        grid), and secondary text on the figure (``note``) and in the plot area (``axes_note``)."""
        pal = self.palette()
        name = lambda role: pal.color(role).name()  # noqa: E731
        return {"figure": name(QPalette.ColorRole.Window), "axes": name(QPalette.ColorRole.Base),
                "text": name(QPalette.ColorRole.WindowText), "muted": name(QPalette.ColorRole.Mid),
                "note": muted_text(pal).name(), "axes_note": muted_text(pal, QPalette.ColorRole.Base).name()}

    def style(self) -> None:
        """Apply the palette to the figure, every axes and the legends (after each redraw of the axes)."""
        c = self.colours()
        self.figure.set_facecolor(c["figure"])
        self.note.set_color(c["note"])
        for ax in self.figure.axes:
            ax.set_facecolor(c["axes"])
            ax.tick_params(colors=c["text"], grid_color=c["text"], which="both")
            for spine in ax.spines.values():
                spine.set_edgecolor(c["muted"])
            for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
                text.set_color(c["text"])
            for text in ax.texts:  # notes inside the plot area
                text.set_color(c["axes_note"])
        for legend in [*self.figure.legends, *(ax.get_legend() for ax in self.figure.axes)]:
            if legend is not None:
                legend.get_frame().set_facecolor(c["axes"])
                legend.get_frame().set_edgecolor(c["muted"])
                for text in legend.get_texts():
                    text.set_color(c["text"])

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() in (QEvent.Type.PaletteChange, QEvent.Type.ApplicationPaletteChange) and \
                hasattr(self, "note"):  # (matplotlib sets a palette before the figure is made)
            self.style()
            self.draw_idle()

    def placeholder(self, text: str) -> None:
        self.ax.clear()
        self.ax.set_axis_off()
        for legend in list(self.figure.legends):
            legend.remove()
        self.note.set_text(text)
        self.draw_idle()

    def _axes_on(self) -> None:
        self.note.set_text("")
        self.ax.set_axis_on()


class LossPlot(PlotCanvas):
    """ANP losses (clean and perturbed) and clean batch accuracy against the iteration.

    Points are added with :meth:`add` (cheap) and shown with :meth:`redraw`, which only updates the
    lines' data, so live updates stay fast.
    """

    KEYS = ("loss_nat", "loss_rob", "acc_nat")

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent, margins=dict(left=0.13, right=0.87, bottom=0.15, top=0.8))
        self.acc_ax = self.ax.twinx()
        self.lines = {
            "loss_nat": self.ax.plot([], [], color=_BLUE, label="loss on clean images")[0],
            "loss_rob": self.ax.plot([], [], color=_ORANGE, label="loss with perturbed neurons")[0],
            "acc_nat": self.acc_ax.plot([], [], color=_GREEN, linestyle="--", label="clean accuracy (batch)")[0],
        }
        self.ax.set_xlabel("iteration")
        self.ax.set_ylabel("cross-entropy loss")
        self.ax.grid(True, alpha=0.2)
        self.acc_ax.set_ylim(0, 1.02)
        self.acc_ax.set_ylabel("accuracy")
        self.legend = self.ax.legend(list(self.lines.values()), [line.get_label() for line in self.lines.values()],
                                     loc="lower left", bbox_to_anchor=(0.0, 1.02, 1.0, 0.2), mode="expand", ncol=2,
                                     fontsize="small", borderaxespad=0.0, frameon=False)
        self.style()
        self.reset()

    def placeholder(self, text: str) -> None:  # keep the axes: only hide them
        self.ax.set_visible(False)
        self.acc_ax.set_visible(False)
        self.note.set_text(text)
        self.draw_idle()

    def reset(self, total: Optional[int] = None) -> None:
        self.steps: list[int] = []
        self.series: dict[str, list[float]] = {k: [] for k in self.KEYS}
        self.total = total
        self.placeholder("The losses appear here while ANP runs")

    def add(self, step: int, metrics: dict) -> None:
        self.steps.append(step)
        for key in self.KEYS:
            self.series[key].append(float(metrics.get(key, np.nan)))

    def set_history(self, history: dict, every: int = 10) -> None:
        """Show a finished run's full history, averaged over windows of ``every`` iterations."""
        n = len(history.get("loss_nat", []))
        self.steps, self.series = [], {k: [] for k in self.KEYS}
        for end in range(every, n + every, every):
            end = min(end, n)
            self.steps.append(end)
            for key in self.KEYS:
                values = history.get(key, [])[max(0, end - every):end]
                self.series[key].append(float(np.mean(values)) if values else np.nan)
        self.redraw()

    def redraw(self) -> None:
        if not self.steps:
            return
        self.note.set_text("")
        self.ax.set_visible(True)
        self.acc_ax.set_visible(True)
        for key, line in self.lines.items():
            line.set_data(self.steps, self.series[key])
        self.ax.relim()
        self.ax.autoscale_view()
        self.ax.set_xlim(0, max(self.total or 0, self.steps[-1], 1))
        self.draw_idle()


class MaskHistogram(PlotCanvas):
    """How many neurons have each mask value; low masks are the pruning candidates."""

    BINS = np.linspace(0.0, 1.0, 21)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent, margins=dict(left=0.13, right=0.96, bottom=0.15, top=0.9))
        self.placeholder("The distribution of mask values appears here")

    def style(self) -> None:
        super().style()
        for patch in self.ax.patches:  # the bars are set apart by the plot area's colour
            patch.set_edgecolor(self.colours()["axes"])

    def show_masks(self, masks: dict, threshold: Optional[float] = None, step: Optional[int] = None) -> None:
        values = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in masks.values()]) if masks else \
            np.zeros(0, np.float32)
        ax = self.ax
        ax.clear()
        self._axes_on()
        counts, edges, patches = ax.hist(values, bins=self.BINS, color=_BLUE)
        if threshold is not None:
            for patch, left in zip(patches, edges[:-1]):
                if left < threshold:
                    patch.set_facecolor(_RED)
            ax.axvline(threshold, color=_RED, linestyle="--", linewidth=1)
        ax.set_yscale("log" if len(values) and counts.max() > 50 else "linear")
        ax.set_xlim(0, 1)
        ax.set_xlabel("mask value (0 = neuron switched off, 1 = untouched)")
        ax.set_ylabel("neurons")
        title = f"Mask values of {len(values)} neurons"
        ax.set_title(title + (f" (iteration {step})" if step else ""), fontsize="medium")
        ax.grid(True, alpha=0.2)
        self.style()
        self.draw_idle()


class PruningCurvePlot(PlotCanvas):
    """Clean accuracy (and ASR) against the number of pruned neurons, with the choices marked."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent, width=6.0, height=3.2)
        self.current_line = None
        self.unmeasured = None  # the shaded region beyond the last measured point, when the choice is there
        self.unmeasured_note = None
        self.measured_to = 0
        self.placeholder("The pruning curve appears here once it is computed")

    def show_curve(self, points: Sequence, chosen=None, total: Optional[int] = None, *,
                   baseline: Optional[float] = None, max_drop: Optional[float] = None) -> None:
        ax = self.ax
        ax.clear()
        self._axes_on()
        counts = [p.count for p in points]
        ax.plot(counts, [np.nan if p.accuracy is None else p.accuracy for p in points], marker="o", markersize=3,
                color=_BLUE, label="clean accuracy")
        asr = [p.asr for p in points]
        if any(a is not None for a in asr):
            ax.plot(counts, [np.nan if a is None else a for a in asr], marker="s", markersize=3, color=_RED,
                    label="attack success rate")
        sig = [(p.count, p.signal) for p in points if getattr(p, "signal", None) is not None]
        if sig:
            ax.plot(*zip(*sig), marker=".", markersize=3, color="#e67e00", label="backdoor signal")
        if baseline is not None and max_drop is not None:
            ax.axhline(baseline - max_drop, color=_BLUE, linestyle=":", linewidth=1,
                       label=f"accuracy budget ({100 * max_drop:g} points)")
        if chosen is not None:
            ax.plot([chosen.count], [chosen.accuracy], marker="*", markersize=14, color=_GREEN, linestyle="none",
                    label=f"automatic choice ({chosen.count})")
            ax.axvline(chosen.count, color=_GREEN, linewidth=1, linestyle="--")
        self.current_line = ax.axvline(0, color=_GREY, linewidth=1.5, visible=False, label="_your choice")
        self.unmeasured = None
        self.unmeasured_note = ax.text(0.99, 0.02, "not measured beyond here", transform=ax.transAxes, ha="right",
                                       va="bottom", fontsize="small", visible=False)
        self.measured_to = max(counts, default=0)
        ax.set_ylim(-0.02, 1.05)
        self._set_right(self.measured_to)
        ax.set_xlabel("neurons pruned (lowest masks first)" + (f", of {total}" if total else ""))
        ax.set_ylabel("rate")
        ax.grid(True, alpha=0.2)
        for old in list(self.figure.legends):
            old.remove()
        self.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize="small",
                           frameon=False)
        ax.set_title("Pruning curve", fontsize="medium")
        self.style()
        self.draw_idle()

    def _set_right(self, right: float) -> None:
        right = max(right, 1)
        self.ax.set_xlim(-0.02 * right, 1.03 * right)

    def mark(self, count: Optional[int]) -> None:
        """Mark the current choice; beyond the measured points the axis widens to show it, and the
        part the curve did not measure is shaded."""
        if self.current_line is None:
            return
        self.current_line.set_visible(count is not None)
        if self.unmeasured is not None:
            self.unmeasured.remove()
            self.unmeasured = None
        beyond = count is not None and count > self.measured_to
        self._set_right(max(self.measured_to, count or 0))
        if count is not None:
            self.current_line.set_xdata([count, count])
            self.current_line.set_linestyle(":" if beyond else "-")
        if beyond:
            self.unmeasured = self.ax.axvspan(self.measured_to, self.ax.get_xlim()[1], color=_GREY, alpha=0.15,
                                              linewidth=0, label="_not measured")
        self.unmeasured_note.set_visible(beyond)
        self.draw_idle()
