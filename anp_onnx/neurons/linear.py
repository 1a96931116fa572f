"""Output units of Gemm and MatMul nodes as neurons of the "conv" kind (see anp_onnx.neurons.conv).

* ``Gemm`` that onnx2torch turns into ``nn.Linear`` (transA = 0, B an initializer, C absent or a 1-D
  initializer): output units are the rows of B when transB = 1 and its columns when transB = 0.
  Other Gemms become onnx2torch's generic ``OnnxGemm`` and are skipped with a note. Gemm adds
  ``beta * C``, so a renormalised pruned unit's clean mean is written into C divided by beta.
* ``MatMul`` whose second input is a 2-D initializer (tf2onnx/Keras write Dense as MatMul + Add):
  output units are the columns of the weight. The bias lives in the following ``Add``, a separate
  node and torch module, which is left untouched: a MatMul neuron's mask and weight noise apply,
  the bias noise ``x`` does not. A renormalised pruned unit's clean mean goes into that Add's bias,
  found at discovery as the ``shift`` parameter.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from ..graph import GraphIndex, InitializerEditor
from .base import NeuronLayer, PerturbedModule
from .channels import ChannelHandler, Params, attr


class PerturbedLinear(PerturbedModule):
    """nn.Linear (a converted Gemm) with output unit c's weight row scaled by (m+d), bias by (1+x)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.out_features)
        self.centreable = True
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wc, bc = self.coefficients()
        weight = self.weight if wc is None else self.weight * wc.to(self.weight.dtype)[:, None]
        bias = self.bias if (bc is None or self.bias is None) else self.bias * bc.to(self.bias.dtype)
        return self.renormalise(F.linear(x, weight, bias), -1)


class PerturbedMatMul(PerturbedModule):
    """onnx2torch's MatMul (x @ W, W an initializer passed in by the graph) with column c of W scaled.

    The bias of a following Add is a separate module and is not perturbed (no bias noise).
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        wc, _ = self.coefficients()
        return self.renormalise(torch.matmul(x, y if wc is None else y * wc.to(y.dtype)), -1)


class GemmHandler(ChannelHandler):
    """Gemm as nn.Linear: output units are the rows of B (transB = 1) or its columns (transB = 0)."""

    op: ClassVar[str] = "Gemm"

    def size(self, node: onnx.NodeProto, index: GraphIndex, w_shape: tuple[int, ...], bias: str) -> tuple[int, str]:
        if int(attr(node, "transA", 0)):
            return 0, "Gemm with transA=1 skipped (onnx2torch makes it a generic module)"
        if len(w_shape) != 2:
            return 0, "Gemm with a non-2-D weight skipped"
        if bias and len(index.initializers[bias].dims) != 1:
            return 0, "Gemm with a non-1-D bias skipped (onnx2torch makes it a generic module)"
        return (w_shape[0] if int(attr(node, "transB", 0)) else w_shape[1]), ""

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{layer.name}: expected onnx2torch's nn.Linear for a Gemm, got "
                            f"{type(module).__name__} (a generic Gemm cannot carry conv neurons)")
        return PerturbedLinear(module)

    def prune_weight(self, node: onnx.NodeProto, weight: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        if int(attr(node, "transB", 0)):
            weight[pruned, :] = 0
        else:
            weight[:, pruned] = 0
        return weight

    def write_centre(self, layer: NeuronLayer, node: onnx.NodeProto, pruned: np.ndarray, values: np.ndarray,
                     editor: InitializerEditor) -> None:
        beta = np.asarray(float(attr(node, "beta", 1.0)), dtype=values.dtype)  # Gemm adds beta * C
        super().write_centre(layer, node, pruned, values / beta, editor)


class MatMulHandler(ChannelHandler):
    """MatMul by a 2-D initializer: output units are its columns; the bias is a following Add's."""

    op: ClassVar[str] = "MatMul"

    def size(self, node: onnx.NodeProto, index: GraphIndex, w_shape: tuple[int, ...], bias: str) -> tuple[int, str]:
        if len(w_shape) != 2:
            return 0, f"MatMul with a {len(w_shape)}-D weight skipped"
        if index.is_initializer(node.input[0]):
            return 0, "MatMul with a constant first input skipped"
        return w_shape[1], ""

    def params(self, node: onnx.NodeProto, index: GraphIndex, weight: str, bias: str, size: int) -> Params:
        """The weight, and the ``shift``: the constant of the Add that alone reads the output, if any."""
        shift = _bias_add(node, index, size)
        return (("weight", weight),) + ((("shift", shift),) if shift else ())

    def wrap(self, module: nn.Module, layer: NeuronLayer) -> PerturbedModule:
        from .._compat import onnx2torch

        matmul = getattr(onnx2torch().node_converters, "OnnxMatMul", None)
        if matmul is None or not isinstance(module, matmul):
            raise TypeError(f"{layer.name}: expected onnx2torch's OnnxMatMul, got {type(module).__name__}")
        wrapped = PerturbedMatMul(layer.size)
        wrapped.centreable = "shift" in dict(layer.params)
        return wrapped

    def prune_weight(self, node: onnx.NodeProto, weight: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        weight[:, pruned] = 0
        return weight

    def write_centre(self, layer: NeuronLayer, node: onnx.NodeProto, pruned: np.ndarray, values: np.ndarray,
                     editor: InitializerEditor) -> None:
        """The following Add's bias gains the pruned units' clean means."""
        add, i = _bias_add_input(node, editor.index, layer.param("shift"))
        shift = editor.read(add, i).copy()
        flat = shift.reshape(-1)
        flat[pruned] += values
        editor.write(add, i, flat.reshape(shift.shape))


def _bias_add(node: onnx.NodeProto, index: GraphIndex, size: int) -> str:
    """The per-column constant of the Add that alone reads a MatMul's output (Dense = MatMul + Add), or ""."""
    out = node.output[0]
    readers = index.consumers.get(out, [])
    if index.uses.get(out, 0) != 1 or len(readers) != 1:
        return ""
    add, i = readers[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return ""
    other = add.input[1 - i]
    if not index.is_initializer(other):
        return ""
    dims = [int(d) for d in index.initializers[other].dims]
    if not dims or dims[-1] != size or int(np.prod(dims)) != size:
        return ""
    return other


def _bias_add_input(node: onnx.NodeProto, index: GraphIndex, name: str) -> tuple[onnx.NodeProto, int]:
    add, _ = index.consumers[node.output[0]][0]
    return add, list(add.input).index(name)
