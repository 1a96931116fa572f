"""The pipeline parts of benchmarks/speed.py: stage breakdown, a big model's costs, onnxruntime latency.

* :func:`stage_breakdown`: one default ``anp_onnx.repair`` of the I-BAU VGG sample, timed per stage
  by wrapping the stage functions where the library looks them up (:class:`StageTimer`), restored
  afterwards; every wrapper must be hit. Times are exclusive: a stage called inside another (the
  verify inside the file save) is counted once, in its own row.
* :func:`big_model`: load, convert (+ neuron search), plan and export (write back + verify) of a
  ResNet-50 (~100 MB of weights) exported with BatchNorm kept, each step's time and peak RSS.
* :func:`ort_latency`: onnxruntime latency of a repaired file against its original.
"""

from __future__ import annotations

import functools
import importlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from benchmarks import native

Log = Callable[[str], None]
#: (module where the name is looked up, name, stage); in the order of the pipeline.
STAGE_PATCHES: tuple[tuple[str, str, str], ...] = (
    ("anp_onnx.api", "load_model", "load"),
    ("anp_onnx.api", "load_images", "load data"),
    ("anp_onnx.api", "open_context", "convert + parity"),
    ("anp_onnx.api", "parity", "convert + parity"),
    ("anp_onnx.learn", "calibrate", "calibrate"),
    ("anp_onnx.learn", "find_target", "probe"),
    ("anp_onnx.anp", "optimize_masks", "ANP"),
    ("anp_onnx.api", "measure_curve", "curve"),
    ("anp_onnx.unlearn", "scan_targets", "unlearn: scan"),
    ("anp_onnx.unlearn", "reconstruct_each", "unlearn: reconstruct"),
    ("anp_onnx.unlearn", "unlearn", "unlearn: train"),
    ("anp_onnx.unlearn", "_accuracy", "unlearn: guard"),
    ("anp_onnx.export", "write_back", "write back"),
    ("anp_onnx.export", "save_model", "write back"),
    ("anp_onnx.export", "verify", "verify"),
    ("anp_onnx.finish", "save_masks", "save masks"),
    ("anp_onnx.finish", "load_model", "evaluate"),
    ("anp_onnx.finish", "evaluate", "evaluate"),
    ("anp_onnx.finish", "write_report", "report"),
)
EXPORT_PATCHES = tuple(p for p in STAGE_PATCHES if p[0] == "anp_onnx.export")
#: Stages a default repair may leave out (anp_onnx.pipeline: ANP, its curve and masks only where they can
#: change the output); the others must run. patched() checks that every wrapped function exists.
MAY_NOT_RUN = frozenset({"ANP", "curve", "save masks"})
#: Stages whose wrapped calls inside count as their own time.
INCLUSIVE = frozenset({"unlearn: scan"})


class StageTimer:
    """Exclusive wall time per stage of wrapped functions, and how often each wrapper ran.

    A call made inside a stage of :data:`INCLUSIVE` counts as that stage (the scan's reconstructions
    are the scan's time, not the reconstruction stage's).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._children: list[float] = []
        self._stack: list[str] = []

    def wrap(self, fn: Callable, stage: str, key: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.calls[key] += 1
            if self._stack and self._stack[-1] in INCLUSIVE:
                return fn(*args, **kwargs)
            self._children.append(0.0)
            self._stack.append(stage)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self._stack.pop()
                self.seconds[stage] += elapsed - self._children.pop()
                if self._children:
                    self._children[-1] += elapsed
        return timed

    @contextmanager
    def patched(self, patches: Sequence[tuple[str, str, str]]) -> Iterator["StageTimer"]:
        """The functions of ``patches`` wrapped for the duration (AttributeError if one is gone)."""
        originals = []
        try:
            for module_name, attr, stage in patches:
                module = importlib.import_module(module_name)
                fn = getattr(module, attr)
                originals.append((module, attr, fn))
                setattr(module, attr, self.wrap(fn, stage, f"{module_name}.{attr}"))
            yield self
        finally:
            for module, attr, fn in reversed(originals):
                setattr(module, attr, fn)

    def missed(self, patches: Sequence[tuple[str, str, str]]) -> list[str]:
        return [f"{m}.{a}" for m, a, _ in patches if not self.calls[f"{m}.{a}"]]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (getrusage; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def stage_breakdown(iterations: Optional[int], log: Log) -> dict:
    """Wall time per stage of one default repair() of the I-BAU VGG sample on the CPU."""
    import anp_onnx

    config = anp_onnx.ANPConfig(device="cpu") if iterations is None else anp_onnx.ANPConfig(
        device="cpu", iterations=iterations)
    timer = StageTimer()
    with tempfile.TemporaryDirectory() as tmp, timer.patched(STAGE_PATCHES):
        start = time.perf_counter()
        result = anp_onnx.repair(native.SAMPLES / "ibau_badnets_vgg.onnx", native.SAMPLES / "data" / "clean_500.npz",
                                 out=Path(tmp) / "repaired.onnx", config=config)
        total = time.perf_counter() - start
    missed = timer.missed(tuple(p for p in STAGE_PATCHES if p[2] not in MAY_NOT_RUN))
    if missed:
        raise SystemExit(f"stage wrappers never called (the library changed?): {', '.join(missed)}")
    order = list(dict.fromkeys(stage for _, _, stage in STAGE_PATCHES))
    stages = {stage: timer.seconds.get(stage, 0.0) for stage in order}
    stages["other (not wrapped)"] = total - sum(stages.values())
    ran = bool(result.masks)  # a default repair runs ANP only where it can change the output (anp_onnx.pipeline)
    log(f"[stages] repair {total:.1f} s, " + (f"ANP loop {result.optimisation.seconds:.1f} s" if ran
                                               else f"ANP not run: {result.optimisation.skipped}"))
    return {"model": "ibau_badnets_vgg.onnx", "iterations": result.optimisation.iterations, "anp_ran": ran,
            "anp_skipped": result.optimisation.skipped or None, "refinements": result.refinements,
            "anp_loop_seconds": result.optimisation.seconds if ran else 0.0, "total_seconds": total, "stages": stages,
            "calls": dict(timer.calls), "pruned": result.plan.count, "peak_rss_mb": peak_rss_mb(),
            "library_stages": list(result.stages)}


def print_stages(r: dict) -> None:
    anp = f"{r['iterations']} ANP iterations" if r.get("anp_ran", True) else "ANP not run"
    print(f"Stages of one default repair (I-BAU VGG, clean_500, CPU, {anp}): "
          f"{r['total_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    if r.get("anp_skipped"):
        print(f"(ANP not run: {r['anp_skipped']})")
    print("| stage | seconds | share |")
    print("|---|---|---|")
    for stage, seconds in r["stages"].items():
        print(f"| {stage} | {seconds:.2f} | {100 * seconds / r['total_seconds']:.1f}% |")


def _export_resnet50(path: Path) -> dict:
    """Export the ResNet-50 in a child process (its memory is not this process's)."""
    code = ("import sys, time, resource; sys.path.insert(0, sys.argv[2]); from benchmarks import native; "
            "t = time.perf_counter(); native.export_bn_kept(native.seeded(native.ResNet50, 0), "
            "__import__('pathlib').Path(sys.argv[1]), (1, 3, 224, 224)); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(native.ROOT)], check=True,
                         capture_output=True, text=True).stdout.split()
    return {"seconds": float(out[-2]), "peak_rss_mb": float(out[-1])}


def big_model(log: Log) -> dict:
    """Time and peak RSS of load, convert, plan and export (write back + verify) of a ResNet-50."""
    import anp_onnx
    from anp_onnx.model import load_model

    steps: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        exported = _export_resnet50(path)
        size_mb = path.stat().st_size / 2 ** 20
        log(f"[big] ResNet-50 exported ({size_mb:.0f} MB) in {exported['seconds']:.1f} s")
        can_reset = reset_peak()
        baseline = _status_mb("VmRSS")
        timer = StageTimer()
        holder: dict = {}

        def step(name: str, fn: Callable[[], object]) -> None:
            reset_peak()
            start = time.perf_counter()
            holder[name] = fn()
            steps[name] = {"seconds": time.perf_counter() - start,
                           "peak_rss_mb": _status_mb("VmHWM") if can_reset else peak_rss_mb(),
                           "rss_after_mb": _status_mb("VmRSS")}
            log(f"[big] {name}: {steps[name]['seconds']:.1f} s, peak {steps[name]['peak_rss_mb']:.0f} MB")

        step("load", lambda: load_model(path))
        step("convert + neurons", lambda: anp_onnx.Repairer(holder["load"]))
        rep = holder["convert + neurons"]
        rng = np.random.default_rng(0)
        ones = {layer.name: np.ones(layer.size, dtype=np.float32) for layer in rep.layers}
        tiebreak = {name: rng.random(len(m)).astype(np.float32) for name, m in ones.items()}
        step("plan", lambda: rep.plan(ones, anp_onnx.PruneSpec.count(10), tiebreak=tiebreak))
        images = anp_onnx.ImageSet(rng.random((4, 3, 224, 224), dtype=np.float32), np.zeros(4, dtype=np.int64))
        with timer.patched(EXPORT_PATCHES):
            step("export (write back + verify)",
                 lambda: rep.export(holder["plan"], Path(tmp) / "repaired.onnx", verify_images=images))
    missed = timer.missed(EXPORT_PATCHES)
    if missed:
        raise SystemExit(f"export wrappers never called (the library changed?): {', '.join(missed)}")
    return {"model": "ResNet-50 (random weights, seed 0, BatchNorm kept, opset 17)", "onnx_mb": size_mb,
            "export_to_onnx": exported, "baseline_rss_mb": baseline, "steps": steps,
            "export_breakdown": dict(timer.seconds), "neurons": int(sum(layer.size for layer in rep.layers)),
            "pruned": holder["plan"].count, "verify_max_diff": holder["export (write back + verify)"].max_abs_diff,
            "peak_rss_mb": peak_rss_mb(), "per_step_peak": "VmHWM reset per step" if can_reset else
            "running getrusage peak (could not reset)"}


def print_big(r: dict) -> None:
    print(f"{r['model']}: {r['onnx_mb']:.0f} MB, {r['neurons']} neurons, {r['pruned']} pruned; "
          f"RSS after imports {r['baseline_rss_mb']:.0f} MB, process peak {r['peak_rss_mb']:.0f} MB")
    print("| step | seconds | peak RSS during step |")
    print("|---|---|---|")
    for name, s in r["steps"].items():
        print(f"| {name} | {s['seconds']:.2f} | {s['peak_rss_mb']:.0f} MB |")
    for name, seconds in r["export_breakdown"].items():
        print(f"| ↳ {name} | {seconds:.2f} | |")


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()  # the same default options for both files
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _latencies(sessions: list, x: np.ndarray, runs: int, warmup: int = 5) -> list[list[float]]:
    """Milliseconds per run for each session, runs interleaved so drifts hit both alike."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for _ in range(warmup):
        for s, feed in zip(sessions, feeds):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for s, feed, out in zip(sessions, feeds, times):
            start = time.perf_counter()
            s.run(None, feed)
            out.append(1000.0 * (time.perf_counter() - start))
    return times


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def ort_latency(models: Sequence[str], runs: int, shared: Path, log: Log) -> dict:
    """onnxruntime latency (median ms, batch 1 and 64) of a repaired file (10 neurons pruned) vs its original."""
    import onnx

    import anp_onnx
    from benchmarks.speed import native_model, onnx_path

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            original = onnx_path(name, native_model(name, shared), Path(tmp))
            rep = anp_onnx.Repairer.open(original)
            rng = np.random.default_rng(0)
            masks = {layer.name: rng.random(layer.size).astype(np.float32) for layer in rep.layers}
            repaired = Path(tmp) / f"{name}.repaired.onnx"
            rep.export(rep.plan(masks, anp_onnx.PruneSpec.count(10)), repaired)
            ops = [[n.op_type for n in onnx.load(str(p)).graph.node] for p in (original, repaired)]
            if ops[0] != ops[1]:
                raise SystemExit(f"{name}: the repaired graph differs from the original "
                                 f"({len(ops[0])} vs {len(ops[1])} nodes)")
            sessions = [_session(original), _session(repaired)]
            for batch in (1, 64):
                spec = rep.model.input
                x = rng.random((batch, spec.channels, spec.height, spec.width), dtype=np.float32)
                t_orig, t_rep = _latencies(sessions, x, runs)
                med_o, med_r = statistics.median(t_orig), statistics.median(t_rep)
                noise = max(_iqr(t_orig), _iqr(t_rep), 0.05 * med_o)
                rows.append({"model": name, "batch": batch, "runs": runs, "nodes": len(ops[0]),
                             "op_types": sorted(set(ops[0])), "same_graph": True,
                             "original_ms": med_o, "repaired_ms": med_r, "ratio": med_r / med_o,
                             "min_original_ms": min(t_orig), "min_repaired_ms": min(t_rep),
                             "iqr_original_ms": _iqr(t_orig), "iqr_repaired_ms": _iqr(t_rep),
                             "equal_within_noise": abs(med_r - med_o) <= noise})
                log(f"[ort] {name} batch {batch}: {med_o:.2f} vs {med_r:.2f} ms")
    return {"rows": rows, "session_options": "onnxruntime defaults, CPUExecutionProvider"}


def print_ort(r: dict) -> None:
    print("onnxruntime latency, repaired (10 neurons pruned) vs original, median of "
          f"{r['rows'][0]['runs'] if r['rows'] else 0} runs")
    print("| model | batch | nodes (same op types) | original median (min) | repaired median (min) | ratio "
          "| equal within noise |")
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['model']} | {row['batch']} | {row['nodes']} ({'yes' if row['same_graph'] else 'NO'}) | "
              f"{row['original_ms']:.2f} ({row['min_original_ms']:.2f}) ms | "
              f"{row['repaired_ms']:.2f} ({row['min_repaired_ms']:.2f}) ms | {row['ratio']:.3f} | "
              f"{'yes' if row['equal_within_noise'] else 'no'} |")
