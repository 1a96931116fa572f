"""The development bench's own pieces (benchmarks/oracle.py, bench_models.py, quality_table.py,
interpolate_study.py's helpers).

Fast and without ../shared: the oracle frontier on synthetic curves, the model registry with an
empty shared folder, the card preprocessing and the data sets a sample row writes; the line
study's row reading, fixed-patch success and soup of initializers (torch and onnx, tiny inputs).
"""

from __future__ import annotations

import numpy as np
import pytest

from anp_onnx.preprocessing import Preprocessing
from benchmarks import bench_models, oracle
from benchmarks.quality_table import COLUMNS, meets, summary, table


def test_frontier_picks_best_accuracy_with_low_asr():
    curve = {0: (0.80, 0.99), 10: (0.79, 0.50), 20: (0.74, 0.04), 30: (0.76, 0.05), 40: (0.60, 0.0),
             50: (0.90, 0.01)}
    front = oracle.frontier(curve, max_count=40)
    assert (front.count, front.accuracy, front.asr) == (30, 0.76, 0.05)  # 5% counts; 50 is beyond half
    assert front.describe() == "76.0% at 30"


def test_frontier_ties_prefer_fewer_neurons_and_skip_unmeasured():
    front = oracle.frontier({5: (0.7, 0.01), 9: (0.7, 0.0), 3: (None, 0.0), 2: (0.9, None)}, max_count=10)
    assert front.count == 5


def test_frontier_never():
    front = oracle.frontier({0: (0.8, 1.0), 10: (0.7, 0.3), 20: (0.5, 0.06)}, max_count=20)
    assert front.count is None and front.accuracy is None
    assert front.describe() == "never (<= 20 pruned)"
    assert front.to_dict()["text"].startswith("never")


def test_search_bisects_the_crossing_and_measures_accuracy_only_where_asr_is_low():
    total = 400  # ASR falls below 5% from 37 neurons on; accuracy falls by 0.1 point per neuron
    asr_calls, acc_calls = [], []

    def asr_at(k):
        asr_calls.append(k)
        return 0.9 if k < 37 else 0.01

    def acc_at(k):
        acc_calls.append(k)
        return 0.8 - k / 1000

    front, measured = oracle.search(asr_at, acc_at, total, points=10)
    assert front.count == 37 and front.accuracy == pytest.approx(0.763) and front.max_count == 200
    assert len(asr_calls) == len(set(asr_calls))  # each count measured once
    assert all(measured[k][1] <= 0.05 for k in acc_calls)
    assert max(measured) == 200


def test_search_never():
    front, measured = oracle.search(lambda k: 1.0, lambda k: pytest.fail("no accuracy needed"), 30)
    assert front.count is None and sorted(measured) == list(range(16))


def test_attack_success_modes():
    pred, y = np.array([0, 0, 2, 3]), np.array([1, 0, 1, 2])
    assert oracle.attack_success(pred, y, 0, "all-to-one", 4) == pytest.approx(1 / 3)  # y == 0 left out
    assert oracle.attack_success(pred, y, None, "all-to-all", 4) == pytest.approx(0.5)  # label + 1


def test_registry_skips_public_models_without_shared(tmp_path):
    reg = bench_models.bench_models(tmp_path)
    assert [m.group for m in reg.models] == ["samples"] * 7 + ["clean"] * 2  # the bundled clean PreActs
    public = [n for files in bench_models.PUBLIC.values() for n in files]
    assert len(public) == 8
    assert {n.removesuffix(".onnx") for n in public} | {"cifar10_small"} <= set(reg.missing)
    chosen, missing = reg.select(["public", "clean"])
    assert [m.name for m in chosen] == ["clean_preact", "clean_preact_folded"]
    assert "kabu_simplecnn_checker_folded" in missing and "cifar10_small" in missing
    chosen, missing = reg.select(["ibau_badnets_vgg", "kabu_simplecnn_checker"])
    assert [m.name for m in chosen] == ["ibau_badnets_vgg"] and list(missing) == ["kabu_simplecnn_checker"]
    assert len(reg.select(None)[0]) == 9
    with pytest.raises(KeyError):
        reg.select(["no_such_model"])


def test_sample_row_writes_its_sets(tmp_path):
    model = next(m for m in bench_models.bench_models(tmp_path / "none").models if m.name == "ibau_badnets_vgg")
    assert model.target == 8 and model.mode == "all-to-one" and model.norm == "6 BN"
    sets = model.write_sets(tmp_path / "sets")
    with np.load(sets.test) as t, np.load(sets.triggered) as p, np.load(sets.clean) as c:
        assert len(t["y"]) == 1000 and len(c["y"]) == 500
        assert len(p["y"]) == int((t["y"] != 8).sum()) and (p["y"] != 8).all()
        assert (p["x"][:, 27:31, 27:31] == 255).all()


def test_all_to_all_sample_row_triggers_every_image(tmp_path):
    model = next(m for m in bench_models.bench_models(tmp_path / "none").models
                 if m.name == "badnets_all2all_preact")
    assert model.target is None and model.mode == "all-to-all"
    sets = model.write_sets(tmp_path / "sets")
    with np.load(sets.test) as t, np.load(sets.triggered) as p:
        assert (p["y"] == t["y"]).all()  # every test image, its own label kept (ASR counts label + 1)
        assert (p["x"][:, 29, 29] == 255).all() and (p["x"][:, 29, 30] == 0).all()  # the badnets checkerboard


def test_card_preprocessing_and_stratified_pick():
    kabu = bench_models.preprocessing_from_card({"scale": 1 / 255, "mean": [0.4914, 0.4822, 0.4465],
                                                 "std": [0.247, 0.2435, 0.2616]})
    assert kabu.scale == 1.0 and kabu.mean == (0.4914, 0.4822, 0.4465)
    raw = bench_models.preprocessing_from_card({"scale": 1.0, "mean": [0.0], "std": [1.0]})
    assert raw == Preprocessing(scale=255.0)
    y = np.repeat(np.arange(10), 30)
    idx = bench_models.stratified_pick(y, 5, 0)
    assert (np.bincount(y[idx]) == 5).all() and (np.diff(idx) > 0).all()
    assert (idx == bench_models.stratified_pick(y, 5, 0)).all()


def test_table_and_summary_render():
    row = {"model": "m", "source": "third-party", "arch": "CNN", "norm": "no BN", "attack": "BadNets", "target": 0,
           "mode": "all-to-one", "random_control": 0.66, "fires_for_random": True, "acc_before": 0.72,
           "acc_after": 0.70, "asr_before": 1.0, "asr_after": 0.04, "pruned": 3, "neurons": 100, "seconds": 12.0,
           "iterations": 5, "device": "cpu", "noise_target": 0,
           "probe": {"suspected_target": 3, "top": 3, "top_share": 0.77}, "rule_kind": "budget",
           "oracle_method": {"text": "71.0% at 4"}, "oracle_reference": {"text": "never (<= 50 pruned)"},
           "refinements": {"unlearn": {"metrics": {"scan_smallest": 0.0, "scan_anomaly": 2.08, "target_1": 3.0,
                                                   "target_2": 0.0, "rounds": 2.0, "lr_1": 0.01, "lr_2": 0.0033}}}}
    clean = {**row, "model": "c", "source": "clean", "attack": None, "target": None, "mode": None,
             "asr_before": None, "asr_after": None, "probe": None, "oracle_method": None, "oracle_reference": None,
             "acc_after": 0.715, "refinements": {"unlearn": {"metrics": {"scan_smallest": 1.0, "scan_anomaly": 1.15,
                                                                          "skipped": 1.0}}}}
    text = table([row, clean])
    assert "class 3, 77% (wrong)" in text and "66% (fires)" in text and "diagnosis only" in text
    assert "scan 0 (2.08); class 3 and 0: 2 rounds kept (lr 0.01, 0.0033)" in text
    assert "scan 1 (1.15); skipped" in text and "yes (drop 0.5)" in text
    assert all(line.count("|") == len(COLUMNS) + 1 for line in text.splitlines() if line.startswith("| "))
    assert meets(row)
    out = summary([row, clean])
    assert "1 of 1" in out and "Clean model c" in out


def test_search_stops_once_accuracy_is_at_chance():
    asked = []

    def acc_at(k):
        asked.append(k)
        return 0.7 if k < 60 else 0.1

    front, measured = oracle.search(lambda k: 0.0, acc_at, 400, points=20, floor=0.15)
    assert front.count == 0 and max(measured) == 70  # 60 and 70 at chance: the grid stops there


def test_interpolation_study_reads_rows_from_the_json_and_from_stderr_logs(tmp_path):
    import json

    from benchmarks.interpolate_study import read_rows

    out = tmp_path / "q.json"
    out.write_text(json.dumps({"rows": [{"model": "a", "acc_after": 0.5}, {"model": "b", "error": "boom"}]}))
    log = tmp_path / "q.err"
    log.write_text("some progress line\n" + json.dumps({"model": "c", "acc_after": 0.7}) + "\nTraceback ...\n")
    rows = read_rows([out, log])
    assert sorted(rows) == ["a", "c"]  # the failed row is left out
    assert rows["c"]["acc_after"] == 0.7


def test_the_interpolation_study_counts_a_fixed_patchs_hits_on_other_classes_only():
    import torch

    from anp_onnx.data import ImageSet
    from anp_onnx.trigger import Trigger
    from benchmarks.interpolate_study import fixed_success

    def net(x):  # class 1 for bright images, else 0
        bright = (x.mean((1, 2, 3)) > 0.5).float()
        return torch.stack([1 - bright, bright], 1)

    x = np.zeros((6, 1, 4, 4), np.float32)
    x[4:] = 1.0  # two bright images of class 1: not counted
    images = ImageSet(x, np.array([0, 0, 0, 0, 1, 1]), ["a", "b"], "test")
    half = torch.zeros(1, 1, 4, 4)
    half[..., :3, :] = 1.0  # 12 of 16 pixels white: the image's mean is 0.75
    patch = Trigger(1, half, torch.ones(1, 1, 4, 4), 0.0, 12.0)
    assert fixed_success(net, patch, images) == 100.0
    weak = Trigger(1, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), 0.0, 0.0)  # stamps nothing
    assert fixed_success(net, weak, images) == 0.0


def test_the_interpolation_study_averages_repairs_of_one_graph_and_keeps_integer_initializers(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    from benchmarks.interpolate_study import mean_initializers

    def model(path, w):
        inits = [numpy_helper.from_array(np.array(w, np.float32), "w"),
                 numpy_helper.from_array(np.array([2, 3], np.int64), "shape")]
        graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])], inits)
        onnx.save(helper.make_model(graph), str(path))
        return path

    mean = mean_initializers([model(tmp_path / "a.onnx", [1.0, 4.0]), model(tmp_path / "b.onnx", [3.0, 0.0])])
    np.testing.assert_array_equal(mean["w"], [2.0, 2.0])
    assert mean["w"].dtype == np.float32 and mean["shape"].tolist() == [2, 3]
