"""The repair context: the model, its neurons and the torch network with perturbable neurons.

:func:`open_context` is the pipeline's convert stage: it finds the neuron layers in the ONNX
graph, converts the model with onnx2torch and installs a perturbable module for each layer. Every
later stage takes the :class:`RepairContext` (and what the stage before it returned) as arguments;
the context only carries state and never calls a stage.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import numpy as np
import torch
import onnx
from torch import nn

from .convert import ClassifierNet, convert, install_neurons
from .errors import UnsupportedModelError
from .model import LoadedModel
from .neurons import NeuronLayer, NeuronSearch, PerturbedModule, find_neurons, get_kind
from .options import NeuronSelection
from .preprocessing import Preprocessing
from .prune import PrunePlan


@dataclass
class RepairContext:
    """A model opened for repair: ``net`` is its torch conversion with ``modules`` (layer name ->
    perturbable module) installed for the ``neurons`` found in the ONNX graph. ``torch_names`` maps
    an ONNX value to the name of the torch module computing it (onnx2torch's own mapping)."""

    model: LoadedModel
    neurons: NeuronSearch
    net: ClassifierNet
    modules: dict[str, PerturbedModule]
    torch_names: dict[str, str] = field(default_factory=dict)

    def module_for(self, value: str) -> nn.Module:
        """The torch module that computes ONNX value ``value`` (a node's output), for weight-level stages."""
        if value not in self.torch_names:
            raise KeyError(f"no torch module computes {value}")
        return getattr(self.net.graph, self.torch_names[value])

    @property
    def layers(self) -> tuple[NeuronLayer, ...]:
        return self.neurons.layers

    @property
    def preprocessing(self) -> Preprocessing:
        return self.net.preprocessing

    def reset_masks(self) -> None:
        """Every mask back to 1: the torch model computes the original model again."""
        for m in self.modules.values():
            m.set_mask(np.ones(m.neuron_mask.numel(), dtype=np.float32))

    def apply_plan(self, plan: PrunePlan) -> None:
        """Masks 0 for the plan's pruned neurons, 1 for the others: the repaired model in torch."""
        for name, m in self.modules.items():
            values = np.ones(m.neuron_mask.numel(), dtype=np.float32)
            values[np.asarray(plan.pruned.get(name, ()), dtype=np.int64)] = 0.0
            m.set_mask(values)

    @contextmanager
    def pruned(self, plan: Optional[PrunePlan]) -> Iterator[ClassifierNet]:
        """The net with ``plan`` applied (None: unpruned), in eval mode; every mask is 1 afterwards."""
        if plan is None:
            self.reset_masks()
        else:
            self.apply_plan(plan)
        try:
            self.net.eval()
            yield self.net
        finally:
            self.reset_masks()

    @contextmanager
    def weights_kept(self) -> Iterator[ClassifierNet]:
        """The net, whose weights and buffers are put back as they were afterwards (a weight-level
        refinement trains them in place; the next plan, curve or export starts from the original)."""
        saved = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        try:
            yield self.net
        finally:
            with torch.no_grad():
                for k, v in self.net.state_dict().items():
                    v.copy_(saved[k].to(v.device))

    @contextmanager
    def on_device(self, device: str, channels_last: bool = False) -> Iterator[ClassifierNet]:
        """The net moved to ``device`` for the duration; back on the CPU afterwards. ``channels_last``:
        computing on channels-last tensors for the duration where :func:`channels_last_safe` (tensors
        the net holds are replaced by the switch: take references to them inside the block)."""
        was = self.net.channels_last
        try:
            if channels_last and not was and channels_last_safe(self.model.runnable):
                self.net.use_channels_last(True)
            yield self.net.to(device)
        finally:
            self.net.to("cpu")
            if self.net.channels_last != was:
                self.net.use_channels_last(was)


def open_context(model: LoadedModel, preprocessing: Preprocessing,
                 selection: NeuronSelection = NeuronSelection(), channels_last: bool = False) -> RepairContext:
    """Find the neuron layers of ``model``, convert it to torch and make its neurons perturbable.

    ``channels_last``: the torch net computes on channels-last tensors when the model is NCHW and
    made only of :data:`CHANNELS_LAST_OPS` (see :meth:`ClassifierNet.use_channels_last`). Off by
    default: about 1.3x faster on the CPU, but its float rounding changed the pruned set on 5 of
    the 6 sample models (benchmarks/README.md)."""
    neurons = find_neurons(model.proto, selection.kinds, selection.include, selection.exclude)
    if not neurons.layers:
        raise UnsupportedModelError(no_neurons_message(model, neurons))
    converted = convert(model)
    modules = install_neurons(converted, neurons.layers)
    net = ClassifierNet(converted.graph, model.input.layout, preprocessing, converted.output_activation)
    net.use_channels_last(channels_last and channels_last_safe(model.runnable))
    return RepairContext(model, neurons, net, modules, dict(converted.modules_by_output))


#: Ops whose torch conversion was checked, forward and backward, on channels-last tensors (tests and
#: sample models). Not in it, for example: GroupNormalization, whose backward crashed (torch 2.13 CPU).
CHANNELS_LAST_OPS = frozenset({
    "Conv", "BatchNormalization", "Relu", "LeakyRelu", "Elu", "Clip", "Sigmoid", "Tanh", "Add", "Sub", "Mul",
    "Div", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul", "Dropout",
    "Identity", "Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Softmax", "LogSoftmax",
})


def channels_last_safe(model: onnx.ModelProto) -> bool:
    """Whether every op of ``model`` is one checked on channels-last tensors (CHANNELS_LAST_OPS)."""
    return all(node.op_type in CHANNELS_LAST_OPS and node.domain in ("", "ai.onnx") for node in model.graph.node)


def no_neurons_message(model: LoadedModel, search: NeuronSearch) -> str:
    """Why no neuron was found, with the model's most frequent ops."""
    ops: dict[str, int] = {}
    for node in model.proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    top = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
    why = f" ({'; '.join(search.notes[:3])})" if search.notes else ""
    if search.excluded:
        why += f"; {len(search.excluded)} layers were excluded by the layer filters"
    kinds = "; ".join(f"{k}: {get_kind(k).description}" for k in search.kinds) or "batchnorm"
    return (f"no neurons to prune: the model has no usable layer of the kinds searched ({kinds}){why}. "
            f"It contains: {top}")


def current_masks(modules: Mapping[str, PerturbedModule]) -> dict[str, np.ndarray]:
    """The masks currently set in ``modules``, as arrays."""
    return {name: m.neuron_mask.detach().float().cpu().numpy().copy() for name, m in modules.items()}
