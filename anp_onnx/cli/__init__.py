"""Command line: ``anp-onnx inspect | repair | prune | evaluate``.

:func:`main` takes an argument list and returns the exit code (0 success, 1 error, 130 interrupted),
so it is tested directly. Errors caused by the user's input print one line without a traceback.
Every command ends with one ``PASSED: ...`` or ``FAILED: ...`` line on stdout (on stderr with
``--json``, so that stdout stays pure JSON); usage errors end with argparse's one line only.

This module imports nothing heavy: :func:`main` loads the commands (and with them the library and
torch, seconds of start-up) inside its Ctrl-C guard, so an interrupt at any moment, start-up
included, ends with one line and exit code 130, never a traceback.

Layout: :mod:`.commands` (the parser and the dispatch), :mod:`.options` (option groups, the
builders of ``ANPConfig``/``PruneSpec``), :mod:`.render` (tables, progress bars, the final line)
and one module per command, each with ``add_parser`` and ``run``. The commands call only the
public ``anp_onnx`` API.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser", "PROG", "COMMANDS", "_config", "_spec"]

PROG = "anp-onnx"
INTERRUPTED = 130
_LAZY = {"build_parser", "COMMANDS", "_config", "_spec"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: sys.argv[1:]); return the exit code."""
    try:
        from .commands import run  # the library and torch: Ctrl-C here is guarded too

        return run(argv)
    except KeyboardInterrupt:  # before a command started (while importing or parsing): nothing written yet
        json_output = "--json" in (sys.argv[1:] if argv is None else list(argv))
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        print("FAILED: interrupted", file=sys.stderr if json_output else sys.stdout)
        return INTERRUPTED


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(".commands", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
