"""Speed of anp-onnx's ANP loop against the reference loop and the floor, plus pipeline costs.

    python benchmarks/speed.py                                  # every part, CPU (+ CUDA if torch sees one)
    python benchmarks/speed.py --parts loop --models ibau_vgg --iterations 5    # a quick look
    python benchmarks/speed.py --parts stages big ort           # the pipeline parts only

Parts (``--parts``, default all; each runs in a fresh subprocess, so peak memory is its own):

* ``loop``: ms per ANP iteration on the same model, data (sample_models/data/clean_500.npz),
  batch size and iteration count, for: ``reference`` (the reference loop re-implemented on the
  native torch module, benchmarks/loops.py, other weights trainable as in the reference code),
  ``reference-frozen`` (the same with the other weights frozen), ``anp-onnx`` (the ONNX model
  through ``Repairer.open(...).optimize(...)``, untargeted = the reference loop; the time is
  ``MaskResult.seconds``, the loop alone) and ``anp-onnx targeted`` (the noise aimed at the model's
  target class), and ``floor`` (3 forwards + 2 backwards with gradients only for the masks and
  noise). Models: ``ibau_vgg`` (I-BAU BadNets VGG, authors' checkpoint), ``preact`` (the BadNets
  PreAct sample, native weights rebuilt from the ONNX initializers), ``resnet18`` (CIFAR ResNet-18,
  random weights, seed 0, exported with BatchNorm kept). Native/ONNX parity is checked first.
  Warm-up iterations are run and not timed. CPU always, CUDA too when torch sees a GPU.
* ``stages``: wall time per stage of one default ``anp_onnx.repair`` of the I-BAU VGG sample with
  clean_500.npz on the CPU, and its peak RSS (see benchmarks/speed_parts.py).
* ``big``: time and peak RSS of load, convert, write back and verify for a ~100 MB ResNet-50.
* ``ort``: onnxruntime latency of a repaired file against its original (batch 1 and 64).

Prints Markdown tables; writes everything as JSON (default benchmarks/results/speed_cpu.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import native  # noqa: E402
from benchmarks.host import cpu_facts  # noqa: E402
from benchmarks.loops import LoopSettings, floor_loop, reference_loop  # noqa: E402

CLEAN = native.SAMPLES / "data" / "clean_500.npz"
PARTS = ("loop", "stages", "big", "ort")
PARITY_TOLERANCE = 1e-4
#: model -> (ONNX sample or None to export one, the target class for the targeted run)
MODELS: dict[str, tuple[Optional[str], int]] = {
    "ibau_vgg": ("ibau_badnets_vgg.onnx", 8),
    "preact": ("badnets_preact.onnx", 0),
    "resnet18": (None, 0),  # random weights: no backdoor, any class will do
}
VARIANTS = ("reference", "reference-frozen", "anp-onnx", "anp-onnx targeted", "floor")


def native_model(name: str, shared: Path) -> torch.nn.Module:
    """The native torch module of a benchmark model (eval mode, CPU)."""
    if name == "ibau_vgg":
        ckpt = shared / "data" / "third_party_models" / "ibau" / "badnets_8_02_ckpt.pth"
        if ckpt.exists():
            return native.ibau_vgg(ckpt)
        _, vgg = native.sample_classes()  # no checkpoint here: the weights from the ONNX sample
        model = vgg()
        native.load_from_onnx(model, native.SAMPLES / MODELS[name][0])
        return model.eval()
    if name == "preact":
        return native.preact_from_onnx(native.SAMPLES / MODELS[name][0])
    if name == "resnet18":
        return native.seeded(native.CifarResNet18, 0)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def onnx_path(name: str, model: torch.nn.Module, tmp: Path) -> Path:
    """The sample ONNX file of ``name``, or ``model`` exported with BatchNorm kept into ``tmp``."""
    sample = MODELS[name][0]
    return native.SAMPLES / sample if sample else native.export_bn_kept(model, tmp / f"{name}.onnx")


def machine() -> dict:
    """Platform, CPU count, torch threads and versions; the GPU's name when CUDA is available."""
    import onnxruntime

    facts = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
             "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
             "cuda": torch.cuda.is_available(), **cpu_facts()}
    if torch.cuda.is_available():
        facts["cuda_device"] = torch.cuda.get_device_name(0)
    return facts


def time_anp_onnx(rep, clean, device: str, iterations: int, warmup: int, target: Optional[int],
                  batch_size: int) -> dict:
    """anp-onnx's loop: a warm-up ``optimize`` call, then the timed one (loop time and wall time)."""
    import anp_onnx

    config = anp_onnx.ANPConfig(iterations=max(warmup, 1), device=device, target=target, batch_size=batch_size)
    if warmup:
        rep.optimize(clean, config)
    start = time.perf_counter()
    result = rep.optimize(clean, replace(config, iterations=iterations))
    wall = time.perf_counter() - start
    return {"ms_per_iteration": 1000.0 * result.seconds / iterations, "loop_seconds": result.seconds,
            "optimize_wall_seconds": wall, "noise_target": result.target}


def loop_rows(names: list[str], devices: dict[str, int], warmup: int, batch_size: int, shared: Path,
              log: Callable[[str], None]) -> list[dict]:
    """One row per (model, device): ms/iteration of every variant and the ratios."""
    import anp_onnx

    settings = LoopSettings(batch_size=batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            base = native_model(name, shared)
            path = onnx_path(name, base, Path(tmp))
            rep = anp_onnx.Repairer.open(path)
            clean = rep.load_data(CLEAN)
            diff = native.onnx_parity(base, path, clean.x[:32])
            if diff > PARITY_TOLERANCE:
                raise SystemExit(f"{name}: native and ONNX logits differ by {diff:.2e} (> {PARITY_TOLERANCE})")
            lib_diff = rep.check_parity(clean)
            for device, iterations in devices.items():
                log(f"[{name} {device}] parity native {diff:.1e}, anp-onnx {lib_diff:.1e}; {iterations} iterations")
                x = torch.from_numpy(clean.x).to(device)
                y = torch.from_numpy(clean.y).to(device)
                times: dict[str, dict] = {}
                for variant in ("reference", "reference-frozen", "floor"):
                    model = copy.deepcopy(base).to(device)
                    native.install_noisy_bn(model)
                    if variant == "floor":
                        timing = floor_loop(model, x, y, iterations, warmup=warmup, settings=settings)
                    else:
                        timing = reference_loop(model, x, y, iterations, warmup=warmup, settings=settings,
                                                freeze=variant == "reference-frozen")
                    times[variant] = {"ms_per_iteration": timing.ms_per_iteration, "loop_seconds": timing.seconds}
                    log(f"[{name} {device}] {variant}: {timing.ms_per_iteration:.1f} ms/it")
                    del model
                for variant, target in (("anp-onnx", None), ("anp-onnx targeted", MODELS[name][1])):
                    times[variant] = time_anp_onnx(rep, clean, device, iterations, warmup, target, batch_size)
                    log(f"[{name} {device}] {variant}: {times[variant]['ms_per_iteration']:.1f} ms/it "
                        f"(optimize {times[variant]['optimize_wall_seconds']:.1f} s)")
                ms = {v: times[v]["ms_per_iteration"] for v in VARIANTS}
                rows.append({
                    "model": name, "device": device, "iterations": iterations, "warmup": warmup,
                    "batch_size": batch_size, "neurons": int(sum(layer.size for layer in rep.layers)),
                    "parity_native_vs_onnx": diff, "parity_anp_onnx": lib_diff, "variants": times,
                    "ratios": {
                        "anp-onnx/reference": ms["anp-onnx"] / ms["reference"],
                        "anp-onnx/floor": ms["anp-onnx"] / ms["floor"],
                        "anp-onnx targeted/reference": ms["anp-onnx targeted"] / ms["reference"],
                        "anp-onnx targeted/floor": ms["anp-onnx targeted"] / ms["floor"],
                        "reference/floor": ms["reference"] / ms["floor"],
                        "reference-frozen/reference": ms["reference-frozen"] / ms["reference"],
                    },
                })
    return rows


def print_loop_table(rows: list[dict]) -> None:
    print("| model | device | iterations | reference | reference-frozen | anp-onnx | anp-onnx targeted | floor "
          "| anp-onnx/reference | anp-onnx/floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = {v: r["variants"][v]["ms_per_iteration"] for v in VARIANTS}
        print(f"| {r['model']} | {r['device']} | {r['iterations']} | "
              + " | ".join(f"{ms[v]:.0f} ms" for v in VARIANTS)
              + f" | {r['ratios']['anp-onnx/reference']:.2f} | {r['ratios']['anp-onnx/floor']:.2f} |")


def run_worker(part: str, args: argparse.Namespace) -> dict:
    """One part, in this (fresh) process; returns its JSON-able figures."""
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    facts = {"torch_threads": torch.get_num_threads()}
    if part == "loop":
        devices = {"cpu": args.iterations}
        if torch.cuda.is_available() and not args.no_cuda:
            devices["cuda"] = args.cuda_iterations
        return {**facts, "rows": loop_rows(args.models, devices, args.warmup, args.batch_size, args.shared, log)}
    from benchmarks import speed_parts

    if part == "stages":
        return {**facts, **speed_parts.stage_breakdown(args.repair_iterations, log)}
    if part == "big":
        return {**facts, **speed_parts.big_model(log)}
    if part == "ort":
        return {**facts, **speed_parts.ort_latency(args.models, args.ort_runs, args.shared, log)}
    raise ValueError(part)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="models of the loop and ort parts (default: all)")
    p.add_argument("--iterations", type=int, default=20, help="timed ANP iterations on the CPU (default 20)")
    p.add_argument("--cuda-iterations", type=int, default=200, help="timed ANP iterations on CUDA (default 200)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before each timed run (default 3)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="ANP batch size (default 128, the reference's; smaller only for quick checks)")
    p.add_argument("--repair-iterations", type=int,
                   help="ANP iterations of the stages part (default: repair()'s default, 300 on a CPU)")
    p.add_argument("--ort-runs", type=int, default=50, help="timed onnxruntime runs per file and batch (default 50)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-cuda", action="store_true", help="CPU only even when torch sees a GPU")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                   help="folder holding data/third_party_models/ibau (default ../shared)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed_cpu.json")
    p.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.worker_out.write_text(json.dumps(run_worker(args.worker, args), indent=1, default=float))
        return 0

    results: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            out = Path(tmp) / f"{part}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", part, "--worker-out", str(out)]
            print(f"== part {part}", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            results[part] = json.loads(out.read_text())
    from benchmarks import speed_parts

    if "loop" in results:
        print_loop_table(results["loop"]["rows"])
    for part in ("stages", "big", "ort"):
        if part in results:
            print()
            getattr(speed_parts, f"print_{part}")(results[part])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/speed.py", *argv]),
        "machine": machine(), "settings": {**LoopSettings(batch_size=args.batch_size).__dict__,
                                           "warmup": args.warmup, "cpu_iterations": args.iterations,
                                           "cuda_iterations": args.cuda_iterations},
        "seconds": time.perf_counter() - started, "parts": results,
    }, indent=1, default=float))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
