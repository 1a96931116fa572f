"""What the commands print: tables, percentages, progress bars, model facts and the final line."""

from __future__ import annotations

import sys
from typing import Optional

from .. import EvalResult, ModelInfo, ProgressEvent, PrunePlan


class Bar:
    """tqdm progress bars fed by the library's progress events, one per stage."""

    LABELS = {"calibrate": "calibrate", "probe": "collapse probe", "optimise": "ANP", "sweep": "pruning curve",
              "evaluate": "evaluate", "refine:scan": "trigger scan", "refine:round": "unlearning"}
    UNITS = {"calibrate": "batch", "probe": "batch", "optimise": "it", "sweep": "pt", "refine:scan": "class",
             "refine:round": "round"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.stage = ""

    def __call__(self, event: ProgressEvent) -> None:
        stage = event.stage
        if stage == "refine":  # the unlearning's per-class scan, then its rounds (anp_onnx.unlearn)
            stage += (":scan" if "scan_class" in event.metrics else
                      ":round" if "round" in event.metrics or "rounds_kept" in event.metrics else "")
        if not self.enabled or stage not in self.UNITS:
            return
        if self.bar is None or stage != self.stage:
            from tqdm import tqdm

            self.close()
            self.stage = stage
            self.bar = tqdm(total=event.total, desc=self.LABELS.get(stage, stage),
                            unit=self.UNITS[stage], file=sys.stderr, dynamic_ncols=True)
        self.bar.total = event.total  # a retried probe goes on counting: batches 5 to 8 of 8
        self.bar.n = event.step
        self.bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in event.metrics.items()},
                             refresh=False)
        self.bar.refresh()
        # a finished stage's bar closes now, so its time and rate are its own; a round's event marks its
        # start, and the unlearning says when its rounds are over ("rounds_kept")
        if event.total and event.step >= event.total and (stage != "refine:round" or "rounds_kept" in event.metrics):
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def print_info(info: ModelInfo) -> None:
    print(f"model      {info.path}")
    print(f"producer   {info.producer or '-'}  (IR {info.ir_version}, opset {info.opset})")
    print(f"input      {info.input.describe()}")
    print(f"classes    {info.num_classes}")
    print(f"neurons    {info.neurons.total} in {len(info.neurons.layers)} layers")
    rows = [[layer.name, layer.kind, str(layer.size)] for layer in info.neurons.layers]
    print(table(rows, ["layer", "kind", "neurons"]))
    if info.neurons.excluded:
        print(f"excluded   {', '.join(info.neurons.excluded)}")
    for note in info.notes:
        print(f"note       {note}")
    print(f"parity     max |torch - onnxruntime| = {info.parity:.2e}")
    if info.probe is not None:
        print(f"probe      {info.probe.describe()}")


def pruned_table(plan: PrunePlan, sizes: Optional[dict[str, int]] = None) -> str:
    """Neurons pruned per layer (only layers with some), then the total; with ``sizes``, layer sizes too."""
    if sizes is None:
        rows = [[name, str(n)] for name, n in plan.per_layer().items() if n] + [["total", str(plan.count)]]
        return table(rows, ["layer", "pruned"])
    rows = [[name, str(n), str(sizes[name])] for name, n in plan.per_layer().items() if n]
    rows.append(["total", str(plan.count), str(plan.total)])
    return table(rows, ["layer", "pruned", "neurons"])


def score_rows(before: Optional[EvalResult], after: Optional[EvalResult], label: str) -> list[list[str]]:
    """Rows of a before/after table: accuracy and attack success rate, where measured."""
    if before is None or after is None:
        return []
    rows = []
    if before.accuracy is not None:
        rows.append([f"{label} accuracy ({before.n_clean} images)", pct(before.accuracy), pct(after.accuracy)])
    if before.asr is not None:
        how = "inferred" if before.target_inferred else "given"
        rows.append([f"attack success rate (target {before.target}, {how})", pct(before.asr), pct(after.asr)])
    return rows


def scores(result: EvalResult) -> str:
    """The figures of one evaluation in one line, for the PASSED line."""
    parts = []
    if result.accuracy is not None:
        parts.append(f"clean accuracy {pct(result.accuracy)} ({result.n_clean} images)")
    if result.asr is not None:
        parts.append(f"attack success rate {pct(result.asr)} ({result.n_poisoned} triggered images, "
                     f"target {result.target})")
    return ", ".join(parts) or "nothing measured"


def passed(text: str, *, json_output: bool = False) -> None:
    """The last line of a command that succeeded; on stderr when stdout carries JSON."""
    print(f"PASSED: {text}", file=sys.stderr if json_output else sys.stdout)


def failed(text: str, *, json_output: bool = False) -> None:
    """The last line of a command that failed; on stderr when stdout carries JSON."""
    print(f"FAILED: {text}", file=sys.stderr if json_output else sys.stdout)

