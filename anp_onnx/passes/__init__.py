"""Graph rewrites of the in-memory copy that is converted to torch (the user's model never changes).

Each pass is a function ``(model) -> (model, modified)`` that returns the same model or a changed
copy (see :mod:`.chain`); :func:`run_passes` applies a chain of them and checks the result. Passes
that need arguments are built by a factory (:func:`generalize_batch`, :func:`lower_opset`).
"""

from __future__ import annotations

from .chain import Pass, best_effort, pass_name, run_passes, undefined_values
from .constants import precompute_constants
from .names import unique_node_names
from .opset import lower_opset
from .output import output_activation, strip_output_softmax
from .padding import explicit_auto_pad
from .reshape import drop_inert_allowzero, generalize_batch

__all__ = [
    "Pass", "best_effort", "pass_name", "run_passes", "undefined_values", "precompute_constants",
    "unique_node_names", "lower_opset", "output_activation", "strip_output_softmax", "explicit_auto_pad",
    "drop_inert_allowzero", "generalize_batch",
]
