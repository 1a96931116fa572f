"""``anp-onnx prune``: prune a model from saved masks, without a new optimisation."""

from __future__ import annotations

import argparse

from .. import prune as prune_model
from . import render
from .options import _spec, model_options, neuron_options, pruning_options

NAME = "prune"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="prune from saved masks (no new optimisation)",
                              description="Prune a model from masks saved by 'repair' (or a reference "
                                          "mask_values.txt).")
    model_options(p)
    p.add_argument("--masks", required=True, help="masks JSON or mask_values.txt")
    p.add_argument("--out", required=True, help="pruned model to write (never the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--data", help="clean images for --auto and the onnxruntime verification (default: random images)")
    neuron_options(p)
    pruning_options(p, auto_default=False)
    return p


def attempted(args: argparse.Namespace) -> str:
    return f"prune {args.model} -> {args.out}"


def run(args: argparse.Namespace) -> int:
    plan, export = prune_model(args.model, args.masks, out=args.out, pruning=_spec(args), layout=args.layout,
                               preprocessing=args.preprocess, overwrite=args.overwrite, verify_data=args.data,
                               kinds=args.kinds, include=args.layers, exclude=args.exclude_layers)
    print(f"Pruned {plan.count} of {plan.total} neurons ({plan.spec.describe()}):")
    print(render.pruned_table(plan))
    print(f"wrote {export.path}")
    render.passed(f"{export.path} verified in onnxruntime (max |diff| {export.max_abs_diff:.1e})")
    return 0
