"""The "unlearn" refinement: trigger reconstruction for the suspected target, then unlearning.

Real parts: models trained here with a planted backdoor, exported to ONNX (BatchNorm kept and
folded), repaired through :func:`anp_onnx.repair`, measured in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import anp_onnx
from anp_onnx.data import save_npz
from anp_onnx.unlearn import reconstruct_trigger, trainable_initializers
from builders import add_trigger, synthetic_images, tiny_model, train_backdoored


@pytest.mark.parametrize("fold", [False, True])
def test_every_weight_initializer_is_matched_to_its_torch_tensor(tmp_path, fold):
    path = tiny_model(tmp_path / "m.onnx", fold_bn=fold)
    rep = anp_onnx.Repairer.open(path)
    found = {t.name: t for t in trainable_initializers(rep.ctx)}
    graph = rep.model.proto.graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    expected = set()
    for node in graph.node:
        positions = {"Conv": (1, 2), "Gemm": (1, 2), "BatchNormalization": (1, 2)}.get(node.op_type, ())
        expected |= {node.input[p] for p in positions if p < len(node.input) and node.input[p] in inits}
    assert set(found) == expected
    for name, t in found.items():  # the torch tensor holds exactly the initializer's values
        np.testing.assert_array_equal(t.value(), inits[name])
    assert len({id(t.tensor) for t in found.values()}) == len(found)


def test_a_reconstructed_trigger_sends_clean_images_to_the_target(tmp_path):
    path = train_backdoored(tmp_path / "b.onnx", target=3)
    rep = anp_onnx.Repairer.open(path)
    clean = synthetic_images(300, seed=3)
    trigger = reconstruct_trigger(rep.ctx.net, clean, 3, steps=150)
    assert trigger.success >= 0.9
    assert trigger.area < 0.25 * 16 * 16  # a patch, not a new image
    assert tuple(trigger.mask.shape) == (1, 1, 16, 16) and float(trigger.mask.min()) >= 0


@pytest.mark.slow
@pytest.mark.parametrize("fold", [False, True])
def test_unlearning_removes_a_planted_backdoor_and_writes_verified_weights(tmp_path, fold):
    model = train_backdoored(tmp_path / "backdoored.onnx", target=0, fold_bn=fold)
    clean, test = synthetic_images(300, seed=3), synthetic_images(1000, seed=2)
    save_npz(clean, tmp_path / "clean.npz")
    save_npz(test, tmp_path / "test.npz")
    save_npz(add_trigger(test), tmp_path / "triggered.npz")
    result = anp_onnx.repair(
        model, tmp_path / "clean.npz", out=tmp_path / "repaired.onnx",
        config=anp_onnx.ANPConfig(iterations=30, batch_size=64, seed=0, target=0),
        pruning=anp_onnx.PruneSpec.count(0), refinements=("unlearn",),
        test_data=tmp_path / "test.npz", poisoned_data=tmp_path / "triggered.npz")
    before, after = result.before, result.after
    assert before.asr > 0.95 and after.asr < 0.2
    assert after.accuracy > before.accuracy - 0.05
    assert "unlearn" in result.stages and result.plan.count == 0
    # the same graph, only initializers changed, and onnxruntime agrees with the refined torch model
    original, repaired = onnx.load(model), onnx.load(result.output)
    assert [n.op_type for n in original.graph.node] == [n.op_type for n in repaired.graph.node]
    assert [n.name for n in original.graph.node] == [n.name for n in repaired.graph.node]
    changed = [a.name for a, b in zip(original.graph.initializer, repaired.graph.initializer)
               if not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))]
    assert changed and set(changed) <= set(result.export.changed_initializers)
    assert result.export.max_abs_diff < 1e-3


def test_an_unknown_refinement_fails_before_any_work(tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    with pytest.raises(anp_onnx.SettingsError, match="unknown refinement"):
        anp_onnx.repair(model, synthetic_images(40, seed=0), out=tmp_path / "r.onnx", refinements=("nope",))
    assert not (tmp_path / "r.onnx").exists()


def _refine(path, data, holdout, target, rep=None):
    from anp_onnx.finish import refine

    rep = rep or anp_onnx.Repairer.open(path)
    plan = rep.plan({layer.name: np.ones(layer.size, np.float32) for layer in rep.ctx.layers},
                    anp_onnx.PruneSpec.count(0))
    values, (result,) = refine(rep.ctx, plan, data, ["unlearn"], target=target, holdout=holdout)
    return values, result


def test_rounds_beyond_the_accuracy_guard_are_reverted(tmp_path, monkeypatch):
    import anp_onnx.unlearn as unlearn_module

    monkeypatch.setattr(unlearn_module.TriggerUnlearning, "settings",
                        unlearn_module.UnlearnSettings(rounds=2, epochs=1, steps=20, scan_steps=5, retries=1))
    monkeypatch.setattr(unlearn_module, "MAX_DROP_POINTS", -101.0)  # no round can stay within it
    path = train_backdoored(tmp_path / "b.onnx", target=0)
    values, result = _refine(path, synthetic_images(120, seed=3), synthetic_images(40, seed=4), target=0)
    assert values == {} and result.metrics["rounds"] == 0


def test_nothing_suspected_means_nothing_changes(tmp_path, monkeypatch):
    import anp_onnx.unlearn as unlearn_module

    monkeypatch.setattr(unlearn_module.TriggerUnlearning, "settings",
                        unlearn_module.UnlearnSettings(rounds=1, epochs=1, steps=20, scan_steps=5))
    monkeypatch.setattr(unlearn_module, "ANOMALY_MIN", 1e9)
    path = train_backdoored(tmp_path / "b.onnx", target=0)
    values, result = _refine(path, synthetic_images(120, seed=3), synthetic_images(40, seed=4), target=None)
    assert values == {} and result.metrics["skipped"] == 1.0 and "scan_anomaly" in result.metrics


def test_the_net_keeps_its_gradient_flags_so_anp_can_run_again(tmp_path):
    from anp_onnx.unlearn import unlearn

    rep = anp_onnx.Repairer.open(tiny_model(tmp_path / "m.onnx"))
    data = synthetic_images(64, seed=1)
    flags = [p.requires_grad for p in rep.ctx.net.parameters()]
    trigger = reconstruct_trigger(rep.ctx.net, data, 2, steps=5)
    unlearn(rep.ctx.net, trainable_initializers(rep.ctx), data, [trigger], epochs=1)
    assert [p.requires_grad for p in rep.ctx.net.parameters()] == flags
    result = rep.optimize(data, anp_onnx.ANPConfig(iterations=3, batch_size=16, target=None))
    assert result.iterations == 3


def test_precision_is_resolved_per_device_and_autocast_lowers_only_inside():
    import torch

    from anp_onnx.precision import autocast, native_bf16, resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16x", "cpu")
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with autocast("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert layer(x).dtype == torch.float32
    assert layer(x).dtype == torch.float32
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    with autocast("bf16", "cpu"):  # weights updated inside one region: the next forward must see them
        first = layer(x)
        first.float().sum().backward()
        opt.step()
        assert not torch.equal(layer(x), first)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_unlearning_trains_in_its_precision_and_scans_and_guards_in_float32(tmp_path, monkeypatch, precision):
    import torch

    import anp_onnx.unlearn as unlearn_module

    monkeypatch.setattr(unlearn_module.TriggerUnlearning, "settings",
                        unlearn_module.UnlearnSettings(rounds=1, epochs=1, steps=10, scan_steps=3,
                                                       precision=precision))
    seen = {"train": [], "guard": [], "scan": []}
    train, guard, scan = unlearn_module.unlearn, unlearn_module._accuracy, unlearn_module.scan_targets

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen[name].append(torch.is_autocast_enabled("cpu"))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(unlearn_module, "unlearn", spy("train", train))
    monkeypatch.setattr(unlearn_module, "_accuracy", spy("guard", guard))
    monkeypatch.setattr(unlearn_module, "scan_targets", spy("scan", scan))
    path = train_backdoored(tmp_path / "b.onnx", target=0)
    values, result = _refine(path, synthetic_images(120, seed=3), synthetic_images(40, seed=4), target=0)
    assert seen["train"] == [precision == "bf16"] * len(seen["train"]) and seen["train"]
    assert seen["guard"] and not any(seen["guard"]) and seen["scan"] == [False]  # what decides: float32
    assert result.metrics["bf16"] == float(precision == "bf16")
    if values:  # what is written back is float32, whatever the training ran in
        assert all(v.dtype == np.float32 for v in values.values())


def test_the_bf16_variant_is_the_same_unlearning_with_its_rounds_in_bfloat16_where_native():
    from dataclasses import replace

    from anp_onnx.stages import get_refinement
    from anp_onnx.unlearn import TriggerUnlearning

    fast, plain = get_refinement("unlearn-bf16"), get_refinement("unlearn")
    assert isinstance(fast, TriggerUnlearning) and plain.settings.precision == "fp32"
    assert fast.settings == replace(plain.settings, precision="auto")


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_unlearning_computes_channels_last_only_inside_and_writes_plain_arrays(tmp_path, monkeypatch,
                                                                                   channels_last):
    import torch

    import anp_onnx.unlearn as unlearn_module

    monkeypatch.setattr(unlearn_module.TriggerUnlearning, "settings",
                        unlearn_module.UnlearnSettings(rounds=1, epochs=1, steps=10, scan_steps=3,
                                                       channels_last=channels_last))
    seen = []
    train = unlearn_module.unlearn

    def spy(net, trainable, *args, **kwargs):
        seen.append((net.channels_last, all(t.tensor.is_contiguous(memory_format=torch.channels_last)
                                            for t in trainable if t.tensor.dim() == 4)))
        return train(net, trainable, *args, **kwargs)

    monkeypatch.setattr(unlearn_module, "unlearn", spy)
    path = train_backdoored(tmp_path / "b.onnx", target=0)
    rep = anp_onnx.Repairer.open(path)
    values, _ = _refine(path, synthetic_images(120, seed=3), synthetic_images(40, seed=4), target=0, rep=rep)
    # the trainable tensors were taken after the switch: the ones the net computes with
    assert seen and all(s == (channels_last, channels_last) for s in seen)
    assert not rep.ctx.net.channels_last  # ANP and the curve after it compute as before
    assert all(p.is_contiguous() for p in rep.ctx.net.parameters())
    assert all(v.flags["C_CONTIGUOUS"] and v.dtype == np.float32 for v in values.values())


def test_the_context_switches_channels_last_for_a_block_only_where_safe(tmp_path):
    from anp_onnx.context import open_context
    from anp_onnx.model import load_model
    from anp_onnx.preprocessing import Preprocessing
    from test_norm_neurons import groupnorm18_model

    ctx = open_context(load_model(tiny_model(tmp_path / "m.onnx")), Preprocessing())
    with ctx.on_device("cpu", channels_last=True) as net:
        assert net.channels_last
    assert not ctx.net.channels_last
    gn = open_context(load_model(groupnorm18_model(tmp_path / "gn.onnx")), Preprocessing())
    with gn.on_device("cpu", channels_last=True) as net:  # its backward crashed on channels-last tensors
        assert not net.channels_last


@pytest.mark.parametrize("which", ["holdout", "all", "either"])
def test_the_guard_watches_the_held_out_images_or_every_clean_image(tmp_path, monkeypatch, which):
    import anp_onnx.unlearn as unlearn_module

    monkeypatch.setattr(unlearn_module.TriggerUnlearning, "settings",
                        unlearn_module.UnlearnSettings(rounds=1, epochs=1, steps=10, scan_steps=3, guard_images=which))
    sizes = []
    guard = unlearn_module._accuracy

    def spy(net, images, device):
        sizes.append(len(images))
        return guard(net, images, device)

    monkeypatch.setattr(unlearn_module, "_accuracy", spy)
    path = train_backdoored(tmp_path / "b.onnx", target=0)
    clean, holdout = synthetic_images(120, seed=3), synthetic_images(40, seed=4)
    _refine(path, clean, holdout, target=0)
    assert sizes and set(sizes) == {"holdout": {40}, "all": {160}, "either": {40, 160}}[which]


def test_an_unknown_guard_image_choice_is_a_settings_error():
    from anp_onnx.unlearn import _guard_images

    images = synthetic_images(10, seed=0)
    assert _guard_images("all", images, None)[0] is images
    with pytest.raises(anp_onnx.SettingsError, match="guard_images"):
        _guard_images("test", images, images)


@pytest.mark.parametrize("augment", [True, False])
def test_the_unlearning_sees_the_clean_images_themselves_without_augmentation(tmp_path, augment):
    import torch

    from anp_onnx.unlearn import unlearn

    rep = anp_onnx.Repairer.open(tiny_model(tmp_path / "m.onnx"))
    data = synthetic_images(48, seed=1)
    trigger = reconstruct_trigger(rep.ctx.net, data, 2, steps=5)
    seen = []

    def teacher(x):  # the teacher gets each batch before it is stamped
        seen.append(x.clone())
        return rep.ctx.net(x)

    unlearn(rep.ctx.net, trainable_initializers(rep.ctx), data, [trigger], teacher=teacher, epochs=1,
            batch_size=16, augment=augment)
    batches = torch.cat(seen).flatten(1)
    originals = torch.from_numpy(data.x).flatten(1)
    exact = (batches[:, None, :] == originals[None]).all(2).any(1).float().mean()
    assert len(batches) == len(data) and (exact == 1.0 if not augment else exact < 0.9)


def _scan_areas(net, images, workers):
    from anp_onnx.trigger import scan_targets
    seen = []
    scan = scan_targets(net, images, [0, 1, 2, 3], steps=12, workers=workers, progress=seen.append)
    return scan.areas, scan.success, seen


def test_the_scan_side_by_side_gives_exactly_the_patches_of_one_thread_in_turn(tmp_path):
    import torch
    rep = anp_onnx.Repairer.open(train_backdoored(tmp_path / "b.onnx", target=3))
    clean, net = synthetic_images(120, seed=3), rep.ctx.net.eval()
    flags = [p.requires_grad for p in net.parameters()]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _scan_areas(net, clean, workers=1)
        torch.set_num_threads(2)
        side = _scan_areas(net, clean, workers=3)
        assert torch.get_num_threads() == 2  # given back after the workers' one-thread run
    finally:
        torch.set_num_threads(threads)
    assert one[:2] == side[:2]  # bit for bit: each worker computes as one thread does
    assert [e.step for e in side[2]] == [1, 2, 3, 4] and sorted(e.metrics["scan_class"] for e in side[2]) == [0, 1, 2, 3]
    assert [p.requires_grad for p in net.parameters()] == flags


def test_a_failing_or_cancelled_side_by_side_job_stops_the_others(tmp_path, monkeypatch):
    from anp_onnx import trigger as trigger_module
    from anp_onnx.progress import CancelToken
    rep = anp_onnx.Repairer.open(tiny_model(tmp_path / "m.onnx"))
    clean, net = synthetic_images(60, seed=3), rep.ctx.net.eval()
    token = CancelToken()
    token.cancel()
    with pytest.raises(anp_onnx.Cancelled):
        trigger_module.scan_targets(net, clean, [0, 1, 2], steps=5, workers=2, cancel=token)
    real = trigger_module.reconstruct_trigger

    def failing(net, images, target, **kw):
        if target == 1:
            raise RuntimeError("out of memory in class 1")
        return real(net, images, target, **kw)

    monkeypatch.setattr(trigger_module, "reconstruct_trigger", failing)
    with pytest.raises(RuntimeError, match="class 1"):
        trigger_module.scan_targets(net, clean, [0, 1, 2, 3], steps=5, workers=2)


@pytest.mark.parametrize("reuse", [False, True])
def test_round_one_unlearns_the_scans_patch_only_when_asked(tmp_path, monkeypatch, reuse):
    import anp_onnx.unlearn as unlearn_module

    monkeypatch.setattr(unlearn_module.TriggerUnlearning, "settings",
                        unlearn_module.UnlearnSettings(rounds=2, epochs=1, steps=10, scan_steps=3, reuse_scan=reuse))
    monkeypatch.setattr(unlearn_module, "MAX_DROP_POINTS", 101.0)  # every round kept
    scans, rebuilt, unlearnt = [], [], []
    scan, each, train = unlearn_module.scan_targets, unlearn_module.reconstruct_each, unlearn_module.unlearn

    def spy_scan(*args, **kwargs):
        scans.append(scan(*args, **kwargs))
        return scans[-1]

    def spy_each(net, images, classes, **kwargs):
        rebuilt.append(list(classes))
        return each(net, images, classes, **kwargs)

    def spy_train(net, trainable, images, triggers, **kwargs):
        unlearnt.append(list(triggers))
        return train(net, trainable, images, triggers, **kwargs)

    monkeypatch.setattr(unlearn_module, "scan_targets", spy_scan)
    monkeypatch.setattr(unlearn_module, "reconstruct_each", spy_each)
    monkeypatch.setattr(unlearn_module, "unlearn", spy_train)
    path = train_backdoored(tmp_path / "b.onnx", target=0)
    _, result = _refine(path, synthetic_images(120, seed=3), synthetic_images(40, seed=4), target=0)
    assert result.metrics["rounds"] == 2
    targets = [int(v) for k, v in sorted(result.metrics.items()) if k.startswith("target_")]
    first = unlearnt[0]
    assert [t.target for t in first] == targets
    assert all(a is b for a, b in zip(first, (scans[0].triggers[t] for t in targets))) == reuse
    assert rebuilt == ([targets] if reuse else [targets, targets])  # round 2 always reconstructs


@pytest.mark.parametrize("which", ["holdout", "all", "either"])
def test_with_either_guard_a_round_passes_when_one_of_its_image_sets_stays_within(tmp_path, monkeypatch, which):
    import anp_onnx.unlearn as unlearn_module

    monkeypatch.setattr(unlearn_module.TriggerUnlearning, "settings",
                        unlearn_module.UnlearnSettings(rounds=1, epochs=1, steps=5, scan_steps=3, retries=0,
                                                       guard_images=which))
    calls = {40: 0, 160: 0}

    def scripted(net, images, device):  # held-out 40 images fall 10 points, all 160 only 1
        calls[len(images)] += 1
        return 90.0 if calls[len(images)] == 1 else {40: 80.0, 160: 89.0}[len(images)]

    monkeypatch.setattr(unlearn_module, "_accuracy", scripted)
    path = train_backdoored(tmp_path / "b.onnx", target=0)
    values, result = _refine(path, synthetic_images(120, seed=3), synthetic_images(40, seed=4), target=0)
    assert result.metrics["rounds"] == (0 if which == "holdout" else 1)
    assert bool(values) == (which != "holdout")


def test_a_sam_step_puts_the_weights_back_and_follows_the_gradient_at_the_moved_weights():
    import torch

    from anp_onnx.unlearn import _sam_step

    w = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    target = torch.tensor([1.0, 1.0, 1.0])

    def loss():
        return ((w - target) ** 2 * torch.tensor([1.0, 3.0, 2.0])).sum()

    loss().backward()
    g = w.grad.clone()
    _sam_step([w], 0.5, loss)
    np.testing.assert_array_equal(w.detach().numpy(), [2.0, -1.0, 0.5])  # back where they were
    moved = w.detach() + 0.5 * w.detach().abs() * (w.detach().abs() * g) / float((w.detach().abs() * g).norm())
    expected = 2 * (moved - target) * torch.tensor([1.0, 3.0, 2.0])  # the gradient there, not at w
    np.testing.assert_allclose(w.grad.numpy(), expected.numpy(), rtol=1e-6)
    assert not torch.allclose(w.grad, g)
