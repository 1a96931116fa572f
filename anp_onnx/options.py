"""Settings shared by the pipeline's stages, as frozen option objects validated on construction.

The ANP hyper-parameters are :class:`anp_onnx.anp.ANPConfig` and how much to prune is
:class:`anp_onnx.prune.PruneSpec`; the objects here say which neurons to use
(:class:`NeuronSelection`) and how the pruning curve and the automatic choice are measured
(:class:`CurveSettings`). The public functions of
:mod:`anp_onnx.api` take their fields as keyword arguments and build them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from .errors import SettingsError

#: Fraction of the clean data held out (stratified) for the pruning curve and automatic choice.
DEFAULT_HOLDOUT = 0.2
#: Refinements run after the pruning by default (see anp_onnx.unlearn; benchmarks/README.md).
DEFAULT_REFINEMENTS = ("unlearn",)
#: Accuracy budget (fraction) of the automatic choice when there is no backdoor signal.
DEFAULT_MAX_DROP = 0.02
#: Largest held-out accuracy drop (fraction) the automatic choice may spend to make the signal go.
DEFAULT_SIGNAL_MAX_DROP = 0.10
#: The pruning curve is measured up to this fraction of all neurons.
DEFAULT_MAX_FRACTION = 0.5


@dataclass(frozen=True)
class NeuronSelection:
    """Which neurons take part: neuron kinds (None: the default search) and layer-name patterns."""

    kinds: Optional[tuple[str, ...]] = None
    include: Optional[tuple[str, ...]] = None
    exclude: Optional[tuple[str, ...]] = None

    @classmethod
    def of(cls, kinds=None, include=None, exclude=None) -> "NeuronSelection":
        """From any sequences (or None)."""
        tup = lambda v: None if v is None else tuple(v)  # noqa: E731
        return cls(tup(kinds), tup(include), tup(exclude))


@dataclass(frozen=True)
class CurveSettings:
    """How the pruning curve and the automatic choice are measured (see :mod:`anp_onnx.curve`)."""

    max_drop: float = DEFAULT_MAX_DROP
    signal_max_drop: float = DEFAULT_SIGNAL_MAX_DROP
    max_fraction: float = DEFAULT_MAX_FRACTION

    def __post_init__(self) -> None:
        for value in (self.max_drop, self.signal_max_drop, self.max_fraction):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise SettingsError(f"the pruning curve's settings must be finite numbers, not {value!r}")
        for value in (self.max_drop, self.signal_max_drop):
            if not 0 <= value <= 1:  # also refuses NaN
                raise SettingsError("the accuracy budget (max drop) must be in [0, 1]")
        if not 0 < self.max_fraction <= 1:
            raise SettingsError("max_fraction must be in (0, 1]")
