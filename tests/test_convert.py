"""onnx2torch conversion, parity with onnxruntime, and the classifier wrapper."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from anp_onnx.convert import ClassifierNet, convert, parity, unsupported_ops
from anp_onnx.preprocessing import Preprocessing
from anp_onnx.errors import ConversionError
from anp_onnx.model import load_model
from anp_onnx.runtime import ort_logits, to_model_input
from builders import TinyBNNet, export, random_images, randomize_bn, tiny_model

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


class _ViewNet(TinyBNNet):
    """Flattens with x.view(x.size(0), -1): a fixed-batch export bakes the batch into a Reshape."""

    def forward(self, x):
        h = self.head[0](self.features(x))
        return self.head[2](h.view(h.size(0), -1))


def test_fixed_batch_reshape_is_generalised_for_torch_only(tmp_path):
    path = export(randomize_bn(_ViewNet()), tmp_path / "v.onnx", dynamic_batch=False)
    model = load_model(path)
    assert model.input.batch == 1 and any(n.op_type == "Reshape" for n in model.proto.graph.node)
    net = ClassifierNet(convert(model).graph, "NCHW", Preprocessing())
    assert parity(model, net, random_images(8).x, Preprocessing()) < TOL  # batch 8 through a batch-1 file
    # the user's model is untouched
    assert model.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


class _SoftmaxNet(TinyBNNet):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=1)


def test_final_softmax_is_stripped_for_anp_and_reapplied_for_checks(tmp_path):
    path = export(randomize_bn(_SoftmaxNet()), tmp_path / "s.onnx")
    model = load_model(path)
    conv = convert(model)
    assert conv.output_activation == "Softmax"
    net = ClassifierNet(conv.graph, "NCHW", Preprocessing(), conv.output_activation)
    images = random_images(8).x
    with torch.no_grad():
        logits = net(torch.from_numpy(images)).numpy()
    assert np.abs(logits.sum(axis=1) - 1).max() > 1e-2  # real logits, not probabilities
    assert parity(model, net, images, Preprocessing()) < TOL
    # the whole repair works and the written model still ends with its Softmax
    import anp_onnx
    result = anp_onnx.repair(path, random_images(48), out=tmp_path / "r.onnx", report=False,
                             config=anp_onnx.ANPConfig(iterations=3, batch_size=16),
                             pruning=anp_onnx.PruneSpec.count(3), refinements=())
    assert result.export.max_abs_diff < 1e-5
    assert onnx.load(tmp_path / "r.onnx").graph.node[-1].op_type == "Softmax"


class _PadMeanNet(TinyBNNet):
    """Pad and a mean over H, W: ops whose opset-18 versions onnx2torch 1.5 has no converter for."""

    def forward(self, x):
        h = self.features(torch.nn.functional.pad(x, (1, 1, 1, 1)))
        return self.head[2](h.mean(dim=(2, 3)))


@pytest.mark.parametrize("opset", [18, 21])
def test_opset_18_plus_models_convert_and_keep_their_opset(tmp_path, opset):
    base = onnx.load(export(randomize_bn(_PadMeanNet()), tmp_path / "m13.onnx"))
    path = tmp_path / f"m{opset}.onnx"
    onnx.save(onnx.version_converter.convert_version(base, opset), path)
    model = load_model(path)
    assert model.opset == opset
    net = ClassifierNet(convert(model).graph, "NCHW", Preprocessing())
    assert parity(model, net, random_images(8).x, Preprocessing()) < TOL
    import anp_onnx
    anp_onnx.repair(path, random_images(48), out=tmp_path / "r.onnx", report=False,
                    config=anp_onnx.ANPConfig(iterations=2, batch_size=16), pruning=anp_onnx.PruneSpec.count(2), refinements=())
    assert [i.version for i in onnx.load(tmp_path / "r.onnx").opset_import if i.domain == ""] == [opset]


def test_new_feature_of_a_newer_op_version_is_a_clear_error(tmp_path):
    # Pad-18 with its new `axes` input: the older converter does not apply, and the message says why
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    inits = [helper.make_tensor("pads", TensorProto.INT64, [2], [1, 1]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [3])]
    nodes = [helper.make_node("Pad", ["x", "pads", "", "axes"], ["h"], name="pad"),
             helper.make_node("GlobalAveragePool", ["h"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    path = tmp_path / "p.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    with pytest.raises(ConversionError, match="Pad with an axes input"):
        convert(load_model(path))


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_is_made_explicit_for_torch(tmp_path, mode):
    # older exporters (CNTK) write auto_pad, which onnx2torch does not convert
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 7, 7])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.random.default_rng(0).random(108).tolist())
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", auto_pad=mode, strides=[2, 2]),
             helper.make_node("MaxPool", ["c"], ["m"], name="pool", auto_pad=mode, kernel_shape=[2, 2]),
             helper.make_node("GlobalAveragePool", ["m"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    path = tmp_path / "a.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                                opset_imports=[helper.make_opsetid("", 11)], ir_version=6), path)
    model = load_model(path)
    net = ClassifierNet(convert(model).graph, "NCHW", Preprocessing())
    assert parity(model, net, random_images(4, size=7).x, Preprocessing()) < TOL
    assert any(a.name == "auto_pad" for a in onnx.load(path).graph.node[0].attribute)  # the file is untouched


def test_ir3_model_with_initializers_as_inputs_is_repaired_in_place(tmp_path):
    # IR 3 (CNTK era): every initializer is also a graph input; that is not sharing
    import anp_onnx

    m = onnx.load(tiny_model(tmp_path / "m.onnx", opset=9))
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    path = tmp_path / "ir3.onnx"
    onnx.save(m, path)
    result = anp_onnx.repair(path, random_images(48), out=tmp_path / "r.onnx", report=False,
                             config=anp_onnx.ANPConfig(iterations=2, batch_size=16),
                             pruning=anp_onnx.PruneSpec.count(3), refinements=())
    written = onnx.load(tmp_path / "r.onnx")
    onnx.checker.check_model(written)
    assert written.ir_version == 3 and len(written.graph.initializer) == len(m.graph.initializer)  # no copies
    assert set(result.export.changed_initializers) <= {t.name for t in m.graph.initializer}


def _shape_model(allowzero_shape):
    """x (N,2,4,5) -> ReduceMean(axes = Concat(Constant, Constant)) -> Reshape(allowzero=1) -> output."""
    nodes = [
        helper.make_node("Constant", [], ["a"], value_ints=[2]),
        helper.make_node("Constant", [], ["b"], value_ints=[3]),
        helper.make_node("Concat", ["a", "b"], ["axes"], axis=0),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["y"], allowzero=1),
    ]
    shape = onnx.numpy_helper.from_array(np.array(allowzero_shape, np.int64), "shape")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_precomputed_constants_and_inert_allowzero():
    from anp_onnx.passes import drop_inert_allowzero, precompute_constants

    model = _shape_model([-1, 2])
    folded, _ = precompute_constants(model)
    # the Constant lists go too: onnx2torch would hand converters a Python list for them
    assert [n.op_type for n in folded.graph.node] == ["ReduceMean", "Reshape"]
    assert {t.name for t in folded.graph.initializer} == {"a", "b", "axes", "shape"}
    axes = next(t for t in folded.graph.initializer if t.name == "axes")
    assert onnx.numpy_helper.to_array(axes).tolist() == [2, 3]
    assert [n.op_type for n in model.graph.node][2] == "Concat"  # the input model is not changed
    cleaned, _ = drop_inert_allowzero(folded)
    assert not any(a.name == "allowzero" for n in cleaned.graph.node for a in n.attribute)
    x = np.random.default_rng(0).random((3, 2, 4, 5), dtype=np.float32)
    from onnx.reference import ReferenceEvaluator

    expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(ReferenceEvaluator(cleaned).run(None, {"x": x})[0], expected, rtol=1e-6)
    # a literal 0 with allowzero=1 means an empty dimension: kept
    kept, _ = drop_inert_allowzero(precompute_constants(_shape_model([0, -1]))[0])
    assert any(a.name == "allowzero" and a.i for n in kept.graph.node for a in n.attribute)


def test_channels_last_is_the_same_function_and_only_for_checked_ops(tmp_path):
    from anp_onnx.context import channels_last_safe, open_context
    from anp_onnx.model import load_model
    from builders import random_images, tiny_model
    from test_norm_neurons import groupnorm18_model

    model = load_model(tiny_model(tmp_path / "m.onnx"))
    plain = open_context(model, Preprocessing())
    fast = open_context(model, Preprocessing(), channels_last=True)
    assert not plain.net.channels_last and fast.net.channels_last
    x = random_images(16).x
    with torch.no_grad():
        a, b = plain.net(torch.from_numpy(x)), fast.net(torch.from_numpy(x))
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5)
    assert parity(model, fast.net, x, Preprocessing()) < 1e-4
    # GroupNormalization's backward crashed on channels-last tensors: such models stay contiguous
    gn = load_model(groupnorm18_model(tmp_path / "gn.onnx"))
    assert channels_last_safe(model.runnable) and not channels_last_safe(gn.runnable)
    assert not open_context(gn, Preprocessing(), channels_last=True).net.channels_last
