"""The speed benchmark's own pieces (benchmarks/native.py, loops.py, speed_parts.py), on tiny inputs.

No timing is asserted: these check that the reference loop behaves as the reference code does
(masks learnt in [0, 1], other weights left trainable unless frozen), that the floor loop only
computes, and that native modules rebuilt from ONNX initializers match onnxruntime.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import native
from benchmarks.loops import LoopSettings, crop_flip, floor_loop, reference_loop
from benchmarks.speed_parts import StageTimer


class TinyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


SETTINGS = LoopSettings(batch_size=16, padding=2)


@pytest.fixture()
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(40, 3, 12, 12, generator=gen), torch.randint(0, 3, (40,), generator=gen)


def tiny() -> nn.Module:
    return native.seeded(TinyBN, 1)


def test_install_noisy_bn_keeps_the_function() -> None:
    model = tiny()
    x = torch.rand(5, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
        layers = native.install_noisy_bn(model)
        after = model(x)
    assert sorted(layers) == ["bn1", "bn2"]
    torch.testing.assert_close(before, after)


def test_reference_loop_learns_masks_and_leaves_weights_trainable(data) -> None:
    model = tiny()
    layers = native.install_noisy_bn(model)
    timing = reference_loop(model, *data, 2, warmup=1, settings=SETTINGS)
    masks = np.concatenate(list(timing.masks.values()))
    assert timing.iterations == 2 and timing.seconds > 0
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    assert (masks < 1.0).any(), "the masks did not move"
    assert all(p.requires_grad for p in model.parameters())
    assert model.conv1.weight.grad is not None  # computed as in the reference, then ignored
    assert all(float(m.num_batches_tracked) > 0 for m in layers.values())  # train(): running stats updated


def test_reference_frozen_variant_freezes_the_other_weights(data) -> None:
    model = tiny()
    layers = native.install_noisy_bn(model)
    timing = reference_loop(model, *data, 2, settings=SETTINGS, freeze=True)
    masks = np.concatenate(list(timing.masks.values()))
    assert masks.min() >= 0.0 and masks.max() <= 1.0 and (masks < 1.0).any()
    anp = {id(p) for m in layers.values() for p in (m.neuron_mask, m.neuron_noise, m.neuron_noise_bias)}
    others = [p for p in model.parameters() if id(p) not in anp]
    assert others and not any(p.requires_grad for p in others)
    assert all(p.grad is None for p in others)


def test_frozen_and_faithful_variants_learn_the_same_masks(data) -> None:
    base = tiny()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    native.install_noisy_bn(a)
    native.install_noisy_bn(b)
    ma = reference_loop(a, *data, 2, settings=SETTINGS).masks
    mb = reference_loop(b, *data, 2, settings=SETTINGS, freeze=True).masks
    for name in ma:
        np.testing.assert_allclose(ma[name], mb[name], atol=1e-6)


def test_floor_loop_only_computes(data) -> None:
    model = tiny()
    layers = native.install_noisy_bn(model)
    timing = floor_loop(model, *data, 2, warmup=1, settings=SETTINGS)
    assert timing.seconds > 0
    assert all(np.all(m == 1.0) for m in timing.masks.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "neuron_" not in n)
    assert all(float(m.num_batches_tracked) == 0 for m in layers.values())  # no running-stat update
    assert all(m.batch_stats is None and not m.perturbed for m in layers.values())  # restored


def test_crop_flip_without_padding_keeps_or_mirrors_each_image() -> None:
    x = torch.rand(8, 3, 6, 6)
    out = crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    for i in range(8):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    assert crop_flip(x, torch.Generator().manual_seed(0), padding=3).shape == x.shape


def test_native_rebuilt_from_onnx_matches_onnxruntime(tmp_path) -> None:
    path = native.export_bn_kept(tiny(), tmp_path / "tiny.onnx", (2, 3, 12, 12))
    rebuilt = TinyBN()
    native.load_from_onnx(rebuilt, path)
    x = np.random.default_rng(0).random((6, 3, 12, 12), dtype=np.float32)
    assert native.onnx_parity(rebuilt, path, x) < 1e-4


def test_preact_sample_rebuilt_from_onnx_matches_onnxruntime() -> None:
    model = native.preact_from_onnx()
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    assert native.onnx_parity(model, native.SAMPLES / "badnets_preact.onnx", x) < 1e-4


def test_load_from_onnx_refuses_a_model_it_cannot_fill(tmp_path) -> None:
    path = native.export_bn_kept(tiny(), tmp_path / "tiny.onnx", (2, 3, 12, 12))
    with pytest.raises(KeyError):
        native.load_from_onnx(native.CifarResNet18(), path)


def test_stage_timer_counts_nested_calls_once() -> None:
    timer = StageTimer()
    inner = timer.wrap(lambda: sum(range(10000)), "inner", "m.inner")
    outer = timer.wrap(lambda: [inner() for _ in range(3)], "outer", "m.outer")
    outer()
    assert timer.calls == {"m.inner": 3, "m.outer": 1}
    assert timer.seconds["inner"] > 0 and timer.seconds["outer"] >= 0
    assert timer.missed([("m", "inner", "inner"), ("m", "gone", "x")]) == ["m.gone"]


def test_stage_timer_charges_calls_inside_an_inclusive_stage_to_it() -> None:
    """The unlearning's scan calls the reconstruction: its time is the scan's, not the reconstruction's."""
    import time as _time

    from benchmarks.speed_parts import INCLUSIVE, STAGE_PATCHES

    scan = next(stage for _, attr, stage in STAGE_PATCHES if attr == "scan_targets")
    assert scan in INCLUSIVE
    timer = StageTimer()
    inner = timer.wrap(lambda: _time.sleep(0.02), "unlearn: reconstruct", "m.reconstruct")
    outer = timer.wrap(lambda: [inner() for _ in range(2)], scan, "m.scan")
    outer()
    inner()  # outside the scan: the reconstruction's own
    assert timer.calls == {"m.reconstruct": 3, "m.scan": 1}
    assert timer.seconds[scan] >= 0.04 and 0.02 <= timer.seconds["unlearn: reconstruct"] < 0.04


def test_the_cpu_facts_name_the_model_and_the_features_that_change_speed(tmp_path):
    from benchmarks.host import cpu_facts

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_facts(info) == {"cpu_model": "AMD EPYC 9R14", "cpu_features": ["avx2", "avx512f", "avx512_bf16"]}
    assert cpu_facts(tmp_path / "missing") == {"cpu_model": None, "cpu_features": []}
