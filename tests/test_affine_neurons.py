"""Per-channel Mul (+ Add) neurons: discovery, the perturbed module's arithmetic, write-back."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from anp_onnx import ANPConfig, Repairer
from anp_onnx.neurons import find_neurons
from anp_onnx.neurons.affine import PerturbedAffine
from builders import initializer, ort_on, random_images, tiny_model, torch_with_plan

C = 6


def _t(rng, name, shape, scale=0.5, offset=0.0):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale + offset).astype(np.float32), name)


def _save(nodes, inits, path, in_shape, n_out=4):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _head(rng, src):
    return ([helper.make_node("Relu", [src], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)],
            [_t(rng, "fc.w", (4, C)), _t(rng, "fc.b", (4,))])


def nchw_model(path, const_shape=(C, 1, 1), seed=0):
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "b"], ["a"], name="add")]
    head, more = _head(rng, "a")
    inits = [_t(rng, "c.w", (C, 3, 3, 3)), _t(rng, "c.b", (C,)), _t(rng, "s", const_shape, 0.3, 1.0),
             _t(rng, "b", const_shape, 0.3)] + more
    return _save(nodes + head, inits, path, (3, 8, 8))


def nhwc_model(path, seed=1):
    """tf2onnx style: NHWC input, Transpose around the Conv, Mul/Add by (C,) constants (const first in Add)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "c.w", "c.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["s", "ct"], ["m"], name="mul"),
             helper.make_node("Add", ["b", "m"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["p"], axes=[1, 2], keepdims=0),
             helper.make_node("Gemm", ["p", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    inits = [_t(rng, "c.w", (C, 3, 3, 3)), _t(rng, "c.b", (C,)), _t(rng, "s", (C,), 0.3, 1.0),
             _t(rng, "b", (C,), 0.3), _t(rng, "fc.w", (4, C)), _t(rng, "fc.b", (4,))]
    return _save(nodes, inits, path, (8, 8, 3))


def _check_prune_two(tmp_path, path, images):
    rep = Repairer.open(path)
    assert [(layer.kind, layer.op_type, layer.size) for layer in rep.layers] == [("affine", "Mul+Add", C)]
    layer = rep.layers[0]
    assert dict(layer.params) == {"scale": "s", "bias": "b"}
    assert rep.check_parity(images) < 1e-5
    pruned = [1, 4]
    masks = {layer.name: np.array([0.0 if i in pruned else 1.0 for i in range(C)], np.float32)}
    plan = rep.plan(masks)
    assert plan.count == 2
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)
    original, written = onnx.load(path), onnx.load(out)
    s0, s1 = initializer(original, "s"), initializer(written, "s")
    assert s1.shape == s0.shape
    flat0, flat1 = s0.reshape(-1), s1.reshape(-1)
    assert np.all(flat1[pruned] == 0)
    keep = np.setdiff1d(np.arange(C), pruned)
    assert flat1[keep].tobytes() == flat0[keep].tobytes()
    for t in original.graph.initializer:  # bias and everything else bitwise equal
        if t.name != "s":
            assert initializer(written, t.name).tobytes() == numpy_helper.to_array(t).tobytes()
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-5)
    return rep


def test_nchw_mul_add(tmp_path):
    path = nchw_model(tmp_path / "m.onnx")
    found = find_neurons(onnx.load(path))
    assert [(layer.name, layer.size) for layer in found.layers] == [("mul", C)]
    assert found.kinds[:1] == ("batchnorm",) and "affine" in found.kinds and "conv" not in found.kinds
    _check_prune_two(tmp_path, path, random_images(16, size=8))


def test_mul_add_normalises_the_mul_input(tmp_path):
    """What the conv kind's find_beside reads: a Mul+Add normalises the Add's and the Mul's inputs."""
    from anp_onnx.graph import GraphIndex
    from anp_onnx.neurons import get_kind

    model = onnx.load(nchw_model(tmp_path / "m.onnx"))
    layer = find_neurons(model).layers[0]
    assert get_kind("affine").normalised_inputs(layer, GraphIndex(model)) == {"c", "s", "m", "b"}
    assert get_kind("conv").find_beside(model, GraphIndex(model), [layer])[0] == []  # the conv feeds the Mul


def test_nchw_4d_constant(tmp_path):
    path = nchw_model(tmp_path / "m.onnx", const_shape=(1, C, 1, 1))
    _check_prune_two(tmp_path, path, random_images(16, size=8))


def test_nhwc_tf2onnx_style(tmp_path):
    path = nhwc_model(tmp_path / "m.onnx")
    rep = _check_prune_two(tmp_path, path, random_images(16, size=8))
    assert rep.model.input.layout == "NHWC"


def test_perturbed_affine_formula():
    torch.manual_seed(0)
    m, d, xb = torch.rand(C), torch.rand(C) - 0.5, torch.rand(C) - 0.5
    x = torch.randn(3, C, 5, 5)
    s, b = torch.randn(C, 1, 1), torch.randn(C, 1, 1)
    mul, add = PerturbedAffine(C, with_bias=False), PerturbedAffine(C, with_bias=True)
    with torch.no_grad():
        y = x * s
        assert torch.equal(mul(x, s), torch.mul(x, s)) and torch.equal(mul(s, x), torch.mul(s, x))
        assert torch.equal(add(y, b), y + b) and torch.equal(add(b, y), b + y)
        for mod in (mul, add):
            mod.neuron_mask.copy_(m)
            mod.neuron_noise.copy_(d)
            mod.neuron_noise_bias.copy_(xb)
        v = lambda t: t.view(C, 1, 1)  # noqa: E731
        # a Mul+Add layer installs the Add module only; it reads y = x * s from the original Mul
        torch.testing.assert_close(add(y, b), x * s * v(m) + b)  # no noise: bias untouched
        torch.testing.assert_close(mul(x, s), x * s * v(m))
        mul.perturbed = add.perturbed = True
        torch.testing.assert_close(add(y, b), x * s * v(m + d) + b * v(1 + xb))
        torch.testing.assert_close(add(b, y), x * s * v(m + d) + b * v(1 + xb))
        torch.testing.assert_close(mul(s, x), x * s * v(m + d))
        # NHWC: (C,) constants on the last axis
        xn, sn, bn = torch.randn(2, 4, 4, C), torch.randn(C), torch.randn(C)
        mul.perturbed = add.perturbed = False
        torch.testing.assert_close(add(bn, xn * sn), xn * sn * m + bn)
        torch.testing.assert_close(mul(sn, xn), xn * sn * m)


def test_scalar_and_non_constant_mul_are_not_neurons(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "k"], ["m"], name="scalar"),
             helper.make_node("Sigmoid", ["m"], ["g"]),
             helper.make_node("Mul", ["m", "g"], ["a"], name="gate")]
    head, more = _head(rng, "a")
    inits = [_t(rng, "c.w", (C, 3, 3, 3)), _t(rng, "c.b", (C,)),
             numpy_helper.from_array(np.array([0.5], np.float32), "k")] + more
    path = _save(nodes + head, inits, tmp_path / "m.onnx", (3, 8, 8))
    model = onnx.load(path)
    assert find_neurons(model, kinds=["affine"]).total == 0
    assert [layer.kind for layer in find_neurons(model).layers] == ["conv"]  # fallback still used


def test_input_normalisation_mul_skipped(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["x", "std"], ["xn"], name="norm"),
             helper.make_node("Conv", ["xn", "c.w", "c.b"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    head, more = _head(rng, "c")
    inits = [_t(rng, "std", (3, 1, 1)), _t(rng, "c.w", (C, 3, 3, 3)), _t(rng, "c.b", (C,))] + more
    found = find_neurons(onnx.load(_save(nodes + head, inits, tmp_path / "m.onnx", (3, 8, 8))), kinds=["affine"])
    assert found.total == 0 and any(n.startswith("norm:") and "input normalisation" in n for n in found.notes)


def test_batchnorm_and_affine_together(tmp_path):
    """BN nodes and per-channel Mul/Add are both normalisation neurons: the default search uses both."""
    model = onnx.load(tiny_model(tmp_path / "t.onnx"))
    graph = model.graph
    rng = np.random.default_rng(3)
    idx = next(i for i, n in enumerate(graph.node) if n.op_type == "BatchNormalization")
    bn_out = graph.node[idx].output[0]
    consumers = [n for n in graph.node if bn_out in n.input]
    mul = helper.make_node("Mul", [bn_out, "as"], ["am"], name="extra_mul")
    add = helper.make_node("Add", ["am", "ab"], ["aa"], name="extra_add")
    for n in consumers:
        n.input[list(n.input).index(bn_out)] = "aa"
    graph.node.insert(idx + 1, add)
    graph.node.insert(idx + 1, mul)
    graph.initializer.extend([_t(rng, "as", (8, 1, 1), 0.2, 1.0), _t(rng, "ab", (8, 1, 1), 0.2)])
    path = tmp_path / "m.onnx"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    found = find_neurons(onnx.load(path))
    assert sorted(found.by_kind().items()) == [("affine", (1, 8)), ("batchnorm", (2, 24))]
    rep = Repairer.open(path)
    images = random_images(32)
    assert rep.check_parity(images) < 1e-4


def test_optimize_runs(tmp_path):
    rep = Repairer.open(nchw_model(tmp_path / "m.onnx"))
    images = random_images(32, size=8, classes=4)
    result = rep.optimize(images, ANPConfig(iterations=3, batch_size=16, device="cpu"))
    assert {k: v.shape for k, v in result.masks.items()} == {"mul": (C,)}
    assert all(np.all((v >= 0) & (v <= 1)) for v in result.masks.values())
