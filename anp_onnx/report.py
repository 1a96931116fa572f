"""Repair reports: a JSON file with every figure and setting, and a Markdown page with plots.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no GUI backend), so writing a
report never touches a display or Qt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import __version__
from .prune import REFERENCE_THRESHOLD
from .results import RepairResult


def report_paths(out: os.PathLike | str) -> dict[str, Path]:
    """Files a report for output model ``out`` consists of."""
    out = Path(out)
    stem = out.name.removesuffix(".onnx")
    return {
        "json": out.with_name(stem + ".report.json"),
        "markdown": out.with_name(stem + ".report.md"),
        "curve": out.with_name(stem + ".curve.png"),
        "masks": out.with_name(stem + ".masks.png"),
    }


def _eval(e) -> Optional[dict]:
    return None if e is None else e.to_dict()


def report_dict(result: RepairResult) -> dict:
    """Every figure and setting of a repair, JSON-ready."""
    layers = {layer.name: layer for layer in result.layers}
    all_masks = np.concatenate([np.asarray(v) for v in result.masks.values()] or [np.zeros(0)])
    return {
        "anp_onnx_version": __version__,
        "output": str(result.output),
        "files": [str(f) for f in result.files],
        "seconds": round(result.seconds, 2),
        "stages": list(result.stages),
        "refinements": result.refinements,
        "masks_source": result.masks_source,
        "optimisation": _optimisation(result),
        "preprocessing": result.preprocessing.to_dict(),
        "conversion_parity_max_abs_diff": result.parity,
        "export_max_abs_diff": result.export.max_abs_diff,
        "changed_initializers": result.export.changed_initializers,
        "neurons": {
            "total": int(result.plan.total), "masks_at_zero": int((all_masks == 0).sum()),
            "masks_below_0.2": int((all_masks <= REFERENCE_THRESHOLD).sum()),
            "layers": [{**layers[n].to_dict(), "pruned": int(len(result.plan.pruned.get(n, ())))}
                       for n in (result.masks or layers)],
        },
        "pruning": {**result.plan.to_dict(), "description": result.plan.describe()},
        "curve": result.curve.to_dict() if result.curve is not None else None,
        "held_out_clean": {"before": _eval(result.holdout_before), "after": _eval(result.holdout_after)},
        "test": {"before": _eval(result.before), "after": _eval(result.after)},
    }


def _optimisation(result: RepairResult) -> dict:
    settings = result.config.to_dict() if result.config is not None else None
    opt = result.optimisation
    if opt is None:
        return {"settings": settings, "stage": None, "source": result.masks_source}
    return {
        "settings": settings, "stage": opt.stage, "device": opt.device,
        "iterations": opt.iterations, "seconds": round(opt.seconds, 2),
        "final_loss_nat": _last(opt.history.get("loss_nat")),
        "final_loss_rob": _last(opt.history.get("loss_rob")),
        "noise_target": opt.target,
        "collapse_probe": opt.probe.to_dict() if opt.probe else None,
        "renormalised_layers": sorted(opt.centres), "skipped": opt.skipped or None,
    }


def _last(values) -> Optional[float]:
    return float(values[-1]) if values else None


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_curve(result: RepairResult, path: Path) -> None:
    """Clean accuracy (and ASR when measured) against neurons pruned, the choice marked."""
    curve = result.curve
    fig = _figure()
    ax = fig.add_subplot(111)
    counts = [p.count for p in curve.points]
    ax.plot(counts, [p.accuracy for p in curve.points], "-", color="tab:blue", label="held-out clean accuracy")
    if any(p.asr is not None for p in curve.points):
        pts = [(p.count, p.asr) for p in curve.points if p.asr is not None]
        ax.plot(*zip(*pts), "-", color="tab:red", label="attack success rate (evaluation only)")
    ax.axhline(curve.baseline - curve.max_drop, color="tab:blue", lw=0.8, ls=":",
               label="accuracy budget" + (" (used without a signal)" if curve.suspected_target is not None else ""))
    sig = [(p.count, p.signal) for p in curve.points if p.signal is not None]
    if sig:
        ax.plot(*zip(*sig), "o-", ms=2.5, color="tab:orange",
                label=f"backdoor signal (pull towards class {curve.suspected_target})")
    ax.axvline(curve.chosen.count, color="k", lw=1, ls="--", label=f"automatic choice ({curve.chosen.count})")
    if result.plan.count != curve.chosen.count:
        ax.axvline(result.plan.count, color="tab:green", lw=1, ls="-.", label=f"used ({result.plan.count})")
    ax.set_xlabel("neurons pruned (lowest masks first)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def plot_masks(result: RepairResult, path: Path) -> None:
    """Histogram of the learnt mask values."""
    values = np.concatenate([np.asarray(v) for v in result.masks.values()])
    fig = _figure()
    ax = fig.add_subplot(111)
    ax.hist(values, bins=50, range=(0, 1), color="tab:purple")
    ax.set_xlabel("mask value")
    ax.set_ylabel("neurons")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def markdown(result: RepairResult, data: dict, paths: dict[str, Path]) -> str:
    lines = [f"# anp-onnx repair report: `{Path(result.output).name}`", ""]
    opt = result.optimisation
    if opt is not None and not result.masks:
        why = opt.skipped or "stopped after the probe"
        lines += [f"anp-onnx {__version__}; ANP not run: {why} (total {result.seconds:.1f} s).", ""]
    elif opt is not None:
        lines += [f"anp-onnx {__version__}; ANP {opt.iterations} iterations on "
                  f"{opt.device} in {opt.seconds:.1f} s (total {result.seconds:.1f} s).", ""]
    else:
        lines += [f"anp-onnx {__version__}; masks {result.masks_source} (total {result.seconds:.1f} s).", ""]
    lines += [f"**Pruned {result.plan.count} of {result.plan.total} neurons** ({result.plan.describe()}).", ""]
    if result.stages:
        lines += ["Stages run: " + " -> ".join(result.stages) + ".", ""]
    for name, facts in result.refinements.items():
        figures = ", ".join(f"{k} {v:g}" for k, v in facts.get("metrics", {}).items())
        lines += [f"Refinement {name}: {facts.get('initializers', 0)} initializers changed in "
                  f"{facts.get('seconds', 0):.0f} s ({figures}).", ""]
    if opt is not None and opt.centres:
        lines += [f"{len(opt.centres)} neuron layers without normalisation (BatchNorm folded away or absent) were "
                  "renormalised: perturbed as BatchNorm channels with clean-data statistics; their pruned "
                  "neurons output their clean mean.", ""]
    if opt is not None and opt.probe is not None:
        lines += [f"Collapse probe (clean images only): {opt.probe.describe()}.", ""]
    if opt is not None and result.masks:
        lines += ["ANP neuron noise: " + (f"targeted at class {opt.target}." if opt.target is not None
                                          else "untargeted (the reference's)."), ""]
    rows = [("held-out clean accuracy", result.holdout_before, result.holdout_after, "accuracy"),
            ("test accuracy", result.before, result.after, "accuracy"),
            ("attack success rate", result.before, result.after, "asr")]
    table = [(name, getattr(b, attr), getattr(a, attr)) for name, b, a, attr in rows
             if b is not None and a is not None and getattr(b, attr) is not None]
    if table:
        lines += ["| | before | after |", "|---|---:|---:|"]
        lines += [f"| {name} | {_pct(b)} | {_pct(a)} |" for name, b, a in table]
        if result.before is not None and result.before.target is not None:
            how = "inferred from predictions" if result.before.target_inferred else "given"
            lines += ["", f"Attack target class {result.before.target} ({how}); triggered images never took part "
                          "in choosing what to prune."]
        lines.append("")
    if result.curve is not None:
        c = result.curve
        lines += ["## Pruning curve", "", f"Automatic choice: {c.rule}: **{c.chosen.count} neurons** "
                  f"(mask <= {c.chosen.threshold:.4f}), accuracy {_pct(c.baseline)} -> {_pct(c.chosen.accuracy)}"
                  + (f"; backdoor signal {'gone' if c.signal_gone else 'still present'}"
                     if c.signal_gone is not None else "") + ".", "",
                  f"![pruning curve]({paths['curve'].name})", ""]
    if result.masks:
        lines += ["## Mask values", "", f"![mask histogram]({paths['masks'].name})", "",
                  f"{data['neurons']['masks_at_zero']} masks at 0, {data['neurons']['masks_below_0.2']} at or below "
                  f"{REFERENCE_THRESHOLD:g}.", ""]
    lines += ["## Neurons pruned per layer", "", "| layer | kind | neurons | pruned |", "|---|---|---:|---:|"]
    lines += [f"| `{layer['name']}` | {layer['kind']} | {layer['size']} | {layer['pruned']} |"
              for layer in data["neurons"]["layers"]]
    lines += ["", "## Settings", "", "```json", json.dumps(data["optimisation"]["settings"], indent=1), "```", "",
              f"Verification: onnx.checker passed; onnxruntime output matches the pruned torch model "
              f"(max |diff| {result.export.max_abs_diff:.2e}).", ""]
    return "\n".join(lines)


def write_report(result: RepairResult, to: Optional[Callable[[Path], Path]] = None) -> list[Path]:
    """Write the JSON report, the Markdown page and its plots beside the output model.

    ``to`` maps each report file to where it is written for now (an output set's temporary name,
    see :class:`anp_onnx.outputs.OutputSet`); the files named in the report are the final paths.
    """
    paths = report_paths(result.output)
    at = to or (lambda p: p)
    data = report_dict(result)
    written = []
    if result.curve is not None:
        plot_curve(result, at(paths["curve"]))
        written.append(paths["curve"])
    if result.masks:
        plot_masks(result, at(paths["masks"]))
        written.append(paths["masks"])
    at(paths["markdown"]).write_text(markdown(result, data, paths), encoding="utf-8")
    data["files"] = [str(f) for f in list(result.files) + written + [paths["markdown"], paths["json"]]]
    at(paths["json"]).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return written + [paths["markdown"], paths["json"]]
