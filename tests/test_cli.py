"""Tests for the command line (anp_onnx.cli.main), run in-process with real models and files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import anp_onnx
from anp_onnx.cli import main
from anp_onnx.data import ImageSet, save_image_folder, save_npz
from builders import command_files, random_images, tiny_model

REPO = Path(__file__).resolve().parents[1]
LAYER1 = "/features/features.1/BatchNormalization"
LAYER2 = "/features/features.4/BatchNormalization"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _bn_scale_zeros(path: Path) -> int:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return sum(int(np.count_nonzero(inits[n.input[1]] == 0))
               for n in model.graph.node if n.op_type == "BatchNormalization")


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _npz_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """What evaluate should see in a save_npz file: uint8 NHWC -> float NCHW in [0, 1]."""
    with np.load(path) as npz:
        x = npz["x"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return np.ascontiguousarray(x), npz["y"]


def _ort_predictions(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0].argmax(1)


def _no_neuron_model(path: Path) -> Path:
    """A valid 10-class image classifier with nothing to prune: pool -> flatten -> classifier MatMul."""
    w = numpy_helper.from_array(np.random.default_rng(0).random((3, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], name="flat"),
         helper.make_node("MatMul", ["f", "w"], ["logits"], name="fc")],
        "plain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return command_files(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def repaired(files: dict[str, Path]) -> dict:
    """One CLI repair run (tiny settings), shared by the tests that need its output."""
    out_dir = files["root"] / "repair"
    out_dir.mkdir()
    out = out_dir / "rep.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["-q", "repair", str(files["model"]), "--data", str(files["clean"]), "--out", str(out),
                   "--iterations", "5", "--batch-size", "16", "--device", "cpu", "--threshold", "0.2",
                   "--test", str(files["test"]),
                   "--poisoned", str(files["poisoned"])])
    return {"rc": rc, "out": out, "dir": out_dir, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


# ----------------------------------------------------------------------------- help and version


def test_top_level_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("inspect", "repair", "prune", "evaluate", "--version", "--verbose", "--quiet"):
        assert word in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"anp-onnx {anp_onnx.__version__}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 1
    assert "usage: anp-onnx" in capsys.readouterr().out


@pytest.mark.parametrize("command, options", [
    ("inspect", ["--json", "--data", "--layers", "--exclude-layers", "--layout", "--preprocess", "--no-renormalise"]),
    ("repair", ["--data", "--out", "--overwrite", "--masks-out", "--holdout", "--test", "--poisoned", "--target",
                "--iterations", "--batch-size", "--eps", "--steps", "--alpha", "--mask-lr", "--momentum",
                "--bn-mode", "--no-augment", "--crop-padding", "--project-noise", "--seed", "--device",
                "--threshold", "--count", "--fraction", "--layers", "--no-renormalise"]),
    ("prune", ["--masks", "--out", "--overwrite", "--data", "--threshold", "--count", "--fraction", "--preprocess"]),
    ("evaluate", ["--data", "--poisoned", "--target", "--json", "--layout", "--preprocess"]),
])
def test_subcommand_help(capsys: pytest.CaptureFixture[str], command: str, options: list[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: anp-onnx {command}")
    for option in options:
        assert option in out, option


def test_console_entry_runs() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "anp_onnx", "--help"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: anp-onnx")
    assert "repair" in proc.stdout


# ----------------------------------------------------------------------------- inspect


def test_inspect_text(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(files["model"])]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"model      {files['model']}" in lines
    assert "input      input: NCHW Nx3x16x16 float32" in lines
    assert "classes    10" in lines
    assert "neurons    24 in 2 layers" in lines
    rows = [line.split() for line in lines if line.startswith("/features/")]
    assert rows == [[LAYER1, "batchnorm", "8"], [LAYER2, "batchnorm", "16"]]
    assert any(line.startswith("parity     max |torch - onnxruntime| = ") for line in lines)


def test_inspect_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(files["model"]), "--json", "--data", str(files["clean"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["neurons"] == 24
    assert [(layer["name"], layer["size"]) for layer in info["layers"]] == [(LAYER1, 8), (LAYER2, 16)]
    assert info["num_classes"] == 10 and info["layout"] == "NCHW" and info["opset"] == 13
    assert info["input"] == "input: NCHW Nx3x16x16 float32"
    assert info["excluded_layers"] == []
    assert 0.0 <= info["parity_max_abs_diff"] < 1e-3


def test_inspect_layer_filter(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(files["model"]), "--json", "--exclude-layers", "*features.4*"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["neurons"] == 8
    assert info["excluded_layers"] == [LAYER2]


# ----------------------------------------------------------------------------- repair and prune


def test_repair(files: dict[str, Path], repaired: dict) -> None:
    assert repaired["rc"] == 0, repaired["stderr"]
    out, folder = repaired["out"], repaired["dir"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "rep.curve.png", "rep.mask_values.txt", "rep.masks.json", "rep.masks.png", "rep.onnx",
        "rep.report.json", "rep.report.md"]
    text = repaired["stdout"]
    lines = text.splitlines()
    assert f"PASSED: {out} verified in onnxruntime" in text
    for name in ("rep.onnx", "rep.masks.json", "rep.mask_values.txt"):
        assert f"wrote {folder / name}" in lines

    pruned = json.loads(_metadata(out)["anp_onnx.pruned"])
    assert pruned["total"] == 24 and pruned["spec"] == {"mode": "threshold", "value": 0.2}
    assert f"Pruned {pruned['count']} of 24 neurons (mask <= 0.2):" in lines
    report = json.loads((folder / "rep.report.json").read_text())
    assert report["pruning"]["count"] == pruned["count"] and report["neurons"]["total"] == 24
    assert report["curve"]["chosen"]["count"] >= 0 and report["pruning"]["spec"]["mode"] == "threshold"
    assert "rep.curve.png" in (folder / "rep.report.md").read_text()
    total = [line.split() for line in lines if line.startswith("total")]
    assert total == [["total", str(pruned["count"]), "24"]]
    assert _bn_scale_zeros(out) == pruned["count"]
    assert "ANP: 5 iterations" in text and "on cpu" in text

    masks, facts = anp_onnx.load_masks(folder / "rep.masks.json")
    assert [(k, len(v)) for k, v in masks.items()] == [(LAYER1, 8), (LAYER2, 16)]
    assert all(((v >= 0) & (v <= 1)).all() for v in masks.values())
    assert facts["config"]["iterations"] == 5 and facts["config"]["batch_size"] == 16
    assert facts["model"]["sha256"] == _sha(files["model"])
    txt, _ = anp_onnx.load_masks(folder / "rep.mask_values.txt")
    for name in masks:
        np.testing.assert_allclose(txt[name], masks[name], atol=5e-5 + 1e-6, rtol=0)


def test_repair_before_after_table(files: dict[str, Path], repaired: dict) -> None:
    assert repaired["rc"] == 0
    lines = repaired["stdout"].splitlines()
    header = [line.split() for line in lines if line.split()[:2] == ["before", "after"]]
    assert header == [["before", "after"]]
    before = anp_onnx.evaluate_model(files["model"], files["test"], poisoned=files["poisoned"])
    after = anp_onnx.evaluate_model(repaired["out"], files["test"], poisoned=files["poisoned"],
                                    target=before.target)
    acc = [line.split() for line in lines if line.startswith("test accuracy")]
    assert acc == [["test", "accuracy", f"({before.n_clean}", "images)", _pct(before.accuracy), _pct(after.accuracy)]]
    asr_rows = [line for line in lines if line.startswith("attack success")]
    assert len(asr_rows) == 1
    assert asr_rows[0].startswith(f"attack success rate (target {before.target}, inferred)")
    assert asr_rows[0].split()[-2:] == [_pct(before.asr), _pct(after.asr)]


def test_prune_count_from_repair_masks(files: dict[str, Path], repaired: dict,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert repaired["rc"] == 0
    masks_json = repaired["dir"] / "rep.masks.json"
    out = files["root"] / "pruned3.onnx"
    before = _sha(files["model"])
    assert main(["prune", str(files["model"]), "--masks", str(masks_json), "--out", str(out), "--count", "3"]) == 0
    text = capsys.readouterr().out
    assert "Pruned 3 of 24 neurons (3 lowest masks):" in text
    assert f"PASSED: {out} verified in onnxruntime" in text
    assert _bn_scale_zeros(out) == _bn_scale_zeros(files["model"]) + 3 == 3
    assert _sha(files["model"]) == before

    masks, facts = anp_onnx.load_masks(masks_json)
    flat = [(name, i) for name, v in masks.items() for i in range(len(v))]
    values = np.concatenate(list(masks.values())).astype(np.float64)
    means = facts.get("mean_masks") or {name: np.zeros(len(v)) for name, v in masks.items()}
    second = np.concatenate([np.asarray(means[name], np.float64) for name in masks])
    lowest = {flat[i] for i in np.lexsort((np.arange(len(flat)), second, values))[:3]}
    written = json.loads(_metadata(out)["anp_onnx.pruned"])["neurons"]
    assert {(name, i) for name, idx in written.items() for i in idx} == lowest


def test_prune_fraction_from_mask_values_txt(files: dict[str, Path], repaired: dict,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert repaired["rc"] == 0
    out = files["root"] / "pruned_frac.onnx"
    argv = ["prune", str(files["model"]), "--masks", str(repaired["dir"] / "rep.mask_values.txt"), "--out",
            str(out), "--fraction", "0.25", "--data", str(files["clean"])]
    assert main(argv) == 0
    assert "Pruned 6 of 24 neurons (lowest 25.0% of neurons):" in capsys.readouterr().out
    assert _bn_scale_zeros(out) == 6
    # same command again: refused without --overwrite, accepted with it
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("anp-onnx: error:") and "exists" in err
    assert main(argv + ["--overwrite", "--count", "2"]) == 1  # --count and --fraction exclude each other
    capsys.readouterr()
    assert main(argv + ["--overwrite"]) == 0
    assert _bn_scale_zeros(out) == 6


def test_repair_refuses_to_replace_existing_mask_values_txt(files: dict[str, Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = files["root"] / "txt_exists"
    folder.mkdir()
    txt = folder / "r.mask_values.txt"
    txt.write_text("No \t Layer Name \t Neuron Idx \t Mask Score \n0 \t mine \t 0 \t 0.5000 \n")
    before = txt.read_bytes()
    rc = main(["-q", "repair", str(files["model"]), "--data", str(files["clean"]), "--out", str(folder / "r.onnx"),
               "--iterations", "2", "--batch-size", "16", "--device", "cpu", "--threshold", "0.2"])
    capsys.readouterr()
    assert txt.read_bytes() == before
    assert rc == 1


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_text(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _npz_images(files["test"])
    acc = float((_ort_predictions(files["model"], x) == y).mean())
    assert main(["evaluate", str(files["model"]), "--data", str(files["test"])]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"clean accuracy        {_pct(acc)}  (40 images)",
                                f"PASSED: {files['model']} evaluated in onnxruntime: clean accuracy {_pct(acc)} "
                                "(40 images)"]


def test_evaluate_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _npz_images(files["test"])
    acc = float((_ort_predictions(files["model"], x) == y).mean())
    px, py = _npz_images(files["poisoned"])
    pred = _ort_predictions(files["model"], px)
    keep = py != 1
    asr = float((pred[keep] == 1).mean())
    assert main(["evaluate", str(files["model"]), "--data", str(files["test"]), "--poisoned",
                 str(files["poisoned"]), "--target", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"accuracy": pytest.approx(acc, abs=1e-12), "n_clean": 40,
                      "asr": pytest.approx(asr, abs=1e-12), "n_poisoned": int(keep.sum()), "target": 1,
                      "target_inferred": False}
    assert result["n_poisoned"] == 20


def test_evaluate_poisoned_text(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(files["model"]), "--poisoned", str(files["poisoned"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = anp_onnx.evaluate_model(files["model"], poisoned=files["poisoned"])
    assert lines == [f"attack success rate   {_pct(expected.asr)}  ({expected.n_poisoned} triggered images, "
                     f"target {expected.target} inferred from predictions)",
                     f"PASSED: {files['model']} evaluated in onnxruntime: attack success rate {_pct(expected.asr)} "
                     f"({expected.n_poisoned} triggered images, target {expected.target})"]


# ----------------------------------------------------------------------------- user errors


def _assert_one_line_error(capsys: pytest.CaptureFixture[str], rc: int, *, contains: str = "",
                           usage: bool = False) -> str:
    """One error line on stderr, exit code 1; stdout: one FAILED line, or nothing for a usage error."""
    out, err = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in out + err
    if usage:  # argparse refused the command line: no command ran
        assert out == ""
    else:
        assert len(out.splitlines()) == 1 and out.startswith("FAILED: "), out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anp-onnx"), err
    assert contains in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def bad(files: dict[str, Path]) -> dict[str, Path]:
    root = files["root"] / "bad"
    root.mkdir()
    garbage = root / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model\x00\x01\x02" * 10)
    folder = root / "images"
    save_image_folder(random_images(12, seed=4, classes=3), folder)
    corrupt = sorted((folder / "1").iterdir())[0]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    labels = random_images(10, seed=5)
    save_npz(ImageSet(labels.x, np.arange(3, 13, dtype=np.int64)), root / "labels12.npz")
    existing = root / "existing.onnx"
    existing.write_bytes(b"keep me")
    return {"garbage": garbage, "folder": folder, "labels": root / "labels12.npz", "existing": existing,
            "folded": tiny_model(root / "folded.onnx", fold_bn=True), "plain": _no_neuron_model(root / "plain.onnx"),
            "root": root}


def test_error_not_an_onnx_file(files, bad, capsys) -> None:
    line = _assert_one_line_error(capsys, main(["inspect", str(bad["garbage"])]), contains="garbage.onnx")
    assert "not an ONNX model" in line


def test_error_missing_model(files, bad, capsys) -> None:
    _assert_one_line_error(capsys, main(["evaluate", str(bad["root"] / "nope.onnx"), "--data", str(files["clean"])]),
                           contains="no such file")


def test_error_out_is_input(files, bad, capsys) -> None:
    before = _sha(files["model"])
    _assert_one_line_error(capsys, main(["repair", str(files["model"]), "--data", str(files["clean"]),
                                         "--out", str(files["model"]), "--overwrite"]), contains="input")
    _assert_one_line_error(capsys, main(["prune", str(files["model"]), "--masks", str(bad["root"] / "m.json"),
                                         "--out", str(files["model"])]), contains="input")
    assert _sha(files["model"]) == before


def test_error_existing_out_without_overwrite(files, bad, capsys) -> None:
    _assert_one_line_error(capsys, main(["repair", str(files["model"]), "--data", str(files["clean"]),
                                         "--out", str(bad["existing"]), "--iterations", "2"]),
                           contains="--overwrite")
    assert bad["existing"].read_bytes() == b"keep me"
    assert not (bad["root"] / "existing.masks.json").exists()


def test_error_corrupt_image_in_folder(files, bad, capsys) -> None:
    _assert_one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(bad["folder"])]),
                           contains="cannot decode image")
    out = bad["root"] / "never.onnx"
    _assert_one_line_error(capsys, main(["repair", str(files["model"]), "--data", str(bad["folder"]),
                                         "--out", str(out), "--iterations", "2"]), contains="cannot decode image")
    assert not out.exists()


def test_error_labels_beyond_classes(files, bad, capsys) -> None:
    _assert_one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(bad["labels"])]),
                           contains="10 classes")


def test_error_model_without_neurons(files, bad, capsys) -> None:
    line = _assert_one_line_error(capsys, main(["inspect", str(bad["plain"])]), contains="BatchNormalization")
    assert line.startswith("anp-onnx: error: no neurons to prune")
    assert "MatMul x1" in line
    _assert_one_line_error(capsys, main(["repair", str(bad["plain"]), "--data", str(files["clean"]), "--out",
                                         str(bad["root"] / "p_out.onnx")]), contains="BatchNormalization")
    assert not (bad["root"] / "p_out.onnx").exists()
    # evaluating needs no neurons
    assert main(["evaluate", str(bad["plain"]), "--data", str(files["clean"])]) == 0
    capsys.readouterr()


def test_inspect_model_with_batchnorm_folded_uses_conv_channels(files, bad, capsys) -> None:
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(bad["folded"])).graph.node}
    assert main(["inspect", str(bad["folded"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(layer["kind"], layer["op_type"], layer["size"]) for layer in info["layers"]] == [
        ("conv", "Conv", 8), ("conv", "Conv", 16)]
    assert info["neurons"] == 24


def test_repair_folded_model_renormalises_and_prune_reuses_the_centres(files, bad, capsys) -> None:
    out, again = bad["root"] / "folded_out.onnx", bad["root"] / "folded_again.onnx"
    assert main(["repair", str(bad["folded"]), "--data", str(files["clean"]), "--out", str(out),
                 "--iterations", "3", "--batch-size", "8", "--count", "3", "--refine", "none"]) == 0
    assert "renormalised layers: 2 without normalisation" in capsys.readouterr().out
    report = json.loads((bad["root"] / "folded_out.report.json").read_text())
    assert len(report["optimisation"]["renormalised_layers"]) == 2
    masks = bad["root"] / "folded_out.masks.json"
    assert all("centre" in layer for layer in json.loads(masks.read_text())["layers"])
    assert main(["prune", str(bad["folded"]), "--masks", str(masks), "--out", str(again), "--count", "3"]) == 0
    capsys.readouterr()
    a, b = onnx.load(str(out)), onnx.load(str(again))
    assert {t.name: t.raw_data for t in a.graph.initializer} == {t.name: t.raw_data for t in b.graph.initializer}
    plain = bad["root"] / "folded_plain.onnx"
    assert main(["repair", str(bad["folded"]), "--data", str(files["clean"]), "--out", str(plain),
                 "--iterations", "3", "--batch-size", "8", "--count", "3", "--no-renormalise", "--refine", "none"]) == 0
    assert "renormalised layers" not in capsys.readouterr().out


def test_error_unknown_preprocess(files, bad, capsys) -> None:
    _assert_one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(files["clean"]),
                                         "--preprocess", "sepia"]), contains="--preprocess",
                           usage=True)


def test_error_unknown_preprocess_explains_presets(files, bad, capsys) -> None:
    _assert_one_line_error(capsys, main(["evaluate", str(files["model"]), "--data", str(files["clean"]),
                                         "--preprocess", "sepia"]), contains="imagenet",
                           usage=True)


def test_error_threshold_out_of_range(files, repaired, bad, capsys) -> None:
    out = bad["root"] / "t2.onnx"
    _assert_one_line_error(capsys, main(["prune", str(files["model"]), "--masks",
                                         str(repaired["dir"] / "rep.masks.json"), "--out", str(out),
                                         "--threshold", "2"]), contains="threshold")
    _assert_one_line_error(capsys, main(["repair", str(files["model"]), "--data", str(files["clean"]), "--out",
                                         str(out), "--threshold", "2"]), contains="threshold")
    assert not out.exists()


@pytest.mark.parametrize("argv, contains", [
    (["repair", "MODEL", "--data", "DATA"], "--out"),
    (["prune", "MODEL", "--out", "x.onnx"], "--masks"),
    (["inspect"], "model"),
    (["frobnicate"], "frobnicate"),
    (["evaluate", "MODEL", "--target", "two"], "--target"),
    (["repair", "MODEL", "--data", "DATA", "--out", "o.onnx", "--count", "3", "--threshold", "0.1"], "--threshold"),
    (["inspect", "MODEL", "--layout", "CHWN"], "--layout"),
    (["repair", "MODEL", "--data", "DATA", "--out", "o.onnx", "--anp-target", "ship"], "--anp-target"),
    (["repair", "MODEL", "--data", "DATA", "--out", "o.onnx", "--anp-target", "-2"], "--anp-target"),
])
def test_error_argparse_usage(files, capsys, argv: list[str], contains: str) -> None:
    argv = [{"MODEL": str(files["model"]), "DATA": str(files["clean"])}.get(a, a) for a in argv]
    line = _assert_one_line_error(capsys, main(argv), contains=contains, usage=True)
    assert "error" in line


def test_error_from_real_console_is_one_line(bad) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "anp_onnx", "inspect", str(bad["plain"])], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == f"FAILED: inspect {bad['plain']}\n"
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("anp-onnx: error: no neurons to prune") and "BatchNormalization" in proc.stderr


def test_anp_target_and_reference_options() -> None:
    from anp_onnx.cli import _config, _spec, build_parser

    base = ["repair", "m.onnx", "--data", "d", "--out", "o.onnx"]
    args = build_parser().parse_args(base)
    assert _config(args).target == "auto" and _config(args).targeted_eps == 0.2 and _spec(args).mode == "auto"
    args = build_parser().parse_args(base + ["--anp-target", "none"])
    assert _config(args).target is None and _spec(args).mode == "auto"
    args = build_parser().parse_args(base + ["--anp-target", "3", "--targeted-eps", "0.1"])
    assert _config(args).target == 3 and _config(args).targeted_eps == 0.1
    args = build_parser().parse_args(base + ["--reference"])
    assert _config(args) == anp_onnx.ANPConfig.reference() and _spec(args) == anp_onnx.PruneSpec.threshold(0.2)
    args = build_parser().parse_args(base + ["--reference", "--count", "7"])
    assert _config(args).target is None and _spec(args) == anp_onnx.PruneSpec.count(7)


def test_repair_prints_what_the_noise_aimed_at(repaired) -> None:
    # the tiny random model does not collapse to one class: the reference's untargeted noise is used
    assert "ANP noise: " in repaired["stdout"]


def test_kinds_option(files, capsys) -> None:
    assert main(["inspect", str(files["model"]), "--kinds", "conv", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {layer["kind"] for layer in info["layers"]} == {"conv"}
    assert main(["inspect", str(files["model"]), "--kinds", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice" in err[0]


# ----------------------------------------------------------------------------- the final PASSED / FAILED line


def test_every_command_ends_with_a_passed_line(files, repaired, capsys) -> None:
    assert repaired["stdout"].splitlines()[-1].startswith(f"PASSED: {repaired['out']} verified in onnxruntime")
    assert main(["inspect", str(files["model"])]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"PASSED: {files['model']} converts; torch matches onnxruntime (max |diff| ")
    out = files["root"] / "pruned_last.onnx"
    assert main(["prune", str(files["model"]), "--masks", str(repaired["dir"] / "rep.masks.json"), "--out",
                 str(out), "--count", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"PASSED: {out} verified in onnxruntime (max |diff| ")
    assert main(["evaluate", str(files["model"]), "--data", str(files["test"]), "--poisoned",
                 str(files["poisoned"]), "--target", "1"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"PASSED: {files['model']} evaluated in onnxruntime: clean accuracy ")
    assert "(40 images), attack success rate " in last and last.endswith("(20 triggered images, target 1)")


@pytest.mark.parametrize("command, extra, attempted", [
    ("inspect", [], "inspect {model}"),
    ("evaluate", ["--data", "{clean}"], "evaluate {model}"),
    ("repair", ["--data", "{clean}", "--out", "{out}", "--iterations", "2"], "repair {model} -> {out}"),
    ("prune", ["--masks", "{masks}", "--out", "{out}"], "prune {model} -> {out}"),
])
def test_bad_model_path_ends_with_a_failed_line(files, bad, capsys, command, extra, attempted) -> None:
    names = {"model": str(bad["root"] / "missing.onnx"), "clean": str(files["clean"]),
             "out": str(bad["root"] / "never_written.onnx"), "masks": str(bad["root"] / "missing.masks.json")}
    rc = main([command, names["model"]] + [a.format(**names) for a in extra])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in out + err
    assert out == f"FAILED: {attempted.format(**names)}\n"
    assert len(err.splitlines()) == 1 and err.startswith("anp-onnx: error: ") and "missing" in err
    assert not Path(names["out"]).exists()


@pytest.mark.parametrize("argv", [["inspect", "{model}", "--json"],
                                  ["evaluate", "{model}", "--data", "{test}", "--json"]])
def test_json_output_stays_pure_json(files, capsys, argv) -> None:
    assert main([a.format(**files) for a in argv]) == 0
    out, err = capsys.readouterr()
    assert isinstance(json.loads(out), dict)
    assert err.splitlines()[-1].startswith(f"PASSED: {files['model']} ")
    assert "PASSED" not in out


def test_json_error_puts_the_failed_line_on_stderr(bad, capsys) -> None:
    assert main(["inspect", str(bad["garbage"]), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[0].startswith("anp-onnx: error: ")
    assert err.splitlines()[1:] == [f"FAILED: inspect {bad['garbage']}"]


@pytest.mark.parametrize("exc, rc, message, why", [
    (KeyboardInterrupt(), 130, "anp-onnx: interrupted; nothing was written", " (interrupted)"),
    (anp_onnx.errors.Cancelled("stopped"), 1, "anp-onnx: cancelled; nothing was written", " (cancelled)"),
])
def test_interrupted_or_cancelled_is_one_line(files, capsys, monkeypatch, exc, rc, message, why) -> None:
    def stop(*args, **kwargs):
        raise exc

    monkeypatch.setattr("anp_onnx.cli.evaluate.evaluate_model", stop)
    assert main(["evaluate", str(files["model"]), "--data", str(files["test"])]) == rc
    out, err = capsys.readouterr()
    assert err == message + "\n"
    assert out == f"FAILED: evaluate {files['model']}{why}\n"


def test_a_bug_keeps_its_traceback_and_still_ends_with_failed(files, capsys, monkeypatch) -> None:
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("anp_onnx.cli.inspect.inspect_model", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", str(files["model"])])
    assert capsys.readouterr().out == f"FAILED: inspect {files['model']}\n"


def test_repair_unlearns_by_default_and_says_what_it_did(repaired) -> None:
    line = next(x for x in repaired["stdout"].splitlines() if x.startswith("refinement unlearn: "))
    assert "initializers changed" in line or "skipped (no backdoor suspected" in line
    report = json.loads((repaired["dir"] / "rep.report.json").read_text())
    assert "unlearn" in report["stages"] and "unlearn" in report["refinements"]


def test_refine_none_and_reference_run_no_refinement() -> None:
    from anp_onnx.cli import build_parser
    from anp_onnx.cli.repair import _refinements

    parse = build_parser().parse_args
    base = ["repair", "m.onnx", "--data", "d", "--out", "o.onnx"]
    assert _refinements(parse(base)) == ("unlearn",)
    assert _refinements(parse(base + ["--refine", "none"])) == ()
    assert _refinements(parse(base + ["--refine", "unlearn-bf16"])) == ("unlearn-bf16",)
    assert _refinements(parse(base + ["--reference"])) == ()
    assert _refinements(parse(base + ["--reference", "--refine", "unlearn"])) == ("unlearn",)


def test_the_progress_bar_shows_the_unlearnings_scan_and_rounds(files, capsys) -> None:
    """The unlearning is the longest stage of a default repair: its scan and rounds get bars of their own."""
    from anp_onnx.cli.render import Bar
    from anp_onnx.progress import ProgressEvent, Stage
    from anp_onnx.unlearn import scan_targets

    rep = anp_onnx.Repairer.open(files["model"])
    bar = Bar(enabled=True)
    scan_targets(rep.ctx.net, rep.load_data(files["clean"]), [0, 1, 2], steps=2, progress=bar)
    assert bar.bar is None  # the scan's bar closed when its last class finished: its time is its own
    bar(ProgressEvent(Stage.REFINE, 1, 3, {"round": 1}))  # as TriggerUnlearning.run emits each round
    bar(ProgressEvent(Stage.REFINE, 3, 3, {"round": 3}))  # the last round starts: its bar stays open
    assert bar.bar is not None
    bar(ProgressEvent(Stage.REFINE, 3, 3, {"rounds_kept": 2}))  # the rounds are over
    assert bar.bar is None
    err = capsys.readouterr().err
    assert "trigger scan" in err and "3/3" in err and "class" in err
    assert "unlearning" in err and "1/3" in err and "round" in err and "rounds_kept=2" in err
