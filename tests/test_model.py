"""Loading and validating ONNX models (anp_onnx.model)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from anp_onnx.errors import ModelError, UnsupportedModelError
from anp_onnx.model import MAX_RUNTIME_OPSET, load_model
from builders import tiny_model


def test_loads_nchw_model(tmp_path):
    m = load_model(tiny_model(tmp_path / "m.onnx"))
    assert (m.input.name, m.input.layout, m.input.channels, m.input.size) == ("input", "NCHW", 3, (16, 16))
    assert m.input.batch is None and m.num_classes == 10 and m.output_name == "logits"
    assert m.opset == 13 and not m.notes


def test_nhwc_guessed_and_overridable(tmp_path):
    path = tiny_model(tmp_path / "m.onnx", nhwc=True)
    assert load_model(path).input.layout == "NHWC"
    assert load_model(path, layout="NCHW").input.channels == 16  # the user's word wins


def test_fixed_batch(tmp_path):
    m = load_model(tiny_model(tmp_path / "m.onnx", dynamic_batch=False))
    assert m.input.batch == 1


def test_not_onnx(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_text("hello, I am not a model")
    with pytest.raises(ModelError, match="not an ONNX model"):
        load_model(bad)
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="folder"):
        load_model(tmp_path)


def _flat_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 784])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])
    w = helper.make_tensor("w", TensorProto.FLOAT, [784, 10], np.zeros(7840, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


def test_no_image_input(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"exactly one image input.*x \[None, 784\]"):
        load_model(_flat_model(tmp_path / "flat.onnx"))


def test_quantized_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 8, 8])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    z = helper.make_tensor("z", TensorProto.UINT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [s, z])
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    with pytest.raises(UnsupportedModelError, match="quantized"):
        load_model(path)


def test_newer_opset_runs_from_downconverted_copy_and_file_untouched(tmp_path):
    path = tiny_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    model = onnx.version_converter.convert_version(model, 22)
    newer = tmp_path / "m22.onnx"
    onnx.save(model, newer)
    before = newer.read_bytes()
    m = load_model(newer)
    assert m.opset == 22
    assert any("down-converted" in n for n in m.notes)
    assert [i.version for i in m.runnable.opset_import if i.domain in ("", "ai.onnx")] == [MAX_RUNTIME_OPSET]
    out = m.session().run(None, {"input": np.zeros((2, 3, 16, 16), np.float32)})[0]
    assert out.shape == (2, 10)
    assert newer.read_bytes() == before


def test_external_data_loaded(tmp_path):
    src = onnx.load(tiny_model(tmp_path / "m.onnx"))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(src, ext / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    m = load_model(ext / "m.onnx")
    assert m.external_tensors and "features.1.weight" in m.external_tensors
    ref = load_model(tmp_path / "m.onnx")
    x = {"input": np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)}
    np.testing.assert_allclose(m.session().run(None, x)[0], ref.session().run(None, x)[0], atol=1e-6)
