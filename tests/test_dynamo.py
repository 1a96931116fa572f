"""Models written by the torch dynamo exporter (opset 20, IR 10): load, convert, repair, fold.

The files in tests/data were written by ``torch.onnx.export(..., dynamo=True)`` (torch 2.13,
onnxscript 0.7) with tests/data/make_dynamo_models.py; onnxscript is not a test dependency, so the
exporter's output is committed. When onnxscript is installed, the last test re-exports live.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from anp_onnx import ANPConfig, Repairer
from anp_onnx.model import load_model
from anp_onnx.prune import PruneSpec
from builders import add_trigger, ort_on, synthetic_images, torch_with_plan

DATA = Path(__file__).resolve().parent / "data"
FILES = {
    "optimized": DATA / "dynamo_backdoor.onnx",
    "unoptimized": DATA / "dynamo_backdoor_unoptimized.onnx",
    "norms": DATA / "dynamo_norms.onnx",
}


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("name, kinds", [
    ("optimized", {"conv"}),                          # BatchNorm folded into the convs by the exporter
    ("unoptimized", {"batchnorm"}),                   # BatchNormalization nodes kept
    ("norms", {"instancenorm", "affine", "layernorm"}),  # GroupNorm decomposed, LayerNorm
])
def test_dynamo_models_convert_repair_and_keep_their_opset(tmp_path, name, kinds):
    path = FILES[name]
    original = onnx.load(str(path))
    assert original.ir_version == 10 and original.opset_import[0].version == 20
    rep = Repairer.open(path)
    assert {layer.kind for layer in rep.layers} == kinds
    images = synthetic_images(64, seed=3)
    assert rep.check_parity(images) < 1e-4
    result = rep.optimize(images, ANPConfig(iterations=3, batch_size=16))
    plan = rep.plan(result.masks, PruneSpec.count(3))
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)  # verified in onnxruntime against the pruned torch model
    written = onnx.load(str(out))
    assert written.ir_version == 10 and written.opset_import[0].version == 20
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-4)


def test_unoptimized_export_needs_precomputed_constants_and_allowzero():
    """What the conversion copy has to deal with in the unoptimised export (checked on the file)."""
    model = onnx.load(str(FILES["unoptimized"]))
    producers = {o: n for n in model.graph.node for o in n.output}
    reduce = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    assert producers[reduce.input[1]].op_type == "Reshape"  # axes computed from Constant nodes
    assert any(a.name == "allowzero" and a.i for n in model.graph.node if n.op_type == "Reshape"
               for a in n.attribute)


@pytest.mark.slow
def test_dynamo_backdoor_is_removed(tmp_path):
    """The dynamo export folds BatchNorm into the convs: renormalised conv neurons, probe, targeted ANP."""
    rep = Repairer.open(FILES["optimized"])
    clean = synthetic_images(300, seed=3)
    result = rep.optimize(clean, ANPConfig(iterations=300, batch_size=64, seed=0, device="cpu"))
    assert result.target == 0  # the collapse probe names the planted target from clean images
    test = synthetic_images(1000, seed=2)
    triggered = add_trigger(test)
    before = rep.evaluate(test, poisoned=triggered, target=0)
    assert before.asr > 0.95 and before.accuracy > 0.9
    curve = rep.pruning_curve(result.masks, synthetic_images(200, seed=4), tiebreak=result.mean_masks,
                              suspected_target=result.target, signal_data=clean)
    plan = rep.plan(result.masks, PruneSpec.auto(), tiebreak=result.mean_masks, curve=curve)
    out = tmp_path / "repaired.onnx"
    rep.export(plan, out)
    after = rep.evaluate(test, poisoned=triggered, target=0, model=load_model(out))
    assert after.asr < 0.2 and after.accuracy > before.accuracy - 0.05, (plan.count, after)


def test_live_dynamo_export_matches_the_fixture(tmp_path):
    pytest.importorskip("onnxscript")
    import sys

    sys.path.insert(0, str(DATA))
    import make_dynamo_models as make

    net = make.NormNet()
    make.export_dynamo(net, tmp_path / "norms.onnx")
    assert _ops(tmp_path / "norms.onnx") == _ops(FILES["norms"])
