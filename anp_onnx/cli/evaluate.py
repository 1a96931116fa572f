"""``anp-onnx evaluate``: clean accuracy and attack success rate of a model in onnxruntime."""

from __future__ import annotations

import argparse
import json

from .. import evaluate_model
from . import render
from .options import model_options

NAME = "evaluate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="clean accuracy and attack success rate in onnxruntime",
                              description="Measure clean accuracy and, with triggered images, attack success rate "
                                          "(images whose true label is the target are excluded).")
    model_options(p)
    p.add_argument("--data", help="clean test images (class folders or .npz)")
    p.add_argument("--poisoned", help="triggered test images with their true labels")
    p.add_argument("--target", type=int, help="target class (default: majority prediction on --poisoned of "
                                              "--original, else of MODEL unless anp-onnx repaired it)")
    p.add_argument("--original", help="the model before the repair: its predictions on --poisoned give the target")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def attempted(args: argparse.Namespace) -> str:
    return f"evaluate {args.model}"


def run(args: argparse.Namespace) -> int:
    result = evaluate_model(args.model, args.data, poisoned=args.poisoned, target=args.target,
                            preprocessing=args.preprocess, layout=args.layout, original=args.original)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        if result.accuracy is not None:
            print(f"clean accuracy        {render.pct(result.accuracy)}  ({result.n_clean} images)")
        if result.asr is not None:
            how = ("given" if not result.target_inferred else "inferred from predictions" if args.original is None
                   else "inferred from the original model's predictions")
            print(f"attack success rate   {render.pct(result.asr)}  ({result.n_poisoned} triggered images, "
                  f"target {result.target} {how})")
    render.passed(f"{args.model} evaluated in onnxruntime: {render.scores(result)}", json_output=args.json)
    return 0
