"""Loading and validating ONNX classifiers.

:func:`load_model` reads an ONNX file (external data included), checks it, finds the image input and
the number of classes, and prepares an in-memory *runnable* copy that onnxruntime-training accepts
(IR <= 10, default-domain opset <= 21). The user's model is never modified: :attr:`LoadedModel.proto`
is the original graph, kept for folding, and :attr:`LoadedModel.runnable` is the copy that runs.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.external_data_helper import uses_external_data

from .errors import ModelError, UnsupportedModelError
from .model_checks import FLOAT_TYPES as _FLOAT_TYPES
from .model_checks import check_attributes, check_finite, check_input_size, first_line as _first_line

_LOGGER = logging.getLogger(__name__)

#: Newest IR version and default-domain opset that onnxruntime-training 1.19 runs.
MAX_RUNTIME_IR = 10
MAX_RUNTIME_OPSET = 21

_QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearConcat",
}
LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class InputSpec:
    """The image input of a model: name, layout and per-image shape.

    ``height``/``width`` are None when the model accepts any size; ``batch`` is None when the batch
    dimension is dynamic.
    """

    name: str
    layout: str
    channels: int
    height: Optional[int]
    width: Optional[int]
    batch: Optional[int]
    dtype: str = "float32"

    @property
    def size(self) -> Optional[tuple[int, int]]:
        if self.height is None or self.width is None:
            return None
        return (self.height, self.width)

    def describe(self) -> str:
        h = "?" if self.height is None else self.height
        w = "?" if self.width is None else self.width
        b = "N" if self.batch is None else self.batch
        dims = (b, self.channels, h, w) if self.layout == "NCHW" else (b, h, w, self.channels)
        return f"{self.name}: {self.layout} {'x'.join(str(d) for d in dims)} {self.dtype}"


@dataclass(eq=False)
class LoadedModel:
    """An ONNX classifier ready for anp-onnx: the original model and a runnable copy."""

    path: Optional[Path]
    proto: onnx.ModelProto
    runnable: onnx.ModelProto
    input: InputSpec
    output_name: str
    num_classes: int
    external_tensors: frozenset[str] = frozenset()
    external_files: frozenset[str] = frozenset()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def opset(self) -> int:
        return default_opset(self.proto)

    @property
    def ir_version(self) -> int:
        return int(self.proto.ir_version)

    def session(self, providers: Optional[Sequence[str]] = None):
        """An onnxruntime InferenceSession on the runnable copy (CPU unless providers say otherwise)."""
        return make_session(self.runnable, providers)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def make_session(model: onnx.ModelProto, providers: Optional[Sequence[str]] = None):
    """onnxruntime session for an in-memory model; providers default to CPU only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model.SerializeToString(), sess_options=options,
            providers=list(providers) if providers else ["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise ModelError(f"onnxruntime cannot run the model: {_first_line(exc)}") from exc


def read_onnx(path: os.PathLike | str) -> tuple[onnx.ModelProto, frozenset[str], frozenset[str]]:
    """Read an ONNX file with its external data.

    Returns the model, the names of externally stored tensors, and the external data files' paths.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{path} is not an ONNX model ({_first_line(exc)})") from exc
    if model.ir_version <= 0 or len(model.graph.node) == 0:
        raise ModelError(f"{path} is not an ONNX model (no graph found)")
    external_tensors = [t for t in _all_tensors(model) if uses_external_data(t)]
    external = frozenset(t.name for t in external_tensors)
    locations = {e.value for t in external_tensors for e in t.external_data if e.key == "location"}
    try:
        files = frozenset(str((path.parent / location).resolve()) for location in locations)
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long, a symbolic-link loop
        raise ModelError(f"{path}: an external data location is not a usable path ({_first_line(exc)})") from exc
    folder = path.parent.resolve()
    outside = sorted(f for f in files if not Path(f).is_relative_to(folder))
    if outside:
        raise ModelError(f"{path}: its external data file {outside[0]} lies outside the model's folder "
                         "(through '..' or a symbolic link); it is not read")
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise ModelError(f"{path}: cannot read its external data ({_first_line(exc)})") from exc
    return model, external, files


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def runnable_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that onnxruntime-training accepts, and notes on what was changed."""
    notes: list[str] = []
    run = copy.deepcopy(model)
    opset = default_opset(run)
    if opset > MAX_RUNTIME_OPSET:
        try:
            run = onnx.version_converter.convert_version(run, MAX_RUNTIME_OPSET)
        except Exception as exc:
            raise ModelError(
                f"the model uses opset {opset}; onnxruntime here runs <= {MAX_RUNTIME_OPSET} and "
                f"the down-conversion failed ({_first_line(exc)})"
            ) from exc
        notes.append(f"opset {opset} down-converted to {MAX_RUNTIME_OPSET} in memory for onnxruntime")
    if run.ir_version > MAX_RUNTIME_IR:
        notes.append(f"IR version {run.ir_version} run as {MAX_RUNTIME_IR} in memory")
        run.ir_version = MAX_RUNTIME_IR
    return run, notes


def _dims(value: onnx.ValueInfoProto) -> list[Optional[int]]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def _guess_layout(dims: list[Optional[int]]) -> str:
    a, c = dims[1], dims[3]
    chan = (1, 2, 3, 4)
    if a in chan and c not in chan:
        return "NCHW"
    if c in chan and a not in chan:
        return "NHWC"
    return "NCHW"


def find_image_input(model: onnx.ModelProto, layout: Optional[str] = None) -> InputSpec:
    """The single 4-D floating-point graph input, with its layout (guessed unless given)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    found = ", ".join(f"{v.name} {_dims(v)}" for v in inputs) or "none"
    candidates = [
        v for v in inputs
        if v.type.HasField("tensor_type") and len(v.type.tensor_type.shape.dim) == 4
        and v.type.tensor_type.elem_type in _FLOAT_TYPES
    ]
    if len(candidates) != 1 or len(inputs) != 1:
        raise UnsupportedModelError(
            "anp-onnx needs exactly one image input (a 4-D float tensor, NCHW or NHWC); "
            f"this model has inputs: {found}"
        )
    value = candidates[0]
    dims = _dims(value)
    if layout is not None and layout not in LAYOUTS:
        raise UnsupportedModelError(f"unknown layout {layout!r}; use NCHW or NHWC")
    layout = layout or _guess_layout(dims)
    batch, rest = dims[0], dims[1:]
    c, h, w = (rest[0], rest[1], rest[2]) if layout == "NCHW" else (rest[2], rest[0], rest[1])
    if c is None:
        raise UnsupportedModelError(f"input {value.name} has no fixed channel dimension ({found})")
    dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return InputSpec(value.name, layout, int(c), h, w, batch, np.dtype(dtype).name)


def _check_not_quantized(model: onnx.ModelProto) -> None:
    quant = sorted({n.op_type for n in model.graph.node if n.op_type in _QUANTIZED_OPS})
    if quant:
        raise UnsupportedModelError(
            f"the model is quantized ({', '.join(quant)}); ANP needs a float model: "
            "repair the float model, then quantize the repaired one"
        )


def _num_classes(run: onnx.ModelProto, spec: InputSpec) -> tuple[str, int]:
    if len(run.graph.output) < 1:
        raise UnsupportedModelError("the model has no output")
    out = run.graph.output[0]
    dims = _dims(out)
    if len(dims) >= 2 and dims[-1] is not None and all(d in (None, 1) for d in dims[1:-1]):
        k = int(dims[-1])
    else:
        k = _probe_classes(run, spec)
    if k < 2:
        raise UnsupportedModelError(f"output {out.name} has shape {dims}: not a classifier's logits")
    return out.name, k


def _probe_classes(run: onnx.ModelProto, spec: InputSpec) -> int:
    h, w = spec.height or 32, spec.width or 32
    shape = (spec.batch or 1,) + ((spec.channels, h, w) if spec.layout == "NCHW" else (h, w, spec.channels))
    try:
        out = make_session(run).run(None, {spec.name: np.zeros(shape, dtype=spec.dtype)})[0]
    except ModelError:
        raise
    except Exception as exc:  # onnxruntime's own exception classes: the graph does not run at that size
        raise ModelError(f"onnxruntime cannot run the model on a blank {'x'.join(map(str, shape))} input to count "
                         f"its classes: {_first_line(exc)}") from exc
    if out.ndim < 2 or int(np.prod(out.shape[1:])) != out.shape[-1]:
        raise UnsupportedModelError(f"first output has shape {list(out.shape)}: not a classifier's logits")
    return int(out.shape[-1])


def load_model(path: os.PathLike | str, layout: Optional[str] = None) -> LoadedModel:
    """Read, check and describe an ONNX image classifier (the file is never modified)."""
    path = Path(path)
    proto, external, files = read_onnx(path)
    newer = proto.ir_version > onnx.IR_VERSION
    if not newer:  # the checker refuses IR versions newer than itself: check the runnable copy then
        _check(proto, path)
    check_finite(proto, path)
    loaded = from_proto(proto, path=path, layout=layout, external=external, external_files=files)
    if newer:
        _check(loaded.runnable, path)
    return loaded


def _check(proto: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"{path} fails onnx.checker: {_first_line(exc)}") from exc


def from_proto(
    proto: onnx.ModelProto, *, path: Optional[Path] = None, layout: Optional[str] = None,
    external: frozenset[str] = frozenset(), external_files: frozenset[str] = frozenset(),
) -> LoadedModel:
    """Describe an in-memory model (see :func:`load_model`)."""
    _check_not_quantized(proto)
    spec = find_image_input(proto, layout)
    check_input_size(spec, str(path or "the model"))
    check_attributes(proto, str(path or "the model"))  # before onnx's shape inference or onnxruntime read them
    run, notes = runnable_copy(proto)
    try:
        run = onnx.shape_inference.infer_shapes(run)
    except Exception as exc:  # shape inference is best effort
        _LOGGER.debug("shape inference failed: %s", exc)
    output_name, k = _num_classes(run, spec)
    for note in notes:
        _LOGGER.info(note)
    return LoadedModel(path, proto, run, spec, output_name, k, external, external_files, tuple(notes))
