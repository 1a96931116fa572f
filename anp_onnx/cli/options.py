"""Reusable option groups of the commands, and the builders of library settings from parsed options.

The library names the CLI needs that ``anp_onnx`` does not export at its root are imported here, and
only here, so that they are easy to re-point when the root exports them.
"""

from __future__ import annotations

import argparse
import math

from .. import (
    CPU_ITERATIONS, DEFAULT_HOLDOUT, DEFAULT_MAX_DROP, DEFAULT_SIGNAL_MAX_DROP, PRESETS, REFERENCE_ITERATIONS,
    REFERENCE_THRESHOLD, ANPConfig, AnpOnnxError, Cancelled, Preprocessing, PruneSpec,
)

from . import PROG

__all__ = ["PROG", "REFERENCE_THRESHOLD", "DEFAULT_HOLDOUT", "Cancelled", "Parser", "model_options",
           "neuron_options", "pruning_options", "renormalise_option", "anp_options", "holdout", "_spec",
           "_config"]



class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- argument types


def _preprocessing(text: str) -> Preprocessing:
    try:
        return Preprocessing.parse(text)
    except AnpOnnxError as exc:  # keep the library's explanation (presets, syntax)
        raise argparse.ArgumentTypeError(str(exc)) from None


def finite(text: str) -> float:
    """A finite number (NaN and infinity slip through every range check written as ``x < 0``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def holdout(text: str) -> float:
    """A fraction in [0, 1) or a whole number of images."""
    value = finite(text)
    if value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError("give a fraction in [0, 1) or a whole number of images")
    return int(value) if value >= 1 else value


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


# ----------------------------------------------------------------------------- option groups


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], help="image layout of the input (default: guessed)")
    p.add_argument("--preprocess", type=_preprocessing, default=None, metavar="SPEC",
                   help=f"input preprocessing: a preset ({', '.join(PRESETS)}) or "
                        "'mean=R,G,B;std=R,G,B;scale=S' (default: from the model's anp-onnx metadata, else unit: "
                        "pixels in [0,1])")


def neuron_options(p: argparse.ArgumentParser) -> None:
    from ..neurons import all_kinds  # not exported at the package root either

    p.add_argument("--kinds", nargs="+", choices=sorted(all_kinds()), metavar="KIND",
                   help=f"neuron kinds to use ({', '.join(sorted(all_kinds()))}; default: the normalisation "
                        "kinds, or conv when the model has none)")
    p.add_argument("--layers", nargs="+", metavar="PATTERN", help="only neuron layers whose name matches (glob)")
    p.add_argument("--exclude-layers", nargs="+", metavar="PATTERN", help="skip neuron layers whose name matches")


def pruning_options(p: argparse.ArgumentParser, auto_default: bool) -> None:
    default = ("--auto: the fewest neurons, in mask order, that remove the backdoor signal of the suspected "
               "target (within --signal-max-drop of held-out accuracy); without one, prune until held-out clean "
               "accuracy first drops by more than --max-drop"
               if auto_default else f"--threshold {REFERENCE_THRESHOLD}, the reference's choice")
    g = p.add_argument_group(f"pruning (one of; default {default})")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--auto", action="store_true",
                   help="automatic choice from clean data only (needs held-out clean data; see the group's default)")
    x.add_argument("--threshold", type=finite,
                   help=f"prune every neuron with mask <= T (reference: {REFERENCE_THRESHOLD})")
    x.add_argument("--count", type=int, help="prune the K neurons with the lowest masks")
    x.add_argument("--fraction", type=finite, help="prune this fraction of all neurons, lowest masks first")
    g.add_argument("--max-drop", type=finite, default=DEFAULT_MAX_DROP,
                   help=f"accuracy budget of --auto without a backdoor signal, as a fraction (default "
                        f"{DEFAULT_MAX_DROP} = 2 points)")
    g.add_argument("--signal-max-drop", type=finite, default=DEFAULT_SIGNAL_MAX_DROP,
                   help="most held-out accuracy --auto may spend to remove the backdoor signal (default "
                        f"{DEFAULT_SIGNAL_MAX_DROP} = 10 points)")
    p.set_defaults(auto_default=auto_default)


def renormalise_option(p) -> None:
    p.add_argument("--no-renormalise", action="store_true",
                   help="neurons of layers that do not normalise (conv/linear channels, per-channel Mul+Add: "
                        "BatchNorm folded away) scale their weights directly, as in ANP's paper, instead of "
                        "being perturbed as BatchNorm channels with the clean data's statistics (the default, "
                        "which also lets the collapse probe run on such models)")


def anp_options(p: argparse.ArgumentParser) -> None:
    d = ANPConfig()
    g = p.add_argument_group("ANP optimisation (defaults: the reference code's, but for --anp-target)")
    g.add_argument("--anp-target", type=_anp_target, default=d.target, metavar="auto|none|CLASS",
                   help="push the neuron noise towards a class: auto (default) when clean images under neuron "
                        "noise clearly collapse to one class (the suspected backdoor target), none = the "
                        "reference's untargeted noise, or a class index")
    g.add_argument("--reference", action="store_true",
                   help="the reference ANP exactly: untargeted noise (--anp-target none) and, unless another "
                        f"pruning option is given, --threshold {REFERENCE_THRESHOLD}")
    g.add_argument("--iterations", type=int, default=None,
                   help=f"optimisation iterations, one batch each (default: {REFERENCE_ITERATIONS}, the reference, "
                        f"on a GPU; {CPU_ITERATIONS} on a CPU)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    g.add_argument("--eps", type=finite, default=d.eps, help="neuron perturbation budget of untargeted noise")
    g.add_argument("--targeted-eps", type=finite, default=d.targeted_eps,
                   help="neuron perturbation budget of targeted noise (see --anp-target)")
    g.add_argument("--steps", type=int, default=d.steps, help="perturbation steps per iteration")
    g.add_argument("--alpha", type=finite, default=d.alpha, help="weight of the clean loss (1-alpha: perturbed)")
    g.add_argument("--mask-lr", type=finite, default=d.mask_lr, help="SGD learning rate of the masks")
    g.add_argument("--momentum", type=finite, default=d.momentum, help="SGD momentum of the masks")
    g.add_argument("--bn-mode", choices=["train", "eval"], default=d.bn_mode,
                   help="normalise with batch statistics (train, as the reference) or running statistics")
    g.add_argument("--no-augment", action="store_true", help="no random crop and flip of the clean images")
    g.add_argument("--crop-padding", type=int, default=None, help="random-crop padding in pixels (default: 4 at 32px)")
    g.add_argument("--project-noise", action="store_true", help="clip the noise to [-eps, eps] after each step")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (same seed, same masks)")
    g.add_argument("--device", default=d.device, help="auto (CUDA when available), cpu, cuda or cuda:N")
    renormalise_option(g)


# ----------------------------------------------------------------------------- builders


def _spec(args: argparse.Namespace) -> PruneSpec:
    """The pruning rule the options ask for (see :func:`pruning_options`)."""
    if args.count is not None:
        return PruneSpec.count(args.count)
    if args.fraction is not None:
        return PruneSpec.fraction(args.fraction)
    if args.threshold is not None:
        return PruneSpec.threshold(args.threshold)
    if getattr(args, "reference", False) and not args.auto:
        return PruneSpec.threshold(REFERENCE_THRESHOLD)
    if args.auto or args.auto_default:
        return PruneSpec.auto(args.max_drop)
    return PruneSpec.threshold(REFERENCE_THRESHOLD)


def _config(args: argparse.Namespace) -> ANPConfig:
    """The ANP settings the options ask for (see :func:`anp_options`)."""
    return ANPConfig(
        eps=args.eps, steps=args.steps, alpha=args.alpha, mask_lr=args.mask_lr, momentum=args.momentum,
        iterations=args.iterations, batch_size=args.batch_size, bn_mode=args.bn_mode, augment=not args.no_augment,
        crop_padding=args.crop_padding, project_noise=args.project_noise, seed=args.seed, device=args.device,
        target=None if args.reference else args.anp_target, targeted_eps=args.targeted_eps,
        renormalise=not args.no_renormalise,
    )
