"""BatchNorm neurons: discovery, the perturbed layer's arithmetic, and the registry."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from anp_onnx.neurons import FALLBACK_KINDS, NeuronLayer, all_kinds, find_neurons, kind_for_op, register_kind
from anp_onnx.neurons import registry
from anp_onnx.neurons.base import FALLBACK
from anp_onnx.neurons.batchnorm import BatchNormKind, PerturbedBatchNorm
from builders import tiny_model


def _bn(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(n).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(n, generator=g) - 0.5)
        bn.running_mean.copy_(torch.rand(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return bn


def test_find_batchnorm_layers(tmp_path):
    found = find_neurons(onnx.load(tiny_model(tmp_path / "m.onnx")))
    assert [(layer.kind, layer.size) for layer in found.layers] == [("batchnorm", 8), ("batchnorm", 16)]
    assert found.total == 24 and found.by_kind() == {"batchnorm": (2, 24)}
    first = found.layers[0]
    assert first.param("scale") == "features.1.weight" and first.param("bias") == "features.1.bias"


def test_layer_filters(tmp_path):
    model = onnx.load(tiny_model(tmp_path / "m.onnx"))
    names = [layer.name for layer in find_neurons(model).layers]
    only = find_neurons(model, include=[names[1]])
    assert [layer.name for layer in only.layers] == [names[1]] and only.excluded == (names[0],)
    assert [layer.name for layer in find_neurons(model, exclude=["*features.1*", "/features/1/*"]).layers] == [names[1]]


def test_folded_model_has_no_bn_neurons(tmp_path):
    assert find_neurons(onnx.load(tiny_model(tmp_path / "m.onnx", fold_bn=True)), kinds=["batchnorm"]).total == 0


def test_non_constant_bn_skipped_with_note():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 4, 4])
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [2], [0.0, 0.0]) for n in ("b", "m")]
    inits.append(helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 1.0]))
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")
    model = helper.make_model(helper.make_graph([node], "g", [x, s], [y], inits))
    found = find_neurons(model)
    assert found.total == 0 and "non-constant" in found.notes[0]


def test_perturbed_bn_identity_when_mask_one_noise_zero():
    bn = _bn()
    pert = PerturbedBatchNorm(bn).eval()
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(pert(x), bn(x))
    pert.batch_stats = True  # the reference's train mode: batch statistics, running stats untouched
    torch.testing.assert_close(pert(x), F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    torch.testing.assert_close(pert.running_mean, bn.running_mean)


def test_perturbed_bn_formula():
    bn = _bn()
    pert = PerturbedBatchNorm(bn).eval()
    m = torch.rand(6)
    d = torch.rand(6) - 0.5
    xb = torch.rand(6) - 0.5
    with torch.no_grad():
        pert.neuron_mask.copy_(m)
        pert.neuron_noise.copy_(d)
        pert.neuron_noise_bias.copy_(xb)
    x = torch.randn(3, 6, 4, 4)

    def ref(gamma, beta):
        return F.batch_norm(x, bn.running_mean, bn.running_var, gamma, beta, False, 0.0, bn.eps)

    pert.perturbed = True
    torch.testing.assert_close(pert(x), ref(bn.weight * (m + d), bn.bias * (1 + xb)))
    pert.perturbed = False
    torch.testing.assert_close(pert(x), ref(bn.weight * m, bn.bias))


def test_reset_noise_range_and_clip():
    pert = PerturbedBatchNorm(_bn(1000))
    pert.reset_noise(0.4, torch.Generator().manual_seed(0))
    for p in (pert.neuron_noise, pert.neuron_noise_bias):
        assert p.abs().max() <= 0.4 and p.abs().max() > 0.35 and p.min() < 0 < p.max()
    pert.reset_noise(0.0)
    assert pert.neuron_noise.abs().max() == 0
    with torch.no_grad():
        pert.neuron_mask.copy_(torch.linspace(-1, 2, 1000))
    pert.clip_mask()
    assert pert.neuron_mask.min() == 0 and pert.neuron_mask.max() == 1


def test_registering_twice_fails():
    assert "batchnorm" in all_kinds()
    with pytest.raises(ValueError, match="already registered"):
        register_kind(BatchNormKind)


def test_duplicate_node_names_get_unique_layer_names(tmp_path):
    model = onnx.load(tiny_model(tmp_path / "m.onnx"))
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.name = "bn"
    names = [layer.name for layer in find_neurons(model).layers]
    assert names == ["bn", "bn#1"]
    assert np.unique(names).size == 2


def test_kinds_keyed_by_op():
    assert kind_for_op("BatchNormalization").name == "batchnorm" and kind_for_op("Mul").name == "affine"
    assert {kind_for_op(op).name for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")} == {"conv"}
    assert kind_for_op("GroupNormalization").name == "groupnorm"
    with pytest.raises(KeyError, match="no neuron kind handles"):
        kind_for_op("Relu")


def test_registering_a_taken_op_or_no_op_fails():
    class OtherBatchNorm(BatchNormKind):
        name = "other-batchnorm"

    with pytest.raises(ValueError, match="'BatchNormalization'.*'batchnorm'"):
        register_kind(OtherBatchNorm)

    class NoOps(BatchNormKind):
        name = "no-ops"
        ops = ()

    with pytest.raises(ValueError, match="declares no ONNX ops"):
        register_kind(NoOps)
    assert "other-batchnorm" not in all_kinds() and "no-ops" not in all_kinds()
    assert kind_for_op("BatchNormalization").name == "batchnorm"


def test_search_order_is_by_priority():
    """Normalisation kinds (in order of registration) before the conv/linear fallback."""
    assert list(all_kinds()) == ["batchnorm", "instancenorm", "layernorm", "groupnorm", "affine", "conv"]
    assert FALLBACK_KINDS == ("conv",) and all_kinds()["conv"].priority >= FALLBACK
    assert [name for name, kind in all_kinds().items() if kind.fallback] == ["conv"]


def test_a_new_kind_is_found_by_its_op(tmp_path, monkeypatch):
    """A kind registered for another op takes part in the default search, before the fallback."""
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))
    monkeypatch.setattr(registry, "_BY_OP", dict(registry._BY_OP))

    @register_kind
    class ReluKind(BatchNormKind):
        name = "relu-test"
        ops = ("Relu",)

        def find(self, model, index):
            return [NeuronLayer(node.name or node.output[0], self.name, node.op_type, node.name, node.output[0], 1, ())
                    for node in model.graph.node if node.op_type in self.ops], ["relu note"]

    model = onnx.load(tiny_model(tmp_path / "m.onnx", fold_bn=True))
    found = find_neurons(model)
    assert kind_for_op("Relu").name == "relu-test" and found.kinds[-1] == "relu-test"
    relus = sum(node.op_type == "Relu" for node in model.graph.node)
    assert found.by_kind()["relu-test"] == (relus, relus) and "relu note" in found.notes
    assert "no normalisation neurons: using conv/linear output channels" not in found.notes  # not a fallback
