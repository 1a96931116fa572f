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
from anp_onnx.convert import torch_logits
from builders import add_trigger, ort_on, synthetic_images, torch_with_plan

DATA = Path(__file__).resolve().parent / "data"
FILES = {
    "optimized": DATA / "dynamo_backdoor.onnx",
    "unoptimized": DATA / "dynamo_backdoor_unoptimized.onnx",
    "norms": DATA / "dynamo_norms.onnx",
    "ops": DATA / "dynamo_unoptimized_ops.onnx",
}
#: Raw ops of the unoptimised export that onnx2torch 1.5.15 has no converter for (anp_onnx/onnx2torch_dynamo.py).
RAW_OPS = {"CastLike", "Gelu", "Mish", "SplitToSequence", "SequenceAt"}


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


def _converts_and_repairs(path: Path, tmp_path: Path) -> None:
    """Converted (torch matches onnxruntime), optimised, pruned and written back, verified."""
    rep = Repairer.open(path)
    assert {layer.kind for layer in rep.layers} == {"batchnorm"}
    images = synthetic_images(48, seed=3)
    assert rep.check_parity(images) < 1e-4
    rep.net.eval()
    np.testing.assert_allclose(torch_logits(rep.net, images.x), ort_on(path, images.x), atol=1e-4, rtol=0)
    result = rep.optimize(images, ANPConfig(iterations=2, batch_size=16))
    plan = rep.plan(result.masks, PruneSpec.count(3))
    out = tmp_path / "pruned.onnx"
    rep.export(plan, out, verify_images=images)
    np.testing.assert_allclose(torch_with_plan(rep, plan, images.x), ort_on(out, images.x), atol=1e-4)


def test_unoptimized_export_raw_ops_convert(tmp_path):
    """The committed optimize=False export of a conv + BN + linear net (opset 20) with the raw ops."""
    assert RAW_OPS <= _ops(FILES["ops"])
    model = onnx.load(str(FILES["ops"]))
    assert any(a.name == "num_outputs" for n in model.graph.node if n.op_type == "Split" for a in n.attribute)
    _converts_and_repairs(FILES["ops"], tmp_path)


@pytest.mark.parametrize("n, k", [(8, 2), (7, 3), (5, 2), (1, 1)])
def test_split_into_num_outputs_follows_onnx(n, k):
    from onnx.reference import ReferenceEvaluator
    from onnx import helper, TensorProto
    import torch

    from anp_onnx.onnx2torch_dynamo import OnnxSplitInto

    outputs = [f"y{i}" for i in range(k)]
    node = helper.make_node("Split", ["x"], outputs, axis=1, num_outputs=k)
    graph = helper.make_graph([node], "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, n])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    x = np.arange(2 * n, dtype=np.float32).reshape(2, n)
    want = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])).run(None, {"x": x})
    got = OnnxSplitInto(1, k)(torch.from_numpy(x))
    assert [g.numpy().tolist() for g in got] == [w.tolist() for w in want]


@pytest.mark.parametrize("opset", [18, 19, 20, 21])  # CastLike-15, -19, -19, -21; Gelu from 20
def test_live_unoptimized_dynamo_export_converts(tmp_path, opset):
    pytest.importorskip("onnxscript", reason="the torch dynamo exporter needs onnxscript, which is not installed")
    import sys

    sys.path.insert(0, str(DATA))
    import make_dynamo_models as make

    path = tmp_path / f"ops{opset}.onnx"
    make.export_dynamo(make.ops_net(seed=opset), path, optimize=False, opset_version=opset)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == opset
    assert RAW_OPS - ({"Gelu"} if opset < 20 else set()) <= _ops(path)
    _converts_and_repairs(path, tmp_path)
