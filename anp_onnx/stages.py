"""Pluggable repair stages: how neurons are scored, and what may run after the pruning choice.

Two slots of the pipeline (docs/ARCHITECTURE.md) take registered implementations:

* a **mask stage** scores every neuron in [0, 1] (low is pruned first). ANP's mask optimisation
  (:class:`anp_onnx.anp.ANPStage`) is the first; a stage is chosen by the type of the settings
  object handed to :func:`anp_onnx.repair` (``config=ANPConfig(...)`` runs ANP; defining the
  settings class next to its stage means holding an instance implies the stage is registered).
* a **refinement** runs after the pruning plan is chosen and may change weights of the pruned
  torch model (for example a short fine-tuning); it returns the new values of the ONNX
  initializers it changed, which are written back with the pruning and verified in onnxruntime
  against the refined torch model. None runs by default.

A new stage is one new module with a class registered by :func:`register_mask_stage` or
:func:`register_refinement` (tests/test_stages.py shows both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, TypeVar

import numpy as np

from .errors import SettingsError

if TYPE_CHECKING:  # pragma: no cover
    from .anp import MaskResult
    from .collapse import CollapseProbe
    from .context import RepairContext
    from .data import ImageSet
    from .progress import CancelToken, ProgressCallback
    from .prune import PrunePlan


class MaskStage(ABC):
    """Scores neurons on clean data; the pipeline prunes the lowest scores first.

    ``config_type`` is the frozen settings class that selects this stage. Before :meth:`run` the
    pipeline has calibrated the renormalised neurons (when ``config.renormalise`` is true or
    absent) and, when :meth:`wants_probe` says so, run the collapse probe, whose result
    :meth:`noise_target` turns into the class the stage aims at (None: none).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_type: ClassVar[type]

    def resolve(self, config: Any) -> Any:
        """``config`` made concrete for this machine (device, iterations); as it is by default."""
        return config

    def wants_probe(self, ctx: "RepairContext", config: Any) -> bool:
        """Whether the collapse probe should run first (it needs normalising or renormalised neurons)."""
        return False

    def noise_target(self, config: Any, probe: Optional["CollapseProbe"]) -> Optional[int]:
        """The class the stage aims at, given the probe's result (None when it did not run)."""
        return None

    @abstractmethod
    def run(self, ctx: "RepairContext", clean: "ImageSet", config: Any, *, target: Optional[int],
            progress: Optional["ProgressCallback"] = None,
            cancel: Optional["CancelToken"] = None) -> "MaskResult":
        """Masks per layer in [0, 1] (and their history); the torch model's masks may be left changed."""


@dataclass
class RefinementResult:
    """What a refinement changed: new values of ONNX initializers (name -> array), and its figures."""

    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Refinement(ABC):
    """A stage after the pruning choice that may change the pruned model's weights.

    :meth:`run` gets the context with the plan applied (pruned masks at 0) and must change the
    torch model and the returned initializers consistently: the export verifies the written ONNX
    file against the refined torch model and refuses it otherwise.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def run(self, ctx: "RepairContext", plan: "PrunePlan", clean: "ImageSet", *, target: Optional[int] = None,
            device: str = "cpu", seed: int = 0, holdout: Optional["ImageSet"] = None,
            progress: Optional["ProgressCallback"] = None,
            cancel: Optional["CancelToken"] = None) -> RefinementResult:
        """Refine the pruned model on ``clean``; return the initializers to write.

        ``target`` is the suspected backdoor target (the collapse probe's, None when it named none),
        ``device`` where to compute (the net is on the CPU before and must be after), ``holdout``
        the held-out clean images (not to train on; None when there are none)."""


_MASK_STAGES: dict[str, MaskStage] = {}
_BY_CONFIG: dict[type, MaskStage] = {}
_REFINEMENTS: dict[str, Refinement] = {}

S = TypeVar("S", bound=type)


def register_mask_stage(cls: S) -> S:
    """Class decorator: make a :class:`MaskStage` available by name and by its settings type."""
    if cls.name in _MASK_STAGES or cls.config_type in _BY_CONFIG:
        raise ValueError(f"a mask stage named {cls.name!r} or taking {cls.config_type.__name__} is registered")
    stage = cls()
    _MASK_STAGES[cls.name] = stage
    _BY_CONFIG[cls.config_type] = stage
    return cls


def register_refinement(cls: S) -> S:
    """Class decorator: make a :class:`Refinement` available by name."""
    if cls.name in _REFINEMENTS:
        raise ValueError(f"a refinement named {cls.name!r} is registered")
    _REFINEMENTS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a registered stage or refinement (tests register temporary ones)."""
    stage = _MASK_STAGES.pop(name, None)
    if stage is not None:
        _BY_CONFIG.pop(stage.config_type, None)
    _REFINEMENTS.pop(name, None)


def mask_stage_for(config: Any) -> MaskStage:
    """The mask stage that ``config``'s type selects."""
    stage = _BY_CONFIG.get(type(config))
    if stage is None:
        known = ", ".join(f"{s.config_type.__name__} ({s.name})" for s in _MASK_STAGES.values())
        raise SettingsError(f"no mask stage takes settings of type {type(config).__name__}; known: {known}")
    return stage


def mask_stages() -> Mapping[str, MaskStage]:
    return dict(_MASK_STAGES)


def get_refinement(name: str) -> Refinement:
    if name not in _REFINEMENTS:
        known = ", ".join(_REFINEMENTS) or "none registered"
        raise SettingsError(f"unknown refinement {name!r} (known: {known})")
    return _REFINEMENTS[name]
