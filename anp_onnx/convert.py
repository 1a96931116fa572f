"""ONNX -> torch with onnx2torch, parity with onnxruntime, and perturbable neurons.

:func:`convert` turns the runnable copy of a :class:`~anp_onnx.model.LoadedModel` into a torch
``fx.GraphModule`` and records which module computes which ONNX value (onnx2torch's own
``onnx_mapping``), so that neuron layers found in the ONNX graph are located in torch exactly.
:class:`ClassifierNet` wraps the graph so that it takes images as (N, C, H, W) floats in [0, 1] and
returns (N, classes) logits, applying the preprocessing and the model's channel layout. Before
conversion the copy is prepared by the graph rewrites of :mod:`anp_onnx.passes`; running the ONNX
model itself is :mod:`anp_onnx.runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import torch
from torch import fx, nn

from ._compat import onnx2torch
from .errors import ConversionError
from .model import LoadedModel
from .neurons import NeuronLayer, PerturbedModule, get_kind
from .passes import (
    Pass, best_effort, drop_inert_allowzero, explicit_auto_pad, generalize_batch, lower_opset, output_activation,
    precompute_constants, run_passes, strip_output_softmax, unique_node_names,
)
from .preprocessing import Preprocessing
from .runtime import max_abs_diff, ort_logits, parity_limit, to_model_input, within_parity

__all__ = [
    "Converted", "unsupported_ops", "convert", "ClassifierNet", "install_neurons", "torch_logits", "parity",
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


def conversion_passes(model: LoadedModel) -> list[Pass]:
    """The rewrites that prepare ``model.runnable`` for onnx2torch, before its ops are checked."""
    passes: list[Pass] = [explicit_auto_pad, precompute_constants, drop_inert_allowzero]
    if model.input.batch is not None:
        passes.append(best_effort(generalize_batch(model.input.name, model.input.batch),
                                  "generalise the fixed batch size"))
    passes.append(lower_opset(unsupported_ops, 17))
    return passes


def convert(model: LoadedModel) -> Converted:
    """Convert ``model.runnable`` with onnx2torch; raise ConversionError naming unsupported ops."""
    source, _ = run_passes(model.runnable, conversion_passes(model))
    missing = unsupported_ops(source)
    activation = output_activation(source)
    source, _ = run_passes(source, [strip_output_softmax, unique_node_names])
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
        self.channels_last = False

    def use_channels_last(self, on: bool = True) -> "ClassifierNet":
        """Run convolutions on channels-last (NHWC in memory) tensors: the same function up to float
        rounding, about 1.3x faster on CPUs with oneDNN (benchmarks/README.md). NCHW models only."""
        self.channels_last = bool(on) and self.layout == "NCHW"
        self.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return self

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
        elif self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
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
