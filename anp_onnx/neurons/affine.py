"""Per-channel ``Mul`` (+ ``Add``) by constants as neurons: BatchNorm in inference form.

Exporters decompose BatchNorm into ``y = x * scale + bias`` with one constant value per channel
(tf2onnx/Keras write ``Mul`` + ``Add`` with constants of shape ``(C,)`` on NHWC tensors), and people
fold BatchNorm by hand the same way on NCHW tensors (constants of shape ``(C, 1, 1)`` or
``(1, C, 1, 1)``). Such a pair is a BatchNorm whose gamma is the Mul's scale and whose beta is the
Add's bias, so its channels are perturbed exactly like ANP's BatchNorm neurons: with noise channel c
computes ``x * scale_c * (m_c + d_c) + bias_c * (1 + x_c)``, without noise ``x * scale_c * m_c + bias_c``.
Pruning sets ``scale_c = 0`` and keeps the bias (the reference's BatchNorm pruning). The pair holds
running statistics already folded in, so by default (``ANPConfig.renormalise``) a Mul+Add is
renormalised like the conv neurons: perturbed as a BatchNorm channel with clean-data statistics, a
pruned channel outputting its clean mean (written into the Add's bias). A lone Mul cannot be.

Layers found:

* a ``Mul`` with one constant input (an initializer) holding one value per channel of a 4-D tensor
  (channel axis 1 or 3, read off the constant's shape: ``(C, 1, 1)`` / ``(1, C, 1, 1)`` is NCHW,
  ``(C,)`` / ``(1, 1, 1, C)`` is NHWC) or of a 2-D tensor ``(N, C)``; when the other input's rank is
  unknown those four shapes are accepted as said;
* with the ``Add`` that is the only reader of the Mul's output, when the Add's other input is a
  constant with one value per channel on the same axis: the layer is then ``Mul+Add``, its ``output``
  is the Add's output and the torch module replaced is onnx2torch's Add module. Since the Mul's output
  ``y = x * scale`` is per channel, ``y * (m + d) + bias * (1 + x)`` is exactly the formula above,
  bias noise included, with one module. A lone ``Mul`` (no such Add) is perturbed by mask and weight
  noise only (there is no bias to perturb).

Skipped: a Mul by a single value (a global scale, e.g. attention scaling), by a non-constant (an SE
block's gate), by a constant that is not per channel; a scale held by a ``Constant`` node (the write-back
edits initializers only; tf2onnx writes initializers); the input normalisation of a model (a Mul reached
from the graph input without a Conv/Gemm/MatMul in between: its channels are colour channels) and a Mul
after the classifier (its channels are the classes).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn

from ..graph import LINEAR_OPS, GraphIndex, InitializerEditor, node_label
from .base import NeuronKind, NeuronLayer, PerturbedModule
from .registry import register_kind


def _channel_slot(shape: tuple[int, ...], size: int) -> Optional[int]:
    """Position from the right of the only non-1 dimension of ``shape`` when it equals ``size``."""
    big = [i for i, d in enumerate(shape) if d != 1]
    if size < 2 or len(big) != 1 or shape[big[0]] != size:
        return None
    return len(shape) - 1 - big[0]


def _is_per_channel(t: torch.Tensor, size: int) -> bool:
    return t.numel() == size and _channel_slot(tuple(t.shape), size) is not None


class PerturbedAffine(PerturbedModule):
    """onnx2torch's Mul (``with_bias=False``) or Add (``with_bias=True``) of a per-channel affine layer.

    ``forward(first, second)`` takes the operands in onnx2torch's order; the per-channel constant is
    recognised by its shape (``size`` elements, one non-1 dimension); when both operands look like that
    (a batch of one already reduced to ``(1, C)``), the lower-rank one, else ``const_input`` (default 1,
    ONNX's usual ``Mul(x, scale)`` order; wrap() cannot see the graph. Only an ``Add(bias, y)`` with a
    bias of shape ``(1, C)`` run on a single 2-D sample ``(1, C)`` is then misread; a Mul never is). The Mul computes ``x * (scale * coef)``; the Add, whose data
    operand is ``x * scale``, computes ``y * coef + bias * bias_coef``. With mask 1 and no noise the
    result is exactly the original's.
    """

    def __init__(self, size: int, with_bias: bool, const_input: int = 1) -> None:
        super().__init__(size)
        self.with_bias = with_bias
        self.centreable = with_bias  # a pruned channel's clean mean goes into the Add's bias
        self.const_input = const_input

    def _const_index(self, first: torch.Tensor, second: torch.Tensor) -> int:
        size = self.neuron_mask.numel()
        a, b = _is_per_channel(first, size), _is_per_channel(second, size)
        if a and b:
            if first.dim() != second.dim():
                return 0 if first.dim() < second.dim() else 1
            return self.const_input
        if a or b:
            return 0 if a else 1
        raise RuntimeError(f"affine neuron: no operand of shapes {tuple(first.shape)} and {tuple(second.shape)} "
                           f"holds {size} per-channel values")

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        ci = self._const_index(first, second)
        const, data = (first, second) if ci == 0 else (second, first)
        slot = _channel_slot(tuple(const.shape), const.numel())
        view = (-1,) + (1,) * slot
        wc, bc = self.coefficients()
        if wc is not None:
            wc = wc.to(const.dtype).view(view)
        if not self.with_bias:
            scaled = const if wc is None else const * wc
            out = scaled * data if ci == 0 else data * scaled
        else:
            bias = const if bc is None else const * bc.to(const.dtype).view(view)
            y = data if wc is None else data * wc
            out = bias + y if ci == 0 else y + bias
        return self.renormalise(out, out.dim() - 1 - slot)


@register_kind
class AffineKind(NeuronKind):
    """One neuron per channel of a per-channel Mul (+ Add) by constants."""

    name = "affine"
    description = ("per-channel Mul (+ Add) after a Conv: BatchNorm decomposed by exporters (tf2onnx/Keras) "
                   "or folded by hand")
    ops = ("Mul",)  # with the Add that alone reads it, when there is one

    def find(self, model: onnx.ModelProto, index: GraphIndex) -> tuple[list[NeuronLayer], list[str]]:
        layers: list[NeuronLayer] = []
        notes: list[str] = []
        ranks = _ranks(model)
        raw = _input_side_values(model, index)
        tail = _after_classifier(model, index)
        for node in model.graph.node:
            if node.op_type not in self.ops or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                continue
            label = node_label(node)
            consts = [index.constant(name) for name in node.input]
            if consts[0] is None and consts[1] is None:
                continue  # a product of two activations (an SE gate, attention): not a neuron layer
            if consts[0] is not None and consts[1] is not None:
                continue  # constant arithmetic
            ci = 0 if consts[0] is not None else 1
            scale, data = node.input[ci], node.input[1 - ci]
            shape = tuple(int(d) for d in consts[ci].shape)
            size = int(consts[ci].size)
            if size <= 1:
                continue  # a global scale (attention scaling, unit conversion)
            axis = _channel_axis(shape, size, ranks.get(data))
            if axis is None:
                notes.append(f"{label}: Mul by a constant of shape {shape} that is not one value per channel skipped")
                continue
            if any(a.name == "broadcast" for a in node.attribute):
                notes.append(f"{label}: Mul with the legacy broadcast attribute skipped")
                continue
            if not index.is_initializer(scale):
                notes.append(f"{label}: per-channel Mul whose scale is a Constant node skipped "
                             "(pruning edits initializers)")
                continue
            if data in raw:
                notes.append(f"{label}: per-channel Mul on the model input (input normalisation) skipped")
                continue
            if id(node) in tail:
                notes.append(f"{label}: per-channel Mul after the classifier skipped (its channels are the classes)")
                continue
            add, bias = _following_add(node, index, size, shape, ranks.get(data))
            params = (("scale", scale),) + ((("bias", bias),) if add is not None else ())
            if add is None:
                layers.append(NeuronLayer(name=label, kind=self.name, op_type="Mul", node_name=node.name,
                                          output=node.output[0], size=size, params=params))
            else:
                layers.append(NeuronLayer(name=label, kind=self.name, op_type="Mul+Add", node_name=node.name,
                                          output=add.output[0], size=size, params=params))
        return layers, notes

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        from .._compat import onnx2torch

        binary = getattr(onnx2torch().node_converters, "OnnxBinaryMathOperation", None)
        if binary is None or not isinstance(module, binary):
            raise TypeError(f"{layer.name}: expected onnx2torch's OnnxBinaryMathOperation, got {type(module).__name__}")
        expected = torch.add if layer.op_type == "Mul+Add" else torch.mul
        if module.math_op_function is not expected:
            raise TypeError(f"{layer.name}: the torch module does not compute {layer.op_type.split('+')[-1]}")
        if module.broadcast == 1 and module.axis is not None:
            raise TypeError(f"{layer.name}: legacy broadcast is not supported")
        return PerturbedAffine(layer.size, with_bias=layer.op_type == "Mul+Add")

    def normalised_inputs(self, layer: NeuronLayer, index: GraphIndex) -> set[str]:
        """The inputs of the node computing ``layer``; of a Mul+Add also the Mul's (the output is the Add's)."""
        values = super().normalised_inputs(layer, index)
        node = index.producer.get(layer.output)
        if node is not None and layer.op_type == "Mul+Add":
            for v in node.input:
                mul = index.producer.get(v)
                if mul is not None and mul.op_type == "Mul":
                    values.update(mul.input)
        return values

    def write_back(self, layer: NeuronLayer, pruned: np.ndarray, editor: InitializerEditor,
                   centre: Optional[np.ndarray] = None) -> None:
        pruned = np.asarray(pruned, dtype=np.int64)
        add = node = self.node_of(layer, editor)
        if centre is not None and layer.op_type == "Mul+Add":  # a renormalised channel outputs its clean mean
            i = list(add.input).index(layer.param("bias"))
            bias = editor.read(add, i).copy()
            flat = bias.reshape(-1)
            flat[pruned] = np.asarray(centre, dtype=bias.dtype)[pruned]
            editor.write(add, i, flat.reshape(bias.shape))
        if layer.op_type == "Mul+Add":
            node = next((editor.index.producer.get(name) for name in node.input
                         if editor.index.producer.get(name) is not None
                         and editor.index.producer[name].op_type == "Mul"), None)
            if node is None:
                raise KeyError(f"no Mul feeds the Add of layer {layer.name}")
        i = list(node.input).index(layer.param("scale"))
        scale = editor.read(node, i).copy()
        flat = scale.reshape(-1)  # one non-1 dimension: the flat index is the channel
        flat[pruned] = 0
        editor.write(node, i, flat.reshape(scale.shape))  # the bias is kept: a pruned channel outputs it


def _channel_axis(shape: tuple[int, ...], size: int, rank: Optional[int]) -> Optional[int]:
    """Channel axis of the data (1 or 3 for 4-D, 1 for 2-D) the constant is per channel of, else None."""
    slot = _channel_slot(shape, size)
    if slot is None:
        return None
    if rank is None:
        if len(shape) > 4:
            return None
        return {2: 1, 0: 3}.get(slot)
    if len(shape) > rank or rank not in (2, 4):
        return None
    axis = rank - 1 - slot
    return axis if (rank == 4 and axis in (1, 3)) or (rank == 2 and axis == 1) else None


def _following_add(mul: onnx.NodeProto, index: GraphIndex, size: int, shape: tuple[int, ...],
                   rank: Optional[int]) -> tuple[Optional[onnx.NodeProto], str]:
    out = mul.output[0]
    readers = index.consumers.get(out, [])
    if index.uses.get(out, 0) != 1 or len(readers) != 1:
        return None, ""
    add, i = readers[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2 or add.input[0] == add.input[1]:
        return None, ""
    if any(a.name == "broadcast" for a in add.attribute):
        return None, ""
    bias = add.input[1 - i]
    value = index.constant(bias)
    if value is None or int(value.size) != size:
        return None, ""
    if _channel_slot(tuple(int(d) for d in value.shape), size) != _channel_slot(shape, size):
        return None, ""
    if _channel_axis(tuple(int(d) for d in value.shape), size, rank) is None:
        return None, ""
    return add, bias


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Known ranks of the graph's values (declared, else inferred; best effort)."""
    ranks: dict[str, int] = {}

    def take(values) -> None:
        for v in values:
            t = v.type.tensor_type
            if v.type.HasField("tensor_type") and t.HasField("shape"):
                ranks.setdefault(v.name, len(t.shape.dim))

    graph = model.graph
    take(graph.input)
    take(graph.value_info)
    take(graph.output)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        take(inferred.graph.value_info)
    except Exception:  # noqa: BLE001 - inference is a hint only
        pass
    return ranks


def _input_side_values(model: onnx.ModelProto, index: GraphIndex) -> set[str]:
    """Values computed from a graph input without a Conv/Gemm/MatMul in between (graph order is topological)."""
    raw = {name for name in index.graph_inputs if name not in index.initializers}
    for node in model.graph.node:
        if node.op_type in LINEAR_OPS:
            continue
        if any(name in raw for name in node.input):
            raw.update(o for o in node.output if o)
    return raw


def _after_classifier(model: onnx.ModelProto, index: GraphIndex) -> set[int]:
    """ids of nodes met walking back from the graph outputs before any Conv/Gemm/MatMul."""
    return index.walk_back_from_outputs(LINEAR_OPS)[0]
