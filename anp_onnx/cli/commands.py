"""The commands and their parser: :func:`run` is :func:`anp_onnx.cli.main` once the library is loaded.

Imported by :func:`anp_onnx.cli.main` inside its Ctrl-C guard, since importing the commands imports
the library (and torch), which takes seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .. import AnpOnnxError, __version__
from . import INTERRUPTED, evaluate, inspect, prune, render, repair
from .options import PROG, Cancelled, Parser, _config, _spec

__all__ = ["run", "build_parser", "PROG", "COMMANDS", "_config", "_spec"]

_LOGGER = logging.getLogger("anp_onnx")
#: The commands' modules by name, in the order of ``--help``.
COMMANDS = {m.NAME: m for m in (inspect, repair, prune, evaluate)}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Remove backdoors from ONNX image classifiers with "
                                           "Adversarial Neuron Pruning (ANP).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> int:
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
    command = COMMANDS[args.command]

    def failed(why: str = "") -> None:
        render.failed(command.attempted(args) + why, json_output=getattr(args, "json", False))

    try:
        return command.run(args)
    except Cancelled:
        print(f"{PROG}: cancelled; nothing was written", file=sys.stderr)
        failed(" (cancelled)")
        return 1
    except AnpOnnxError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        failed()
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        failed(" (interrupted)")
        return INTERRUPTED
    except Exception:  # a bug, not the user's input: its traceback follows, stdout still ends with FAILED
        failed()
        raise
