"""InstanceNormalization and LayerNormalization neurons: discovery, arithmetic, folding, ANP."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from anp_onnx import ANPConfig, Repairer
from anp_onnx.convert import ort_logits, to_model_input, torch_logits
from anp_onnx.data import Preprocessing
from anp_onnx.model import load_model
from anp_onnx.neurons import FALLBACK_KINDS, all_kinds, find_neurons
from anp_onnx.neurons.norms import PerturbedInstanceNorm, PerturbedLayerNorm
from builders import initializer, random_images


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


def test_kinds_registered_and_not_fallback():
    kinds = all_kinds()
    assert {"instancenorm", "layernorm"} <= set(kinds)
    assert "instancenorm" not in FALLBACK_KINDS and "layernorm" not in FALLBACK_KINDS


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


def _masks_for(rep, pruned):
    return {layer.name: np.array([0.0 if i in pruned.get(layer.name, ()) else 1.0 for i in range(layer.size)],
                                 np.float32) for layer in rep.layers}


@pytest.mark.parametrize("build, chosen", [
    (instancenorm_model, {"inorm": [1, 4]}),
    (layernorm_model, {"lns": [3, 17], "lnc": [0, 5]}),
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

    loaded = load_model(out)
    ref = ort_logits(loaded, to_model_input(loaded, images.x, Preprocessing()))
    rep.apply_plan(plan)
    try:
        rep.net.eval()
        got = torch_logits(rep.net, images.x)
    finally:
        rep.reset_masks()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


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
