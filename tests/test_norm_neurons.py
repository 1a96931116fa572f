"""Instance-, Layer- and GroupNormalization neurons: discovery, arithmetic, conversion, write-back, ANP."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from anp_onnx import ANPConfig, PruneSpec, Repairer, inspect_model, prune
from anp_onnx.convert import convert
from anp_onnx.errors import ConversionError
from anp_onnx.model import load_model, make_session
from anp_onnx.neurons import FALLBACK_KINDS, all_kinds, find_neurons
from anp_onnx.neurons.norms import PerturbedGroupNorm, PerturbedInstanceNorm, PerturbedLayerNorm
from builders import initializer, ort_on, random_images, torch_with_plan


def _t(rng, name, shape, scale=0.5, offset=0.0):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale + offset).astype(np.float32), name)


def _save(nodes, inits, path, opset, ir, inputs=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    graph = helper.make_graph(nodes, "g", [x, *inputs], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _head(rng, src, channels):
    inits = [_t(rng, "cls.w", (10, channels)), _t(rng, "cls.b", (10,))]
    nodes = [
        helper.make_node("GlobalAveragePool", [src], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "cls.w", "cls.b"], ["logits"], name="cls", transB=1),
    ]
    return nodes, inits


def instancenorm_model(path):
    """Conv -> InstanceNormalization -> Relu -> GAP -> Flatten -> Gemm (opset 13): 6 neurons."""
    rng = np.random.default_rng(0)
    inits = [_t(rng, "c1.w", (6, 3, 3, 3)), _t(rng, "c1.b", (6,)),
             _t(rng, "in.scale", (6,), 0.3, 1.0), _t(rng, "in.bias", (6,), 0.3)]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("InstanceNormalization", ["c1", "in.scale", "in.bias"], ["in"], name="inorm",
                         epsilon=1e-5),
        helper.make_node("Relu", ["in"], ["r1"]),
    ]
    head, more = _head(rng, "r1", 6)
    return _save(nodes + head, inits + more, path, 13, 8)


def layernorm_model(path):
    """Conv(stride 2) -> Relu -> LayerNorm(axis 2: scale 8x8, no bias) -> NHWC -> LayerNorm(axis -1: 6
    channels) -> NCHW -> Relu -> GAP -> Flatten -> Gemm (opset 17): 64 + 6 neurons.

    (A pruned spatial element is exactly 0 in every channel, so the channel LayerNorm sees zero variance
    without rounding noise; the other order would make a pruned channel a constant, whose spatial
    variance rounds differently in torch and onnxruntime and is then divided by sqrt(eps).)
    """
    rng = np.random.default_rng(1)
    inits = [_t(rng, "c1.w", (6, 3, 3, 3)), _t(rng, "c1.b", (6,)),
             _t(rng, "lns.scale", (8, 8), 0.3, 1.0),
             _t(rng, "lnc.scale", (6,), 0.3, 1.0), _t(rng, "lnc.bias", (6,), 0.3)]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r0"]),
        helper.make_node("LayerNormalization", ["r0", "lns.scale"], ["lns"], name="lns", axis=2, epsilon=1e-5),
        helper.make_node("Transpose", ["lns"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["nhwc", "lnc.scale", "lnc.bias"], ["lnc"], name="lnc",
                         axis=-1, epsilon=1e-5),
        helper.make_node("Transpose", ["lnc"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Relu", ["nchw"], ["r1"]),
    ]
    head, more = _head(rng, "r1", 6)
    return _save(nodes + head, inits + more, path, 17, 8)


def groupnorm_model(path, opset=18):
    """Conv(8 channels) -> GroupNormalization(4 groups) -> Relu -> GAP -> Flatten -> Gemm.

    Opset 18 (IR 8): scale and bias of shape (4,), one per group: 4 neurons. Opset 21 (IR 10): shape
    (8,), one per channel: 8 neurons.
    """
    rng = np.random.default_rng(2)
    n = 4 if opset < 21 else 8
    inits = [_t(rng, "c1.w", (8, 3, 3, 3)), _t(rng, "c1.b", (8,)),
             _t(rng, "gn.scale", (n,), 0.3, 1.0), _t(rng, "gn.bias", (n,), 0.3)]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("GroupNormalization", ["c1", "gn.scale", "gn.bias"], ["gn"], name="gn",
                         num_groups=4, epsilon=1e-5),
        helper.make_node("Relu", ["gn"], ["r1"]),
    ]
    head, more = _head(rng, "r1", 8)
    return _save(nodes + head, inits + more, path, opset, 10 if opset >= 21 else 8)


def groupnorm18_model(path):
    return groupnorm_model(path, 18)


def groupnorm21_model(path):
    return groupnorm_model(path, 21)


def test_kinds_registered_and_not_fallback():
    kinds = all_kinds()
    assert {"instancenorm", "layernorm", "groupnorm"} <= set(kinds)
    assert not {"instancenorm", "layernorm", "groupnorm"} & set(FALLBACK_KINDS)


def test_find_instancenorm(tmp_path):
    found = find_neurons(onnx.load(instancenorm_model(tmp_path / "m.onnx")))
    assert [(layer.kind, layer.op_type, layer.size) for layer in found.layers] == [
        ("instancenorm", "InstanceNormalization", 6)]  # preferred to the conv fallback
    assert dict(found.layers[0].params) == {"scale": "in.scale", "bias": "in.bias"}


def test_find_layernorm(tmp_path):
    found = find_neurons(onnx.load(layernorm_model(tmp_path / "m.onnx")))
    assert [(layer.name, layer.kind, layer.size) for layer in found.layers] == [
        ("lns", "layernorm", 64), ("lnc", "layernorm", 6)]
    assert dict(found.layers[0].params) == {"scale": "lns.scale"}
    assert dict(found.layers[1].params) == {"scale": "lnc.scale", "bias": "lnc.bias"}


@pytest.mark.parametrize("opset, size", [(18, 4), (21, 8)])
def test_find_groupnorm(tmp_path, opset, size):
    found = find_neurons(onnx.load(groupnorm_model(tmp_path / "m.onnx", opset)))
    assert [(layer.name, layer.kind, layer.op_type, layer.size) for layer in found.layers] == [
        ("gn", "groupnorm", "GroupNormalization", size)]  # preferred to the conv fallback
    assert dict(found.layers[0].params) == {"scale": "gn.scale", "bias": "gn.bias"}


@pytest.mark.parametrize("opset, size", [(18, 4), (21, 8)])
def test_inspect_model_lists_groupnorm(tmp_path, opset, size):
    info = inspect_model(groupnorm_model(tmp_path / "m.onnx", opset))
    assert info.opset == opset
    assert [(layer.name, layer.kind, layer.size) for layer in info.neurons.layers] == [("gn", "groupnorm", size)]
    assert info.neurons.total == size and info.neurons.by_kind() == {"groupnorm": (1, size)}
    assert info.parity is not None and info.parity < 1e-5


@pytest.mark.parametrize("opset", [18, 21])
def test_groupnorm_converts_to_torch_groupnorm(tmp_path, opset):
    """An nn.GroupNorm with per-channel parameters (opset 18: each group's value over its 2 channels)."""
    path = groupnorm_model(tmp_path / "m.onnx", opset)
    converted = convert(load_model(path))
    module = getattr(converted.graph, converted.modules_by_output["gn"])
    assert isinstance(module, torch.nn.GroupNorm) and module.affine
    assert (module.num_groups, module.num_channels) == (4, 8) and module.eps == pytest.approx(1e-5)
    scale, bias = initializer(onnx.load(path), "gn.scale"), initializer(onnx.load(path), "gn.bias")
    if opset < 21:
        scale, bias = np.repeat(scale, 2), np.repeat(bias, 2)
    np.testing.assert_array_equal(module.weight.numpy(), scale)
    np.testing.assert_array_equal(module.bias.numpy(), bias)
    assert module.onnx_mapping.inputs == ("c1",) and module.onnx_mapping.outputs == ("gn",)


def _gn_graph(opset, ir, channels, groups, n_params, *, input_channels=None, twice=False, const_scale=True):
    """X -> GroupNormalization [-> GroupNormalization] -> GlobalAveragePool, for direct conversion."""
    rng = np.random.default_rng(3)
    c = channels if input_channels is None else input_channels
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 1, 1])
    inits = [_t(rng, "s", (n_params,), 0.3, 1.0), _t(rng, "b", (n_params,), 0.3)]
    inputs = [x]
    if not const_scale:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [n_params]))
        inits = inits[1:]
    nodes = [helper.make_node("GroupNormalization", ["x", "s", "b"], ["g1"], name="g1", num_groups=groups)]
    if twice:
        nodes.append(helper.make_node("GroupNormalization", ["g1", "s", "b"], ["g2"], name="g2",
                                      num_groups=groups, epsilon=1e-3))
    nodes.append(helper.make_node("GlobalAveragePool", [nodes[-1].output[0]], ["y"]))
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [y], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _o2t_convert(model):
    from anp_onnx._compat import onnx2torch

    return onnx2torch().convert(model, attach_onnx_mapping=True).eval()


@pytest.mark.parametrize("opset, ir, n_params", [(18, 8, 3), (20, 9, 3), (21, 10, 6)])
def test_groupnorm_chain_converts_like_onnxruntime(opset, ir, n_params):
    """Two GroupNormalizations in a row, then GlobalAveragePool (whose converter needs the shape of
    its input, which onnx's shape inference alone leaves unknown after a GroupNormalization)."""
    model = _gn_graph(opset, ir, 6, 3, n_params, twice=True)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(4).standard_normal((2, 6, 5, 5)).astype(np.float32)
    ref = make_session(model).run(None, {"x": x})[0]
    graph = _o2t_convert(model)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in graph.modules()) == 2
    with torch.no_grad():
        got = graph(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("opset, ir, n_params, const_scale", [(18, 8, 3, True), (18, 8, 3, False),
                                                             (21, 10, 6, False)])
def test_groupnorm_functional_when_channels_or_scale_unknown(opset, ir, n_params, const_scale):
    """A symbolic channel count (opset 18 needs C) or a scale given as an input: the parameters are
    passed to a module that computes GroupNormalization at run time, with the same result."""
    from anp_onnx.onnx2torch_ext import OnnxGroupNorm

    model = _gn_graph(opset, ir, 6, 3, n_params, input_channels="C", const_scale=const_scale)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    feeds = {"x": x}
    if not const_scale:
        feeds["s"] = (rng.random(n_params) + 0.5).astype(np.float32)
    ref = make_session(model).run(None, feeds)[0]
    graph = _o2t_convert(model)
    assert any(isinstance(m, OnnxGroupNorm) for m in graph.modules())
    with torch.no_grad():
        got = graph(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("opset, ir, n_params, input_channels, message", [
    (21, 10, 4, 6, "scale has 4 elements but the input has 6 channels"),
    (18, 8, 6, 6, "scale has 6 elements, expected one per group"),
    (21, 10, 8, 8, "8 channels do not split into 3 groups"),
])
def test_groupnorm_inconsistent_parameters_clear_error(opset, ir, n_params, input_channels, message):
    model = _gn_graph(opset, ir, n_params, 3, n_params, input_channels=input_channels)
    with pytest.raises(ConversionError, match=message):
        _o2t_convert(model)


def test_groupnorm_unusable_nodes_skipped_with_note():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 4, 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 4, 4])
    b = helper.make_tensor("b", TensorProto.FLOAT, [2], [0.0, 0.0])
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], name="n", num_groups=2)
    model = helper.make_model(helper.make_graph([node], "g", [x, s], [y], [b]),
                              opset_imports=[helper.make_opsetid("", 18)])
    found = find_neurons(model, kinds=["groupnorm"])
    assert found.total == 0 and any("non-constant" in note for note in found.notes)
    # opset 18 wants one scale value per group: a per-channel scale (4 values, 2 groups) is skipped
    s4, b4 = helper.make_tensor("s4", TensorProto.FLOAT, [4], [1.0] * 4), helper.make_tensor("b4", TensorProto.FLOAT,
                                                                                             [4], [0.0] * 4)
    node = helper.make_node("GroupNormalization", ["x", "s4", "b4"], ["y"], name="n", num_groups=2)
    for opset, size in [(18, 0), (21, 4)]:
        model = helper.make_model(helper.make_graph([node], "g", [x], [y], [s4, b4]),
                                  opset_imports=[helper.make_opsetid("", opset)])
        found = find_neurons(model, kinds=["groupnorm"])
        assert found.total == size
        assert any("one per group" in note for note in found.notes) == (size == 0)


@pytest.mark.parametrize("op", ["InstanceNormalization", "LayerNormalization"])
def test_non_constant_scale_skipped_with_note(op):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [2] if op.startswith("Instance") else [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 4, 4])
    b = helper.make_tensor("b", TensorProto.FLOAT, [2] if op.startswith("Instance") else [4], [0.0] * (
        2 if op.startswith("Instance") else 4))
    node = helper.make_node(op, ["x", "s", "b"], ["y"], name="n")
    model = helper.make_model(helper.make_graph([node], "g", [x, s], [y], [b]),
                              opset_imports=[helper.make_opsetid("", 17)])
    found = find_neurons(model, kinds=["instancenorm", "layernorm"])
    assert found.total == 0 and any("non-constant" in note for note in found.notes)


def _set(pert, m, d, xb):
    with torch.no_grad():
        pert.neuron_mask.copy_(m)
        pert.neuron_noise.copy_(d)
        pert.neuron_noise_bias.copy_(xb)


def test_perturbed_instancenorm_identity_and_formula():
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.InstanceNorm2d(5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(5, generator=g) + 0.5)
        norm.bias.copy_(torch.rand(5, generator=g) - 0.5)
    pert = PerturbedInstanceNorm(norm).eval()
    x = torch.randn(3, 5, 6, 6, generator=g)
    assert torch.equal(pert(x), norm(x))
    pert.batch_stats = True  # no train/eval distinction
    assert torch.equal(pert(x), norm(x))
    m, d, xb = torch.rand(5, generator=g), torch.rand(5, generator=g) - 0.5, torch.rand(5, generator=g) - 0.5
    _set(pert, m, d, xb)

    def ref(gamma, beta):
        mu = x.mean(dim=(2, 3), keepdim=True)
        var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)

    with torch.no_grad():
        torch.testing.assert_close(pert(x), ref(norm.weight * m, norm.bias), atol=1e-5, rtol=1e-5)
        pert.perturbed = True
        torch.testing.assert_close(pert(x), ref(norm.weight * (m + d), norm.bias * (1 + xb)), atol=1e-5, rtol=1e-5)
    pert(x).sum().backward()
    assert pert.neuron_mask.grad is not None and pert.neuron_noise.grad is not None


def test_perturbed_layernorm_identity_and_formula():
    g = torch.Generator().manual_seed(1)
    norm = torch.nn.LayerNorm((4, 3))
    with torch.no_grad():
        norm.weight.copy_(torch.rand(4, 3, generator=g) + 0.5)
        norm.bias.copy_(torch.rand(4, 3, generator=g) - 0.5)
    pert = PerturbedLayerNorm(norm).eval()
    assert pert.neuron_mask.shape == (12,)
    x = torch.randn(2, 5, 4, 3, generator=g)
    assert torch.equal(pert(x), norm(x))
    m, d, xb = torch.rand(12, generator=g), torch.rand(12, generator=g) - 0.5, torch.rand(12, generator=g) - 0.5
    _set(pert, m, d, xb)

    def ref(gamma, beta):
        mu = x.mean(dim=(2, 3), keepdim=True)
        var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * gamma + beta

    with torch.no_grad():
        torch.testing.assert_close(pert(x), ref(norm.weight * m.view(4, 3), norm.bias), atol=1e-5, rtol=1e-5)
        pert.perturbed = True
        torch.testing.assert_close(pert(x), ref(norm.weight * (m + d).view(4, 3), norm.bias * (1 + xb).view(4, 3)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_group", [True, False])
def test_perturbed_groupnorm_identity_and_formula(per_group):
    """Per group (opset 18): neuron g's coefficients act on channels 2g, 2g+1; per channel (opset 21)."""
    g = torch.Generator().manual_seed(3)
    norm = torch.nn.GroupNorm(3, 6)
    with torch.no_grad():
        norm.weight.copy_((torch.rand(3, generator=g) + 0.5).repeat_interleave(2) if per_group
                          else torch.rand(6, generator=g) + 0.5)
        norm.bias.copy_(torch.rand(6, generator=g) - 0.5)
    n = 3 if per_group else 6
    pert = PerturbedGroupNorm(norm, n).eval()
    assert pert.neuron_mask.shape == (n,) and pert.normalises
    x = torch.randn(2, 6, 5, 5, generator=g)
    assert torch.equal(pert(x), norm(x))
    pert.batch_stats = True  # no train/eval distinction
    assert torch.equal(pert(x), norm(x))
    m, d, xb = torch.rand(n, generator=g), torch.rand(n, generator=g) - 0.5, torch.rand(n, generator=g) - 0.5
    _set(pert, m, d, xb)

    def per_channel(v):
        return v.repeat_interleave(2) if per_group else v

    def ref(gamma, beta):
        xg = x.reshape(2, 3, -1)
        mu, var = xg.mean(dim=-1, keepdim=True), xg.var(dim=-1, unbiased=False, keepdim=True)
        xn = ((xg - mu) / torch.sqrt(var + norm.eps)).reshape(x.shape)
        return xn * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)

    with torch.no_grad():
        torch.testing.assert_close(pert(x), ref(norm.weight * per_channel(m), norm.bias), atol=1e-5, rtol=1e-5)
        pert.perturbed = True
        torch.testing.assert_close(pert(x), ref(norm.weight * per_channel(m + d), norm.bias * per_channel(1 + xb)),
                                   atol=1e-5, rtol=1e-5)
    pert(x).sum().backward()
    assert pert.neuron_mask.grad is not None and pert.neuron_noise.grad is not None
    with pytest.raises(ValueError):
        PerturbedGroupNorm(norm, 4)


def _masks_for(rep, pruned):
    return {layer.name: np.array([0.0 if i in pruned.get(layer.name, ()) else 1.0 for i in range(layer.size)],
                                 np.float32) for layer in rep.layers}


@pytest.mark.parametrize("build, chosen", [
    (instancenorm_model, {"inorm": [1, 4]}),
    (layernorm_model, {"lns": [3, 17], "lnc": [0, 5]}),
    (groupnorm18_model, {"gn": [1, 3]}),
    (groupnorm21_model, {"gn": [0, 5, 6]}),
])
def test_repairer_parity_optimize_export(tmp_path, build, chosen):
    path = build(tmp_path / "m.onnx")
    rep = Repairer.open(path)
    assert {layer.name for layer in rep.layers} >= set(chosen)
    images = random_images(32)
    assert rep.check_parity(images) < 1e-5
    result = rep.optimize(images, ANPConfig(iterations=3, batch_size=16, device="cpu"))
    assert set(result.masks) == {layer.name for layer in rep.layers}
    assert all(np.all((v >= 0) & (v <= 1)) for v in result.masks.values())

    plan = rep.plan(_masks_for(rep, chosen))
    assert plan.count == sum(len(v) for v in chosen.values())
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)
    original, written = onnx.load(path), onnx.load(out)
    scales = set()
    for layer in rep.layers:
        name = layer.param("scale")
        scales.add(name)
        s0, s1 = initializer(original, name), initializer(written, name)
        assert s1.shape == s0.shape and s1.dtype == s0.dtype
        idx = chosen.get(layer.name, [])
        flat0, flat1 = s0.reshape(-1), s1.reshape(-1)
        assert np.all(flat1[idx] == 0)
        keep = np.setdiff1d(np.arange(layer.size), idx)
        assert flat1[keep].tobytes() == flat0[keep].tobytes()
    for t in original.graph.initializer:  # biases and everything else unchanged
        if t.name not in scales:
            assert initializer(written, t.name).tobytes() == numpy_helper.to_array(t).tobytes()
    assert [n.input[:] for n in written.graph.node] == [n.input[:] for n in original.graph.node]

    got = torch_with_plan(rep, plan, images.x)
    np.testing.assert_allclose(got, ort_on(out, images.x), atol=1e-5, rtol=0)


def test_functional_onnx2torch_modules_wrapped():
    """onnx2torch's functional norms (scale and bias as forward arguments) get the same coefficients."""
    from anp_onnx._compat import onnx2torch

    onnx2torch()  # imports onnx2torch even without torchvision
    from onnx2torch.node_converters.instance_norm import OnnxInstanceNorm
    from onnx2torch.node_converters.layer_norm import OnnxLayerNorm

    from anp_onnx.neurons import NeuronLayer, get_kind

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 3, generator=g)
    scale, bias = torch.rand(4, generator=g) + 0.5, torch.rand(4, generator=g) - 0.5
    cases = [("instancenorm", OnnxInstanceNorm(0.1, 1e-5), x, scale, bias),
             ("layernorm", OnnxLayerNorm(-2, 1e-5), x, torch.rand(3, 3, generator=g) + 0.5, None)]
    for kind, inner, inp, s, b in cases:
        layer = NeuronLayer("n", kind, "", "n", "y", s.numel(), (("scale", "s"),))
        pert = get_kind(kind).wrap(inner, layer)
        assert torch.equal(pert(inp, s, b), inner(inp, s, b))
        mask = torch.ones(s.numel())
        mask[1] = 0.0
        pert.set_mask(mask)
        s0 = s.clone().reshape(-1)
        s0[1] = 0.0
        assert torch.equal(pert(inp, s, b), inner(inp, s0.view(s.shape), b))


@pytest.mark.parametrize("opset, pruned", [(18, [2]), (21, [1, 4, 7])])
def test_prune_groupnorm_count(tmp_path, opset, pruned):
    """anp_onnx.prune with a count: exactly the lowest-mask scale entries become 0 (a whole group's at
    opset 18), everything else is unchanged, and onnxruntime agrees with the pruned torch model."""
    path = groupnorm_model(tmp_path / "m.onnx", opset)
    size = 4 if opset < 21 else 8
    mask = np.linspace(0.5, 1.0, size).astype(np.float32)
    mask[pruned] = np.linspace(0.0, 0.1, len(pruned))
    out = tmp_path / "pruned.onnx"
    images = random_images(16)
    plan, export = prune(path, {"gn": mask}, out=out, pruning=PruneSpec.count(len(pruned)), verify_data=images)
    assert plan.to_dict()["neurons"] == {"gn": pruned}
    assert export.changed_initializers == ["gn.scale"]
    original, written = onnx.load(path), onnx.load(out)
    s0, s1 = initializer(original, "gn.scale"), initializer(written, "gn.scale")
    assert s1.shape == s0.shape == (size,) and s1.dtype == s0.dtype
    assert np.all(s1[pruned] == 0) and np.count_nonzero(s0[pruned]) == len(pruned)
    keep = np.setdiff1d(np.arange(size), pruned)
    assert s1[keep].tobytes() == s0[keep].tobytes()
    for t in original.graph.initializer:
        if t.name != "gn.scale":
            assert initializer(written, t.name).tobytes() == numpy_helper.to_array(t).tobytes()
    assert [(n.op_type, n.input[:], n.output[:]) for n in written.graph.node] == [
        (n.op_type, n.input[:], n.output[:]) for n in original.graph.node]

    got = torch_with_plan(Repairer.open(path), plan, images.x)
    np.testing.assert_allclose(got, ort_on(out, images.x), atol=1e-5, rtol=0)
    # the pruned neurons change the output: a pruned group/channel outputs its bias only
    assert not np.allclose(got, ort_on(path, images.x))


def test_functional_groupnorm_wrapped():
    """onnx2torch's run-time GroupNorm (scale and bias as arguments) gets per-group coefficients."""
    from anp_onnx.neurons import NeuronLayer, get_kind
    from anp_onnx.onnx2torch_ext import OnnxGroupNorm

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 3, 3, generator=g)
    scale, bias = torch.rand(3, generator=g) + 0.5, torch.rand(3, generator=g) - 0.5
    inner = OnnxGroupNorm(3, 1e-5, per_channel=False)
    ref = torch.nn.GroupNorm(3, 6)
    with torch.no_grad():
        ref.weight.copy_(scale.repeat_interleave(2))
        ref.bias.copy_(bias.repeat_interleave(2))
        torch.testing.assert_close(inner(x, scale, bias), ref(x))
    layer = NeuronLayer("n", "groupnorm", "GroupNormalization", "n", "y", 3, (("scale", "s"), ("bias", "b")))
    pert = get_kind("groupnorm").wrap(inner, layer)
    assert pert.normalises and torch.equal(pert(x, scale, bias), inner(x, scale, bias))
    pert.set_mask(torch.tensor([1.0, 0.0, 1.0]))
    s0 = scale.clone()
    s0[1] = 0.0
    assert torch.equal(pert(x, scale, bias), inner(x, s0, bias))
    with pytest.raises(TypeError):
        get_kind("groupnorm").wrap(torch.nn.ReLU(), layer)


def test_same_padded_conv_after_groupnorm_converts(tmp_path):
    """auto_pad needs the input's size; after a GroupNormalization onnx 1.17 leaves it unknown."""
    rng = np.random.default_rng(5)
    inits = [_t(rng, "c1.w", (8, 3, 3, 3)), _t(rng, "c1.b", (8,)),
             _t(rng, "gn.scale", (4,), 0.3, 1.0), _t(rng, "gn.bias", (4,), 0.3),
             _t(rng, "c2.w", (8, 8, 3, 3)), _t(rng, "c2.b", (8,))]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("GroupNormalization", ["c1", "gn.scale", "gn.bias"], ["gn"], name="gn",
                         num_groups=4, epsilon=1e-5),
        helper.make_node("Conv", ["gn", "c2.w", "c2.b"], ["c2"], name="c2", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r1"]),
    ]
    head, more = _head(rng, "r1", 8)
    path = _save(nodes + head, inits + more, tmp_path / "m.onnx", 18, 8)
    rep = Repairer.open(path)
    assert rep.check_parity(random_images(8)) < 1e-4
