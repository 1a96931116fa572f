"""RNP's mask stage (anp_onnx.rnp): settings, the weights left as they were, the masks, the pipeline.

Real parts: small models exported to ONNX here (BatchNorm kept and folded), a model trained with a
planted backdoor, repaired through :func:`anp_onnx.repair` and checked in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import anp_onnx
from anp_onnx.data import save_npz
from anp_onnx.rnp import RNPConfig, rnp_masks
from anp_onnx.unlearn import trainable_initializers
from builders import add_trigger, synthetic_images, tiny_model, train_backdoored

QUICK = RNPConfig(unlearn_epochs=3, recover_epochs=3, batch_size=32)


@pytest.mark.parametrize("bad", [dict(unlearn_lr=-1.0), dict(mask_lr=float("nan")), dict(batch_size=1),
                                 dict(recover_epochs=0), dict(momentum=1.0), dict(clean_threshold=2.0),
                                 dict(device="tpu")])
def test_bad_settings_are_refused_in_one_line(bad):
    with pytest.raises(anp_onnx.SettingsError, match="invalid RNP settings") as info:
        RNPConfig(**bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fold", [False, True])
def test_the_weights_are_as_before_and_every_neuron_gets_a_mask_in_0_1(tmp_path, fold):
    rep = anp_onnx.Repairer.open(tiny_model(tmp_path / "m.onnx", fold_bn=fold))
    clean = synthetic_images(96, seed=1)
    before = {t.name: t.value().copy() for t in trainable_initializers(rep.ctx)}
    x = clean.x[:16]
    logits_before = rep.ctx.net(torch.from_numpy(x)).detach().numpy()
    result = rep.optimize(clean, QUICK)
    assert result.stage == "rnp" and result.target is None
    for t in trainable_initializers(rep.ctx):
        np.testing.assert_array_equal(t.value(), before[t.name])
    assert set(result.masks) == {layer.name for layer in rep.layers}
    for name, values in result.masks.items():
        assert values.shape == (next(layer.size for layer in rep.layers if layer.name == name),)
        assert np.all((values >= 0) & (values <= 1))
        assert np.all((result.mean_masks[name] >= 0) & (result.mean_masks[name] <= 1))
    assert 1 <= len(result.history["unlearn_acc"]) <= QUICK.unlearn_epochs
    assert len(result.history["recover_acc"]) == QUICK.recover_epochs
    # the model itself is unchanged once the masks are set back to 1
    for m in rep.ctx.modules.values():
        m.neuron_mask.data.fill_(1.0)
    np.testing.assert_allclose(rep.ctx.net(torch.from_numpy(x)).detach().numpy(), logits_before, atol=1e-5)


def test_the_same_seed_gives_the_same_masks(tmp_path):
    path = tiny_model(tmp_path / "m.onnx")
    clean = synthetic_images(96, seed=1)
    a = anp_onnx.Repairer.open(path).optimize(clean, QUICK).masks
    b = anp_onnx.Repairer.open(path).optimize(clean, QUICK).masks
    c = anp_onnx.Repairer.open(path).optimize(clean, RNPConfig(unlearn_epochs=3, recover_epochs=3, batch_size=32,
                                                               seed=1)).masks
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[name], c[name]) for name in a)


def test_unlearning_stops_at_the_clean_threshold(tmp_path):
    rep = anp_onnx.Repairer.open(train_backdoored(tmp_path / "b.onnx", target=0))
    result = rnp_masks(rep.ctx, synthetic_images(200, seed=3), RNPConfig(unlearn_epochs=20, recover_epochs=1,
                                                                          batch_size=50))
    accs = result.history["unlearn_acc"]
    assert accs[-1] <= 0.2 < min(accs[:-1], default=1.0)  # stopped right after the first epoch at or under it
    assert len(accs) < 20


def test_a_repair_with_rnp_masks_prunes_and_writes_a_verified_file(tmp_path):
    model = train_backdoored(tmp_path / "backdoored.onnx", target=0)
    clean, test = synthetic_images(300, seed=3), synthetic_images(400, seed=2)
    save_npz(clean, tmp_path / "clean.npz")
    save_npz(test, tmp_path / "test.npz")
    save_npz(add_trigger(test), tmp_path / "triggered.npz")
    result = anp_onnx.repair(model, tmp_path / "clean.npz", out=tmp_path / "repaired.onnx",
                             config=RNPConfig(recover_epochs=5, batch_size=64), pruning=anp_onnx.PruneSpec.count(4),
                             refinements=(), test_data=tmp_path / "test.npz", poisoned_data=tmp_path / "triggered.npz")
    assert result.plan.count == 4 and "rnp" in result.stages
    assert result.optimisation.stage == "rnp"
    original, repaired = onnx.load(model), onnx.load(result.output)
    assert [n.op_type for n in original.graph.node] == [n.op_type for n in repaired.graph.node]
    assert result.export.max_abs_diff < 1e-3
    assert result.after.accuracy is not None and result.after.asr is not None
