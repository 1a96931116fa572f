"""ONNX -> torch with onnx2torch, parity with onnxruntime, and perturbable neurons.

:func:`convert` turns the runnable copy of a :class:`~anp_onnx.model.LoadedModel` into a torch
``fx.GraphModule`` and records which module computes which ONNX value (onnx2torch's own
``onnx_mapping``), so that neuron layers found in the ONNX graph are located in torch exactly.
:class:`ClassifierNet` wraps the graph so that it takes images as (N, C, H, W) floats in [0, 1] and
returns (N, classes) logits, applying the preprocessing and the model's channel layout.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import torch
from torch import fx, nn

from ._compat import onnx2torch
from .errors import ConversionError
from .model import LoadedModel, default_opset
from .neurons import NeuronLayer, PerturbedModule, get_kind
from .preprocessing import Preprocessing
from .runtime import PARITY_ATOL, PARITY_RTOL, max_abs_diff, ort_logits, parity_limit, to_model_input, within_parity

__all__ = [
    "Converted", "unsupported_ops", "convert", "ClassifierNet", "install_neurons", "torch_logits", "parity",
    "strip_output_softmax", "generalize_batch", "explicit_auto_pad", "fold_constants", "drop_inert_allowzero",
    # onnxruntime side, importable from here as before
    "ort_logits", "to_model_input", "PARITY_ATOL", "PARITY_RTOL",
]

_LOGGER = logging.getLogger(__name__)


@dataclass
class Converted:
    """A converted model: the graph module and ONNX value name -> torch module name.

    ``output_activation`` is "Softmax" or "LogSoftmax" when the ONNX model ends with one: the graph
    module then returns the logits before it (what ANP's cross-entropy needs).
    """

    graph: fx.GraphModule
    modules_by_output: dict[str, str]
    output_activation: Optional[str] = None


def strip_output_softmax(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Optional[str]]:
    """A copy of ``model`` whose first output is the input of its final Softmax/LogSoftmax, if any."""
    output = model.graph.output[0].name
    node = next((n for n in model.graph.node if output in n.output), None)
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return model, None
    out = copy.deepcopy(model)
    for n in out.graph.node:
        if output in n.output:
            out.graph.node.remove(n)
            break
    out.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    return out, node.op_type


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """'OpType (node names)' for every op onnx2torch has no converter for."""
    registry = onnx2torch().node_converters.registry
    opsets = {imp.domain or "": int(imp.version) for imp in model.opset_import}
    missing: dict[str, list[str]] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        version = opsets.get(domain, opsets.get("ai.onnx", 0)) if domain in ("", "ai.onnx") else opsets.get(domain, 1)
        try:
            registry.get_converter(operation_type=node.op_type, version=version, domain=domain)
        except NotImplementedError:
            missing.setdefault(f"{node.op_type}-{version}", []).append(node.name or node.output[0])
    return [f"{op} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" for op, names in missing.items()]


def generalize_batch(model: onnx.ModelProto, input_name: str, batch: int) -> onnx.ModelProto:
    """A copy of a fixed-batch model that accepts any batch size (for the torch conversion only).

    Exporters without dynamic axes bake the batch size into Reshape targets (``x.view(x.size(0), -1)``
    becomes a Reshape to ``[1, N]``). onnxruntime tells the concrete target of every Reshape; a
    leading entry equal to the fixed batch becomes 0 ("copy the input's dimension"), and the input's
    batch dimension becomes symbolic. The parity check then confirms the result against the
    original file at its own batch size.
    """
    from .model import make_session

    out = copy.deepcopy(model)
    reshapes = [n for n in out.graph.node if n.op_type == "Reshape"
                and not any(a.name == "allowzero" and a.i for a in n.attribute)]
    graph_input = next(v for v in out.graph.input if v.name == input_name)
    if reshapes:
        probe = copy.deepcopy(out)
        known = {o.name for o in probe.graph.output}
        for name in {n.input[1] for n in reshapes} - known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
        dims = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
        elem = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
        session = make_session(probe)
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, {input_name: np.zeros(dims, dtype=elem)})))
        for i, node in enumerate(reshapes):
            target = np.asarray(values.get(node.input[1]))
            if target.ndim == 1 and target.size >= 2 and int(target[0]) == batch:
                fixed = target.copy()
                fixed[0] = 0
                name = f"{node.input[1]}_anp_any_batch_{i}"
                out.graph.initializer.append(onnx.numpy_helper.from_array(fixed.astype(np.int64), name))
                node.input[1] = name
    dim = graph_input.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "batch"
    return out


def explicit_auto_pad(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where Conv/MaxPool/AveragePool ``auto_pad`` SAME_*/VALID become explicit ``pads``.

    onnx2torch does not convert ``auto_pad`` (older exporters such as CNTK write it). The padding is
    computed from the input's spatial size as the ONNX spec defines it, so it needs shapes known by
    shape inference; nodes whose input size is unknown are left as they are.
    """
    targets = [n for n in model.graph.node if n.op_type in ("Conv", "MaxPool", "AveragePool")
               and any(a.name == "auto_pad" and a.s not in (b"NOTSET", b"") for a in n.attribute)]
    if not targets:
        return model
    from .onnx2torch_ext import infer_shapes

    out = copy.deepcopy(model)
    try:
        inferred = infer_shapes(out)
    except Exception:  # noqa: BLE001 - without shapes nothing can be made explicit
        return out
    shapes = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    inits = {t.name: list(t.dims) for t in out.graph.initializer}
    for node in out.graph.node:
        attrs = {a.name: a for a in node.attribute}
        mode = attrs.get("auto_pad")
        if mode is None or mode.s in (b"NOTSET", b""):
            continue
        spatial = (shapes.get(node.input[0]) or [None, None])[2:]
        if node.op_type == "Conv":
            kernel = (attrs["kernel_shape"].ints if "kernel_shape" in attrs else inits.get(node.input[1], [0, 0])[2:])
        else:
            kernel = attrs["kernel_shape"].ints
        if not spatial or any(d is None for d in spatial) or len(kernel) != len(spatial):
            continue
        strides = attrs["strides"].ints if "strides" in attrs else [1] * len(spatial)
        dilations = attrs["dilations"].ints if "dilations" in attrs else [1] * len(spatial)
        begin, end = [], []
        for size, k, st, dl in zip(spatial, kernel, strides, dilations):
            total = 0 if mode.s == b"VALID" else max((-(-size // st) - 1) * st + (k - 1) * dl + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(large if mode.s == b"SAME_LOWER" else small)
            end.append(small if mode.s == b"SAME_LOWER" else large)
        node.attribute.remove(mode)
        if "pads" in attrs:
            node.attribute.remove(attrs["pads"])
        node.attribute.append(onnx.helper.make_attribute("pads", begin + end))
    return out


#: Ops never folded: their output is not a function of their inputs.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli"})
#: Largest constant (elements) folding may create: shape arithmetic, not weights.
_FOLD_LIMIT = 1 << 16


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where nodes computing only from constants (shape arithmetic) are replaced by initializers.

    The torch dynamo exporter without its optimiser writes e.g. a ReduceMean whose axes come from
    Reshape(Constant, Constant); onnx2torch needs such axes, Reshape/Pad/Slice arguments and the like
    as constants. Nodes are evaluated one at a time with onnx's reference evaluator, in graph order,
    when every input is an initializer, a Constant node or an already folded value, and the result
    is small. Only the conversion copy changes; the written model keeps its nodes.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    opset = default_opset(model)
    initializers = {t.name: t for t in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}  # constant values met so far (initializers read when needed)
    folded: dict[int, list[np.ndarray]] = {}

    def value(name: str) -> np.ndarray:
        if name in arrays:
            return arrays[name]
        if name in initializers:
            arrays[name] = numpy_helper.to_array(initializers[name])
            return arrays[name]
        return None

    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM_OPS or not node.output:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        inputs = [name for name in node.input if name]
        if any(name not in arrays and name not in initializers for name in inputs):
            continue
        if node.op_type != "Constant" and any(initializers[n].data_location == onnx.TensorProto.EXTERNAL
                                              for n in inputs if n in initializers and n not in arrays):
            continue
        try:
            feed = {name: value(name) for name in inputs}
            if any(v.size > _FOLD_LIMIT for v in feed.values()):
                continue
            results = [np.asarray(r) for r in ReferenceEvaluator(node, opsets={"": opset}).run(None, feed)]
        except Exception:  # noqa: BLE001 - a node the evaluator cannot run stays as it is
            continue
        if any(r.size > _FOLD_LIMIT for r in results):
            continue
        arrays.update((name, r) for name, r in zip(node.output, results) if name)
        if node.op_type != "Constant" and inputs:  # onnx2torch takes Constant nodes as they are
            folded[i] = results
    if not folded:
        return model
    out = copy.deepcopy(model)
    keep = [node for i, node in enumerate(out.graph.node) if i not in folded]
    for i in sorted(folded):
        for name, result in zip(model.graph.node[i].output, folded[i]):
            if name:
                out.graph.initializer.append(numpy_helper.from_array(result, name))
    del out.graph.node[:]
    out.graph.node.extend(keep)
    _LOGGER.debug("folded %d constant nodes in the conversion copy", len(folded))
    return out


def drop_inert_allowzero(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where ``Reshape(allowzero=1)`` loses the attribute unless its constant shape holds a 0.

    The torch dynamo exporter writes ``allowzero=1`` on every Reshape; onnx2torch refuses it. It only
    changes what a 0 in the target shape means (an empty dimension instead of "copy the input's"),
    so without a 0 the node computes the same either way. A computed shape (from the batch size) has
    no 0 for a non-empty batch; the parity check on real images would show it otherwise.
    """
    from .graph import GraphIndex

    index = None
    out = model
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Reshape" or not any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        if index is None:
            index = GraphIndex(model)
        shape = index.constant(node.input[1]) if len(node.input) > 1 else None
        if shape is not None and (np.asarray(shape) == 0).any():
            continue
        if out is model:
            out = copy.deepcopy(model)
        target = out.graph.node[i]
        for a in list(target.attribute):
            if a.name == "allowzero":
                target.attribute.remove(a)
    return out


def _unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose node names stay unique after onnx2torch's normalisation.

    onnx2torch turns '/a/Constant_1' into 'a/Constant_1' and numbers duplicates as 'name_1', so two
    different nodes can end up with one module name and one of them is silently dropped. Modules are
    mapped back to ONNX through their output values, so the names themselves do not matter.
    """
    out = copy.deepcopy(model)
    for i, node in enumerate(out.graph.node):
        node.name = f"{node.name or node.op_type}__{i}"
    return out


def convert(model: LoadedModel) -> Converted:
    """Convert ``model.runnable`` with onnx2torch; raise ConversionError naming unsupported ops."""
    source = drop_inert_allowzero(fold_constants(explicit_auto_pad(model.runnable)))
    if model.input.batch is not None:
        try:
            source = generalize_batch(source, model.input.name, model.input.batch)
        except Exception as exc:  # best effort: the parity check reports what still does not fit
            _LOGGER.debug("could not generalise the fixed batch size: %s", exc)
    missing = unsupported_ops(source)
    if missing and default_opset(source) > 17:
        try:  # onnx2torch 1.5 lacks several opset-18+ converters; opset 17 keeps node names
            lowered = onnx.version_converter.convert_version(copy.deepcopy(source), 17)
            if not unsupported_ops(lowered):
                _LOGGER.info("converted through an in-memory opset-17 copy for onnx2torch")
                source, missing = lowered, []
        except Exception as exc:  # version conversion is best effort
            _LOGGER.debug("opset 17 down-conversion failed: %s", exc)
    source, activation = strip_output_softmax(source)
    source = _unique_node_names(source)
    if missing:
        raise ConversionError(
            "onnx2torch cannot convert these ops: " + "; ".join(missing)
            + ". Re-export the model with standard ONNX ops (opset <= 17 is safest)"
        )
    try:
        graph = onnx2torch().convert(source, attach_onnx_mapping=True)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ConversionError(f"onnx2torch failed to convert the model: {text[0] if text else exc!r}") from exc
    graph.eval()
    for p in graph.parameters():
        p.requires_grad_(False)
    outputs: dict[str, str] = {}
    for name, module in graph.named_children():
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is not None:
            for value in mapping.outputs:
                outputs[value] = name
    if activation:
        _LOGGER.info("the model ends with %s: ANP works on the logits before it", activation)
    return Converted(graph, outputs, activation)


class ClassifierNet(nn.Module):
    """(N, C, H, W) images in [0, 1] -> (N, classes) logits through the converted graph."""

    def __init__(self, graph: fx.GraphModule, layout: str, preprocessing: Preprocessing,
                 output_activation: Optional[str] = None) -> None:
        super().__init__()
        self.graph = graph
        self.layout = layout
        self.preprocessing = preprocessing
        self.output_activation = output_activation

    def to_model_output(self, logits: np.ndarray) -> np.ndarray:
        """What the ONNX model outputs for these logits (its final Softmax/LogSoftmax re-applied)."""
        if self.output_activation == "Softmax":
            return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        if self.output_activation == "LogSoftmax":
            return torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocessing.apply(x)
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        out = self.graph(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(out.shape[0], -1)


def install_neurons(converted: Converted, layers: tuple[NeuronLayer, ...]) -> dict[str, PerturbedModule]:
    """Replace each layer's torch module by its perturbable version; layer name -> module."""
    installed: dict[str, PerturbedModule] = {}
    for layer in layers:
        name = converted.modules_by_output.get(layer.output)
        if name is None:
            raise ConversionError(f"no torch module computes {layer.output} ({layer.name})")
        wrapped = get_kind(layer.kind).wrap(getattr(converted.graph, name), layer)
        setattr(converted.graph, name, wrapped)
        installed[layer.name] = wrapped
    return installed


@torch.no_grad()
def torch_logits(net: nn.Module, images: np.ndarray, device: str = "cpu", batch_size: int = 256) -> np.ndarray:
    """``net``'s outputs for ``images`` in batches, as float numpy on the CPU."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
        out.append(net(x).float().cpu().numpy())
    return np.concatenate(out)


def parity(model: LoadedModel, net: nn.Module, images: np.ndarray, preprocessing: Preprocessing,
           device: str = "cpu") -> float:
    """Max |torch - onnxruntime| over the logits of ``images``; ConversionError if out of tolerance."""
    ref = ort_logits(model, to_model_input(model, images, preprocessing))
    was_training = net.training
    net.eval()
    try:
        got = torch_logits(net, images, device)
        if isinstance(net, ClassifierNet):
            got = net.to_model_output(got)
    except Exception as exc:
        raise ConversionError(f"the converted torch model fails to run: {str(exc).splitlines()[0]}") from exc
    finally:
        net.train(was_training)
    if got.shape != ref.shape:
        raise ConversionError(f"torch gives logits of shape {got.shape}, onnxruntime {ref.shape}")
    diff, limit = max_abs_diff(ref, got), parity_limit(ref)
    if not within_parity(diff, limit):
        raise ConversionError(
            f"the torch conversion disagrees with onnxruntime: max |diff| {diff:.3g} > {limit:.3g}; "
            "the model uses an op onnx2torch converts differently"
        )
    return diff
