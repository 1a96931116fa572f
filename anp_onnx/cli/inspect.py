"""``anp-onnx inspect``: describe a model and check its torch conversion against onnxruntime."""

from __future__ import annotations

import argparse
import json

from .. import inspect_model
from . import render
from .options import model_options, neuron_options, renormalise_option

NAME = "inspect"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="describe a model: input, classes, neurons, conversion check",
                              description="Describe a model and check that its torch conversion matches "
                                          "onnxruntime.")
    model_options(p)
    neuron_options(p)
    p.add_argument("--data", help="clean images for the conversion check (default: random images) and the "
                                  "collapse probe (does the model collapse to a suspected backdoor target under "
                                  "neuron noise?)")
    renormalise_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def attempted(args: argparse.Namespace) -> str:
    return f"inspect {args.model}"


def run(args: argparse.Namespace) -> int:
    info = inspect_model(args.model, layout=args.layout, data=args.data, preprocessing=args.preprocess,
                         kinds=args.kinds, include=args.layers, exclude=args.exclude_layers,
                         renormalise=not args.no_renormalise)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        render.print_info(info)
        if args.data and info.probe is None:
            print("probe      not run: it needs every neuron layer to normalise its input (BatchNorm, "
                  "InstanceNorm, GroupNorm, LayerNorm) or to be renormalised (not with --no-renormalise; "
                  "a lone per-channel Mul and a MatMul without a bias Add cannot be)")
    parity = "" if info.parity is None else f" (max |diff| {info.parity:.1e})"
    render.passed(f"{args.model} converts; torch matches onnxruntime{parity}", json_output=args.json)
    return 0
