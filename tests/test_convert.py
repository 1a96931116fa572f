"""onnx2torch conversion, parity with onnxruntime, and the classifier wrapper."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from anp_onnx.convert import ClassifierNet, convert, parity, to_model_input, ort_logits, unsupported_ops
from anp_onnx.data import Preprocessing
from anp_onnx.errors import ConversionError
from anp_onnx.model import load_model
from builders import random_images, tiny_model

TOL = 1e-5  # torch vs onnxruntime on these small float32 models


@pytest.mark.parametrize("kwargs", [{}, {"nhwc": True}, {"dynamic_batch": False}, {"opset": 17}])
def test_parity_with_onnxruntime(tmp_path, kwargs):
    model = load_model(tiny_model(tmp_path / "m.onnx", **kwargs))
    net = ClassifierNet(convert(model).graph, model.input.layout, Preprocessing())
    images = random_images(8).x
    assert parity(model, net, images, Preprocessing()) < TOL


def test_preprocessing_applied_identically(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    pre = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), scale=1.0)
    net = ClassifierNet(convert(model).graph, "NCHW", pre)
    images = random_images(8).x
    ref = ort_logits(model, to_model_input(model, images, pre))
    with torch.no_grad():
        got = net(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, ref, atol=TOL)
    raw = ort_logits(model, to_model_input(model, images, Preprocessing()))
    assert np.abs(raw - ref).max() > 1e-2  # the preprocessing really changes the input


def test_module_mapping_follows_onnx_outputs(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    conv = convert(model)
    bn_outputs = [n.output[0] for n in model.proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn_outputs) == 2
    for out in bn_outputs:
        module = getattr(conv.graph, conv.modules_by_output[out])
        assert isinstance(module, torch.nn.BatchNorm2d)
    assert all(not p.requires_grad for p in conv.graph.parameters())


def test_torchvision_not_left_in_sys_modules(tmp_path):
    convert(load_model(tiny_model(tmp_path / "m.onnx")))
    tv = sys.modules.get("torchvision")
    assert tv is None or hasattr(tv, "__file__")  # never our stand-in


def _model_with(op_nodes, path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    nodes = op_nodes + [
        helper.make_node("GlobalAveragePool", ["h"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


def test_unsupported_ops_listed_with_node_names(tmp_path):
    path = _model_with([helper.make_node("Hardmax", ["x"], ["a"], name="hm1", axis=1),
                        helper.make_node("Hardmax", ["a"], ["b"], name="hm2", axis=1),
                        helper.make_node("LpNormalization", ["b"], ["h"], name="lpn", axis=1)], tmp_path / "u.onnx")
    model = load_model(path)
    assert unsupported_ops(model.runnable) == ["Hardmax-13 (hm1, hm2)", "LpNormalization-13 (lpn)"]
    with pytest.raises(ConversionError, match=r"Hardmax-13 \(hm1, hm2\); LpNormalization-13 \(lpn\)"):
        convert(model)


def test_parity_failure_is_reported(tmp_path):
    model = load_model(tiny_model(tmp_path / "m.onnx"))
    conv = convert(model)
    bn = getattr(conv.graph, conv.modules_by_output[[n.output[0] for n in model.proto.graph.node
                                                      if n.op_type == "BatchNormalization"][0]])
    with torch.no_grad():
        bn.weight.mul_(3.0)  # the torch graph no longer matches the ONNX file
    net = ClassifierNet(conv.graph, "NCHW", Preprocessing())
    with pytest.raises(ConversionError, match="disagrees with onnxruntime"):
        parity(model, net, random_images(8).x, Preprocessing())
