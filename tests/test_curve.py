"""The pruning curve and the automatic choice (anp_onnx.curve), and the repair report."""

from __future__ import annotations

import json

import numpy as np
import pytest

import anp_onnx
from anp_onnx.curve import compute_curve, effective_pruning, grid_counts, pruning_after_refinements
from anp_onnx.errors import SettingsError
from anp_onnx.prune import PruneSpec, RankedNeuron, rank_neurons
from builders import add_trigger, synthetic_images, train_backdoored


def _ranking(n):
    return [RankedNeuron("layer", i, i / n) for i in range(n)]


def _evaluator(acc_of_count, calls=None, signal_of_count=None, signal_calls=None):
    def evaluate(chosen, signal, above=None):
        if calls is not None:
            calls.append(len(chosen))
        share = None
        if signal and signal_of_count is not None:
            share = signal_of_count(len(chosen))
            if signal_calls is not None:
                signal_calls.append(len(chosen))
        return acc_of_count(len(chosen)), None, share
    return evaluate


def test_grid_counts():
    assert grid_counts(5) == [0, 1, 2, 3, 4, 5]
    g = grid_counts(1000, points=10)
    assert g[0] == 0 and g[-1] == 1000 and len(g) == 11


def test_refinements_after_an_automatic_choice_prune_nothing_first():
    """effective_pruning: count 0 exactly for an automatic choice followed by refinements, whatever the
    curve's backdoor signal did; a count or threshold asked for stands."""
    auto = PruneSpec.auto()
    assert effective_pruning(auto, ["unlearn"]) == PruneSpec.count(0)
    assert effective_pruning(PruneSpec.auto(0.1), ("unlearn", "other")) == PruneSpec.count(0)
    assert effective_pruning(auto, ()) is auto  # no refinements: the automatic choice stands
    for spec in (PruneSpec.count(7), PruneSpec.threshold(0.2), PruneSpec.fraction(0.1)):
        assert effective_pruning(spec, ["unlearn"]) is spec  # the user's own choice stands


def test_refinements_that_changed_nothing_give_the_signal_rule_back():
    """pruning_after_refinements: the automatic choice prunes after all only when the refinements changed
    no weight and the curve's backdoor signal went."""
    ranking, acc = _ranking(100), lambda k: 0.9 - 0.0001 * k
    unsuspected = compute_curve(ranking, _evaluator(acc), n_images=100)
    stays = compute_curve(ranking, _evaluator(acc, signal_of_count=lambda k: 0.5), n_images=100, suspected_target=3)
    goes = compute_curve(ranking, _evaluator(acc, signal_of_count=lambda k: 0.5 if k < 30 else 0.0), n_images=100,
                         suspected_target=3)
    assert unsuspected.signal_gone is None and stays.signal_gone is False and goes.signal_gone is True
    auto, zero = PruneSpec.auto(), PruneSpec.count(0)
    assert pruning_after_refinements(auto, goes, ["unlearn"], changed=False) is auto
    assert pruning_after_refinements(auto, goes, ["unlearn"], changed=True) == zero
    for curve in (unsuspected, stays, None):
        assert pruning_after_refinements(auto, curve, ["unlearn"], changed=False) == zero
    assert pruning_after_refinements(auto, goes, (), changed=False) is auto
    count = PruneSpec.count(7)
    assert pruning_after_refinements(count, goes, ["unlearn"], changed=False) is count


def test_choice_is_exact_largest_count_within_budget():
    # accuracy 0.9 until 137 neurons are pruned, then it falls off a cliff
    curve = compute_curve(_ranking(1000), _evaluator(lambda k: 0.9 if k <= 137 else 0.5), n_images=100,
                          max_drop=0.02)
    assert curve.baseline == 0.9 and curve.chosen.count == 137
    assert curve.chosen.threshold == pytest.approx(136 / 1000)
    assert curve.spec() == PruneSpec.count(137)
    assert [p.count for p in curve.points] == sorted(p.count for p in curve.points)


def test_budget_is_respected_and_sweep_stops_early():
    calls = []
    curve = compute_curve(_ranking(1000), _evaluator(lambda k: 0.9 - 0.001 * k, calls), n_images=100,
                          max_drop=0.02, max_fraction=0.5)
    assert curve.chosen.count == 20  # 0.9 - 0.02: the last count whose drop is <= 2 points
    assert curve.baseline - curve.chosen.accuracy <= 0.02 + 1e-12
    assert max(calls) < 500  # stopped once accuracy was far below the budget


def test_signal_rule_prunes_until_the_backdoor_signal_goes():
    # the suspected target takes half the errors until 57 neurons are pruned, then almost none;
    # accuracy falls slowly (4 points at 57: beyond the 2-point budget, within the 10-point cap)
    signal_calls = []
    curve = compute_curve(_ranking(400), _evaluator(lambda k: 0.9 - 0.0007 * k, None,
                                                    lambda k: 0.5 if k < 57 else 0.001, signal_calls),
                          n_images=100, max_drop=0.02, suspected_target=3)
    assert curve.chosen.count == 57 and curve.signal_gone is True and curve.suspected_target == 3
    assert curve.chosen.signal == pytest.approx(0.001)
    assert "backdoor signal" in curve.rule and "target 3" in curve.rule
    assert max(signal_calls) <= 70  # the probe is not run once the signal has gone
    assert curve.to_dict()["signal_gone"] is True


def test_signal_rule_ignores_a_single_noisy_dip():
    # one grid point dips below the gone level, the next does not: not gone there
    dip = lambda k: 0.002 if k == 40 else (0.4 if k < 100 else 0.0)  # noqa: E731
    curve = compute_curve(_ranking(400), _evaluator(lambda k: 0.9, None, dip), n_images=100,
                          suspected_target=1)
    assert curve.chosen.count > 40 and curve.signal_gone


def test_signal_rule_falls_back_to_the_budget_when_the_signal_stays():
    # the signal never goes before accuracy falls more than 10 points: the 2-point budget decides
    curve = compute_curve(_ranking(400), _evaluator(lambda k: 0.9 - 0.001 * k, None, lambda k: 0.5),
                          n_images=100, max_drop=0.02, suspected_target=0)
    assert curve.chosen.count == 20 and curve.signal_gone is False
    assert "did not go" in curve.rule


def test_choice_stops_at_the_first_crossing_not_a_lucky_later_point():
    # a dip below the budget at 11..12, then a (noisy) recovery: the choice stops before the dip
    acc = lambda k: 0.80 if (11 <= k <= 12 or k > 30) else 0.9  # noqa: E731
    curve = compute_curve(_ranking(40), _evaluator(acc), n_images=100, max_drop=0.02)
    assert curve.chosen.count == 10


def test_nothing_pruned_when_every_pruning_hurts():
    curve = compute_curve(_ranking(50), _evaluator(lambda k: 0.9 if k == 0 else 0.1), n_images=10)
    assert curve.chosen.count == 0


def test_invalid_budget():
    with pytest.raises(SettingsError):
        compute_curve(_ranking(10), _evaluator(lambda k: 1.0), n_images=1, max_drop=2)


def test_tiebreak_orders_equal_masks():
    masks = {"a": np.array([0.0, 0.0, 0.5], np.float32), "b": np.array([0.0], np.float32)}
    means = {"a": np.array([0.3, 0.1, 0.6], np.float32), "b": np.array([0.2], np.float32)}
    assert [(n.layer, n.index) for n in rank_neurons(masks, means)] == [("a", 1), ("b", 0), ("a", 0), ("a", 2)]
    assert [(n.layer, n.index) for n in rank_neurons(masks)] == [("a", 0), ("a", 1), ("b", 0), ("a", 2)]


def test_auto_spec_needs_a_curve(tmp_path):
    rep = anp_onnx.Repairer.open(train_backdoored(tmp_path / "b.onnx", n=600, epochs=1))
    masks = {layer.name: np.linspace(0, 1, layer.size).astype(np.float32) for layer in rep.layers}
    with pytest.raises(SettingsError, match="curve"):
        rep.plan(masks, PruneSpec.auto())
    clean = synthetic_images(100, seed=5)
    curve = rep.pruning_curve(masks, clean, poisoned=add_trigger(clean), target=0)
    plan = rep.plan(masks, PruneSpec.auto(), curve=curve)
    assert plan.count == curve.chosen.count
    assert all(p.asr is not None for p in curve.points)
    # the torch model is left unpruned afterwards
    assert all(float(m.neuron_mask.detach().min()) == 1.0 for m in rep.modules.values())


def test_report_files(tmp_path):
    model = train_backdoored(tmp_path / "b.onnx", n=600, epochs=1)
    data = synthetic_images(120, seed=3)
    result = anp_onnx.repair(model, data, out=tmp_path / "r.onnx",
                             config=anp_onnx.ANPConfig(iterations=5, batch_size=32),
                             test_data=data, poisoned_data=add_trigger(data), refinements=())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["b.onnx", "r.curve.png", "r.mask_values.txt", "r.masks.json", "r.masks.png", "r.onnx",
                     "r.report.json", "r.report.md"]
    report = json.loads((tmp_path / "r.report.json").read_text())
    assert report["pruning"]["count"] == result.plan.count
    assert report["curve"]["chosen"]["count"] == result.curve.chosen.count
    assert report["test"]["before"]["asr"] == pytest.approx(result.before.asr)
    assert report["optimisation"]["iterations"] == 5
    md = (tmp_path / "r.report.md").read_text()
    assert f"Pruned {result.plan.count} of {result.plan.total} neurons" in md and "r.curve.png" in md
    assert (tmp_path / "r.curve.png").read_bytes()[:4] == b"\x89PNG"
