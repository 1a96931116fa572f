"""Issue #13: the tool is safe to point at untrusted files (outputs as one checked set, settings
validated where they enter, loader errors in one line)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

import anp_onnx
from anp_onnx.cli import main
from anp_onnx.data import ImageSet, save_npz
from anp_onnx.errors import OutputError
from builders import command_files, random_images, tiny_model

TINY = ["--iterations", "2", "--batch-size", "16", "--device", "cpu", "--threshold", "0.2", "--refine", "none"]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int, contains: str = "") -> str:
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    assert "Traceback" not in out + err
    assert "PASSED" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("anp-onnx"), err
    assert contains in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return command_files(tmp_path_factory.mktemp("harden"))


@pytest.fixture
def out_dir(files: dict[str, Path], request: pytest.FixtureRequest) -> Path:
    d = files["root"] / request.node.name.replace("[", "_").replace("]", "")
    d.mkdir()
    return d


def _repair(files, out: Path, *extra: str) -> int:
    return main(["-q", "repair", str(files["model"]), "--data", str(files["clean"]), "--out", str(out), *TINY,
                 *extra])


# ----------------------------------------------------------------------------- 1. outputs distinct from inputs


def test_masks_out_equal_to_out_is_refused(files, out_dir, capsys) -> None:
    out = out_dir / "r.onnx"
    _one_line_error(capsys, _repair(files, out, "--masks-out", str(out)), "twice")
    assert list(out_dir.iterdir()) == []


def test_masks_out_naming_an_input_is_refused_even_with_overwrite(files, out_dir, capsys) -> None:
    before = {k: _sha(files[k]) for k in ("clean", "test", "poisoned", "model")}
    for name in ("clean", "test", "poisoned", "model"):
        rc = _repair(files, out_dir / "r.onnx", "--masks-out", str(files[name]), "--overwrite",
                     "--test", str(files["test"]), "--poisoned", str(files["poisoned"]))
        _one_line_error(capsys, rc, "input")
    # a report file named like an input, through a symlink
    link = out_dir / "r.report.json"
    link.symlink_to(files["clean"])
    _one_line_error(capsys, _repair(files, out_dir / "r.onnx", "--overwrite"), "clean data")
    assert {k: _sha(files[k]) for k in before} == before
    assert [p.name for p in out_dir.iterdir()] == ["r.report.json"]


def test_prune_masks_file_is_an_input(files, out_dir, capsys) -> None:
    assert _repair(files, out_dir / "r.onnx") == 0
    capsys.readouterr()
    masks = out_dir / "r.masks.json"
    before = _sha(masks)
    _one_line_error(capsys, main(["prune", str(files["model"]), "--masks", str(masks), "--out", str(masks),
                                  "--overwrite"]), "masks file")
    assert _sha(masks) == before


# ----------------------------------------------------------------------------- 2. written as a set


@pytest.mark.parametrize("where", ["masks", "mask_values", "report"])
def test_failed_masks_or_report_leaves_nothing(files, out_dir, capsys, monkeypatch, where) -> None:
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    target = {"masks": "anp_onnx.finish.save_masks_json", "mask_values": "anp_onnx.finish.save_mask_values_txt",
              "report": "anp_onnx.report.plot_masks"}[where]
    monkeypatch.setattr(target, fail)
    _one_line_error(capsys, _repair(files, out_dir / "r.onnx"), "No space left on device")
    assert list(out_dir.iterdir()) == []


def test_failed_overwrite_of_the_set_keeps_every_old_file(files, out_dir, capsys, monkeypatch) -> None:
    assert _repair(files, out_dir / "r.onnx") == 0
    capsys.readouterr()
    before = {p.name: _sha(p) for p in out_dir.iterdir()}
    assert {"r.onnx", "r.masks.json", "r.mask_values.txt", "r.report.json", "r.report.md"} <= set(before)

    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("anp_onnx.report.plot_masks", fail)
    _one_line_error(capsys, _repair(files, out_dir / "r.onnx", "--overwrite"), "Input/output error")
    assert {p.name: _sha(p) for p in out_dir.iterdir()} == before


def test_failed_move_into_place_restores_the_old_files(tmp_path: Path, monkeypatch) -> None:
    outputs = anp_onnx.outputs.OutputSet(overwrite=True)
    a, b = outputs.add_output(tmp_path / "a", "a"), outputs.add_output(tmp_path / "b", "b")
    a.write_text("old a")
    b.write_text("old b")
    real = os.replace
    with outputs.check():
        outputs.temp(a).write_text("new a")
        outputs.temp(b).write_text("new b")

        def replace(src, dst):
            if Path(dst) == b and Path(src).name == "b":  # the new b, not the old one back
                raise OSError(5, "Input/output error")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OutputError, match="nothing was written"):
            outputs.commit()
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_an_optional_output_not_written_again_is_removed_and_a_failure_puts_it_back(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """A re-export without a pruning curve must not leave the last export's curve plot beside the new report."""
    def outputs_with_old_files():
        outputs = anp_onnx.outputs.OutputSet(overwrite=True)
        plot = outputs.add_output(tmp_path / "a.curve.png", "curve plot", optional=True)  # removed first ...
        a = outputs.add_output(tmp_path / "a", "a")  # ... then a fails to move, the second time
        a.write_text("old a")
        plot.write_text("old plot")
        return outputs, a, plot

    outputs, a, plot = outputs_with_old_files()
    with outputs.check():
        outputs.temp(a).write_text("new a")  # the plot is not written this time
        assert outputs.commit() == [a]
    assert a.read_text() == "new a" and not plot.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    outputs, a, plot = outputs_with_old_files()
    real = os.replace

    def replace(src, dst):
        if Path(dst) == a and Path(src).name == "a":
            raise OSError(5, "Input/output error")
        return real(src, dst)

    with outputs.check():
        outputs.temp(a).write_text("new a")
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OutputError, match="nothing was written"):
            outputs.commit()
    assert (a.read_text(), plot.read_text()) == ("old a", "old plot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.curve.png"]


# ----------------------------------------------------------------------------- 3. unwritable folder, up front


def test_unwritable_output_folder_is_refused_before_any_work(files, out_dir, capsys, monkeypatch) -> None:
    masks_dir = out_dir / "masks"
    masks_dir.mkdir()
    for make in ("mkstemp", "mkdtemp"):  # root ignores permissions: the folder refuses new files instead
        real = getattr(tempfile, make)

        def refuse(*args, _real=real, **kwargs):
            if Path(kwargs.get("dir") or "").resolve() == masks_dir.resolve():
                raise PermissionError(13, "Permission denied")
            return _real(*args, **kwargs)

        monkeypatch.setattr(tempfile, make, refuse)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was converted before the output folder was checked")

    monkeypatch.setattr("anp_onnx.api.open_context", no_work)
    line = _one_line_error(capsys, _repair(files, out_dir / "r.onnx", "--masks-out", str(masks_dir / "m.json")),
                           "Permission denied")
    assert str(masks_dir) in line
    assert list(out_dir.iterdir()) == [masks_dir] and list(masks_dir.iterdir()) == []


# ----------------------------------------------------------------------------- 4. numbers validated where they enter


@pytest.mark.parametrize("option", ["--eps", "--targeted-eps", "--mask-lr", "--alpha", "--momentum", "--max-drop",
                                    "--signal-max-drop", "--holdout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_refuses_non_finite_numbers(files, out_dir, capsys, option, value) -> None:
    rc = _repair(files, out_dir / "r.onnx", f"{option}={value}")
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err and "PASSED" not in out
    assert option in err and "finite" in err, err
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("field", ["eps", "targeted_eps", "mask_lr", "alpha", "momentum"])
def test_anp_config_refuses_nan_and_infinity(field) -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(anp_onnx.SettingsError, match=field):
            anp_onnx.ANPConfig(**{field: value})
    with pytest.raises(anp_onnx.SettingsError):
        anp_onnx.ANPConfig(iterations=float("nan"))
    with pytest.raises(anp_onnx.SettingsError):
        anp_onnx.ANPConfig(steps=1.5)


def test_curve_settings_refuse_nan() -> None:
    from anp_onnx.options import CurveSettings

    for kwargs in ({"max_drop": float("nan")}, {"signal_max_drop": float("inf")}, {"max_fraction": float("nan")}):
        with pytest.raises(anp_onnx.SettingsError):
            CurveSettings(**kwargs)


def test_diverged_optimisation_writes_nothing(files, out_dir, monkeypatch) -> None:
    from anp_onnx.anp import ANPStage

    real = ANPStage.run

    def nan_run(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        for values in result.masks.values():
            values[:] = np.nan
        return result

    monkeypatch.setattr(ANPStage, "run", nan_run)
    with pytest.raises(anp_onnx.SettingsError, match="diverged"):
        anp_onnx.repair(files["model"], files["clean"], out=out_dir / "r.onnx",
                        config=anp_onnx.ANPConfig(iterations=2, batch_size=16, device="cpu"),
                        pruning=anp_onnx.PruneSpec.threshold(0.2), refinements=())
    assert list(out_dir.iterdir()) == []


@pytest.fixture(scope="module")
def masks_doc(files) -> dict:
    folder = files["root"] / "masks_source"
    folder.mkdir()
    assert _repair(files, folder / "r.onnx", "--no-report") == 0
    return json.loads((folder / "r.masks.json").read_text())


def _broken(doc: dict, change) -> dict:
    doc = json.loads(json.dumps(doc))
    change(doc["layers"][0])
    return doc


@pytest.mark.parametrize("what, change", [
    ("nan mask", lambda layer: layer["mask"].__setitem__(0, float("nan"))),
    ("infinite mask", lambda layer: layer["mask"].__setitem__(1, float("inf"))),
    ("string mask", lambda layer: layer["mask"].__setitem__(0, "keep")),
    ("nested mask", lambda layer: layer.__setitem__("mask", [layer["mask"]])),
    ("short mean_mask", lambda layer: layer.__setitem__("mean_mask", layer["mask"][:-1])),
    ("nan mean_mask", lambda layer: layer.__setitem__("mean_mask", [float("nan")] * len(layer["mask"]))),
    ("short centre", lambda layer: layer.__setitem__("centre", layer["mask"][:-2])),
    ("no name", lambda layer: layer.pop("name")),
])
def test_bad_masks_file_is_one_line(files, out_dir, capsys, masks_doc, what, change) -> None:
    bad = out_dir / "bad.masks.json"
    doc = _broken(masks_doc, change)
    if "centre" in what:
        doc["layers"][0]["spread"] = doc["layers"][0]["centre"]
    bad.write_text(json.dumps(doc))  # json.dumps writes NaN/Infinity: what an attacker's file may hold
    rc = main(["prune", str(files["model"]), "--masks", str(bad), "--out", str(out_dir / "p.onnx")])
    line = _one_line_error(capsys, rc, str(bad))
    assert "masks file" in line
    assert not (out_dir / "p.onnx").exists()


def test_masks_txt_with_nan_is_refused(files, out_dir, capsys) -> None:
    bad = out_dir / "bad.mask_values.txt"
    bad.write_text("No \t Layer Name \t Neuron Idx \t Mask Score \n0 \t /features/features.1/BatchNormalization "
                   "\t 0 \t nan \n")
    _one_line_error(capsys, main(["prune", str(files["model"]), "--masks", str(bad), "--out",
                                  str(out_dir / "p.onnx")]), "finite")


def test_masks_dict_with_nan_is_refused(files, out_dir) -> None:
    rep = anp_onnx.Repairer.open(files["model"])
    masks = {layer.name: np.full(layer.size, np.nan, dtype=np.float32) for layer in rep.layers}
    with pytest.raises(anp_onnx.DataError, match="NaN"):
        anp_onnx.prune(files["model"], masks, out=out_dir / "p.onnx", pruning=anp_onnx.PruneSpec.count(2))
    assert list(out_dir.iterdir()) == []


# ----------------------------------------------------------------------------- 5. the attack's target


@pytest.fixture(scope="module")
def backdoor(tmp_path_factory) -> dict[str, Path]:
    """An original model and another one marked as repaired by anp-onnx (its metadata)."""
    import onnx

    root = tmp_path_factory.mktemp("target")
    model = tiny_model(root / "original.onnx", seed=0)
    proto = onnx.load(str(tiny_model(root / "other.onnx", seed=5)))
    onnx.helper.set_model_props(proto, {"anp_onnx.pruned": json.dumps({"mode": "count", "value": 1})})
    repaired = root / "repaired.onnx"
    onnx.save_model(proto, str(repaired))
    triggered = random_images(60, seed=7)
    save_npz(ImageSet(triggered.x, (np.arange(60) % 10).astype(np.int64)), root / "triggered.npz")
    return {"model": model, "repaired": repaired, "triggered": root / "triggered.npz"}


def test_evaluate_repaired_model_without_target_asks_for_it(backdoor, capsys) -> None:
    rc = main(["evaluate", str(backdoor["repaired"]), "--poisoned", str(backdoor["triggered"])])
    _one_line_error(capsys, rc, "--target")


def test_evaluate_takes_the_target_from_the_original(backdoor, capsys) -> None:
    original = anp_onnx.evaluate_model(backdoor["model"], poisoned=backdoor["triggered"])
    got = anp_onnx.evaluate_model(backdoor["repaired"], poisoned=backdoor["triggered"], original=backdoor["model"])
    assert got.target == original.target and got.target_inferred
    given = anp_onnx.evaluate_model(backdoor["repaired"], poisoned=backdoor["triggered"], target=original.target)
    assert got.asr == given.asr
    assert main(["evaluate", str(backdoor["repaired"]), "--poisoned", str(backdoor["triggered"]),
                 "--original", str(backdoor["model"])]) == 0
    assert "inferred from the original model's predictions" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 6. loaders


def test_external_data_behind_a_symlink_outside_the_folder_is_not_read(tmp_path: Path, capsys) -> None:
    import onnx

    secret_dir, model_dir = tmp_path / "elsewhere", tmp_path / "model"
    secret_dir.mkdir()
    model_dir.mkdir()
    proto = onnx.load(str(tiny_model(tmp_path / "plain.onnx", seed=3)))
    onnx.save_model(proto, str(secret_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    os.replace(secret_dir / "model.onnx", model_dir / "model.onnx")
    (model_dir / "weights.bin").symlink_to(secret_dir / "weights.bin")
    line = _one_line_error(capsys, main(["inspect", str(model_dir / "model.onnx")]), "outside the model's folder")
    assert "weights.bin" in line


def test_npy_named_npz_is_one_line(files, out_dir, capsys) -> None:
    fake = out_dir / "images.npz"
    with open(fake, "wb") as f:
        np.save(f, np.zeros((4, 16, 16, 3), dtype=np.uint8))
    _one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(fake)]), "not an .npz archive")


# ----------------------------------------------------------------------------- 7. zero-size images


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (and no image data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("shape, dtype, says", [
    ((0, 16, 16, 3), np.uint8, "no images"),
    ((5, 0, 0, 3), np.uint8, "zero"),
    ((5, 0, 0, 3), np.float32, "zero"),
    ((5, 3, 0, 16), np.float32, "zero"),
    ((5, 16, 16, 0), np.uint8, "zero"),
], ids=["no_images", "uint8_0x0", "float_0x0", "float_zero_height", "no_channels"])
def test_zero_size_images_in_npz_are_one_line(files, out_dir, capsys, shape, dtype, says) -> None:
    bad = out_dir / "empty.npz"
    np.savez(bad, x=np.zeros(shape, dtype), y=np.zeros(shape[0], np.int64))
    line = _one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(bad)]), str(bad))
    assert says in line


@pytest.mark.parametrize("what, content, says", [
    ("empty file", b"", "empty (0 bytes)"),
    ("0x0 png", _png_header_only(0, 0), "cannot decode"),
], ids=["empty_file", "png_0x0"])
def test_zero_size_image_files_are_one_line(files, out_dir, capsys, what, content, says) -> None:
    for label in ("0", "1"):
        (out_dir / "data" / label).mkdir(parents=True)
    (out_dir / "data" / "0" / "bad.png").write_bytes(content)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(out_dir / "data" / "1" / "good.png")
    line = _one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(out_dir / "data")]),
                           str(out_dir / "data" / "0" / "bad.png"))
    assert says in line


def test_folder_of_large_images_is_decoded_one_at_a_time(tmp_path) -> None:
    """Memory holds the resized set and one decoded file, not every decoded file (camera photos)."""
    import tracemalloc

    from PIL import Image

    n, side = 24, 256
    rng = np.random.default_rng(0)
    for i in range(n):
        (tmp_path / str(i % 2)).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(tmp_path / str(i % 2) / f"{i}.png")
    tracemalloc.start()
    try:
        images = anp_onnx.load_images(tmp_path, size=(16, 16), channels=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert images.x.shape == (n, 3, 16, 16)
    assert peak < n * side * side * 3, peak  # below the decoded files' bytes, let alone their floats


def test_image_set_refuses_zero_height_or_width() -> None:
    with pytest.raises(anp_onnx.DataError, match="zero"):
        ImageSet(np.zeros((2, 3, 0, 4), np.float32), np.zeros(2, np.int64), source="made")
    assert len(ImageSet(np.zeros((0, 3, 4, 4), np.float32), np.zeros(0, np.int64))) == 0  # no images is a set


# ----------------------------------------------------------------------------- 8. absurd input dimensions


def _declared_input_model(path: Path, dims: list) -> Path:
    """A valid model (mean over C, H, W -> 10 logits) whose input declares ``dims``; output shape unknown."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1, 10), np.float32), "w")
    axes = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
         helper.make_node("Flatten", ["m"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
        "declared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])], [w, axes])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("dims, says", [
    ([1, 3, 10**9, 10**9], "height"),
    (["N", 3, 10**9, 32], "height"),
    ([1, 10**9, 32, 32], "channels"),
    (["N", 10**9, "H", "W"], "channels"),
    ([10**9, 3, 32, 32], "fixed batch"),
    ([1, 3, 12000, 12000], "values per image"),
])
def test_absurd_input_dimensions_are_refused_before_any_allocation(tmp_path, capsys, monkeypatch, dims, says) -> None:
    model = _declared_input_model(tmp_path / "huge.onnx", dims)

    def no_session(*args, **kwargs):
        raise AssertionError("onnxruntime ran before the input dimensions were checked")

    monkeypatch.setattr("anp_onnx.model.make_session", no_session)
    line = _one_line_error(capsys, main(["inspect", str(model)]), "input")
    assert says in line and str(model) in line


def test_a_large_but_sane_input_still_loads(tmp_path) -> None:
    loaded = anp_onnx.load_model(_declared_input_model(tmp_path / "big.onnx", ["N", 3, 1024, 1024]))
    assert loaded.input.size == (1024, 1024) and loaded.num_classes == 10


# ----------------------------------------------------------------------------- 9. NaN / infinite weights


@pytest.fixture(scope="module")
def damaged(files) -> dict[str, Path]:
    """Copies of the tiny model with NaN and infinite weights (in a conv, a BatchNorm and the classifier)."""
    import onnx
    from onnx import numpy_helper

    def damage(name: str, change: dict) -> Path:
        proto = onnx.load(str(files["model"]))
        for t in proto.graph.initializer:
            if t.name in change:
                a = numpy_helper.to_array(t).copy()
                a.flat[0] = change[t.name]
                t.CopyFrom(numpy_helper.from_array(a, t.name))
        path = files["root"] / f"{name}.onnx"
        onnx.save_model(proto, str(path))
        return path

    return {"nan": damage("nan_weights", {"features.0.weight": np.nan}),
            "inf": damage("inf_weights", {"head.2.bias": np.inf, "features.4.weight": -np.inf}),
            "nan_bn": damage("nan_bn", {"features.1.running_var": np.nan})}


@pytest.mark.parametrize("which, names", [("nan", ["features.0.weight"]), ("inf", ["features.4.weight", "head.2.bias"]),
                                          ("nan_bn", ["features.1.running_var"])])
@pytest.mark.parametrize("command", ["inspect", "evaluate", "repair"])
def test_non_finite_weights_are_named(files, damaged, out_dir, capsys, which, names, command) -> None:
    args = {"inspect": ["inspect", str(damaged[which])],
            "evaluate": ["evaluate", str(damaged[which]), "--data", str(files["test"])],
            "repair": ["repair", str(damaged[which]), "--data", str(files["clean"]), "--out", str(out_dir / "r.onnx"),
                       *TINY]}[command]
    line = _one_line_error(capsys, main(args), str(damaged[which]))
    assert all(name in line for name in names), line
    assert ("NaN" if which != "inf" else "infinite") in line and "conversion" not in line
    assert list(out_dir.iterdir()) == []


def test_infinite_constant_that_the_model_handles_is_accepted(tmp_path) -> None:
    """-inf is a legitimate fill value (a Max with -inf is the identity): only weights are checked."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Max", ["f", "lowest"], ["g"]), helper.make_node("Gemm", ["g", "w", "b"], ["y"])],
        "fill", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array([-np.inf], np.float32), "lowest"),
         numpy_helper.from_array(np.ones((3, 4), np.float32), "w"),
         numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    path = tmp_path / "fill.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    result = anp_onnx.evaluate_model(path, _images_npz(tmp_path, 8, 4))
    assert result.n_clean == 8


def _images_npz(root: Path, size: int, classes: int, n: int = 8) -> Path:
    path = root / "images.npz"
    save_npz(ImageSet(random_images(n, size=size).x, (np.arange(n) % classes).astype(np.int64)), path)
    return path


def test_nan_outputs_of_the_model_are_refused_not_counted(tmp_path, capsys) -> None:
    """A model that outputs NaN (here: Log of a negative number) is refused by evaluate, not scored."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "w", "b"], ["g"]), helper.make_node("Log", ["g"], ["y"])],
        "nan_out", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(-np.ones((3, 4), np.float32), "w"),
         numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    path = tmp_path / "nan_out.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    line = _one_line_error(capsys, main(["evaluate", str(path), "--data", str(_images_npz(tmp_path, 8, 4))]), str(path))
    assert "NaN or infinite" in line


# ----------------------------------------------------------------------------- 10. one class of clean data


def test_repair_on_one_class_is_refused_before_any_work(files, out_dir, capsys, monkeypatch) -> None:
    one = out_dir / "one_class.npz"
    save_npz(ImageSet(random_images(40, seed=4).x, np.full(40, 3, np.int64)), one)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was checked for parity before the labels were")

    monkeypatch.setattr("anp_onnx.api.parity", no_work)
    rc = main(["-q", "repair", str(files["model"]), "--data", str(one), "--out", str(out_dir / "r.onnx"), *TINY])
    line = _one_line_error(capsys, rc, str(one))
    assert "only class 3" in line and "at least 2 classes" in line
    assert [p.name for p in out_dir.iterdir()] == ["one_class.npz"]


def test_optimize_on_one_class_is_refused(files) -> None:
    rep = anp_onnx.Repairer.open(files["model"])
    with pytest.raises(anp_onnx.DataError, match="only class 0"):
        rep.optimize(ImageSet(random_images(20).x, np.zeros(20, np.int64), source="made"),
                     anp_onnx.ANPConfig(iterations=1, batch_size=8, device="cpu"))


# ----------------------------------------------------------------------------- 11. Ctrl-C while starting


_BLOCK_TORCH = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits SIG_IGN)
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            print("importing torch", file=sys.stderr, flush=True)
            time.sleep(120)  # Ctrl-C arrives here, in the middle of the import
        return None
sys.meta_path.insert(0, Block())
from anp_onnx.cli import main  # must not import torch
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_torch_is_imported_is_one_line(files) -> None:
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _BLOCK_TORCH, "inspect", str(files["model"])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "importing torch\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    assert err == "anp-onnx: interrupted; nothing was written\n"
    assert out == "FAILED: interrupted\n"


def test_ctrl_c_while_the_library_loads_in_process(files, capsys, monkeypatch) -> None:
    import builtins
    import sys

    from anp_onnx import cli

    real = builtins.__import__

    def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "commands" and level == 1:
            raise KeyboardInterrupt
        return real(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "anp_onnx.cli.commands", raising=False)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert cli.main(["--json", "inspect", str(files["model"])]) == 130
    out, err = capsys.readouterr()
    assert (out, err) == ("", "anp-onnx: interrupted; nothing was written\nFAILED: interrupted\n")


# ---------------------------------------------------------------------- 12. found by the fuzzer (tests/test_fuzz.py)


def _lying_npz(path: Path, shape: tuple) -> Path:
    """An .npz whose x's .npy header claims ``shape`` (uint8) with almost no data behind it."""
    import zipfile

    header = repr({"descr": "|u1", "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * (64 - (10 + len(header) + 1) % 64) + b"\n"
    labels = io_bytes(np.zeros(3, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 64)
        z.writestr("y.npy", labels)
    return path


def io_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_npz_header_claiming_terabytes_is_refused_before_reading(files, out_dir, capsys) -> None:
    bad = _lying_npz(out_dir / "lying.npz", (10**6, 10**6))
    line = _one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(bad)]), str(bad))
    assert "GiB" in line and "(1000000, 1000000)" in line


def test_damaged_compressed_npz_is_one_line(files, out_dir, capsys) -> None:
    good = out_dir / "good.npz"
    save_npz(random_images(8, seed=3), good)
    data = bytearray(good.read_bytes())
    data[55] ^= 0xFF  # inside x's deflate stream: zlib.error, not an OSError
    bad = out_dir / "bad.npz"
    bad.write_bytes(bytes(data))
    _one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(bad)]), "cannot read")


@pytest.mark.parametrize("text", ['{"layers": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                  '{"layers": [{"name": "a", "mask": [' + "1" * 400 + "]}]}"],
                         ids=["nested_deeply", "integer_too_large"])
def test_masks_files_that_broke_the_json_reader_are_one_line(files, out_dir, capsys, text) -> None:
    bad = out_dir / "bad.masks.json"
    bad.write_text(text)
    rc = main(["prune", str(files["model"]), "--masks", str(bad), "--out", str(out_dir / "p.onnx")])
    assert "masks file" in _one_line_error(capsys, rc, str(bad))


def test_masks_document_keys_do_not_pose_as_layer_facts(files, out_dir, capsys, masks_doc) -> None:
    """Top-level "centres"/"mean_masks" are not the facts read from the layers (prune crashed on them)."""
    doc = json.loads(json.dumps(masks_doc))
    for layer in doc["layers"]:
        layer.pop("centre", None), layer.pop("spread", None), layer.pop("mean_mask", None)
    doc.update(centres="not statistics", mean_masks=3)
    masks = out_dir / "odd.masks.json"
    masks.write_text(json.dumps(doc))
    assert main(["-q", "prune", str(files["model"]), "--masks", str(masks), "--count", "2",
                 "--out", str(out_dir / "p.onnx")]) == 0, capsys.readouterr()


def test_out_of_memory_while_loading_images_is_one_line(files, capsys, monkeypatch) -> None:
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("anp_onnx.data.load_npz", exhausted)
    line = _one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(files["test"])]),
                           str(files["test"]))
    assert "not enough memory" in line


def _mismatched_gemm_model(path: Path, output_dims: list) -> Path:
    """Valid to onnx.checker, but its Gemm reads 5 features where the pooled input has 3: it cannot run."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "w", "b"], ["g"], transB=1), helper.make_node("Shape", ["g"], ["s"]),
         helper.make_node("Reshape", ["g", "s"], ["y"])],  # a shape inference cannot follow: classes unknown
        "mismatch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_dims)],
        [numpy_helper.from_array(np.ones((4, 5), np.float32), "w"),
         numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_a_model_onnxruntime_cannot_run_is_one_line(tmp_path, capsys) -> None:
    probed = _mismatched_gemm_model(tmp_path / "probed.onnx", ["N", "K"])  # classes counted by running it
    _one_line_error(capsys, main(["inspect", str(probed)]), "cannot run the model")
    declared = _mismatched_gemm_model(tmp_path / "declared.onnx", ["N", 4])  # runs first in evaluate
    line = _one_line_error(capsys, main(["evaluate", str(declared), "--data", str(_images_npz(tmp_path, 8, 4))]),
                           str(declared))
    assert "fails to run the model" in line


def test_external_data_location_with_a_nul_byte_is_one_line(tmp_path, capsys) -> None:
    import onnx

    proto = onnx.load(str(tiny_model(tmp_path / "plain.onnx", seed=3)))
    tensor = proto.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights\x00.bin"
    path = tmp_path / "nul.onnx"
    path.write_bytes(proto.SerializeToString())
    _one_line_error(capsys, main(["inspect", str(path)]), "not a usable path")


def test_image_larger_than_decodable_is_refused_from_its_header(files, out_dir, capsys) -> None:
    for label in ("0", "1"):
        (out_dir / "data" / label).mkdir(parents=True)
        (out_dir / "data" / label / "big.png").write_bytes(_png_header_only(9000, 9000))  # 81 M pixels, no data
    line = _one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(out_dir / "data")]),
                           "9000x9000 pixels")
    assert "big.png" in line


# ---------------------------------------------------------------------- 13. Ctrl-C and hostile inputs, end to end


def test_ctrl_c_while_the_outputs_are_moved_keeps_every_old_file(tmp_path: Path, monkeypatch) -> None:
    """A KeyboardInterrupt between two moves: the set is rolled back as for an OSError (the old b was
    in the temporary folder at that moment, which is then deleted)."""
    outputs = anp_onnx.outputs.OutputSet(overwrite=True)
    a, b = outputs.add_output(tmp_path / "a", "a"), outputs.add_output(tmp_path / "b", "b")
    a.write_text("old a")
    b.write_text("old b")
    real = os.replace
    with pytest.raises(KeyboardInterrupt):
        with outputs.check():
            outputs.temp(a).write_text("new a")
            outputs.temp(b).write_text("new b")

            def replace(src, dst):
                if Path(dst) == b and Path(src).name == "b":
                    raise KeyboardInterrupt
                return real(src, dst)

            monkeypatch.setattr(os, "replace", replace)
            outputs.commit()
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_ctrl_c_during_anp_writes_nothing(files, out_dir, capsys, monkeypatch) -> None:
    from anp_onnx.anp import ANPStage

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ANPStage, "run", interrupted)
    assert _repair(files, out_dir / "r.onnx") == 130
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == "anp-onnx: interrupted; nothing was written" and "Traceback" not in err
    assert out.splitlines()[-1].startswith("FAILED: ") and out.endswith("(interrupted)\n")
    assert list(out_dir.iterdir()) == []


class _Marker:
    """Unpickling this would create ``path``: an .npz must never be unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_npz_is_refused_without_unpickling(files, out_dir, capsys) -> None:
    marker = out_dir / "unpickled"
    bad = out_dir / "pickled.npz"
    x = np.empty(4, dtype=object)
    x[:] = [_Marker(str(marker))] * 4
    np.savez(bad, x=x, y=np.arange(4))
    line = _one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(bad)]), str(bad))
    assert "allow_pickle" in line
    assert not marker.exists()


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_external_data_outside_the_folder_by_path_is_not_read(tmp_path: Path, capsys, where) -> None:
    import onnx

    secret_dir, model_dir = tmp_path / "secret", tmp_path / "model"
    secret_dir.mkdir()
    model_dir.mkdir()
    proto = onnx.load(str(tiny_model(tmp_path / "plain.onnx", seed=3)))
    onnx.save_model(proto, str(secret_dir / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    written = onnx.load(str(secret_dir / "m.onnx"), load_external_data=False)
    location = "../secret/weights.bin" if where == "parent" else str(secret_dir / "weights.bin")
    for tensor in written.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (model_dir / "model.onnx").write_bytes(written.SerializeToString())
    line = _one_line_error(capsys, main(["inspect", str(model_dir / "model.onnx")]), "outside the model's folder")
    assert "weights.bin" in line


# ----------------------------------------------------------------------------- 14. numbers that crash native libraries


@pytest.mark.parametrize("op, attribute, values", [
    ("Conv", "strides", [0, 0]),        # onnx's shape inference: SIGFPE
    ("Conv", "pads", [-1, -1, -1, -1]),  # onnxruntime: the process died
    ("Conv", "group", 0),
    ("MaxPool", "strides", [0, 0]),     # onnx's shape inference: SIGFPE
], ids=["conv_stride_0", "conv_negative_pads", "conv_group_0", "maxpool_stride_0"])
def test_window_attributes_that_crash_native_libraries_are_refused(tmp_path, op, attribute, values) -> None:
    """Run in a child process: before the fix the process died of a signal, which no test could catch."""
    import subprocess
    import sys

    import onnx

    proto = onnx.load(str(tiny_model(tmp_path / "plain.onnx", seed=3)))
    if op == "MaxPool":
        relu = next(i for i, n in enumerate(proto.graph.node) if n.op_type == "Relu")
        node = proto.graph.node[relu]
        pooled = onnx.helper.make_node("MaxPool", [node.output[0]], ["pooled"], kernel_shape=[1, 1], strides=[1, 1])
        for later in proto.graph.node[relu + 1:]:
            later.input[:] = ["pooled" if i == node.output[0] else i for i in later.input]
        proto.graph.node.insert(relu + 1, pooled)
    target = next(n for n in proto.graph.node if n.op_type == op)
    attr = next(a for a in target.attribute if a.name == attribute)
    if isinstance(values, list):
        attr.ints[:] = values
    else:
        attr.i = values
    path = tmp_path / "damaged.onnx"
    onnx.save_model(proto, str(path))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "anp_onnx", "inspect", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stderr.splitlines() == [done.stderr.splitlines()[0]] and attribute in done.stderr
    assert str(path) in done.stderr and "Traceback" not in done.stderr
