"""End to end: a model with a planted backdoor is repaired; ASR measured in onnxruntime falls."""

from __future__ import annotations

import numpy as np
import pytest

import anp_onnx
from anp_onnx.data import save_npz
from builders import add_trigger, synthetic_images, train_backdoored

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("refinements", [(), ("unlearn",)], ids=["pruning-only", "default"])
def test_planted_backdoor_is_removed(tmp_path, refinements):
    model = train_backdoored(tmp_path / "backdoored.onnx", target=0)
    clean = synthetic_images(300, seed=3)          # the defender's small clean set
    test = synthetic_images(1000, seed=2)
    save_npz(clean, tmp_path / "clean.npz")
    save_npz(test, tmp_path / "test.npz")
    save_npz(add_trigger(test), tmp_path / "triggered.npz")

    result = anp_onnx.repair(
        model, tmp_path / "clean.npz", out=tmp_path / "repaired.onnx",
        config=anp_onnx.ANPConfig(iterations=300, batch_size=64, seed=0),
        test_data=tmp_path / "test.npz", poisoned_data=tmp_path / "triggered.npz", refinements=refinements,
    )
    before, after = result.before, result.after
    assert before.target == 0 and before.target_inferred
    assert before.asr > 0.95 and before.accuracy > 0.9           # the backdoor works
    assert after.asr < 0.5 * before.asr                          # ... and is mostly gone
    assert after.accuracy > before.accuracy - 0.05               # clean accuracy stays close
    if refinements:  # with the unlearning, the automatic choice prunes nothing (anp_onnx.effective_pruning)
        assert result.plan.count == 0 and result.refinements["unlearn"]["initializers"] > 0
    else:
        assert 0 < result.plan.count < 0.25 * result.plan.total

    # the same figures from the written file, through the evaluate API
    again = anp_onnx.evaluate_model(result.output, tmp_path / "test.npz",
                                    poisoned=tmp_path / "triggered.npz", target=0)
    assert again.asr == pytest.approx(after.asr) and again.accuracy == pytest.approx(after.accuracy)
    # the collapse probe named the planted target from clean images only; the loop was targeted
    assert result.optimisation.target == 0 and result.optimisation.probe.suspected_target == 0
    assert np.isfinite(result.export.max_abs_diff) and result.export.max_abs_diff < 1e-4
    if refinements:  # what follows is about the pruning alone (re-pruning from the masks file)
        return
    # the automatic choice used clean data only; it is reported with its curve
    assert result.curve is not None and result.curve.chosen.count == result.plan.count
    assert result.curve.suspected_target == 0 and result.curve.points[0].signal > 0
    # re-pruning the same count from the saved masks (their tie-breakers included) needs no new
    # optimisation and reproduces the file's pruning exactly
    plan, _ = anp_onnx.prune(model, tmp_path / "repaired.masks.json", out=tmp_path / "again.onnx",
                             pruning=anp_onnx.PruneSpec.count(result.plan.count))
    assert {k: list(v) for k, v in plan.pruned.items()} == {k: list(v) for k, v in result.plan.pruned.items()}
    # the masks file carries the suspected target, so an automatic re-prune uses the same rules
    _, facts = anp_onnx.load_masks(tmp_path / "repaired.masks.json")
    assert facts["suspected_target"] == 0 and facts["probe"]["suspected_target"] == 0
    plan_auto, _ = anp_onnx.prune(model, tmp_path / "repaired.masks.json", out=tmp_path / "auto.onnx",
                                  pruning=anp_onnx.PruneSpec.auto(), verify_data=tmp_path / "clean.npz")
    assert 0 < plan_auto.count < 0.25 * plan_auto.total
    assert np.isfinite(result.export.max_abs_diff) and result.export.max_abs_diff < 1e-4
