"""Chaining graph rewrites of the conversion copy, and the check that a chain left a sound graph.

A pass is a function ``(model) -> (model, modified)``: it returns the model unchanged (the same
object) and False, or a changed copy and True. It never changes the model it is given.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import onnx

from ..errors import ConversionError

_LOGGER = logging.getLogger(__name__)

#: A graph rewrite: the model -> (the same model or a changed copy, whether it changed anything).
Pass = Callable[[onnx.ModelProto], tuple[onnx.ModelProto, bool]]


def pass_name(rewrite: Pass) -> str:
    """The name a pass is reported by (its function name)."""
    return getattr(rewrite, "__name__", repr(rewrite))


def best_effort(rewrite: Pass, what: str) -> Pass:
    """``rewrite``, but a failure leaves the model as it is and is logged as "could not <what>"."""

    def attempt(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
        try:
            return rewrite(model)
        except Exception as exc:  # best effort: the parity check reports what still does not fit
            _LOGGER.debug("could not %s: %s", what, exc)
            return model, False

    attempt.__name__ = pass_name(rewrite)
    return attempt


def undefined_values(model: onnx.ModelProto) -> set[str]:
    """Names read by the main graph's nodes or outputs that no node, initializer or input provides."""
    graph = model.graph
    known = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    known.update(name for node in graph.node for name in node.output)
    read = {name for node in graph.node for name in node.input if name} | {v.name for v in graph.output}
    return read - known


def run_passes(model: onnx.ModelProto, passes: Iterable[Pass]) -> tuple[onnx.ModelProto, list[str]]:
    """Apply ``passes`` in order; the result and the names of the passes that changed something.

    Afterwards every value the graph reads must still be provided (values the input model already
    lacked are left for the converter to report); otherwise :class:`ConversionError`.
    """
    out, changed = model, []
    for rewrite in passes:
        out, modified = rewrite(out)
        if modified:
            changed.append(pass_name(rewrite))
    if changed:
        lost = undefined_values(out) - undefined_values(model)
        if lost:
            raise ConversionError(
                f"rewriting the conversion copy ({', '.join(changed)}) left values that nothing computes: "
                f"{', '.join(sorted(lost)[:5])}; this is a bug in anp-onnx"
            )
    return out, changed
