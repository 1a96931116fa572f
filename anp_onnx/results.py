"""What the public functions return: plain records that the CLI, the GUI and the report read.

No torch here: a report or a CLI table is made from these without loading the torch stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .anp import MaskResult
    from .collapse import CollapseProbe
    from .curve import PruningCurve
    from .evaluate import EvalResult
    from .model import InputSpec
    from .neurons import NeuronLayer, NeuronSearch
    from .preprocessing import Preprocessing
    from .prune import PrunePlan


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`anp_onnx.inspect_model` found: input, classes, neurons, and the conversion check."""

    path: Optional[Path]
    input: "InputSpec"
    num_classes: int
    opset: int
    ir_version: int
    producer: str
    neurons: "NeuronSearch"
    parity: Optional[float]
    notes: tuple[str, ...]
    metadata: Mapping[str, object]
    probe: Optional["CollapseProbe"] = None

    def to_dict(self) -> dict:
        return {
            "path": str(self.path) if self.path else None, "input": self.input.describe(),
            "layout": self.input.layout, "num_classes": self.num_classes, "opset": self.opset,
            "ir_version": self.ir_version, "producer": self.producer,
            "neurons": self.neurons.total, "layers": [layer.to_dict() for layer in self.neurons.layers],
            "excluded_layers": list(self.neurons.excluded), "parity_max_abs_diff": self.parity,
            "notes": list(self.notes), "collapse_probe": self.probe.to_dict() if self.probe else None,
        }


@dataclass
class ExportResult:
    """A written repaired model, verified by onnx.checker and onnxruntime."""

    path: Path
    files: list[Path]
    changed_initializers: list[str]
    max_abs_diff: float


@dataclass
class RepairResult:
    """Everything a repair did: masks, pruned neurons, figures, files and the stages that ran.

    ``optimisation`` is None when the masks were not learnt in this run (loaded from a file);
    ``masks_source`` then says where they came from.
    """

    output: Path
    masks: dict[str, np.ndarray]
    plan: "PrunePlan"
    layers: tuple["NeuronLayer", ...]
    config: Any
    preprocessing: "Preprocessing"
    optimisation: Optional["MaskResult"]
    export: ExportResult
    parity: Optional[float]
    before: Optional["EvalResult"] = None
    after: Optional["EvalResult"] = None
    holdout_before: Optional["EvalResult"] = None
    holdout_after: Optional["EvalResult"] = None
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    curve: Optional["PruningCurve"] = None
    stages: list[str] = field(default_factory=list)
    masks_source: str = "learnt in this run"
    #: refinement name -> its figures ("metrics", "seconds", "initializers": how many it changed)
    refinements: dict[str, dict] = field(default_factory=dict)

    @property
    def pruned(self) -> dict[str, list[int]]:
        return {k: [int(i) for i in v] for k, v in self.plan.pruned.items() if len(v)}
