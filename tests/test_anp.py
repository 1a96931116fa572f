"""The ANP optimisation loop: settings, determinism, what it may change, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anp_onnx import ANPConfig, CancelToken, Repairer
from anp_onnx.errors import Cancelled, SettingsError
from builders import random_images, tiny_model

FAST = dict(iterations=8, batch_size=16)


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    return Repairer.open(tiny_model(tmp_path_factory.mktemp("m") / "m.onnx"))


def test_defaults_are_the_reference():
    c = ANPConfig()
    assert (c.eps, c.steps, c.alpha, c.mask_lr, c.momentum, c.batch_size, c.bn_mode) == (
        0.4, 1, 0.2, 0.2, 0.9, 128, "train")
    assert c.augment and not c.project_noise and c.device == "auto"
    # iterations: the reference's 2000 on a GPU, fewer on a CPU; an explicit value always wins
    resolved = c.resolve()
    assert resolved.iterations == (2000 if resolved.device == "cuda" else 300)
    assert ANPConfig(iterations=2000, device="cpu").resolve().iterations == 2000


@pytest.mark.parametrize("bad", [dict(eps=-1), dict(steps=0), dict(alpha=1.5), dict(iterations=0),
                                 dict(batch_size=1), dict(bn_mode="x"), dict(device="tpu")])
def test_invalid_settings(bad):
    with pytest.raises(SettingsError):
        ANPConfig(**bad)


def test_same_seed_same_masks_other_seed_other_masks(rep):
    data = random_images(48)
    a = rep.optimize(data, ANPConfig(seed=1, **FAST)).masks
    b = rep.optimize(data, ANPConfig(seed=1, **FAST)).masks
    c = rep.optimize(data, ANPConfig(seed=2, **FAST)).masks
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[n], c[n]) for n in a)


def test_masks_in_unit_interval_and_only_masks_change(rep):
    before = {k: v.clone() for k, v in rep.net.state_dict().items() if "neuron_" not in k}
    result = rep.optimize(random_images(48), ANPConfig(mask_lr=5.0, **FAST))
    values = np.concatenate(list(result.masks.values()))
    assert values.min() >= 0 and values.max() <= 1 and values.min() < 1
    after = rep.net.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    # masks are reset in the torch model afterwards; the result keeps them
    assert all(float(m.neuron_mask.detach().min()) == 1.0 for m in rep.modules.values())
    assert len(result.history["loss_nat"]) == FAST["iterations"]


def _differs(a, b) -> bool:
    return any(not np.array_equal(a[n], b[n]) for n in a)


def test_eps_zero_and_eval_mode_and_projection_run(rep):
    data = random_images(32)
    base = dict(FAST, target=None, mask_lr=2.0)
    default = rep.optimize(data, ANPConfig(**base)).masks
    for change in (dict(eps=0.0), dict(bn_mode="eval"), dict(augment=False)):
        result = rep.optimize(data, ANPConfig(**base, **change))
        assert set(result.masks) == {layer.name for layer in rep.layers}
        values = np.concatenate(list(result.masks.values()))
        assert values.min() >= 0 and values.max() <= 1
        assert _differs(result.masks, default), f"{change} changed nothing"
    # no perturbation at all with eps 0: the robust loss is never computed
    assert rep.optimize(data, ANPConfig(**base, eps=0.0)).history["loss_rob"] == [0.0] * FAST["iterations"]
    # projection keeps two noise steps within the budget, which changes the masks
    two = rep.optimize(data, ANPConfig(**base, steps=2)).masks
    projected = rep.optimize(data, ANPConfig(**base, steps=2, project_noise=True)).masks
    assert _differs(projected, two)


def test_progress_events_and_cancel(rep):
    events = []
    rep.optimize(random_images(32), ANPConfig(iterations=25, batch_size=16), progress=events.append)
    # the collapse probe's four batches (BatchNorm neurons: nothing to calibrate), then the ANP loop
    assert [(e.stage, e.step, e.total) for e in events] == [
        ("probe", 1, 4), ("probe", 2, 4), ("probe", 3, 4), ("probe", 4, 4),
        ("optimise", 1, 25), ("optimise", 10, 25), ("optimise", 20, 25), ("optimise", 25, 25)]
    assert events[0].message == "neuron noise 0.2" and "errors" in events[3].metrics
    assert set(events[-1].metrics) == {"loss_nat", "loss_rob", "acc_nat"}
    assert set(events[-1].payload["masks"]) == {layer.name for layer in rep.layers}
    # untargeted (the reference loop): no probe, only the loop
    events.clear()
    rep.optimize(random_images(32), ANPConfig(iterations=25, batch_size=16, target=None), progress=events.append)
    assert [(e.stage, e.step) for e in events] == [("optimise", 1), ("optimise", 10), ("optimise", 20),
                                                   ("optimise", 25)]

    token = CancelToken()
    seen = []

    def cancel_at_10(event):
        seen.append(event.step)
        if event.step >= 10:
            token.cancel()

    with pytest.raises(Cancelled):
        rep.optimize(random_images(32), ANPConfig(iterations=1000, batch_size=16), progress=cancel_at_10, cancel=token)
    assert max(seen) == 10


def test_calibration_and_probe_report_progress_and_stop_when_cancelled(tmp_path):
    """Renormalised conv neurons: calibrate (one event per batch of 256), probe, loop; a cancel in the
    calibration or the probe stops there and leaves the neurons as they were."""
    folded = Repairer.open(tiny_model(tmp_path / "folded.onnx", fold_bn=True))
    data = random_images(300)
    events = []
    folded.optimize(data, ANPConfig(iterations=1, batch_size=16), progress=events.append)
    assert [(e.stage, e.step, e.total) for e in events] == [
        ("calibrate", 1, 2), ("calibrate", 2, 2), ("probe", 1, 4), ("probe", 2, 4), ("probe", 3, 4), ("probe", 4, 4),
        ("optimise", 1, 1)]
    assert events[0].message == "256 of 300 clean images" and events[1].message == "300 of 300 clean images"

    for stage in ("calibrate", "probe"):
        folded.set_centres({})
        token = CancelToken()
        seen = []

        def cancel_in(event, stage=stage):
            seen.append(event.stage)
            if event.stage == stage:
                token.cancel()

        with pytest.raises(Cancelled):
            folded.optimize(data, ANPConfig(iterations=1000, batch_size=16), progress=cancel_in, cancel=token)
        assert seen[-1] == stage and "optimise" not in seen and seen.count(stage) == 1
        modules = list(folded.modules.values())
        assert not any(m.perturbed or m.batch_stats for m in modules)
        assert all(float(m.neuron_noise.detach().abs().max()) == 0 for m in modules)
        if stage == "calibrate":  # a cancelled calibration sets no centres
            assert folded.centres == {}


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from anp_onnx.anp import resolve_device

    assert resolve_device("auto") == "cpu"
    with pytest.raises(SettingsError, match="no CUDA"):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_cpu(rep):
    data = random_images(48)
    cpu = rep.optimize(data, ANPConfig(device="cpu", augment=False, **FAST)).masks
    gpu = rep.optimize(data, ANPConfig(device="cuda", augment=False, **FAST))
    assert gpu.device == "cuda"
    for name in cpu:
        np.testing.assert_allclose(gpu.masks[name], cpu[name], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_cpu_with_renormalised_neurons(tmp_path):
    folded = Repairer.open(tiny_model(tmp_path / "folded.onnx", fold_bn=True))
    data = random_images(48)
    config = dict(augment=False, target=None, **FAST)
    cpu = folded.optimize(data, ANPConfig(device="cpu", **config))
    gpu = folded.optimize(data, ANPConfig(device="cuda", **config))
    assert set(gpu.centres) == set(cpu.centres) and gpu.centres
    for name in cpu.masks:
        np.testing.assert_allclose(gpu.centres[name][0], cpu.centres[name][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gpu.masks[name], cpu.masks[name], atol=1e-3)
