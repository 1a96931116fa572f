"""The development bench: repair quality of the defaults on every bench model (issue #12).

    python benchmarks/quality.py                        # every model available, default settings
    python benchmarks/quality.py --models samples --iterations 2000
    python benchmarks/quality.py --models kabu_simplecnn_checker cifar10_small --iterations 5   # a smoke run
    python benchmarks/quality.py --reference            # the reference ANP loop + threshold 0.2 as the method
    python benchmarks/quality.py --from benchmarks/results/quality.json --summary   # re-print saved runs (one or more files)

Models (benchmarks/bench_models.py): the six sample models (sample_models/), the public bench's
third-party backdoored models and the clean models, both read at run time from ../shared (rows
missing when it is absent; never committed, see benchmarks/README.md). ``--models`` takes row
names or groups (samples, public, clean, all). Each model is repaired with ``anp_onnx.repair`` on
its clean repair set with the preprocessing of its card; ACC / ASR before and after are measured
in onnxruntime on its test set and the triggered copy (2,000 images for the public and clean
models, 1,000 for the samples); the triggered set never takes part in the repair.

Per row: ACC and ASR before -> after, neurons pruned, time, what the collapse probe said, the noise
(targeted class or untargeted), the rule that chose (signal / budget), and two diagnostic columns
that use the triggered TEST set for diagnosis only, never for a decision (benchmarks/oracle.py): the
oracle frontier of the repair's mask ranking (best test accuracy with test ASR <= 5% anywhere in
mask order, up to half the neurons) and the same for the masks of the reference ANP loop
(``ANPConfig.reference()``, same iterations). Measured in torch with the repair's masks applied,
after checking that torch and onnxruntime agree on the repaired file. Prints a Markdown table and
writes every figure, the command, the machine and the settings as JSON (default
benchmarks/results/quality.json); ``--summary`` adds how many all-to-one models meet the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import oracle  # noqa: E402
from benchmarks.host import cpu_facts  # noqa: E402
from benchmarks.bench_models import CIFAR_PICK_SEED, DEFAULT_SHARED, LEFT_OUT, BenchModel, bench_models  # noqa: E402
from benchmarks.quality_table import ORACLE_NOTE, summary, table  # noqa: E402

#: The oracle's grid stops once test accuracy is at most chance + this at two grid points in a row.
CHANCE_MARGIN = 0.05


def parse_spec(text: str):
    from anp_onnx.prune import PruneSpec

    mode, _, value = text.partition("=")
    return PruneSpec(mode, float(value)) if value else PruneSpec(mode)


def rule_kind(result) -> str:
    if result.curve is None and result.plan.asked is not None:  # ANP not run (anp_onnx.pipeline)
        return "none: refinements first"
    if result.curve is None:
        return result.plan.spec.describe()
    return "signal" if result.curve.signal_gone else "budget"


def torch_ort_check(rep, result, test, model: BenchModel) -> dict:
    """Do torch (the repair's plan as masks) and onnxruntime (the written file) agree on the test set?"""
    from anp_onnx.convert import torch_logits
    from anp_onnx.evaluate import predict
    from anp_onnx.model import load_model
    from anp_onnx.runtime import max_abs_diff, ort_logits, to_model_input

    written = load_model(result.output)
    with rep.ctx.pruned(result.plan) as net:
        logits = torch_logits(net, test.x)
    ours = logits.argmax(1)
    theirs = predict(written, test, model.preprocessing)
    x = test.x[:64]
    diff = max_abs_diff(ort_logits(written, to_model_input(written, x, model.preprocessing)),
                        rep.net.to_model_output(logits[:64]))
    agree = float((ours == theirs).mean())
    return {"prediction_agreement": agree, "max_abs_diff_64": diff, "ok": agree >= 0.999,
            "torch_accuracy": float((ours == test.y).mean())}


def oracle_of(rep, masks, mean_masks, centres, test, triggered, model: BenchModel, device: str, points: int) -> dict:
    from anp_onnx.prune import match_masks, rank_neurons

    rep.set_centres(centres or {})
    masks = match_masks(masks, rep.layers)
    ranking = rank_neurons(masks, mean_masks)
    prefixes = oracle.TorchPrefixes(rep, masks, ranking, test, triggered, model.target, model.mode, device)
    t0 = time.perf_counter()
    floor = 1 / prefixes.num_classes + CHANCE_MARGIN  # past chance level no point can be the best
    front, measured = oracle.search(prefixes.asr, prefixes.accuracy, len(ranking), points=points, floor=floor)
    return {**front.to_dict(), "seconds": round(time.perf_counter() - t0, 1), "stop_floor": floor,
            "points": {str(k): {"accuracy": a, "asr": s} for k, (a, s) in measured.items()}}


def run_model(model: BenchModel, args, config, pruning, tmp: Path) -> dict:
    import anp_onnx
    from anp_onnx.evaluate import predict
    from anp_onnx.model import load_model
    from anp_onnx.options import DEFAULT_HOLDOUT

    sets = model.write_sets(tmp / model.name)
    files = args.keep or tmp
    one_target = model.mode == "all-to-one"
    t0 = time.perf_counter()
    result = anp_onnx.repair(
        model.path, sets.clean, out=files / f"{model.name}.onnx", config=config, pruning=pruning,
        preprocessing=model.preprocessing, test_data=sets.test,
        poisoned_data=sets.triggered if one_target else None, target=model.target if one_target else None,
        masks_out=files / f"{model.name}.masks.json", report=False, refinements=args.refinements)
    seconds = time.perf_counter() - t0
    opt = result.optimisation
    row = {
        "model": model.name, "source": model.source, "group": model.group, "file": str(model.path.name),
        "arch": model.arch, "norm": model.norm, "attack": model.attack, "target": model.target, "mode": model.mode,
        "random_control": model.random_control, "fires_for_random": model.fires_for_random,
        "licence": model.licence, "preprocessing": model.preprocessing.to_dict(), "sets": sets.facts,
        "neurons": result.plan.total, "acc_before": result.before.accuracy, "acc_after": result.after.accuracy,
        "asr_before": result.before.asr, "asr_after": result.after.asr,
        "pruned": result.plan.count, "pruning": result.plan.describe(), "iterations": opt.iterations,
        "seconds": round(seconds, 1), "anp_seconds": round(opt.seconds, 1) if result.masks else 0.0,
        "anp_skipped": opt.skipped or None, "device": opt.device,
        "noise_target": opt.target, "probe": opt.probe.to_dict() if opt.probe else None,
        "signal_gone": result.curve.signal_gone if result.curve is not None else None,
        "rule_kind": rule_kind(result), "rule": result.curve.rule if result.curve is not None else None,
        "chosen": result.curve.to_dict()["chosen"] if result.curve is not None else None,
        "refinements": result.refinements,
    }
    if sets.triggered is None:
        return row
    rep = anp_onnx.Repairer.open(model.path, preprocessing=model.preprocessing)
    test, triggered = rep.load_data(sets.test), rep.load_data(sets.triggered)
    if not one_target:  # ASR as label + 1, measured here in onnxruntime (the library's ASR is all-to-one)
        k = rep.model.num_classes
        for key, loaded in (("asr_before", rep.model), ("asr_after", load_model(result.output))):
            row[key] = oracle.attack_success(predict(loaded, triggered, model.preprocessing), triggered.y,
                                             None, model.mode, k)
    if args.no_oracle:
        return row
    rep.set_centres(opt.centres or {})
    row["torch_ort_check"] = torch_ort_check(rep, result, test, model)
    device = opt.device
    row["oracle_method"] = oracle_of(rep, result.masks, opt.mean_masks, opt.centres, test, triggered, model,
                                     device, args.oracle_points) if result.masks else \
        {"text": "ANP not run", "anp_not_run": opt.skipped}
    if args.reference and result.masks:  # the method is the reference loop: its masks are the reference's
        row["oracle_reference"] = {**row["oracle_method"], "same_as_method": True}
        return row
    if args.no_reference_oracle:
        return row
    ref_config = anp_onnx.ANPConfig.reference(
        iterations=opt.iterations if isinstance(config, anp_onnx.ANPConfig) else None, device=opt.device,
        seed=config.seed, batch_size=config.batch_size).resolve()
    if (result.masks and opt.target is None and isinstance(config, anp_onnx.ANPConfig)
            and replace(config.resolve(), target=None) == ref_config):
        # the probe named no target: the default loop WAS the reference loop (same settings and seed)
        row["oracle_reference"] = {**row["oracle_method"], "same_loop_as_default": True}
        return row
    clean = rep.load_data(sets.clean)
    train, _ = clean.split(DEFAULT_HOLDOUT, seed=config.seed) if DEFAULT_HOLDOUT else (clean, None)
    ref = rep.optimize(train, ref_config)
    row["oracle_reference"] = {**oracle_of(rep, ref.masks, ref.mean_masks, ref.centres, test, triggered, model,
                                           device, args.oracle_points), "anp_seconds": round(ref.seconds, 1)}
    return row


def unlearn_settings() -> dict:
    from dataclasses import asdict

    from anp_onnx.unlearn import TriggerUnlearning
    return asdict(TriggerUnlearning.settings)


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), **cpu_facts(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="row names or groups: samples, public, clean, all (default: all available)")
    p.add_argument("--iterations", type=int, help="ANP iterations (default: anp-onnx's default for the device)")
    p.add_argument("--eps", type=float, help="ANP eps (default: anp-onnx's default)")
    p.add_argument("--batch-size", type=int, help="ANP batch size (default: anp-onnx's default, 128)")
    p.add_argument("--alpha", type=float, help="ANP clean-loss weight (default: anp-onnx's default, 0.2)")
    p.add_argument("--reference", action="store_true",
                   help="the method is the reference ANP loop (untargeted) with pruning threshold 0.2")
    p.add_argument("--rnp", action="store_true",
                   help="the method is RNP's masks (anp_onnx.RNPConfig) with pruning threshold 0.2, no refinements")
    p.add_argument("--pruning", type=parse_spec, help="auto[=budget], threshold=T, count=K "
                   "(default: auto; threshold=0.2 with --reference)")
    p.add_argument("--refinements", nargs="*", default=None, metavar="NAME",
                   help="refinements after the pruning (default: anp-onnx's, 'unlearn'; none with --reference; "
                        "give no name for none)")
    p.add_argument("--unlearn", nargs="+", default=[], metavar="KEY=VALUE",
                   help="settings of the unlearn refinement to try instead of its defaults "
                        "(anp_onnx.unlearn.UnlearnSettings fields, e.g. guard_se=2 precision=fp32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder (default ../shared)")
    p.add_argument("--no-oracle", action="store_true", help="skip the two oracle columns (and the reference run)")
    p.add_argument("--no-reference-oracle", action="store_true",
                   help="skip the reference loop's oracle column (and its ANP run)")
    p.add_argument("--oracle-points", type=int, default=oracle.GRID_POINTS, help="oracle grid points (default 24)")
    p.add_argument("--summary", action="store_true", help="also print how many models meet the targets")
    p.add_argument("--from", dest="from_json", type=Path, nargs="+",
                   help="print the table of saved JSON files, their rows together (no run)")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep every repaired ONNX file and its masks in DIR (never commit the public bench's)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    args = p.parse_args(argv)
    if args.refinements is None:
        from anp_onnx.options import DEFAULT_REFINEMENTS
        args.refinements = () if args.reference or args.rnp else DEFAULT_REFINEMENTS
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(f.read_text())["rows"]]
        print(table(rows))
        if args.summary:
            print("\n" + summary(rows))
        return 0

    import anp_onnx
    from anp_onnx.prune import REFERENCE_THRESHOLD, PruneSpec

    if args.unlearn:
        from anp_onnx.unlearn import TriggerUnlearning, UnlearnSettings
        fields = UnlearnSettings.__dataclass_fields__
        try:
            changes = {k: v if isinstance(getattr(UnlearnSettings, k), str) else
                       type(getattr(UnlearnSettings, k))(float(v)) for k, v in
                       (item.split("=", 1) for item in args.unlearn)}
        except (AttributeError, ValueError) as exc:
            p.error(f"--unlearn: {exc} (fields: {', '.join(fields)})")
        TriggerUnlearning.settings = replace(TriggerUnlearning.settings, **changes)

    if args.rnp and args.reference:
        p.error("--rnp and --reference are two methods: give one")
    config = (anp_onnx.RNPConfig if args.rnp else anp_onnx.ANPConfig.reference if args.reference else
              anp_onnx.ANPConfig)(device=args.device, seed=args.seed)
    for key in ("iterations", "eps", "batch_size", "alpha"):
        if getattr(args, key) is not None:
            config = replace(config, **{key: getattr(args, key)})
    pruning = args.pruning or (PruneSpec.threshold(REFERENCE_THRESHOLD) if args.reference or args.rnp
                               else PruneSpec())
    try:
        models, missing = bench_models(args.shared).select(args.models)
    except KeyError as exc:
        p.error(str(exc.args[0]))
    for name, why in missing.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    rows = []
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            try:
                row = run_model(model, args, config, pruning, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end of the bench
                traceback.print_exc()
                row = {"model": model.name, "source": model.source, "error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if args.summary:
        print("\n" + summary(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/quality.py"] + (argv if argv is not None else sys.argv[1:])),
        "settings": config.to_dict(), "pruning": pruning.to_dict(), "machine": machine(),
        "refinements": list(args.refinements), "unlearn_settings": unlearn_settings(),
        "oracle": {"note": ORACLE_NOTE, "max_asr": oracle.MAX_ASR, "max_fraction": oracle.MAX_FRACTION,
                   "grid_points": args.oracle_points, "skipped": args.no_oracle,
                   "uses": "the triggered TEST set, for diagnosis only; it never feeds a decision"},
        "data": {"cifar_pick_seed": CIFAR_PICK_SEED, "shared": str(args.shared)},
        "missing": missing, "left_out": LEFT_OUT, "rows": rows,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
