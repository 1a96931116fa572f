"""anp-onnx: remove backdoors from ONNX image classifiers with Adversarial Neuron Pruning.

Public API::

    import anp_onnx
    info = anp_onnx.inspect_model("model.onnx")
    result = anp_onnx.repair("model.onnx", "clean/", out="repaired.onnx")
    plan, export = anp_onnx.prune("model.onnx", "repaired.masks.json", out="p.onnx",
                                  pruning=anp_onnx.PruneSpec.threshold(0.3))
    scores = anp_onnx.evaluate_model("repaired.onnx", "test/", poisoned="triggered/")

The library never imports Qt; progress is reported through callbacks (:mod:`anp_onnx.progress`).
Names are imported from their submodule on first use, so ``import anp_onnx`` (and the torch-free
submodules: model, data, preprocessing, runtime, evaluate) does not load torch.
"""

from __future__ import annotations

import importlib as _importlib
import sys as _sys
import types as _types
from typing import Any as _Any

__version__ = "0.1.0"

#: Public name -> the submodule it lives in.
_EXPORTS: dict[str, str] = {
    "ANPConfig": "anp", "MaskResult": "anp", "CPU_ITERATIONS": "anp", "REFERENCE_ITERATIONS": "anp",
    "Repairer": "api", "evaluate_model": "api", "inspect_model": "api", "prune": "api", "repair": "api",
    "ExportResult": "results", "ModelInfo": "results", "RepairResult": "results",
    "DEFAULT_HOLDOUT": "options", "DEFAULT_MAX_DROP": "options", "DEFAULT_SIGNAL_MAX_DROP": "options",
    "CurveSettings": "options", "NeuronSelection": "options",
    "default_masks_path": "masks_io", "mask_values_path": "masks_io", "load_masks": "masks_io",
    "CollapseProbe": "collapse",
    "RepairContext": "context",
    "RNPConfig": "rnp",
    "CurvePoint": "curve", "PruningCurve": "curve", "effective_pruning": "curve",
    "pruning_after_refinements": "curve",
    "ImageSet": "data", "load_images": "data",
    "Preprocessing": "preprocessing", "PRESETS": "preprocessing",
    "AnpOnnxError": "errors", "Cancelled": "errors", "ConversionError": "errors", "DataError": "errors",
    "ModelError": "errors", "OutputError": "errors", "SettingsError": "errors", "UnsupportedModelError": "errors",
    "EvalResult": "evaluate",
    "Evaluation": "finish", "refinement_summary": "finish",
    "InputSpec": "model", "LoadedModel": "model", "load_model": "model",
    "CancelToken": "progress", "ProgressEvent": "progress", "Stage": "progress",
    "PrunePlan": "prune", "PruneSpec": "prune", "rank_neurons": "prune", "REFERENCE_THRESHOLD": "prune",
    "report_paths": "report", "write_report": "report",
    "MaskStage": "stages", "Refinement": "stages", "RefinementResult": "stages",
    "register_mask_stage": "stages", "register_refinement": "stages",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> _Any:
    """A public name (imported from its submodule and kept), or a submodule not imported yet."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names and whatever is already imported (submodules included)."""
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """The package module: importing a submodule never replaces a public name of the same name.

    Python binds a submodule to its package's attribute when it is first imported; ``anp_onnx.prune``
    must stay the function :func:`anp_onnx.api.prune`, not the module :mod:`anp_onnx.prune`, whatever
    is imported first (as it was when everything was imported eagerly).
    """

    def __setattr__(self, name: str, value: _Any) -> None:
        if name in _EXPORTS and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
