"""Conv/linear output channels as neurons: discovery, the perturbed layers' arithmetic, write-back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from anp_onnx import ANPConfig, Repairer
from anp_onnx.errors import UnsupportedModelError
from anp_onnx.model import load_model
from anp_onnx.neurons import find_neurons
from anp_onnx.neurons.conv import PerturbedConv
from anp_onnx.neurons.linear import PerturbedLinear, PerturbedMatMul
from anp_onnx.prune import PruneSpec
from builders import (
    add_trigger, initializer, ort_on, random_images, synthetic_images, tiny_model, torch_with_plan, train_backdoored,
)


def _rng_tensor(rng, name, shape, scale=0.5):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _save(nodes, inits, path, in_shape, n_out, inputs=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])
    graph = helper.make_graph(nodes, "g", [x, *inputs], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mixed_model(path):
    """Conv (asymmetric pads) -> grouped ConvTranspose -> Gemm(transB=0) -> MatMul+Add -> Gemm(transB=1)
    -> classifier Gemm."""
    rng = np.random.default_rng(0)
    inits = [
        _rng_tensor(rng, "c1.w", (4, 3, 3, 3)), _rng_tensor(rng, "c1.b", (4,)),
        _rng_tensor(rng, "ct.w", (4, 3, 2, 2)), _rng_tensor(rng, "ct.b", (6,)),
        _rng_tensor(rng, "g0.w", (216, 7), 0.1), _rng_tensor(rng, "g0.b", (7,)),
        _rng_tensor(rng, "mm.w", (7, 5)), _rng_tensor(rng, "mm.b", (5,)),
        _rng_tensor(rng, "g1.w", (6, 5)), _rng_tensor(rng, "g1.b", (6,)),
        _rng_tensor(rng, "cls.w", (3, 6)), _rng_tensor(rng, "cls.b", (3,)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", pads=[0, 0, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "ct.w", "ct.b"], ["ct"], name="ct", group=2),
        helper.make_node("Relu", ["ct"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "g0.w", "g0.b"], ["g0"], name="g0"),
        helper.make_node("Relu", ["g0"], ["r3"]),
        helper.make_node("MatMul", ["r3", "mm.w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "mm.b"], ["mmb"]),
        helper.make_node("Relu", ["mmb"], ["r4"]),
        helper.make_node("Gemm", ["r4", "g1.w", "g1.b"], ["g1"], name="g1", transB=1),
        helper.make_node("Relu", ["g1"], ["r5"]),
        helper.make_node("Gemm", ["r5", "cls.w", "cls.b"], ["logits"], name="cls", transB=1),
    ]
    return _save(nodes, inits, path, (3, 6, 6), 3)


def _masks_for(rep, pruned):
    return {layer.name: np.array([0.0 if i in pruned.get(layer.name, ()) else 1.0 for i in range(layer.size)],
                                 np.float32) for layer in rep.layers}


# --- discovery ---------------------------------------------------------------------------------

def test_find_on_folded_model_excludes_classifier(tmp_path):
    found = find_neurons(onnx.load(tiny_model(tmp_path / "m.onnx", fold_bn=True)))
    got = [(layer.kind, layer.op_type, layer.size) for layer in found.layers]
    assert got == [("conv", "Conv", 8), ("conv", "Conv", 16)]
    assert found.kinds[0] == "batchnorm" and found.kinds[-1] == "conv"  # normalisation kinds first, then conv
    assert "no normalisation neurons: using conv/linear output channels" in found.notes
    assert any(n.startswith("classifier layer ") and "Gemm" in n and "excluded" in n for n in found.notes)
    assert all(set(dict(layer.params)) == {"weight", "bias"} for layer in found.layers)


def test_default_kinds_prefer_batchnorm(tmp_path):
    model = onnx.load(tiny_model(tmp_path / "m.onnx"))
    assert [layer.kind for layer in find_neurons(model).layers] == ["batchnorm", "batchnorm"]
    assert "conv" not in find_neurons(model).kinds
    convs = find_neurons(model, kinds=["conv"])
    assert [(layer.op_type, layer.size) for layer in convs.layers] == [("Conv", 8), ("Conv", 16)]
    both = find_neurons(model, kinds=["batchnorm", "conv"])
    assert [layer.kind for layer in both.layers] == ["conv", "batchnorm", "conv", "batchnorm"]


def test_find_mixed_ops(tmp_path):
    found = find_neurons(onnx.load(mixed_model(tmp_path / "m.onnx")))
    assert [(layer.name, layer.op_type, layer.size) for layer in found.layers] == [
        ("c1", "Conv", 4), ("ct", "ConvTranspose", 6), ("g0", "Gemm", 7), ("mm", "MatMul", 5), ("g1", "Gemm", 6)]
    # the Add's bias is not the MatMul's; it is where a renormalised pruned unit's clean mean goes
    assert dict(found.layers[3].params) == {"weight": "mm.w", "shift": "mm.b"}
    assert "classifier layer cls excluded (3 output units are the classes)" in found.notes


def test_unusable_nodes_skipped_with_notes():
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="dyn"),  # weight is a graph input
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "a.w"], ["t"], name="ta", transA=1),
        helper.make_node("Transpose", ["t"], ["tt"]),
        helper.make_node("Gemm", ["tt", "cls.w"], ["y"], name="cls", transB=1),
    ]
    inits = [_rng_tensor(rng, "a.w", (2, 4)), _rng_tensor(rng, "cls.w", (5, 4))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, w], [y], inits))
    found = find_neurons(model, kinds=["conv"])
    assert found.total == 0
    assert any(n.startswith("dyn:") and "non-constant weight" in n for n in found.notes)
    assert any(n.startswith("ta:") and "transA=1" in n for n in found.notes)
    assert any(n.startswith("classifier layer cls") for n in found.notes)


def test_classifier_only_model_has_no_neurons(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], name="fc", transB=1)]
    path = _save(nodes, [_rng_tensor(rng, "w", (4, 12)), _rng_tensor(rng, "b", (4,))],
                 tmp_path / "m.onnx", (3, 2, 2), 4)
    with pytest.raises(UnsupportedModelError) as err:
        Repairer.open(path)
    text = str(err.value)
    assert "no neurons to prune" in text and "conv: output channels" in text and "batchnorm:" in text
    assert "classifier layer fc excluded" in text


# --- the perturbed modules ---------------------------------------------------------------------

def _random_conv(cls, seed=0, **kw):
    torch.manual_seed(seed)
    conv = cls(**kw).eval()
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.uniform_(-1, 1)
    return conv


CONVS = [
    (torch.nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 9)),
    (torch.nn.Conv2d, dict(in_channels=3, out_channels=6, kernel_size=3, stride=2, padding=1), (2, 3, 9, 9)),
    (torch.nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, dilation=2, bias=False),
     (2, 4, 9, 9)),
    (torch.nn.Conv2d, dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1), (2, 4, 7, 7)),
    (torch.nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=2), (2, 2, 4, 4, 4)),
    (torch.nn.ConvTranspose2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1,
                                    output_padding=1, groups=2), (2, 4, 5, 5)),
    (torch.nn.ConvTranspose1d, dict(in_channels=3, out_channels=5, kernel_size=2), (2, 3, 6)),
]


@pytest.mark.parametrize("cls,kw,shape", CONVS)
def test_perturbed_conv_identity_and_mask(cls, kw, shape):
    conv = _random_conv(cls, **kw)
    pert = PerturbedConv(conv).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(pert(x), conv(x))  # exactly the original with mask 1, no noise
        pert.perturbed = True
        assert torch.equal(pert(x), conv(x))  # zero noise
        m = torch.rand(conv.out_channels)
        pert.neuron_mask.copy_(m)
        no_bias = (conv(x) - conv.bias[:, None].view(1, -1, *[1] * (x.dim() - 2))) if conv.bias is not None else conv(x)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        expect = no_bias * m.view(1, -1, *[1] * (x.dim() - 2)) + bias.view(1, -1, *[1] * (x.dim() - 2))
        torch.testing.assert_close(pert(x), expect, atol=1e-5, rtol=1e-5)


def test_perturbed_conv2d_formula():
    conv = _random_conv(torch.nn.Conv2d, in_channels=3, out_channels=5, kernel_size=3, padding=1)
    pert = PerturbedConv(conv).eval()
    m, d, xb = torch.rand(5), torch.rand(5) - 0.5, torch.rand(5) - 0.5
    with torch.no_grad():
        pert.neuron_mask.copy_(m)
        pert.neuron_noise.copy_(d)
        pert.neuron_noise_bias.copy_(xb)
        x = torch.randn(2, 3, 6, 6)
        pert.perturbed = True
        ref = F.conv2d(x, conv.weight * (m + d)[:, None, None, None], conv.bias * (1 + xb), padding=1)
        torch.testing.assert_close(pert(x), ref)
        pert.perturbed = False
        torch.testing.assert_close(pert(x), F.conv2d(x, conv.weight * m[:, None, None, None], conv.bias, padding=1))


def test_perturbed_linear_and_matmul():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).eval()
    pert = PerturbedLinear(lin)
    x = torch.randn(3, 6)
    m, d, xb = torch.rand(4), torch.rand(4) - 0.5, torch.rand(4) - 0.5
    with torch.no_grad():
        assert torch.equal(pert(x), lin(x))
        pert.neuron_mask.copy_(m)
        pert.neuron_noise.copy_(d)
        pert.neuron_noise_bias.copy_(xb)
        pert.perturbed = True
        torch.testing.assert_close(pert(x), F.linear(x, lin.weight * (m + d)[:, None], lin.bias * (1 + xb)))
        w = torch.randn(6, 4)
        mm = PerturbedMatMul(4)
        assert torch.equal(mm(x, w), torch.matmul(x, w))
        mm.neuron_mask.copy_(m)
        mm.neuron_noise.copy_(d)
        mm.perturbed = True
        torch.testing.assert_close(mm(x, w), x @ (w * (m + d)))


# --- Repairer on real models -------------------------------------------------------------------

def test_repairer_on_folded_model_export(tmp_path):
    path = tiny_model(tmp_path / "m.onnx", fold_bn=True)
    rep = Repairer.open(path)
    assert [layer.size for layer in rep.layers] == [8, 16]
    images = random_images(32)
    assert rep.check_parity(images) < 1e-5
    # the plain conv neurons (weights scaled, a pruned channel keeps its bias); renormalised ones: test_renormalise
    result = rep.optimize(images, ANPConfig(iterations=3, batch_size=16, device="cpu", renormalise=False))
    assert set(result.masks) == {layer.name for layer in rep.layers}
    assert all(np.all((v >= 0) & (v <= 1)) for v in result.masks.values())

    chosen = {rep.layers[0].name: [1, 5], rep.layers[1].name: [0, 3, 15]}
    plan = rep.plan(_masks_for(rep, chosen))
    assert plan.count == 5
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)
    original, written = onnx.load(path), onnx.load(out)
    for layer in rep.layers:
        w0, w1 = initializer(original, layer.param("weight")), initializer(written, layer.param("weight"))
        idx = chosen[layer.name]
        assert np.all(w1[idx] == 0)
        keep = np.setdiff1d(np.arange(layer.size), idx)
        assert w1[keep].tobytes() == w0[keep].tobytes()
        bias = layer.param("bias")
        assert initializer(written, bias).tobytes() == initializer(original, bias).tobytes()
    for t in original.graph.initializer:  # nothing else changed
        if t.name not in {layer.param("weight") for layer in rep.layers}:
            assert initializer(written, t.name).tobytes() == numpy_helper.to_array(t).tobytes()
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-4)


def test_mixed_ops_write_back_matches_torch(tmp_path):
    path = mixed_model(tmp_path / "m.onnx")
    rep = Repairer.open(path)
    images = random_images(16, size=6)
    assert rep.check_parity(images) < 1e-4
    mods = rep.modules
    assert type(mods["c1"]).__name__ == "PerturbedConv" and mods["c1"].pad is not None  # Sequential(pad, conv)
    assert type(mods["g0"]).__name__ == "PerturbedLinear" and type(mods["mm"]).__name__ == "PerturbedMatMul"

    # masks on the Gemm layers, transB=0 (g0) and transB=1 (g1), against the ONNX weights
    proto = rep.model.proto
    x = torch.randn(4, 216)
    m0 = torch.rand(7)
    with torch.no_grad():
        mods["g0"].neuron_mask.copy_(m0)
        b, c = torch.tensor(initializer(proto, "g0.w")), torch.tensor(initializer(proto, "g0.b"))
        torch.testing.assert_close(mods["g0"](x), x @ (b * m0[None, :]) + c)
        x1 = torch.randn(4, 5)
        m1 = torch.rand(6)
        mods["g1"].neuron_mask.copy_(m1)
        b, c = torch.tensor(initializer(proto, "g1.w")), torch.tensor(initializer(proto, "g1.b"))
        torch.testing.assert_close(mods["g1"](x1), x1 @ (b * m1[:, None]).T + c)
    rep.reset_masks()

    chosen = {"c1": [2], "ct": [1, 4], "g0": [0, 6], "mm": [3], "g1": [5]}
    plan = rep.plan(_masks_for(rep, chosen))
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)
    written = onnx.load(out)
    w = {name: initializer(written, f"{name}.w") for name in chosen}
    assert np.all(w["c1"][2] == 0) and np.count_nonzero(w["c1"] == 0) == w["c1"][2].size
    # grouped ConvTranspose (C_in, C_out/group, k, k), group 2: channel 1 -> rows 0-1, column 1;
    # channel 4 -> rows 2-3, column 1
    assert np.all(w["ct"][0:2, 1] == 0) and np.all(w["ct"][2:4, 1] == 0)
    assert np.count_nonzero(w["ct"] == 0) == 4 * 2 * 2
    assert np.all(w["g0"][:, [0, 6]] == 0) and np.count_nonzero(w["g0"] == 0) == 2 * 216
    assert np.all(w["mm"][:, 3] == 0) and np.count_nonzero(w["mm"] == 0) == 7
    assert np.all(w["g1"][5] == 0) and np.count_nonzero(w["g1"] == 0) == 5
    for name in ("c1", "ct", "g0", "mm", "g1", "cls"):  # biases (the MatMul's Add too) kept
        assert initializer(written, f"{name}.b").tobytes() == initializer(rep.model.proto, f"{name}.b").tobytes()
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-4)


def test_shared_weight_initializer_is_copied(tmp_path):
    rng = np.random.default_rng(1)
    inits = [_rng_tensor(rng, "w", (2, 2, 3, 3)), _rng_tensor(rng, "ba", (2,)), _rng_tensor(rng, "bb", (2,)),
             _rng_tensor(rng, "cls.w", (3, 2)), _rng_tensor(rng, "cls.b", (3,))]
    nodes = [
        helper.make_node("Conv", ["x", "w", "ba"], ["a"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "w", "bb"], ["b"], name="b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("GlobalAveragePool", ["rb"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "cls.w", "cls.b"], ["logits"], name="cls", transB=1),
    ]
    path = _save(nodes, inits, tmp_path / "m.onnx", (2, 5, 5), 3)
    rep = Repairer.open(path)
    assert [layer.name for layer in rep.layers] == ["a", "b"]
    images = random_images(8, size=5, channels=2)
    rep.check_parity(images)
    plan = rep.plan(_masks_for(rep, {"a": [0]}))
    out = tmp_path / "pruned.onnx"
    result = rep.export(plan, out, verify_images=images)
    written = onnx.load(out)
    node_a, node_b = written.graph.node[0], written.graph.node[2]
    assert node_b.input[1] == "w" and node_a.input[1] != "w"
    assert initializer(written, "w").tobytes() == initializer(rep.model.proto, "w").tobytes()
    copy = initializer(written, node_a.input[1])
    assert np.all(copy[0] == 0) and copy[1].tobytes() == initializer(rep.model.proto, "w")[1].tobytes()
    assert result.changed_initializers == [node_a.input[1]]
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-4)


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("config", [ANPConfig(iterations=300, batch_size=64, seed=0, device="cpu"),
                                    ANPConfig.reference(iterations=300, batch_size=64, seed=0, device="cpu")],
                         ids=["default", "reference-loop"])
def test_folded_backdoor_pruning_curve(tmp_path, config):
    """BN folded into the convs: renormalised conv neurons remove the backdoor within 25% pruning.

    With the plain conv neurons (``renormalise=False``: weights scaled, no batch statistics) this
    failed: many masks fell to exactly 0 within a few iterations and the backdoor stayed.
    """
    model = train_backdoored(tmp_path / "b.onnx", fold_bn=True)
    rep = Repairer.open(model)
    assert all(layer.kind == "conv" for layer in rep.layers)
    clean = synthetic_images(300, seed=3)
    rep.check_parity(clean)
    result = rep.optimize(clean, config)
    assert set(result.centres) == {layer.name for layer in rep.layers}
    test = synthetic_images(1000, seed=2)
    triggered = add_trigger(test)
    before = rep.evaluate(test, poisoned=triggered, target=0)
    assert before.asr > 0.95 and before.accuracy > 0.9
    total = sum(layer.size for layer in rep.layers)
    curve = []
    for k in (2, 4, 6, 8, 12, 16, total // 4):
        plan = rep.plan(result.masks, PruneSpec.count(k))
        out = tmp_path / f"p{k}.onnx"
        rep.export(plan, out)
        after = rep.evaluate(test, poisoned=triggered, target=0, model=load_model(out))
        curve.append((k, after.accuracy, after.asr))
    print("\nk, acc, asr (before: acc %.3f asr %.3f)" % (before.accuracy, before.asr))
    for k, acc, asr in curve:
        print(f"{k:3d} ({k / total:5.1%})  acc {acc:.3f}  asr {asr:.3f}")
    assert any(asr < 0.2 and acc > before.accuracy - 0.05 for _, acc, asr in curve)


def test_default_search_adds_convs_with_folded_normalisation(tmp_path):
    """Some BatchNorm kept, some folded (what the torch exporter does to a pre-activation ResNet):
    a conv read only by an activation stands for its folded BatchNorm; a conv into a residual Add does not."""
    rng = np.random.default_rng(4)
    inits = [_rng_tensor(rng, "c1.w", (4, 3, 3, 3)), _rng_tensor(rng, "c1.b", (4,)),
             _rng_tensor(rng, "c2.w", (4, 4, 3, 3)), _rng_tensor(rng, "c2.b", (4,)),
             _rng_tensor(rng, "bn.s", (4,)), _rng_tensor(rng, "bn.b", (4,)), _rng_tensor(rng, "bn.m", (4,)),
             numpy_helper.from_array(np.ones(4, np.float32), "bn.v"),
             _rng_tensor(rng, "cls.w", (3, 4)), _rng_tensor(rng, "cls.b", (3,))]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"]),
        helper.make_node("BatchNormalization", ["res", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "cls.w", "cls.b"], ["logits"], name="cls", transB=1),
    ]
    path = _save(nodes, inits, tmp_path / "m.onnx", (3, 6, 6), 3)
    found = find_neurons(onnx.load(path))
    assert [(layer.name, layer.kind) for layer in found.layers] == [("c1", "conv"), ("bn", "batchnorm")]
    assert any("normalisation folded into them" in note for note in found.notes)
    assert [layer.name for layer in find_neurons(onnx.load(path), kinds=["batchnorm"]).layers] == ["bn"]
    rep = Repairer.open(path)
    images = random_images(32, size=6, classes=3)
    result = rep.optimize(images, ANPConfig(iterations=3, batch_size=16, target=None))
    assert set(result.centres) == {"c1"}  # the BatchNorm normalises by itself
    plan = rep.plan(_masks_for(rep, {"c1": [1], "bn": [2]}))
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-4)
