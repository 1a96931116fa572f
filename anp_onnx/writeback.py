"""The write-back stage: a pruning decision written into the ORIGINAL ONNX model's initializers.

The repaired model is the user's model with only the pruned channels' initializer values changed
(and, for a renormalised conv/Gemm neuron without a bias, one new bias initializer): same nodes,
node names, inputs and outputs, opset, IR version and producer. ``metadata_props`` gain
``anp_onnx.*`` entries recording what was done (:mod:`anp_onnx.metadata`). Writing the file safely is :mod:`anp_onnx.outputs`.
"""

from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import InitializerEditor
from .metadata import set_metadata
from .neurons import NeuronLayer, get_kind
from .prune import PrunePlan

def write_back(model: onnx.ModelProto, layers: Sequence[NeuronLayer], plan: PrunePlan,
              metadata: Optional[Mapping[str, object]] = None,
              centre_of: Optional[Mapping[str, np.ndarray]] = None,
              initializers: Optional[Mapping[str, np.ndarray]] = None) -> tuple[onnx.ModelProto, InitializerEditor]:
    """A copy of ``model`` with ``plan`` written into its initializers, and the editor that knows what changed.

    ``centre_of`` (layer name -> each neuron's centre, its clean mean) covers the renormalised layers
    (see ``ANPConfig.renormalise``): their pruned neurons are written to output their centre.
    ``initializers`` (name -> new values, from a refinement stage, :mod:`anp_onnx.stages`) are
    written first, so the pruning applies to the refined weights as the torch model's masks do.
    """
    out = copy.deepcopy(model)
    for name, values in (initializers or {}).items():
        replace_initializer(out, name, values)
    editor = InitializerEditor(out)
    editor.changed.update(initializers or {})
    centre_of = centre_of or {}
    for layer in layers:
        idx = np.asarray(plan.pruned.get(layer.name, ()), dtype=np.int64)
        if idx.size:
            get_kind(layer.kind).write_back(layer, idx, editor, centre_of.get(layer.name))
    set_metadata(out, metadata or {})
    return out, editor


def replace_initializer(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    """Set initializer ``name`` of ``model`` (in place) to ``values``, keeping its shape and data type."""
    tensor = next((t for t in model.graph.initializer if t.name == name), None)
    if tensor is None:
        raise KeyError(f"the model has no initializer {name}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    values = np.asarray(values, dtype=dtype)
    if tuple(values.shape) != tuple(tensor.dims):
        raise ValueError(f"initializer {name} has shape {tuple(tensor.dims)}, not {values.shape}")
    tensor.CopyFrom(numpy_helper.from_array(values, name))
