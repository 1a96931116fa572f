"""Command line: ``anp-onnx inspect | repair | prune | evaluate``.

:func:`main` takes an argument list and returns the exit code (0 success, 1 error), so it is tested
directly. Errors caused by the user's input print one line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from . import __version__
from .anp import CPU_ITERATIONS, REFERENCE_ITERATIONS, ANPConfig
from .curve import DEFAULT_MAX_DROP, DEFAULT_SIGNAL_MAX_DROP
from .api import DEFAULT_HOLDOUT, ModelInfo, RepairResult, evaluate_model, inspect_model, prune, repair
from .data import PRESETS, Preprocessing
from .errors import AnpOnnxError, Cancelled
from .evaluate import EvalResult
from .progress import ProgressEvent
from .prune import PrunePlan, PruneSpec

PROG = "anp-onnx"
_LOGGER = logging.getLogger("anp_onnx")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _preprocessing(text: str) -> Preprocessing:
    try:
        return Preprocessing.parse(text)
    except AnpOnnxError as exc:  # keep the library's explanation (presets, syntax)
        raise argparse.ArgumentTypeError(str(exc)) from None


def _holdout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError("give a fraction in [0, 1) or a whole number of images")
    return int(value) if value >= 1 else value


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], help="image layout of the input (default: guessed)")
    p.add_argument("--preprocess", type=_preprocessing, default=None, metavar="SPEC",
                   help=f"input preprocessing: a preset ({', '.join(PRESETS)}) or "
                        "'mean=R,G,B;std=R,G,B;scale=S' (default: from the model's anp-onnx metadata, else unit: "
                        "pixels in [0,1])")


def _neuron_options(p: argparse.ArgumentParser) -> None:
    from .neurons import all_kinds

    p.add_argument("--kinds", nargs="+", choices=sorted(all_kinds()), metavar="KIND",
                   help=f"neuron kinds to use ({', '.join(sorted(all_kinds()))}; default: the normalisation "
                        "kinds, or conv when the model has none)")
    p.add_argument("--layers", nargs="+", metavar="PATTERN", help="only neuron layers whose name matches (glob)")
    p.add_argument("--exclude-layers", nargs="+", metavar="PATTERN", help="skip neuron layers whose name matches")


def _pruning_options(p: argparse.ArgumentParser, auto_default: bool) -> None:
    default = ("--auto: the fewest neurons, in mask order, that remove the backdoor signal of the suspected "
               "target (within --signal-max-drop of held-out accuracy); without one, prune until held-out clean "
               "accuracy first drops by more than --max-drop"
               if auto_default else "--threshold 0.2, the reference's choice")
    g = p.add_argument_group(f"pruning (one of; default {default})")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--auto", action="store_true",
                   help="automatic choice from clean data only (needs held-out clean data; see the group's default)")
    x.add_argument("--threshold", type=float, help="prune every neuron with mask <= T (reference: 0.2)")
    x.add_argument("--count", type=int, help="prune the K neurons with the lowest masks")
    x.add_argument("--fraction", type=float, help="prune this fraction of all neurons, lowest masks first")
    g.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP,
                   help=f"accuracy budget of --auto without a backdoor signal, as a fraction (default "
                        f"{DEFAULT_MAX_DROP} = 2 points)")
    g.add_argument("--signal-max-drop", type=float, default=DEFAULT_SIGNAL_MAX_DROP,
                   help="most held-out accuracy --auto may spend to remove the backdoor signal (default "
                        f"{DEFAULT_SIGNAL_MAX_DROP} = 10 points)")
    p.set_defaults(auto_default=auto_default)


def _anp_target(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto, none or a class index, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a class index must be >= 0")
    return value


def _renormalise_option(p) -> None:
    p.add_argument("--no-renormalise", action="store_true",
                   help="neurons of layers that do not normalise (conv/linear channels, per-channel Mul+Add: "
                        "BatchNorm folded away) scale their weights directly, as in ANP's paper, instead of "
                        "being perturbed as BatchNorm channels with the clean data's statistics (the default, "
                        "which also lets the collapse probe run on such models)")


def _anp_options(p: argparse.ArgumentParser) -> None:
    d = ANPConfig()
    g = p.add_argument_group("ANP optimisation (defaults: the reference code's, but for --anp-target)")
    g.add_argument("--anp-target", type=_anp_target, default=d.target, metavar="auto|none|CLASS",
                   help="push the neuron noise towards a class: auto (default) when clean images under neuron "
                        "noise clearly collapse to one class (the suspected backdoor target), none = the "
                        "reference's untargeted noise, or a class index")
    g.add_argument("--reference", action="store_true",
                   help="the reference ANP exactly: untargeted noise (--anp-target none) and, unless another "
                        "pruning option is given, --threshold 0.2")
    g.add_argument("--iterations", type=int, default=None,
                   help=f"optimisation iterations, one batch each (default: {REFERENCE_ITERATIONS}, the reference, "
                        f"on a GPU; {CPU_ITERATIONS} on a CPU)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    g.add_argument("--eps", type=float, default=d.eps, help="neuron perturbation budget of untargeted noise")
    g.add_argument("--targeted-eps", type=float, default=d.targeted_eps,
                   help="neuron perturbation budget of targeted noise (see --anp-target)")
    g.add_argument("--steps", type=int, default=d.steps, help="perturbation steps per iteration")
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the clean loss (1-alpha: perturbed)")
    g.add_argument("--mask-lr", type=float, default=d.mask_lr, help="SGD learning rate of the masks")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum of the masks")
    g.add_argument("--bn-mode", choices=["train", "eval"], default=d.bn_mode,
                   help="normalise with batch statistics (train, as the reference) or running statistics")
    g.add_argument("--no-augment", action="store_true", help="no random crop and flip of the clean images")
    g.add_argument("--crop-padding", type=int, default=None, help="random-crop padding in pixels (default: 4 at 32px)")
    g.add_argument("--project-noise", action="store_true", help="clip the noise to [-eps, eps] after each step")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed, same masks)")
    g.add_argument("--device", default=d.device, help="auto (CUDA when available), cpu, cuda or cuda:N")
    _renormalise_option(g)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Remove backdoors from ONNX image classifiers with "
                                            "Adversarial Neuron Pruning (ANP).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="describe a model: input, classes, neurons, conversion check",
                       description="Describe a model and check that its torch conversion matches onnxruntime.")
    _model_options(p)
    _neuron_options(p)
    p.add_argument("--data", help="clean images for the conversion check (default: random images) and the "
                                  "collapse probe (does the model collapse to a suspected backdoor target under "
                                  "neuron noise?)")
    _renormalise_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("repair", help="learn ANP masks on clean data, prune, and write the repaired model",
                       description="Learn ANP masks on clean data, prune the lowest, fold the pruning into a "
                                   "copy of the ONNX model and verify it in onnxruntime.")
    _model_options(p)
    p.add_argument("--data", required=True, help="clean images: class folders or .npz (x, y)")
    p.add_argument("--out", required=True, help="repaired model to write (never the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and the masks files) if they exist")
    p.add_argument("--masks-out", help="masks JSON (default: OUT with .masks.json; a mask_values.txt goes beside)")
    p.add_argument("--no-report", action="store_true", help="do not write the report (JSON + Markdown with plots)")
    p.add_argument("--holdout", type=_holdout, default=DEFAULT_HOLDOUT,
                   help="fraction (<1) or count of the clean data kept aside (stratified) for the pruning "
                        f"curve and the automatic choice (default {DEFAULT_HOLDOUT})")
    p.add_argument("--test", help="clean test images to measure accuracy before and after")
    p.add_argument("--poisoned", help="triggered test images (true labels) to measure attack success rate")
    p.add_argument("--target", type=int, help="attack target class (default: majority prediction on --poisoned)")
    _neuron_options(p)
    _anp_options(p)
    _pruning_options(p, auto_default=True)

    p = sub.add_parser("prune", help="prune from saved masks (no new optimisation)",
                       description="Prune a model from masks saved by 'repair' (or a reference mask_values.txt).")
    _model_options(p)
    p.add_argument("--masks", required=True, help="masks JSON or mask_values.txt")
    p.add_argument("--out", required=True, help="pruned model to write (never the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--data", help="clean images for --auto and the onnxruntime verification (default: random images)")
    _neuron_options(p)
    _pruning_options(p, auto_default=False)

    p = sub.add_parser("evaluate", help="clean accuracy and attack success rate in onnxruntime",
                       description="Measure clean accuracy and, with triggered images, attack success rate "
                                   "(images whose true label is the target are excluded).")
    _model_options(p)
    p.add_argument("--data", help="clean test images (class folders or .npz)")
    p.add_argument("--poisoned", help="triggered test images with their true labels")
    p.add_argument("--target", type=int, help="target class (default: majority prediction on --poisoned)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _spec(args: argparse.Namespace) -> PruneSpec:
    if args.count is not None:
        return PruneSpec.count(args.count)
    if args.fraction is not None:
        return PruneSpec.fraction(args.fraction)
    if args.threshold is not None:
        return PruneSpec.threshold(args.threshold)
    if getattr(args, "reference", False) and not args.auto:
        return PruneSpec.threshold(0.2)
    if args.auto or args.auto_default:
        return PruneSpec.auto(args.max_drop)
    return PruneSpec.threshold(0.2)


def _config(args: argparse.Namespace) -> ANPConfig:
    return ANPConfig(
        eps=args.eps, steps=args.steps, alpha=args.alpha, mask_lr=args.mask_lr, momentum=args.momentum,
        iterations=args.iterations, batch_size=args.batch_size, bn_mode=args.bn_mode, augment=not args.no_augment,
        crop_padding=args.crop_padding, project_noise=args.project_noise, seed=args.seed, device=args.device,
        target=None if args.reference else args.anp_target, targeted_eps=args.targeted_eps,
        renormalise=not args.no_renormalise,
    )


class _Bar:
    """tqdm progress bars fed by the library's progress events, one per stage."""

    LABELS = {"optimise": "ANP", "sweep": "pruning curve", "evaluate": "evaluate"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.stage = ""

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled or event.stage not in ("optimise", "sweep"):
            return
        if self.bar is None or event.stage != self.stage:
            from tqdm import tqdm

            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=self.LABELS.get(event.stage, event.stage),
                            unit="it" if event.stage == "optimise" else "pt", file=sys.stderr, dynamic_ncols=True)
        self.bar.n = event.step
        self.bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in event.metrics.items()},
                             refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _print_info(info: ModelInfo) -> None:
    print(f"model      {info.path}")
    print(f"producer   {info.producer or '-'}  (IR {info.ir_version}, opset {info.opset})")
    print(f"input      {info.input.describe()}")
    print(f"classes    {info.num_classes}")
    print(f"neurons    {info.neurons.total} in {len(info.neurons.layers)} layers")
    rows = [[layer.name, layer.kind, str(layer.size)] for layer in info.neurons.layers]
    print(_table(rows, ["layer", "kind", "neurons"]))
    if info.neurons.excluded:
        print(f"excluded   {', '.join(info.neurons.excluded)}")
    for note in info.notes:
        print(f"note       {note}")
    print(f"parity     max |torch - onnxruntime| = {info.parity:.2e}")
    if info.probe is not None:
        print(f"probe      {info.probe.describe()}")


def _pruned_table(plan: PrunePlan, sizes: dict[str, int]) -> str:
    rows = [[name, str(n), str(sizes[name])] for name, n in plan.per_layer().items() if n]
    rows.append(["total", str(plan.count), str(plan.total)])
    return _table(rows, ["layer", "pruned", "neurons"])


def _score_rows(before: Optional[EvalResult], after: Optional[EvalResult], label: str) -> list[list[str]]:
    if before is None or after is None:
        return []
    rows = []
    if before.accuracy is not None:
        rows.append([f"{label} accuracy ({before.n_clean} images)", _pct(before.accuracy), _pct(after.accuracy)])
    if before.asr is not None:
        how = "inferred" if before.target_inferred else "given"
        rows.append([f"attack success rate (target {before.target}, {how})", _pct(before.asr), _pct(after.asr)])
    return rows


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.model, layout=args.layout, data=args.data, preprocessing=args.preprocess,
                         kinds=args.kinds, include=args.layers, exclude=args.exclude_layers,
                         renormalise=not args.no_renormalise)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        _print_info(info)
        if args.data and info.probe is None:
            print("probe      not run: it needs every neuron layer to normalise its input (BatchNorm, "
                  "InstanceNorm, GroupNorm, LayerNorm) or to be renormalised (not with --no-renormalise; "
                  "a lone per-channel Mul and a MatMul without a bias Add cannot be)")
    return 0


def _cmd_repair(args: argparse.Namespace) -> int:
    holdout = args.holdout
    bar = _Bar(enabled=not args.quiet)
    try:
        result: RepairResult = repair(
            args.model, args.data, out=args.out, config=_config(args), pruning=_spec(args),
            preprocessing=args.preprocess, layout=args.layout, holdout=holdout, test_data=args.test,
            poisoned_data=args.poisoned, target=args.target, masks_out=args.masks_out, overwrite=args.overwrite,
            kinds=args.kinds, include=args.layers, exclude=args.exclude_layers, report=not args.no_report,
            signal_max_drop=args.signal_max_drop, progress=bar,
        )
    finally:
        bar.close()
    sizes = {layer.name: layer.size for layer in result.layers}
    print(f"\nPruned {result.plan.count} of {result.plan.total} neurons ({result.plan.spec.describe()}):")
    print(_pruned_table(result.plan, sizes))
    print()
    rows = _score_rows(result.holdout_before, result.holdout_after, "held-out clean")
    rows += _score_rows(result.before, result.after, "test")
    if rows:
        print(_table(rows, ["", "before", "after"]))
    opt = result.optimisation
    if opt.centres:
        print(f"renormalised layers: {len(opt.centres)} without normalisation, perturbed as BatchNorm channels "
              "(--no-renormalise: off)")
    if opt.probe is not None:
        print(f"collapse probe: {opt.probe.describe()}")
    print("ANP noise: " + (f"targeted at class {opt.target}" if opt.target is not None
                           else "untargeted (the reference's)"))
    if result.curve is not None:
        c = result.curve
        if c.suspected_target is not None and c.points[0].signal is not None:
            state = "gone" if c.signal_gone else "still there"
            now = f"{_pct(c.chosen.signal)}" if c.chosen.signal is not None else "-"
            print(f"backdoor signal: {state} (neuron noise aimed at class {c.suspected_target} sends "
                  f"{_pct(c.points[0].signal)} of clean images there unpruned, {now} at the automatic choice)")
        print(f"automatic choice: {c.chosen.count} neurons (mask <= {c.chosen.threshold:.3f}), held-out accuracy "
              f"{_pct(c.baseline)} -> {_pct(c.chosen.accuracy)}; rule: {c.rule}")
        if result.plan.spec.mode != "auto":
            print(f"used instead: {result.plan.spec.describe()}")
    print(f"\nANP: {result.optimisation.iterations} iterations in {result.optimisation.seconds:.1f} s "
          f"on {result.optimisation.device}; total {result.seconds:.1f} s")
    for f in result.files:
        print(f"wrote {f}")
    diff = result.export.max_abs_diff
    print(f"PASSED: {result.output} verified in onnxruntime (max |diff| vs pruned torch model {diff:.1e})")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    plan, export = prune(args.model, args.masks, out=args.out, pruning=_spec(args), layout=args.layout,
                         preprocessing=args.preprocess, overwrite=args.overwrite, verify_data=args.data,
                         kinds=args.kinds, include=args.layers, exclude=args.exclude_layers)
    print(f"Pruned {plan.count} of {plan.total} neurons ({plan.spec.describe()}):")
    rows = [[name, str(n)] for name, n in plan.per_layer().items() if n] + [["total", str(plan.count)]]
    print(_table(rows, ["layer", "pruned"]))
    print(f"wrote {export.path}")
    print(f"PASSED: {export.path} verified in onnxruntime (max |diff| {export.max_abs_diff:.1e})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    result = evaluate_model(args.model, args.data, poisoned=args.poisoned, target=args.target,
                            preprocessing=args.preprocess, layout=args.layout)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if result.accuracy is not None:
        print(f"clean accuracy        {_pct(result.accuracy)}  ({result.n_clean} images)")
    if result.asr is not None:
        how = "inferred from predictions" if result.target_inferred else "given"
        print(f"attack success rate   {_pct(result.asr)}  ({result.n_poisoned} triggered images, "
              f"target {result.target} {how})")
    return 0


_COMMANDS = {"inspect": _cmd_inspect, "repair": _cmd_repair, "prune": _cmd_prune, "evaluate": _cmd_evaluate}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version exit 0, usage errors 1
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    _LOGGER.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        return _COMMANDS[args.command](args)
    except Cancelled:
        print(f"{PROG}: cancelled; nothing was written", file=sys.stderr)
        return 1
    except AnpOnnxError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
