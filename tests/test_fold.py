"""Tests for folding a pruning plan into the original ONNX model and writing it (anp_onnx.writeback, anp_onnx.export, Repairer.export)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

import anp_onnx
from anp_onnx import PruneSpec, Repairer
from anp_onnx.convert import torch_logits
from anp_onnx.data import ImageSet
from anp_onnx.errors import DataError, OutputError
from anp_onnx.masks_io import file_sha256
from builders import random_images, tiny_model, torch_with_plan

USER_METADATA = [("author", "alice"), ("license", "MIT")]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _masks(rep: Repairer, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer.name: rng.random(layer.size).astype(np.float32) for layer in rep.layers}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A tiny Conv-BN model with user metadata, alone in its folder."""
    folder = tmp_path / "src"
    folder.mkdir()
    path = tiny_model(folder / "model.onnx", seed=1)
    model = onnx.load(str(path))
    for key, value in USER_METADATA:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# ----------------------------------------------------------------------------- what the written file holds


@pytest.mark.parametrize("opset", [13, 17])
def test_written_model_keeps_everything_but_pruned_values(tmp_path: Path, outdir: Path, opset: int) -> None:
    src = tiny_model(tmp_path / f"m{opset}.onnx", seed=1, opset=opset)
    original = onnx.load(str(src))
    prop = original.metadata_props.add()
    prop.key, prop.value = "author", "alice"
    onnx.save_model(original, str(src))
    original = onnx.load(str(src))
    before = src.read_bytes()

    rep = Repairer.open(src)
    assert [layer.size for layer in rep.layers] == [8, 16]
    masks = _masks(rep)
    plan = rep.plan(masks, PruneSpec.count(5))
    expected_idx = sorted(((name, i) for name, v in masks.items() for i in range(len(v))),
                          key=lambda ni: masks[ni[0]][ni[1]])[:5]
    assert sorted((n, int(i)) for n, idx in plan.pruned.items() for i in idx) == sorted(expected_idx)

    out = outdir / "repaired.onnx"
    result = rep.export(plan, out)
    assert src.read_bytes() == before
    assert result.path == out and result.files == [out] and 0 <= result.max_abs_diff < 1e-4  # always verified
    scale_of = {layer.name: layer.param("scale") for layer in rep.layers}
    bias_of = {layer.name: layer.param("bias") for layer in rep.layers}
    changed = sorted(scale_of[name] for name, idx in plan.pruned.items() if len(idx))
    assert result.changed_initializers == changed

    written = onnx.load(str(out))
    assert list(written.graph.node) == list(original.graph.node)
    assert list(written.graph.input) == list(original.graph.input)
    assert list(written.graph.output) == list(original.graph.output)
    assert list(written.graph.value_info) == list(original.graph.value_info)
    assert written.graph.name == original.graph.name
    assert list(written.opset_import) == list(original.opset_import)
    assert (written.ir_version, written.producer_name, written.producer_version, written.domain,
            written.model_version, written.doc_string) == (
        original.ir_version, original.producer_name, original.producer_version, original.domain,
        original.model_version, original.doc_string)

    old, new = _inits(original), _inits(written)
    assert [t.name for t in written.graph.initializer] == [t.name for t in original.graph.initializer]
    for name, tensor in old.items():
        if name in changed:
            continue
        assert new[name].SerializeToString() == tensor.SerializeToString(), name
    for layer, idx in plan.pruned.items():
        scale_name = scale_of[layer]
        a, b = numpy_helper.to_array(old[scale_name]), numpy_helper.to_array(new[scale_name])
        assert (new[scale_name].data_type, list(new[scale_name].dims)) == (old[scale_name].data_type,
                                                                          list(old[scale_name].dims))
        keep = np.ones(a.size, dtype=bool)
        keep[idx] = False
        assert np.all(b[idx] == 0.0)
        assert b[keep].tobytes() == a[keep].tobytes()
        assert np.count_nonzero(b == 0) == len(idx)
        assert new[bias_of[layer]].SerializeToString() == old[bias_of[layer]].SerializeToString()

    meta = {p.key: p.value for p in written.metadata_props}
    keys = [p.key for p in written.metadata_props]
    assert len(keys) == len(set(keys))
    assert keys[0] == "author" and meta["author"] == "alice"
    assert meta["anp_onnx.version"] == anp_onnx.__version__
    assert json.loads(meta["anp_onnx.pruned"]) == plan.to_dict()
    assert json.loads(meta["anp_onnx.preprocessing"]) == {"mean": None, "std": None, "scale": 1.0}
    assert meta["anp_onnx.layout"] == "NCHW"
    assert meta["anp_onnx.source_sha256"] == _sha(src)
    assert {k for k in keys if k.startswith("anp_onnx.")} >= {
        "anp_onnx.version", "anp_onnx.date", "anp_onnx.pruned", "anp_onnx.preprocessing"}


def test_export_does_not_touch_the_loaded_model(source: Path, outdir: Path) -> None:
    rep = Repairer.open(source)
    in_memory = rep.model.proto.SerializeToString()
    plan = rep.plan(_masks(rep), PruneSpec.count(6))
    rep.export(plan, outdir / "a.onnx")
    assert rep.model.proto.SerializeToString() == in_memory
    # a second, different plan from the same Repairer starts from the original values again
    plan2 = rep.plan(_masks(rep, seed=9), PruneSpec.count(2))
    rep.export(plan2, outdir / "b.onnx")
    b = _inits(onnx.load(str(outdir / "b.onnx")))
    zeros = sum(int(np.count_nonzero(numpy_helper.to_array(b[layer.param("scale")]) == 0))
                for layer in rep.layers)
    assert zeros == 2


def test_user_metadata_kept_and_anp_entries_replaced_on_re_repair(source: Path, outdir: Path) -> None:
    rep = Repairer.open(source)
    first = rep.plan(_masks(rep), PruneSpec.count(3))
    rep.export(first, outdir / "once.onnx")
    rep2 = Repairer.open(outdir / "once.onnx")
    second = rep2.plan(_masks(rep2, seed=5), PruneSpec.count(4))
    rep2.export(second, outdir / "twice.onnx", metadata={"note": "second pass"})
    props = [(p.key, p.value) for p in onnx.load(str(outdir / "twice.onnx")).metadata_props]
    keys = [k for k, _ in props]
    assert len(keys) == len(set(keys))
    assert props[:2] == USER_METADATA
    meta = dict(props)
    assert json.loads(meta["anp_onnx.pruned"]) == second.to_dict()
    assert meta["anp_onnx.note"] == "second pass"
    assert meta["anp_onnx.source_sha256"] == file_sha256(outdir / "once.onnx")


def test_written_model_matches_pruned_torch_and_differs_from_original(source: Path, outdir: Path) -> None:
    rep = Repairer.open(source)
    plan = rep.plan(_masks(rep, seed=2), PruneSpec.count(7))
    assert plan.count == 7
    images = random_images(20, seed=3)
    out = outdir / "r.onnx"
    result = rep.export(plan, out, verify_images=images)
    onnx.checker.check_model(str(out))
    assert result.max_abs_diff is not None and 0.0 <= result.max_abs_diff <= 1e-4

    got = _ort(out, images.x)
    want = torch_with_plan(rep, plan, images.x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    original = _ort(source, images.x)
    assert float(np.max(np.abs(got - original))) > 1e-3
    # masks are back to 1 after the export: the torch model is the original again
    rep.net.eval()
    np.testing.assert_allclose(torch_logits(rep.net, images.x), original, atol=1e-4, rtol=0)


def test_pruning_nothing_writes_identical_values(source: Path, outdir: Path) -> None:
    rep = Repairer.open(source)
    plan = rep.plan(_masks(rep), PruneSpec.count(0))
    result = rep.export(plan, outdir / "same.onnx", verify_images=random_images(4))
    assert result.changed_initializers == []
    old, new = onnx.load(str(source)), onnx.load(str(outdir / "same.onnx"))
    assert [t.SerializeToString() for t in new.graph.initializer] == [
        t.SerializeToString() for t in old.graph.initializer]
    np.testing.assert_array_equal(_ort(outdir / "same.onnx", random_images(4).x), _ort(source, random_images(4).x))


def test_nhwc_model_export(tmp_path: Path, outdir: Path) -> None:
    src = tiny_model(tmp_path / "nhwc.onnx", nhwc=True, seed=2)
    rep = Repairer.open(src)
    assert rep.model.input.layout == "NHWC"
    plan = rep.plan(_masks(rep), PruneSpec.count(4))
    images = random_images(8, seed=1)
    rep.export(plan, outdir / "nhwc_r.onnx", verify_images=images)
    got = _ort(outdir / "nhwc_r.onnx", np.ascontiguousarray(images.x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, torch_with_plan(rep, plan, images.x), atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(outdir / "nhwc_r.onnx")).metadata_props}
    assert meta["anp_onnx.layout"] == "NHWC"


# ----------------------------------------------------------------------------- shared initializers


def shared_scale_model() -> onnx.ModelProto:
    """Two BatchNormalization nodes on the same input reading the SAME scale (and mean/var)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([1.5, 0.75, 2.0], np.float32), "scale"),
        numpy_helper.from_array(np.array([0.25, -0.5, 0.125], np.float32), "b1"),
        numpy_helper.from_array(np.array([-0.25, 0.5, 1.0], np.float32), "b2"),
        numpy_helper.from_array(rng.uniform(0.3, 0.6, 3).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.05, 0.1, 3).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "b1", "mean", "var"], ["y1"], name="bn1"),
        helper.make_node("BatchNormalization", ["x", "scale", "b2", "mean", "var"], ["y2"], name="bn2"),
        helper.make_node("GlobalAveragePool", ["y1"], ["p1"], name="pool1"),
        helper.make_node("GlobalAveragePool", ["y2"], ["p2"], name="pool2"),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flat1"),
        helper.make_node("Flatten", ["p2"], ["f2"], name="flat2"),
        helper.make_node("Concat", ["f1", "f2"], ["logits"], name="cat", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


SHARED_BUG = ("BUG: anp_onnx/graph.py InitializerEditor.write (line ~99) appends the copy of a shared "
              "initializer with graph.initializer.append(tensor), which stores a COPY of `tensor`; the new values "
              "are then written into the detached local `tensor`, so the node is re-pointed to an unpruned copy "
              "and the pruning is silently lost (export without verify_images writes an unpruned model; with "
              "verification it fails with ModelError). Fix: tensor = self.model.graph.initializer.add(); "
              "tensor.CopyFrom(original); tensor.name = new_name")


def _shared_images(n: int = 6) -> ImageSet:
    x = np.random.default_rng(1).random((n, 3, 4, 4), dtype=np.float32)
    return ImageSet(x, np.zeros(n, np.int64))


def test_shared_initializer_is_copied_for_the_pruned_node(tmp_path: Path, outdir: Path) -> None:
    src = tmp_path / "shared.onnx"
    onnx.save_model(shared_scale_model(), str(src))
    rep = Repairer.open(src)
    assert [layer.name for layer in rep.layers] == ["bn1", "bn2"]
    masks = {"bn1": np.array([0.0, 0.9, 0.8], np.float32), "bn2": np.array([0.7, 0.95, 0.6], np.float32)}
    plan = rep.plan(masks, PruneSpec.count(1))
    assert {k: v.tolist() for k, v in plan.pruned.items()} == {"bn1": [0], "bn2": []}
    images = _shared_images()
    out = outdir / "shared_r.onnx"
    result = rep.export(plan, out)

    original, written = onnx.load(str(src)), onnx.load(str(out))
    bn1, bn2 = written.graph.node[0], written.graph.node[1]
    copy_name = bn1.input[1]
    assert copy_name != "scale" and copy_name.startswith("scale_anp_")
    assert list(bn1.input) == ["x", copy_name, "b1", "mean", "var"]
    assert list(bn2.input) == list(original.graph.node[1].input) == ["x", "scale", "b2", "mean", "var"]
    # every other node is untouched, and only the copy was added
    for i in range(1, len(original.graph.node)):
        assert written.graph.node[i] == original.graph.node[i]
    assert [t.name for t in written.graph.initializer] == [t.name for t in original.graph.initializer] + [copy_name]
    new = _inits(written)
    for t in original.graph.initializer:
        assert new[t.name].SerializeToString() == t.SerializeToString()
    assert numpy_helper.to_array(new[copy_name]).tolist() == [0.0, 0.75, 2.0]
    assert result.changed_initializers == [copy_name]

    before, after = _ort(src, images.x), _ort(out, images.x)
    np.testing.assert_array_equal(after[:, 3:], before[:, 3:])  # second branch unchanged
    np.testing.assert_array_equal(after[:, 1:3], before[:, 1:3])
    np.testing.assert_allclose(after[:, 0], 0.25, atol=1e-6)  # pruned channel outputs beta
    assert float(np.max(np.abs(after[:, 0] - before[:, 0]))) > 0.1
    np.testing.assert_allclose(after, torch_with_plan(rep, plan, images.x), atol=1e-4, rtol=0)


def test_shared_initializer_export_passes_verification(tmp_path: Path, outdir: Path) -> None:
    src = tmp_path / "shared.onnx"
    onnx.save_model(shared_scale_model(), str(src))
    rep = Repairer.open(src)
    plan = rep.plan({"bn1": np.array([0.0, 0.9, 0.8], np.float32)}, PruneSpec.count(1))
    result = rep.export(plan, outdir / "v.onnx", verify_images=_shared_images())
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4


def test_shared_initializer_pruned_in_both_nodes(tmp_path: Path, outdir: Path) -> None:
    src = tmp_path / "shared.onnx"
    onnx.save_model(shared_scale_model(), str(src))
    rep = Repairer.open(src)
    masks = {"bn1": np.array([0.0, 0.9, 0.8], np.float32), "bn2": np.array([0.7, 0.95, 0.1], np.float32)}
    plan = rep.plan(masks, PruneSpec.count(2))
    assert {k: v.tolist() for k, v in plan.pruned.items()} == {"bn1": [0], "bn2": [2]}
    images = _shared_images()
    out = outdir / "both.onnx"
    rep.export(plan, out)
    written = onnx.load(str(out))
    vals = {t.name: numpy_helper.to_array(t).tolist() for t in written.graph.initializer}
    s1, s2 = written.graph.node[0].input[1], written.graph.node[1].input[1]
    assert s1 != s2
    assert vals[s1] == [0.0, 0.75, 2.0]
    assert vals[s2] == [1.5, 0.75, 0.0]
    after = _ort(out, images.x)
    np.testing.assert_allclose(after[:, 0], 0.25, atol=1e-6)
    np.testing.assert_allclose(after[:, 5], 1.0, atol=1e-6)
    np.testing.assert_allclose(after, torch_with_plan(rep, plan, images.x), atol=1e-4, rtol=0)


def test_shared_external_initializer_copy_goes_external_too(tmp_path: Path, outdir: Path) -> None:
    src_dir = tmp_path / "ext"
    src_dir.mkdir()
    src = src_dir / "shared.onnx"
    onnx.save_model(shared_scale_model(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    rep = Repairer.open(src)
    plan = rep.plan({"bn1": np.array([0.0, 0.9, 0.8], np.float32)}, PruneSpec.count(1))
    out = outdir / "s.onnx"
    rep.export(plan, out)
    raw = onnx.load(str(out), load_external_data=False)
    assert all(uses_external_data(t) for t in raw.graph.initializer)
    full = onnx.load(str(out))
    copy_name = full.graph.node[0].input[1]
    assert numpy_helper.to_array(_inits(full)[copy_name]).tolist() == [0.0, 0.75, 2.0]
    assert numpy_helper.to_array(_inits(full)["scale"]).tolist() == [1.5, 0.75, 2.0]


# ----------------------------------------------------------------------------- external data


@pytest.mark.parametrize("same_folder", [False, True])
def test_external_data_source(tmp_path: Path, same_folder: bool) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    proto = onnx.load(str(tiny_model(tmp_path / "plain.onnx", seed=3)))
    src = src_dir / "model.onnx"
    # save_model(save_as_external_data=True) rewrites the proto it is given: save a copy
    onnx.save_model(copy.deepcopy(proto), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    hashes = {p.name: _sha(p) for p in src_dir.iterdir()}
    assert set(hashes) == {"model.onnx", "weights.bin"}

    rep = Repairer.open(src)
    assert rep.model.external_tensors == frozenset(t.name for t in proto.graph.initializer)
    plan = rep.plan(_masks(rep, seed=4), PruneSpec.count(6))
    out_dir = src_dir if same_folder else tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "fixed.onnx"
    images = random_images(8, seed=5)
    result = rep.export(plan, out, verify_images=images)

    data = out_dir / "fixed.onnx.data"
    assert result.files == [out, data]
    expected = {"fixed.onnx", "fixed.onnx.data"} | ({"model.onnx", "weights.bin"} if same_folder else set())
    assert {p.name for p in out_dir.iterdir()} == expected
    assert {p.name: _sha(p) for p in src_dir.iterdir() if p.name in hashes} == hashes

    raw = onnx.load(str(out), load_external_data=False)
    assert len(raw.graph.initializer) == len(proto.graph.initializer)
    for t in raw.graph.initializer:
        assert uses_external_data(t), t.name
        assert {e.key: e.value for e in t.external_data}["location"] == "fixed.onnx.data"
    full = onnx.load(str(out))
    old = _inits(proto)
    for t in full.graph.initializer:
        if t.name not in result.changed_initializers:
            np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(old[t.name]))
    got = _ort(out, images.x)
    np.testing.assert_allclose(got, torch_with_plan(rep, plan, images.x), atol=1e-4, rtol=0)

    # overwriting writes a fresh data file (not appended to the old one)
    size = data.stat().st_size
    rep.export(plan, out, overwrite=True)
    assert data.stat().st_size == size
    np.testing.assert_allclose(_ort(out, images.x), got, atol=1e-6, rtol=0)
    assert {p.name: _sha(p) for p in src_dir.iterdir() if p.name in hashes} == hashes


DATA_FILE_BUG = ("BUG: the external data file <out>.data is never checked: outputs.save_model os.replace()s it "
                 "into place but the output checks (outputs.OutputSet) only cover <out> itself. "
                 "Fix: in Repairer.export, when tensors go external, refuse <out>.data if it resolves to one of "
                 "the source's external data files, and if it exists without overwrite")


def _external_source(tmp_path: Path, location: str) -> Path:
    folder = tmp_path / "ext"
    folder.mkdir()
    proto = onnx.load(str(tiny_model(tmp_path / "plain.onnx", seed=3)))
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return folder / "model.onnx"


def test_output_data_file_never_replaces_the_source_weights(tmp_path: Path) -> None:
    src = _external_source(tmp_path, "r.onnx.data")  # the source keeps its weights where r.onnx's would go
    hashes = {p.name: _sha(p) for p in src.parent.iterdir()}
    rep = Repairer.open(src)
    plan = rep.plan(_masks(rep), PruneSpec.count(5))
    try:
        rep.export(plan, src.parent / "r.onnx", overwrite=True)
    except OutputError:
        pass  # refusing is fine; corrupting the input is not
    assert {p.name: _sha(p) for p in src.parent.iterdir() if p.name in hashes} == hashes


def test_existing_output_data_file_without_overwrite_is_refused(tmp_path: Path, outdir: Path) -> None:
    src = _external_source(tmp_path, "weights.bin")
    (outdir / "r.onnx.data").write_bytes(b"someone else's file")
    rep = Repairer.open(src)
    with pytest.raises(OutputError):
        rep.export(rep.plan(_masks(rep), PruneSpec.count(5)), outdir / "r.onnx")
    assert (outdir / "r.onnx.data").read_bytes() == b"someone else's file"


# ----------------------------------------------------------------------------- output paths


def test_output_equal_to_input_is_refused(source: Path) -> None:
    rep = Repairer.open(source)
    plan = rep.plan(_masks(rep), PruneSpec.count(3))
    before = source.read_bytes()
    with pytest.raises(OutputError, match="input"):
        rep.export(plan, source)
    with pytest.raises(OutputError, match="input"):
        rep.export(plan, source, overwrite=True)
    (source.parent / "sub").mkdir()
    with pytest.raises(OutputError):
        rep.export(plan, source.parent / "sub" / ".." / source.name, overwrite=True)
    link = source.parent / "link.onnx"
    link.symlink_to(source)
    with pytest.raises(OutputError):
        rep.export(plan, link, overwrite=True)
    assert source.read_bytes() == before
    assert sorted(p.name for p in source.parent.iterdir()) == ["link.onnx", "model.onnx", "sub"]


def test_existing_output_without_overwrite_is_untouched(source: Path, outdir: Path) -> None:
    rep = Repairer.open(source)
    plan = rep.plan(_masks(rep), PruneSpec.count(3))
    out = outdir / "exists.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists"):
        rep.export(plan, out)
    assert out.read_bytes() == b"precious"
    assert [p.name for p in outdir.iterdir()] == ["exists.onnx"]

    rep.export(plan, out, overwrite=True)
    written = onnx.load(str(out))
    assert json.loads({p.key: p.value for p in written.metadata_props}["anp_onnx.pruned"]) == plan.to_dict()
    assert [p.name for p in outdir.iterdir()] == ["exists.onnx"]


def test_missing_output_folder_or_folder_as_output(source: Path, tmp_path: Path) -> None:
    rep = Repairer.open(source)
    plan = rep.plan(_masks(rep), PruneSpec.count(3))
    with pytest.raises(OutputError, match="does not exist"):
        rep.export(plan, tmp_path / "nope" / "r.onnx")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(OutputError, match="folder"):
        rep.export(plan, tmp_path, overwrite=True)


def test_no_temporary_files_after_success(source: Path, outdir: Path) -> None:
    rep = Repairer.open(source)
    rep.export(rep.plan(_masks(rep), PruneSpec.count(3)), outdir / "ok.onnx", verify_images=random_images(4))
    assert [p.name for p in outdir.iterdir()] == ["ok.onnx"]
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.onnx"]


def _failing_save(written: list):
    def save_model(model, f, *args, **kwargs):
        Path(f).write_bytes(b"half a model")  # a partial write, then the disk is full
        written.append(Path(f))
        raise OSError(28, "No space left on device")
    return save_model


def test_failed_write_leaves_nothing(source: Path, outdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = Repairer.open(source)
    plan = rep.plan(_masks(rep), PruneSpec.count(3))
    written: list[Path] = []
    monkeypatch.setattr(onnx, "save_model", _failing_save(written))
    with pytest.raises(OutputError, match="No space left on device"):
        rep.export(plan, outdir / "r.onnx")
    assert len(written) == 1 and written[0].parent.parent == outdir  # it wrote into a temporary folder
    assert list(outdir.iterdir()) == []


def test_failed_overwrite_keeps_old_output(source: Path, outdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rep = Repairer.open(source)
    plan = rep.plan(_masks(rep), PruneSpec.count(3))
    out = outdir / "r.onnx"
    out.write_bytes(b"previous result")
    monkeypatch.setattr(onnx, "save_model", _failing_save([]))
    with pytest.raises(OutputError):
        rep.export(plan, out, overwrite=True)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in outdir.iterdir()] == ["r.onnx"]


# ----------------------------------------------------------------------------- prune() from saved masks


def test_prune_from_saved_masks_matches_repairer_export(source: Path, outdir: Path, tmp_path: Path) -> None:
    rep = Repairer.open(source)
    sizes = [layer.size for layer in rep.layers]
    values = (np.random.default_rng(0).permutation(sum(sizes)) + 0.5) / sum(sizes)  # k/24 + 1/48: no value near 0.3
    masks = {rep.layers[0].name: values[:sizes[0]].astype(np.float32),
             rep.layers[1].name: values[sizes[0]:].astype(np.float32)}
    files = rep.save_masks(masks, tmp_path / "r.masks.json", {"note": "hand made"})
    assert files == [tmp_path / "r.masks.json", tmp_path / "r.mask_values.txt"]
    assert all(f.is_file() for f in files)
    spec = PruneSpec.threshold(0.3)
    ref_plan = rep.plan(masks, spec)
    assert ref_plan.count == 7  # 0.5/24 .. 6.5/24 <= 0.3 < 7.5/24
    rep.export(ref_plan, outdir / "ref.onnx")
    ref = onnx.load(str(outdir / "ref.onnx"))

    for name, masks_file in (("from_json", files[0]), ("from_txt", files[1])):
        out = outdir / f"{name}.onnx"
        plan, export = anp_onnx.prune(source, masks_file, out=out, pruning=spec)
        assert plan.to_dict() == ref_plan.to_dict()
        assert export.path == out and export.max_abs_diff is not None and export.max_abs_diff <= 1e-4
        got = onnx.load(str(out))
        assert [t.SerializeToString() for t in got.graph.initializer] == [
            t.SerializeToString() for t in ref.graph.initializer], name
        assert list(got.graph.node) == list(ref.graph.node)

    plan, _ = anp_onnx.prune(source, masks, out=outdir / "from_dict.onnx", pruning=spec)
    assert plan.to_dict() == ref_plan.to_dict()
    doc = json.loads(files[0].read_text())
    assert doc["note"] == "hand made" and doc["model"]["sha256"] == file_sha256(source)


def test_prune_with_masks_of_another_model_writes_nothing(source: Path, outdir: Path) -> None:
    with pytest.raises(DataError):
        anp_onnx.prune(source, {"not_a_layer": np.zeros(8)}, out=outdir / "x.onnx")
    with pytest.raises(DataError):
        anp_onnx.prune(source, {"/features/features.1/BatchNormalization": np.zeros(5)}, out=outdir / "x.onnx")
    assert list(outdir.iterdir()) == []


def test_prune_refuses_output_equal_to_input(source: Path) -> None:
    before = source.read_bytes()
    with pytest.raises(OutputError):
        anp_onnx.prune(source, {"/features/features.1/BatchNormalization": np.zeros(8)}, out=source,
                       overwrite=True)
    assert source.read_bytes() == before
    assert os.listdir(source.parent) == ["model.onnx"]
