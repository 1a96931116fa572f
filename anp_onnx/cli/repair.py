"""``anp-onnx repair``: learn ANP masks on clean data, prune, and write the verified repaired model."""

from __future__ import annotations

import argparse

from .. import RepairResult, refinement_summary, repair
from . import render
from .options import (
    DEFAULT_HOLDOUT, _config, _spec, anp_options, holdout, model_options, neuron_options, pruning_options,
)

NAME = "repair"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="repair a backdoored model on clean data and write the repaired model",
                              description="Repair a backdoored ONNX classifier on clean data: probe for a backdoor "
                                          "target, unlearn a reconstructed trigger, and prune with ANP masks where "
                                          "pruning is asked for or can still help; write the changes into a copy "
                                          "of the ONNX model and verify it in onnxruntime. With the default "
                                          "(automatic choice and unlearning), ANP runs only when the unlearning "
                                          "changed no weight and the probe named a target: otherwise its masks "
                                          "could not change the output, and no masks file is written.")
    model_options(p)
    p.add_argument("--data", required=True, help="clean images: class folders or .npz (x, y)")
    p.add_argument("--out", required=True, help="repaired model to write (never the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and the masks files) if they exist")
    p.add_argument("--masks-out", help="masks JSON (default: OUT with .masks.json; a mask_values.txt goes beside), "
                                       "written when ANP ran")
    p.add_argument("--no-report", action="store_true", help="do not write the report (JSON + Markdown with plots)")
    p.add_argument("--holdout", type=holdout, default=DEFAULT_HOLDOUT,
                   help="fraction (<1) or count of the clean data kept aside (stratified) for the pruning "
                        f"curve and the automatic choice (default {DEFAULT_HOLDOUT})")
    p.add_argument("--test", help="clean test images to measure accuracy before and after")
    p.add_argument("--poisoned", help="triggered test images (true labels) to measure attack success rate")
    p.add_argument("--target", type=int, help="attack target class (default: majority prediction on --poisoned)")
    p.add_argument("--refine", choices=["unlearn", "unlearn-bf16", "none"], default=None,
                   help="unlearn = reconstruct a trigger for the suspected target (and the class a per-class "
                        "scan finds) and unlearn it, changing weights (default; the automatic choice then prunes "
                        "nothing, a --count or --threshold still prunes first); unlearn-bf16 = the same with its "
                        "rounds in bfloat16 where the CPU (AVX-512 BF16 or AMX) or GPU computes it natively: "
                        "about twice as fast there, results differ slightly; none = ANP pruning only (the "
                        "default with --reference)")
    neuron_options(p)
    anp_options(p)
    pruning_options(p, auto_default=True)
    return p


def _refinements(args: argparse.Namespace) -> tuple[str, ...]:
    choice = args.refine or ("none" if args.reference else "unlearn")
    return () if choice == "none" else (choice,)


def attempted(args: argparse.Namespace) -> str:
    return f"repair {args.model} -> {args.out}"


def run(args: argparse.Namespace) -> int:
    bar = render.Bar(enabled=not args.quiet)
    try:
        result = repair(
            args.model, args.data, out=args.out, config=_config(args), pruning=_spec(args),
            preprocessing=args.preprocess, layout=args.layout, holdout=args.holdout, test_data=args.test,
            poisoned_data=args.poisoned, target=args.target, masks_out=args.masks_out, overwrite=args.overwrite,
            kinds=args.kinds, include=args.layers, exclude=args.exclude_layers, report=not args.no_report,
            signal_max_drop=args.signal_max_drop, refinements=_refinements(args), progress=bar,
        )
    finally:
        bar.close()
    _print_result(result)
    diff = result.export.max_abs_diff
    render.passed(f"{result.output} verified in onnxruntime (max |diff| vs pruned torch model {diff:.1e})")
    return 0


def _print_result(result: RepairResult) -> None:
    pct = render.pct
    sizes = {layer.name: layer.size for layer in result.layers}
    print(f"\nPruned {result.plan.count} of {result.plan.total} neurons ({result.plan.describe()}):")
    print(render.pruned_table(result.plan, sizes))
    print()
    rows = render.score_rows(result.holdout_before, result.holdout_after, "held-out clean")
    rows += render.score_rows(result.before, result.after, "test")
    if rows:
        print(render.table(rows, ["", "before", "after"]))
    opt = result.optimisation
    if opt.centres:
        print(f"renormalised layers: {len(opt.centres)} without normalisation, perturbed as BatchNorm channels "
              "(--no-renormalise: off)")
    if opt.probe is not None:
        print(f"collapse probe: {opt.probe.describe()}")
    if result.masks:
        print("ANP noise: " + (f"targeted at class {opt.target}" if opt.target is not None
                               else "untargeted (the reference's)"))
    if result.curve is not None:
        c = result.curve
        if c.suspected_target is not None and c.points[0].signal is not None:
            state = "gone" if c.signal_gone else "still there"
            now = f"{pct(c.chosen.signal)}" if c.chosen.signal is not None else "-"
            print(f"backdoor signal: {state} (neuron noise aimed at class {c.suspected_target} sends "
                  f"{pct(c.points[0].signal)} of clean images there unpruned, {now} at the automatic choice)")
        print(f"automatic choice: {c.chosen.count} neurons (mask <= {c.chosen.threshold:.3f}), held-out accuracy "
              f"{pct(c.baseline)} -> {pct(c.chosen.accuracy)}; rule: {c.rule}")
        if result.plan.spec.mode != "auto":
            print(f"used instead: {result.plan.spec.describe()}")
    for name, facts in result.refinements.items():
        print(f"refinement {name}: {refinement_summary(facts)}")
    if result.masks:
        print(f"\nANP: {opt.iterations} iterations in {opt.seconds:.1f} s on {opt.device}; "
              f"total {result.seconds:.1f} s")
    else:
        print(f"\nANP not run: {opt.skipped or 'stopped after the probe'}; total {result.seconds:.1f} s")
    for f in result.files:
        print(f"wrote {f}")
