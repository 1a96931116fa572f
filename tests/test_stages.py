"""Pluggable stages: a second mask stage and a refinement, each one class plus one registration."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import pytest
import torch

import anp_onnx
from anp_onnx.anp import MaskResult
from anp_onnx.errors import ModelError, SettingsError
from anp_onnx.stages import (
    MaskStage, Refinement, RefinementResult, mask_stage_for, mask_stages, register_mask_stage, register_refinement,
    unregister,
)
from builders import initializer, ort_on, random_images, tiny_model


@dataclass(frozen=True)
class RandomScores:
    """Settings of the test's stage: a random score per neuron (the usual control for a ranking)."""

    seed: int = 0

    def to_dict(self) -> dict:
        return {"seed": self.seed}


class RandomStage(MaskStage):
    name = "random-test"
    description = "random neuron scores (test)"
    config_type = RandomScores

    def run(self, ctx, clean, config, *, target, progress=None, cancel=None) -> MaskResult:
        rng = np.random.default_rng(config.seed)
        masks = {name: rng.random(m.neuron_mask.numel()).astype(np.float32) for name, m in ctx.modules.items()}
        return MaskResult(masks, 0, 0.0, "cpu")


class ClassifierBias(Refinement):
    """Adds 0.25 to the classifier's bias in torch and says so in the initializers (consistent)."""

    name = "bias-test"
    description = "shift the classifier bias (test)"
    honest = True

    def run(self, ctx, plan, clean, *, target=None, device="cpu", seed=0, holdout=None, progress=None,
            cancel=None) -> RefinementResult:
        gemm = next(n for n in ctx.model.proto.graph.node if n.op_type == "Gemm")
        linear = ctx.module_for(gemm.output[0])
        with torch.no_grad():
            linear.bias += 0.25
        values = {gemm.input[2]: linear.bias.detach().numpy().copy()} if self.honest else {}
        return RefinementResult(values, {"shift": 0.25})


class HiddenChange(ClassifierBias):
    """Changes torch but returns nothing: the export must refuse the inconsistent file."""

    name = "hidden-test"
    honest = False


class NoChange(Refinement):
    """Changes no weight (as an unlearning whose every round failed its guard)."""

    name = "nochange-test"
    description = "change nothing (test)"

    def run(self, ctx, plan, clean, *, target=None, device="cpu", seed=0, holdout=None, progress=None,
            cancel=None) -> RefinementResult:
        return RefinementResult({}, {"rounds": 0.0})


@pytest.fixture()
def registered():
    for cls in (RandomStage, ClassifierBias, HiddenChange, NoChange):
        (register_mask_stage if issubclass(cls, MaskStage) else register_refinement)(cls)
    yield
    for cls in (RandomStage, ClassifierBias, HiddenChange, NoChange):
        unregister(cls.name)


def test_the_settings_type_selects_the_stage(registered):
    assert mask_stage_for(anp_onnx.ANPConfig()).name == "anp"
    assert mask_stage_for(RandomScores()).name == "random-test"
    assert {"anp", "random-test"} <= set(mask_stages())
    with pytest.raises(SettingsError, match="no mask stage"):
        mask_stage_for(object())
    with pytest.raises(ValueError, match="registered"):
        register_mask_stage(RandomStage)


def test_a_new_mask_stage_runs_the_whole_pipeline(registered, tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    data = random_images(60)
    result = anp_onnx.repair(model, data, out=tmp_path / "r.onnx", config=RandomScores(seed=3),
                             pruning=anp_onnx.PruneSpec.count(5), holdout=0, refinements=())
    scores = RandomStage().run(anp_onnx.Repairer.open(model).ctx, data, RandomScores(seed=3), target=None).masks
    lowest = sorted((v, name, i) for name, vals in scores.items() for i, v in enumerate(vals))[:5]
    assert sorted((n, i) for _, n, i in lowest) == sorted((n, i) for n, idx in result.pruned.items() for i in idx)
    assert result.optimisation.stage == "random-test" and result.optimisation.probe is None
    assert result.stages[:4] == ["convert", "parity", "random-test", "rank"]
    assert "report" in result.stages
    report = (tmp_path / "r.report.json").read_text()
    assert '"random-test"' in report and '"seed": 3' in report


def test_a_refinement_is_written_back_and_verified(registered, tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    data = random_images(60)
    spec = anp_onnx.PruneSpec.count(3)
    anp_onnx.repair(model, data, out=tmp_path / "plain.onnx", config=RandomScores(), pruning=spec,
                            holdout=0, report=False, refinements=())
    refined = anp_onnx.repair(model, data, out=tmp_path / "r.onnx", config=RandomScores(), pruning=spec,
                              holdout=0, report=False, refinements=["bias-test"])
    gemm = next(n for n in onnx.load(model).graph.node if n.op_type == "Gemm")
    before = initializer(onnx.load(tmp_path / "plain.onnx"), gemm.input[2])
    after = initializer(onnx.load(tmp_path / "r.onnx"), gemm.input[2])
    np.testing.assert_allclose(after, before + 0.25, rtol=0, atol=1e-6)
    assert gemm.input[2] in refined.export.changed_initializers
    assert refined.stages[-4:] == ["rank", "bias-test", "write-back", "verify"]
    # the logits move by exactly the shift, in onnxruntime
    x = data.x[:8]
    np.testing.assert_allclose(ort_on(tmp_path / "r.onnx", x), ort_on(tmp_path / "plain.onnx", x) + 0.25, atol=1e-5)


def test_an_inconsistent_refinement_writes_nothing(registered, tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="verification failed"):
        anp_onnx.repair(model, random_images(60), out=tmp_path / "r.onnx", config=RandomScores(),
                        pruning=anp_onnx.PruneSpec.count(3), holdout=0, refinements=["hidden-test"])
    assert not (tmp_path / "r.onnx").exists()


def test_an_unknown_refinement_fails_before_any_work(tmp_path, monkeypatch):
    model = tiny_model(tmp_path / "m.onnx")

    def no_work(*args, **kwargs):
        raise AssertionError("the model was opened before the settings were checked")

    monkeypatch.setattr(anp_onnx.api, "open_context", no_work)
    with pytest.raises(SettingsError, match="unknown refinement"):
        anp_onnx.repair(model, random_images(60), out=tmp_path / "r.onnx", refinements=["nope"])
    assert not (tmp_path / "r.onnx").exists()


def test_finish_prunes_nothing_before_refinements_after_an_automatic_choice(registered, tmp_path):
    """Repairer.finish applies repair()'s rule to a plan made without the refinements in mind."""
    model = tiny_model(tmp_path / "m.onnx")
    data = random_images(60)
    rep = anp_onnx.Repairer.open(model)
    masks = {layer.name: np.linspace(0.0, 1.0, layer.size, dtype=np.float32) for layer in rep.layers}
    curve = rep.pruning_curve(masks, data, max_drop=1.0)  # no suspected target: the budget fallback prunes
    assert curve.signal_gone is None and curve.chosen.count > 0
    auto = anp_onnx.PruneSpec.auto(1.0)
    plan = rep.plan(masks, auto, curve=curve)
    assert plan.count == curve.chosen.count and plan.spec == auto
    assert rep.plan(masks, auto, curve=curve, refinements=["bias-test"]).count == 0
    common = dict(curve=curve, report=False, save_masks=False, refine_data=data)
    plain = rep.finish(plan, masks, tmp_path / "p.onnx", **common)  # no refinements: the automatic choice
    assert plain.plan.count == curve.chosen.count
    refined = rep.finish(plan, masks, tmp_path / "r.onnx", refinements=["bias-test"], **common)
    assert refined.plan.count == 0 and refined.plan.spec == anp_onnx.PruneSpec.count(0)
    assert "bias-test" in refined.stages and sum(len(v) for v in refined.pruned.values()) == 0
    # a refinement that changed nothing: only a backdoor signal that went brings the automatic choice back
    assert rep.finish(plan, masks, tmp_path / "n.onnx", refinements=["nochange-test"], **common).plan.count == 0
    gone = replace(curve, suspected_target=0, signal_gone=True)
    planned = rep.plan(masks, auto, curve=gone, refinements=["nochange-test"])  # as the app plans it
    assert planned.count == 0 and planned.asked == auto
    again = rep.finish(planned, masks, tmp_path / "g.onnx", refinements=["nochange-test"], **{**common, "curve": gone})
    assert again.plan.count == curve.chosen.count and again.plan.spec == auto
    kept = rep.finish(planned, masks, tmp_path / "k.onnx", refinements=["bias-test"], **{**common, "curve": gone})
    assert kept.plan.count == 0


def test_finish_with_a_refinement_leaves_the_repairers_weights_as_they_were(registered, tmp_path):
    """A refinement trains the torch weights in place; the Repairer (the app keeps one per model) gets the
    original's back, so a later export without the refinement still verifies against the original."""
    model = tiny_model(tmp_path / "m.onnx")
    data = random_images(40)
    rep = anp_onnx.Repairer.open(model)
    before = {k: v.clone() for k, v in rep.net.state_dict().items()}
    masks = {layer.name: np.ones(layer.size, dtype=np.float32) for layer in rep.layers}
    plan = rep.plan(masks, anp_onnx.PruneSpec.count(0))
    refined = rep.finish(plan, masks, tmp_path / "r.onnx", refinements=["bias-test"], refine_data=data,
                         report=False, save_masks=False)
    assert refined.refinements["bias-test"]["initializers"]
    after = rep.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    plain = rep.finish(plan, masks, tmp_path / "p.onnx", verify_images=data, report=False, save_masks=False)
    assert plain.export.changed_initializers == [] and plain.export.max_abs_diff < 1e-4
    np.testing.assert_array_equal(ort_on(tmp_path / "p.onnx", data.x[:8]), ort_on(model, data.x[:8]))


@dataclass(frozen=True)
class TargetedScores(RandomScores):
    """Random scores whose stage aims at class 0 (as ANP after a probe that named it)."""


class TargetedStage(RandomStage):
    name = "targeted-test"
    description = "random neuron scores aimed at class 0 (test)"
    config_type = TargetedScores

    def noise_target(self, config, probe):
        return 0


@pytest.fixture()
def targeted(registered):
    register_mask_stage(TargetedStage)
    yield
    unregister(TargetedStage.name)


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_with_refinements_the_automatic_choice_skips_the_mask_stage_that_could_not_change_the_output(
        registered, tmp_path):
    """Default order (anp_onnx.pipeline): the refinements first; they changed weights, so no masks are learnt,
    and the model written is exactly the one of the fixed order (mask stage, then the same 0 pruned)."""
    model = tiny_model(tmp_path / "m.onnx")
    data = random_images(60)
    stale = tmp_path / "r.masks.json"
    stale.write_text("{}")  # an earlier run's masks: they must not stay beside a model they do not belong to
    (tmp_path / "r.masks.png").write_bytes(b"old")
    result = anp_onnx.repair(model, data, out=tmp_path / "r.onnx", config=RandomScores(), refinements=["bias-test"],
                             overwrite=True)
    assert result.masks == {} and result.optimisation.stage == "probe"
    assert result.optimisation.skipped == anp_onnx.pipeline.WEIGHTS_CHANGED
    assert result.plan.count == 0 and result.plan.asked == anp_onnx.PruneSpec.auto()
    assert result.stages[:3] == ["convert", "parity", "bias-test"] and "random-test" not in result.stages
    assert not stale.exists() and not (tmp_path / "r.mask_values.txt").exists()
    assert not (tmp_path / "r.masks.png").exists()
    assert "ANP not run: the refinements changed the weights" in (tmp_path / "r.report.md").read_text()
    fixed = anp_onnx.repair(model, data, out=tmp_path / "f.onnx", config=RandomScores(), refinements=["bias-test"],
                            pruning=anp_onnx.PruneSpec.count(0))
    assert fixed.optimisation.stage == "random-test" and fixed.masks
    assert (tmp_path / "f.masks.json").exists()
    written, expected = _initializers(tmp_path / "r.onnx"), _initializers(tmp_path / "f.onnx")
    assert written.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(written[name], expected[name])


def test_a_refinement_that_changed_nothing_without_a_suspected_target_prunes_nothing(registered, tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    result = anp_onnx.repair(model, random_images(60), out=tmp_path / "r.onnx", config=RandomScores(),
                             refinements=["nochange-test"])
    assert result.masks == {} and result.plan.count == 0
    assert result.optimisation.skipped == anp_onnx.pipeline.NOTHING_CHANGED
    np.testing.assert_array_equal(ort_on(tmp_path / "r.onnx", random_images(8).x),
                                  ort_on(model, random_images(8).x))


def test_a_refinement_that_changed_nothing_with_a_suspected_target_runs_the_mask_stage_after_it(targeted, tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    data = random_images(60)
    result = anp_onnx.repair(model, data, out=tmp_path / "r.onnx", config=TargetedScores(seed=2),
                             refinements=["nochange-test"])
    assert result.optimisation.stage == "targeted-test" and result.optimisation.target == 0 and result.masks
    assert result.stages[2:6] == ["nochange-test", "targeted-test", "rank", "curve"]
    assert (tmp_path / "r.masks.json").exists() and result.curve is not None
    plain = anp_onnx.repair(model, data, out=tmp_path / "p.onnx", config=TargetedScores(seed=2), refinements=())
    for name, values in plain.masks.items():  # the same masks as without the refinement
        np.testing.assert_array_equal(result.masks[name], values)
    expected = plain.plan.count if plain.curve.signal_gone else 0
    assert result.plan.count == expected
