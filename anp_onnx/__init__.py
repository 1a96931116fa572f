"""anp-onnx: remove backdoors from ONNX image classifiers with Adversarial Neuron Pruning.

Public API::

    import anp_onnx
    info = anp_onnx.inspect_model("model.onnx")
    result = anp_onnx.repair("model.onnx", "clean/", out="repaired.onnx")
    plan, export = anp_onnx.prune("model.onnx", "repaired.masks.json", out="p.onnx",
                                  pruning=anp_onnx.PruneSpec.threshold(0.3))
    scores = anp_onnx.evaluate_model("repaired.onnx", "test/", poisoned="triggered/")

The library never imports Qt; progress is reported through callbacks (:mod:`anp_onnx.progress`).
"""

__version__ = "0.1.0"

from .anp import ANPConfig, MaskResult  # noqa: E402
from .api import (  # noqa: E402
    DEFAULT_HOLDOUT, ExportResult, ModelInfo, RepairResult, Repairer, default_masks_path, evaluate_model,
    inspect_model, mask_values_path, prune, repair,
)
from .collapse import CollapseProbe  # noqa: E402
from .curve import CurvePoint, PruningCurve  # noqa: E402
from .data import ImageSet, Preprocessing, load_images  # noqa: E402
from .errors import AnpOnnxError  # noqa: E402
from .evaluate import EvalResult  # noqa: E402
from .model import InputSpec, LoadedModel, load_model  # noqa: E402
from .progress import CancelToken, ProgressEvent  # noqa: E402
from .prune import PrunePlan, PruneSpec, load_masks, rank_neurons  # noqa: E402
from .report import report_paths, write_report  # noqa: E402

__all__ = [
    "__version__", "ANPConfig", "MaskResult", "ExportResult", "ModelInfo", "RepairResult", "Repairer",
    "evaluate_model", "inspect_model", "prune", "repair", "ImageSet", "Preprocessing", "load_images",
    "AnpOnnxError", "EvalResult", "InputSpec", "LoadedModel", "load_model", "CancelToken", "ProgressEvent",
    "PrunePlan", "PruneSpec", "load_masks", "rank_neurons", "DEFAULT_HOLDOUT", "default_masks_path",
    "mask_values_path", "CurvePoint", "PruningCurve", "report_paths", "write_report", "CollapseProbe",
]
