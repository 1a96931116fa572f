"""Tests for anp_onnx.prune: PruneSpec, planning, ranking ties, and mask files (JSON / mask_values.txt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anp_onnx.errors import DataError, SettingsError
from anp_onnx.neurons import NeuronLayer
from anp_onnx.masks_io import MASKS_FORMAT, load_masks, save_mask_values_txt, save_masks_json
from anp_onnx.prune import PrunePlan, PruneSpec, match_masks, plan_pruning, rank_neurons


def _layer(name: str, size: int) -> NeuronLayer:
    return NeuronLayer(name=name, kind="batchnorm", op_type="BatchNormalization", node_name=name,
                       output=f"{name}_out", size=size, params=(("scale", f"{name}.w"), ("bias", f"{name}.b")))


def _plan_lists(plan: PrunePlan) -> dict[str, list[int]]:
    return {k: [int(i) for i in v] for k, v in plan.pruned.items()}


# ----------------------------------------------------------------------------- PruneSpec


@pytest.mark.parametrize("make", [
    lambda: PruneSpec("bogus", 0.2),
    lambda: PruneSpec("", 0.2),
    lambda: PruneSpec.threshold(1.5),
    lambda: PruneSpec.threshold(-0.01),
    lambda: PruneSpec.threshold(float("nan")),
    lambda: PruneSpec.count(-1),
    lambda: PruneSpec("count", 2.5),
    lambda: PruneSpec("count", -3.0),
    lambda: PruneSpec.fraction(1.01),
    lambda: PruneSpec.fraction(-0.5),
])
def test_prunespec_rejects_bad_values(make) -> None:
    with pytest.raises(SettingsError):
        make()


def test_auto_spec_needs_a_curve() -> None:
    spec = PruneSpec.auto(0.05)
    assert (spec.mode, spec.value) == ("auto", 0.05)
    with pytest.raises(SettingsError):
        PruneSpec.auto(1.5)
    with pytest.raises(SettingsError):
        plan_pruning({"a": np.array([0.1, 0.9], np.float32)}, spec)


def test_settings_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        PruneSpec("threshold", 2.0)


def test_prunespec_count_classmethod_rejects_fraction() -> None:
    with pytest.raises(SettingsError):
        PruneSpec.count(2.5)


@pytest.mark.parametrize("spec, mode, value, text", [
    (PruneSpec.threshold(0.2), "threshold", 0.2, "mask <= 0.2"),
    (PruneSpec.threshold(0), "threshold", 0.0, "mask <= 0"),
    (PruneSpec.threshold(1), "threshold", 1.0, "mask <= 1"),
    (PruneSpec.count(0), "count", 0, "0 lowest masks"),
    (PruneSpec.count(7), "count", 7, "7 lowest masks"),
    (PruneSpec("count", 3.0), "count", 3.0, "3 lowest masks"),
    (PruneSpec.fraction(0.25), "fraction", 0.25, "lowest 25.0% of neurons"),
    (PruneSpec.fraction(1.0), "fraction", 1.0, "lowest 100.0% of neurons"),
])
def test_prunespec_valid(spec: PruneSpec, mode: str, value: float, text: str) -> None:
    assert spec.mode == mode
    assert spec.value == value
    assert spec.describe() == text
    assert spec.to_dict() == {"mode": mode, "value": value}


# ----------------------------------------------------------------------------- planning


MASKS = {
    "a": np.array([0.5, 0.25, 0.75, 0.0], dtype=np.float32),
    "b": np.array([0.125, 1.0, 0.25, 0.375, 0.5], dtype=np.float32),
}


def test_threshold_is_inclusive() -> None:
    # 0.25 and 0.5 are exact in float32, so "<=" is tested without rounding noise
    plan = plan_pruning(MASKS, PruneSpec.threshold(0.25))
    assert _plan_lists(plan) == {"a": [1, 3], "b": [0, 2]}
    assert plan.count == 4 and plan.total == 9
    plan = plan_pruning(MASKS, PruneSpec.threshold(0.5))
    assert _plan_lists(plan) == {"a": [0, 1, 3], "b": [0, 2, 3, 4]}
    assert _plan_lists(plan_pruning(MASKS, PruneSpec.threshold(0.0))) == {"a": [3], "b": []}
    assert plan_pruning(MASKS, PruneSpec.threshold(1.0)).count == 9


def test_threshold_inclusive_for_float32_masks_at_decimal_threshold() -> None:
    masks = {"a": np.array([0.1, 0.2, 0.3], dtype=np.float32)}
    assert _plan_lists(plan_pruning(masks, PruneSpec.threshold(0.2))) == {"a": [0, 1]}


def test_threshold_from_txt_matches_reference(tmp_path: Path) -> None:
    path = tmp_path / "mask_values.txt"
    path.write_text("No \t Layer Name \t Neuron Idx \t Mask Score \n"
                    "0 \t a \t 0 \t 0.2000 \n1 \t a \t 1 \t 0.7000 \n")
    masks, _ = load_masks(path)
    assert _plan_lists(plan_pruning(masks, PruneSpec.threshold(0.2))) == {"a": [0]}


def test_count_takes_lowest() -> None:
    assert _plan_lists(plan_pruning(MASKS, PruneSpec.count(0))) == {"a": [], "b": []}
    assert _plan_lists(plan_pruning(MASKS, PruneSpec.count(1))) == {"a": [3], "b": []}
    assert _plan_lists(plan_pruning(MASKS, PruneSpec.count(2))) == {"a": [3], "b": [0]}
    # 0.25 tie between a[1] and b[2]: layer order first
    assert _plan_lists(plan_pruning(MASKS, PruneSpec.count(3))) == {"a": [1, 3], "b": [0]}
    assert _plan_lists(plan_pruning(MASKS, PruneSpec.count(4))) == {"a": [1, 3], "b": [0, 2]}
    assert _plan_lists(plan_pruning(MASKS, PruneSpec.count(9))) == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3, 4]}


def test_count_above_total_is_an_error() -> None:
    with pytest.raises(SettingsError, match="10"):
        plan_pruning(MASKS, PruneSpec.count(10))


@pytest.mark.parametrize("fraction, expected", [
    (0.0, 0), (0.1, 0), (0.12, 1), (0.2, 1), (0.22, 1), (0.23, 2), (0.5, 4), (0.99, 8), (1.0, 9),
])
def test_fraction_floors(fraction: float, expected: int) -> None:
    plan = plan_pruning(MASKS, PruneSpec.fraction(fraction))
    assert plan.count == expected
    assert plan.total == 9


def test_fraction_of_exact_products_is_not_lost_to_rounding() -> None:
    # 0.7 * 10 == 7.000000000000001 and 0.29 * 100 == 28.999999999999996 in binary floating point
    masks10 = {"x": np.linspace(0, 1, 10, dtype=np.float32)}
    assert plan_pruning(masks10, PruneSpec.fraction(0.7)).count == 7
    masks100 = {"x": np.linspace(0, 1, 100, dtype=np.float32)}
    assert plan_pruning(masks100, PruneSpec.fraction(0.29)).count == 29
    assert _plan_lists(plan_pruning(masks100, PruneSpec.fraction(0.03))) == {"x": [0, 1, 2]}


def test_ties_keep_layer_then_channel_order() -> None:
    masks = {
        "first": np.array([0.5, 0.5, 0.1, 0.5], dtype=np.float32),
        "second": np.array([0.5, 0.0, 0.5], dtype=np.float32),
    }
    ranked = [(n.layer, n.index) for n in rank_neurons(masks)]
    assert ranked == [("second", 1), ("first", 2), ("first", 0), ("first", 1), ("first", 3),
                      ("second", 0), ("second", 2)]
    assert _plan_lists(plan_pruning(masks, PruneSpec.count(4))) == {"first": [0, 1, 2], "second": [1]}
    assert _plan_lists(plan_pruning(masks, PruneSpec.count(6))) == {"first": [0, 1, 2, 3], "second": [0, 1]}
    # the dict order given is the layer order: reversed dict, reversed precedence
    rev = {"second": masks["second"], "first": masks["first"]}
    assert _plan_lists(plan_pruning(rev, PruneSpec.count(4))) == {"second": [0, 1, 2], "first": [2]}


def test_tiebreak_orders_equal_masks_then_layer_and_channel_order() -> None:
    masks = {"a": np.array([0.0, 0.0, 0.5], np.float32), "b": np.array([0.0, 0.5, 0.0], np.float32)}
    means = {"a": np.array([0.4, 0.2, 0.9], np.float32), "b": np.array([0.2, 0.1, 0.3], np.float32)}
    ranked = [(n.layer, n.index) for n in rank_neurons(masks, means)]
    # masks 0 first ordered by mean (a1 0.2 and b0 0.2 tie -> layer order), then masks 0.5 by mean
    assert ranked == [("a", 1), ("b", 0), ("b", 2), ("a", 0), ("b", 1), ("a", 2)]
    assert [n.mask for n in rank_neurons(masks, means)] == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
    assert _plan_lists(plan_pruning(masks, PruneSpec.count(2), means)) == {"a": [1], "b": [0]}
    assert _plan_lists(plan_pruning(masks, PruneSpec.count(2))) == {"a": [0, 1], "b": []}
    # a tie-break that misses a layer is ignored entirely
    partial = {"b": means["b"]}
    assert [(n.layer, n.index) for n in rank_neurons(masks, partial)] == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 2), ("a", 2), ("b", 1)]


def test_ties_follow_model_layer_order_through_match_masks() -> None:
    layers = [_layer("conv1.bn", 3), _layer("conv2.bn", 2)]
    masks = {"conv2.bn": np.array([0.5, 0.5]), "conv1.bn": np.array([0.5, 0.9, 0.5])}
    matched = match_masks(masks, layers)
    assert list(matched) == ["conv1.bn", "conv2.bn"]
    assert all(v.dtype == np.float32 for v in matched.values())
    assert _plan_lists(plan_pruning(matched, PruneSpec.count(3))) == {"conv1.bn": [0, 2], "conv2.bn": [0]}


def test_plan_count_per_layer_to_dict() -> None:
    plan = plan_pruning(MASKS, PruneSpec.threshold(0.25))
    assert plan.count == 4
    assert plan.per_layer() == {"a": 2, "b": 2}
    assert plan.spec == PruneSpec.threshold(0.25)
    d = plan.to_dict()
    assert d == {"spec": {"mode": "threshold", "value": 0.25}, "count": 4, "total": 9,
                 "neurons": {"a": [1, 3], "b": [0, 2]}}
    json.dumps(d)  # JSON-ready: plain ints, no numpy types
    assert all(type(i) is int for idx in d["neurons"].values() for i in idx)

    only_a = plan_pruning(MASKS, PruneSpec.count(1))
    assert only_a.per_layer() == {"a": 1, "b": 0}
    assert only_a.to_dict()["neurons"] == {"a": [3]}  # empty layers left out
    assert all(v.dtype == np.int64 for v in only_a.pruned.values())


# ----------------------------------------------------------------------------- mask files


def _layers_for(masks: dict[str, np.ndarray]) -> list[NeuronLayer]:
    return [_layer(name, len(v)) for name, v in masks.items()]


def test_masks_json_roundtrip_keeps_values_and_facts(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    masks = {"/f/bn1": rng.random(8).astype(np.float32), "/f/bn2": rng.random(16).astype(np.float32)}
    path = tmp_path / "m.masks.json"
    extra = {"model": {"path": "x.onnx", "sha256": "ab" * 32}, "config": {"eps": 0.4, "seed": 1}}
    save_masks_json(path, masks, _layers_for(masks), extra)

    loaded, facts = load_masks(path)
    assert list(loaded) == list(masks)
    for name in masks:
        assert loaded[name].dtype == np.float32
        assert loaded[name].shape == masks[name].shape
        np.testing.assert_allclose(loaded[name], masks[name], atol=1e-6, rtol=0)
    assert facts == {"format": MASKS_FORMAT, "version": 1, **extra}

    doc = json.loads(path.read_text())
    assert [layer["name"] for layer in doc["layers"]] == ["/f/bn1", "/f/bn2"]
    first = doc["layers"][0]
    assert first["size"] == 8 and first["kind"] == "batchnorm" and first["op_type"] == "BatchNormalization"
    assert first["params"] == {"scale": "/f/bn1.w", "bias": "/f/bn1.b"}
    assert first["output"] == "/f/bn1_out" and first["node"] == "/f/bn1"
    assert [p.name for p in tmp_path.iterdir()] == ["m.masks.json"]  # no temporary file left


def test_masks_json_keeps_mean_masks_as_tiebreak_facts(tmp_path: Path) -> None:
    masks = {"bn1": np.array([0.0, 0.5, 1.0], np.float32), "bn2": np.array([0.25, 0.0], np.float32)}
    means = {"bn1": np.array([0.1, 0.6, 1.0], np.float32), "bn2": np.array([0.3, 0.05], np.float32)}
    path = tmp_path / "m.json"
    save_masks_json(path, masks, _layers_for(masks), {"note": 1}, means)
    loaded, facts = load_masks(path)
    assert set(facts) == {"format", "version", "note", "mean_masks"}
    assert {k: v.tolist() for k, v in facts["mean_masks"].items()} == {k: v.tolist() for k, v in means.items()}
    assert {k: v.tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in masks.items()}
    # without means: no mean_masks fact
    save_masks_json(path, masks, _layers_for(masks))
    assert load_masks(path)[1] == {"format": MASKS_FORMAT, "version": 1}


def test_mask_values_txt_exact_reference_format(tmp_path: Path) -> None:
    masks = {"layer1.bn": np.array([0.123456, 1.0, 0.0], dtype=np.float32),
             "layer2.bn": np.array([0.99995, 0.5], dtype=np.float32)}
    path = tmp_path / "mask_values.txt"
    save_mask_values_txt(path, masks)
    expected = ("No \t Layer Name \t Neuron Idx \t Mask Score \n"
                "0 \t layer1.bn \t 0 \t 0.1235 \n"
                "1 \t layer1.bn \t 1 \t 1.0000 \n"
                "2 \t layer1.bn \t 2 \t 0.0000 \n"
                "3 \t layer2.bn \t 0 \t {:.4f} \n"
                "4 \t layer2.bn \t 1 \t 0.5000 \n").format(float(np.float32(0.99995)))
    assert path.read_text(encoding="utf-8") == expected
    # each row is what the reference writes: '{} \t {} \t {} \t {:.4f} \n'
    assert path.read_bytes().splitlines(keepends=True)[2] == "{} \t {} \t {} \t {:.4f} \n".format(
        1, "layer1.bn", 1, 1.0).encode()


def test_mask_values_txt_roundtrip_to_4_decimals(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    masks = {"/a/BatchNormalization": rng.random(8).astype(np.float32),
             "/b/BatchNormalization": rng.random(16).astype(np.float32)}
    path = tmp_path / "x.mask_values.txt"
    save_mask_values_txt(path, masks)
    loaded, facts = load_masks(path)
    assert facts == {}
    assert list(loaded) == list(masks)
    for name in masks:
        assert loaded[name].dtype == np.float32
        np.testing.assert_allclose(loaded[name], np.round(masks[name].astype(np.float64), 4), atol=1e-6, rtol=0)


def test_load_masks_reads_reference_file_with_layer_names_with_spaces_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "mask_values.txt"
    path.write_text("No \t Layer Name \t Neuron Idx \t Mask Score \n"
                    "0 \t layer1.0.bn1 \t 1 \t 0.5000 \n"
                    "1 \t layer1.0.bn1 \t 0 \t 0.2500 \n"
                    "\n"
                    "2 \t bn \t 0 \t 1.0000 \n")
    loaded, _ = load_masks(path)
    assert list(loaded) == ["layer1.0.bn1", "bn"]
    assert loaded["layer1.0.bn1"].tolist() == [0.25, 0.5]  # by neuron index, not row order
    assert loaded["bn"].tolist() == [1.0]


@pytest.mark.parametrize("content", [
    "{not json at all",
    '{"format": "anp-onnx-masks", "version": 1}',  # no layers
    '{"layers": [{"mask": [0.1]}]}',  # no name
    '{"layers": [{"name": "a", "mask": "abc"}]}',
    '{"layers": [{"name": "a", "mask": [[0.1, 0.2], [0.3]]}]}',
    '{"layers": ["a", "b"]}',
    "No \t Layer Name \t Neuron Idx \t Mask Score \n",  # header only
    "hello world\nthis is not a mask file\n",
    "No \t Layer Name \t Neuron Idx \t Mask Score \n0 \t a \t zero \t 0.5 \n",
    "No \t Layer Name \t Neuron Idx \t Mask Score \n0 \t a \t 0 \t high \n",
    "No \t Layer Name \t Neuron Idx \t Mask Score \n0 \t a \t 0 \t 0.5 \n1 \t a \t 2 \t 0.5 \n",  # gap
    "",
])
def test_load_masks_garbage_is_data_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "masks.json"
    path.write_text(content)
    with pytest.raises(DataError):
        load_masks(path)


def test_load_masks_binary_garbage_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "masks.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError):
        load_masks(path)


def test_load_masks_missing_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such masks file"):
        load_masks(tmp_path / "nope.json")
    with pytest.raises(DataError):
        load_masks(tmp_path)


def test_match_masks_errors() -> None:
    layers = [_layer("bn1", 3), _layer("bn2", 2)]
    with pytest.raises(DataError, match="bnX"):
        match_masks({"bn1": np.ones(3), "bnX": np.ones(2)}, layers)
    with pytest.raises(DataError, match="bn2"):
        match_masks({"bn1": np.ones(3), "bn2": np.ones(3)}, layers)
    with pytest.raises(DataError):
        match_masks({"bn1": np.ones((3, 1))}, layers)
    with pytest.raises(DataError):
        match_masks({}, layers)


def test_match_masks_subset_of_layers() -> None:
    layers = [_layer("bn1", 3), _layer("bn2", 2)]
    out = match_masks({"bn2": [0.25, 0.75]}, layers)
    assert list(out) == ["bn2"]
    assert out["bn2"].tolist() == [0.25, 0.75]
    plan = plan_pruning(out, PruneSpec.count(1))
    assert plan.total == 2 and _plan_lists(plan) == {"bn2": [0]}
