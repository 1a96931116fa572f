"""Renormalised neurons: layers that do not normalise, perturbed as BatchNorm channels after the layer.

Covers the arithmetic (identity on clean data, the BatchNorm formulas), the calibration statistics,
writing a pruned neuron's clean mean back into the original initializers (bias written, bias added, a
MatMul's Add, a Mul+Add) checked in onnxruntime, the masks file round trip and the switch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from anp_onnx import ANPConfig, Repairer, prune
from anp_onnx.calibrate import calibrate
from anp_onnx.collapse import probe_supported
from anp_onnx.neurons.conv import PerturbedConv
from anp_onnx.masks_io import load_masks
from anp_onnx.prune import PruneSpec
from builders import initializer, ort_on, random_images, tiny_model, torch_with_plan
from test_affine_neurons import nhwc_model
from test_conv_neurons import _masks_for, _rng_tensor, _save, mixed_model


def _conv_module(seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    return conv, PerturbedConv(conv)


def test_calibration_statistics_and_identity():
    conv, m = _conv_module()
    x = torch.randn(40, 3, 6, 6)
    m.start_calibration()
    with torch.no_grad():
        for part in x.split(16):
            assert torch.equal(m(part), conv(part))  # recording changes nothing
    m.finish_calibration()
    with torch.no_grad():
        z = conv(x)
    assert m.renormalised and m.centreable
    np.testing.assert_allclose(m.centre.numpy(), z.mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    # one spread for the layer: the mean of its neurons' standard deviations (see finish_calibration)
    np.testing.assert_allclose(m.spread.numpy(), np.full(5, z.std((0, 2, 3), unbiased=False).mean().item()),
                               rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(m(x), z, atol=1e-5, rtol=1e-5)  # mask 1, eval: the layer unchanged


def test_renormalised_formulas():
    conv, m = _conv_module(1)
    centre, spread = np.linspace(-1, 1, 5).astype(np.float32), np.linspace(0.5, 2, 5).astype(np.float32)
    m.set_centres(centre, spread)
    x = torch.randn(8, 3, 6, 6)
    mask, d, b = torch.rand(5), torch.rand(5) * 0.4 - 0.2, torch.rand(5) * 0.4 - 0.2
    view = (1, -1, 1, 1)
    c, s = torch.tensor(centre).view(view), torch.tensor(spread).view(view)
    with torch.no_grad():
        z = conv(x)
        m.neuron_mask.copy_(mask)
        m.neuron_noise.copy_(d)
        m.neuron_noise_bias.copy_(b)
        # eval statistics, no noise: a pruned neuron (m = 0) outputs its centre
        torch.testing.assert_close(m(x), mask.view(view) * (z - c) + c)
        m.perturbed = True
        torch.testing.assert_close(m(x), (mask + d).view(view) * (z - c) + (1 + b).view(view) * c)
        m.batch_stats = True  # BatchNorm in train mode with gamma = spread and beta = centre
        var, mean = torch.var_mean(z, dim=(0, 2, 3), keepdim=True, unbiased=False)
        expected = (mask + d).view(view) * s * (z - mean) / torch.sqrt(var + 1e-5) + (1 + b).view(view) * c
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)
    m.set_centres(None, None)
    assert not m.renormalised


def test_mixed_ops_renormalised_write_back_matches_onnxruntime(tmp_path):
    path = mixed_model(tmp_path / "m.onnx")
    rep = Repairer.open(path)
    images = random_images(48, size=6)
    assert calibrate(rep.net, rep.modules.values(), images) == 5  # Conv, ConvTranspose, 2 Gemm, MatMul+Add
    assert probe_supported(rep.modules.values())
    assert rep.check_parity(images) < 1e-4  # renormalised with mask 1: the model is unchanged
    centres = {name: c for name, (c, _) in rep.centres.items()}
    chosen = {"c1": [2], "ct": [1, 4], "g0": [0, 6], "mm": [3], "g1": [5]}
    plan = rep.plan(_masks_for(rep, chosen))
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)  # verified against the pruned torch model
    original, written = onnx.load(path), onnx.load(out)
    for name, idx in chosen.items():
        b0, b1 = initializer(original, f"{name}.b"), initializer(written, f"{name}.b")
        keep = np.setdiff1d(np.arange(b0.size), idx)
        assert b1[keep].tobytes() == b0[keep].tobytes()
        if name == "mm":  # the Dense bias lives in the Add: it gains the MatMul output's clean mean
            np.testing.assert_allclose(b1[idx], b0[idx] + centres[name][idx], rtol=1e-6)
        else:
            np.testing.assert_allclose(b1[idx], centres[name][idx], rtol=1e-6)
    assert np.all(initializer(written, "mm.w")[:, 3] == 0)
    assert [n.name for n in written.graph.node] == [n.name for n in original.graph.node]
    x = random_images(16, size=6, seed=5).x
    np.testing.assert_allclose(torch_with_plan(rep, plan, x), ort_on(out, x), atol=1e-4)


def test_conv_without_bias_gets_one(tmp_path):
    rng = np.random.default_rng(2)
    inits = [_rng_tensor(rng, "w", (4, 3, 3, 3)), _rng_tensor(rng, "cls.w", (3, 4)), _rng_tensor(rng, "cls.b", (3,))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "cls.w", "cls.b"], ["logits"], name="cls", transB=1),
    ]
    path = _save(nodes, inits, tmp_path / "m.onnx", (3, 6, 6), 3)
    rep = Repairer.open(path)
    images = random_images(32, size=6)
    calibrate(rep.net, rep.modules.values(), images)
    plan = rep.plan(_masks_for(rep, {"conv": [0, 2]}))
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)
    written = onnx.load(out)
    conv = next(n for n in written.graph.node if n.name == "conv")
    assert len(conv.input) == 3
    bias = initializer(written, conv.input[2])
    np.testing.assert_allclose(bias[[0, 2]], rep.centres["conv"][0][[0, 2]], rtol=1e-6)
    assert np.all(bias[[1, 3]] == 0)
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-4)


def test_mul_add_renormalised_write_back(tmp_path):
    path = nhwc_model(tmp_path / "m.onnx")
    rep = Repairer.open(path)
    images = random_images(32, size=8)
    assert calibrate(rep.net, rep.modules.values(), images) == 1
    plan = rep.plan(_masks_for(rep, {rep.layers[0].name: [1, 4]}))
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)
    written = onnx.load(out)
    assert np.all(initializer(written, "s")[[1, 4]] == 0)
    np.testing.assert_allclose(initializer(written, "b")[[1, 4]], rep.centres[rep.layers[0].name][0][[1, 4]],
                               rtol=1e-6)
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-4)


def test_lone_mul_is_not_renormalised(tmp_path):
    rng = np.random.default_rng(3)
    inits = [_rng_tensor(rng, "c.w", (4, 3, 3, 3)), _rng_tensor(rng, "c.b", (4,)),
             _rng_tensor(rng, "s", (4, 1, 1)), _rng_tensor(rng, "cls.w", (3, 4)), _rng_tensor(rng, "cls.b", (3,))]
    nodes = [
        helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "cls.w", "cls.b"], ["logits"], name="cls", transB=1),
    ]
    rep = Repairer.open(_save(nodes, inits, tmp_path / "m.onnx", (3, 6, 6), 3))
    assert [layer.op_type for layer in rep.layers] == ["Mul"]
    assert calibrate(rep.net, rep.modules.values(), random_images(16, size=6)) == 0
    assert not probe_supported(rep.modules.values())


def test_masks_file_carries_centres_to_prune(tmp_path):
    path = tiny_model(tmp_path / "m.onnx", fold_bn=True)
    rep = Repairer.open(path)
    images = random_images(48)
    result = rep.optimize(images, ANPConfig(iterations=3, batch_size=16, target=None))
    assert set(result.centres) == {layer.name for layer in rep.layers}
    masks_path = tmp_path / "m.masks.json"
    rep.save_masks(result.masks, masks_path)
    masks, facts = load_masks(masks_path)
    for name, (centre, spread) in result.centres.items():
        np.testing.assert_array_equal(facts["centres"][name][0], centre)
        np.testing.assert_array_equal(facts["centres"][name][1], spread)
    plan = rep.plan(masks, PruneSpec.count(4))
    direct = tmp_path / "direct.onnx"
    rep.export(plan, direct, verify_images=images)
    from_file = tmp_path / "from_file.onnx"
    prune(path, masks_path, out=from_file, pruning=PruneSpec.count(4), verify_data=images)
    a, b = onnx.load(direct), onnx.load(from_file)
    for t in a.graph.initializer:
        assert initializer(b, t.name).tobytes() == initializer(a, t.name).tobytes()
    # a masks file without centres (e.g. the reference's mask_values.txt) prunes the plain way
    prune(path, masks_path.with_name("m.mask_values.txt"), out=tmp_path / "plain.onnx", pruning=PruneSpec.count(4),
          verify_data=images)
    plain = onnx.load(tmp_path / "plain.onnx")
    original = onnx.load(path)
    for layer in rep.layers:
        bias = layer.param("bias")
        assert initializer(plain, bias).tobytes() == initializer(original, bias).tobytes()


def test_renormalise_off_keeps_the_plain_conv_neurons(tmp_path):
    path = tiny_model(tmp_path / "m.onnx", fold_bn=True)
    rep = Repairer.open(path)
    result = rep.optimize(random_images(32), ANPConfig(iterations=2, batch_size=16, renormalise=False))
    assert result.centres == {} and rep.centres == {} and result.probe is None and result.target is None


def test_saved_centres_must_fit(tmp_path):
    from anp_onnx.errors import DataError

    rep = Repairer.open(tiny_model(tmp_path / "m.onnx", fold_bn=True))
    name = rep.layers[0].name
    with pytest.raises(DataError, match="does not have"):
        rep.set_centres({"nope": (np.zeros(1), np.ones(1))})
    with pytest.raises(DataError, match="saved centres of"):
        rep.set_centres({name: (np.zeros(3), np.ones(3))})
    bn = Repairer.open(tiny_model(tmp_path / "bn.onnx"))
    with pytest.raises(DataError, match="cannot be renormalised"):
        bn.set_centres({bn.layers[0].name: (np.zeros(bn.layers[0].size), np.ones(bn.layers[0].size))})
