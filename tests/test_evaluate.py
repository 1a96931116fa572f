"""Tests for anp_onnx.evaluate (ACC / ASR in onnxruntime) and anp_onnx.evaluate_model.

Most tests use a hand-built ONNX model whose prediction is known exactly: GlobalAveragePool ->
Flatten -> MatMul(identity), so the predicted class is the channel with the largest mean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import anp_onnx
from anp_onnx.data import ImageSet, save_npz
from anp_onnx.preprocessing import Preprocessing
from anp_onnx.errors import Cancelled, DataError, SettingsError
from anp_onnx.evaluate import EvalResult, evaluate, predict
from anp_onnx.model import from_proto, load_model
from anp_onnx.progress import CancelToken
from builders import random_images, tiny_model

Dim = Union[int, str]


def argmax_model(batch: Dim = "N", classes: int = 3, size: int = 4) -> onnx.ModelProto:
    """(batch, classes, size, size) -> (batch, classes) logits = per-channel means."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, classes, size, size])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, classes])
    w = numpy_helper.from_array(np.eye(classes, dtype=np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flat", axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["scores"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "argmax", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def images_for(preds: list[int], labels: list[int], classes: int = 3, size: int = 4, seed: int = 0) -> ImageSet:
    """Images whose channel ``preds[i]`` has by far the largest mean (noise on top)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.05, 0.25, size=(len(preds), classes, size, size)).astype(np.float32)
    for i, p in enumerate(preds):
        x[i, p] += 0.6
    return ImageSet(x, np.asarray(labels, dtype=np.int64), source="controlled")


def loaded(batch: Dim = "N", classes: int = 3):
    return from_proto(argmax_model(batch, classes))


UNIT = Preprocessing()


# ----------------------------------------------------------------------------- the controlled model


def test_controlled_model_predicts_the_brightest_channel() -> None:
    model = loaded()
    assert model.num_classes == 3 and model.input.layout == "NCHW" and model.input.batch is None
    preds = [0, 1, 2, 2, 1, 0, 0]
    assert predict(model, images_for(preds, [0] * 7), UNIT).tolist() == preds


def test_accuracy_exact() -> None:
    preds = [0, 1, 2, 0, 1, 2, 0, 1]
    labels = [0, 1, 2, 1, 1, 0, 0, 2]  # 5 of 8 right
    result = evaluate(loaded(), images_for(preds, labels), UNIT)
    assert result == EvalResult(accuracy=0.625, n_clean=8, asr=None, n_poisoned=0, target=None,
                                target_inferred=False)
    assert result.to_dict() == {"accuracy": 0.625, "n_clean": 8, "asr": None, "n_poisoned": 0,
                                "target": None, "target_inferred": False}


def test_asr_excludes_images_labelled_target_and_infers_target() -> None:
    # predictions 2,2,2,2,0 ; true labels 2,2,0,1,1 -> images 0 and 1 are excluded (label == target 2)
    poisoned = images_for([2, 2, 2, 2, 0], [2, 2, 0, 1, 1])
    result = evaluate(loaded(), None, UNIT, poisoned=poisoned)
    assert result.target == 2 and result.target_inferred is True
    assert result.n_poisoned == 3
    assert result.asr == pytest.approx(2 / 3, abs=1e-12)  # counting all five would give 0.8
    assert result.accuracy is None and result.n_clean == 0


def test_given_target_is_used_not_inferred() -> None:
    poisoned = images_for([2, 2, 2, 2, 0], [2, 2, 0, 1, 1])
    result = evaluate(loaded(), None, UNIT, poisoned=poisoned, target=0)
    # labels != 0: images 0, 1, 3, 4 predicted 2, 2, 2, 0 -> one hits target 0
    assert (result.target, result.target_inferred, result.n_poisoned, result.asr) == (0, False, 4, 0.25)
    result = evaluate(loaded(), None, UNIT, poisoned=poisoned, target=2)
    assert (result.target, result.target_inferred, result.n_poisoned) == (2, False, 3)
    assert result.asr == pytest.approx(2 / 3, abs=1e-12)


def test_inferred_target_is_majority_prediction() -> None:
    poisoned = images_for([1, 1, 1, 0, 2, 2, 1], [0, 0, 2, 2, 0, 1, 1])
    result = evaluate(loaded(), None, UNIT, poisoned=poisoned)
    assert result.target == 1 and result.target_inferred
    # labels != 1: images 0,1,2,3,4 predicted 1,1,1,0,2
    assert result.n_poisoned == 5 and result.asr == pytest.approx(0.6, abs=1e-12)


def test_clean_and_poisoned_together() -> None:
    clean = images_for([0, 1, 2, 2], [0, 1, 2, 0])
    poisoned = images_for([2, 2, 0], [0, 1, 1], seed=1)
    result = evaluate(loaded(), clean, UNIT, poisoned=poisoned)
    assert result.accuracy == 0.75 and result.n_clean == 4
    assert result.target == 2 and result.target_inferred
    assert result.n_poisoned == 3 and result.asr == pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize("target", [3, -1, 100])
def test_target_outside_classes_is_data_error(target: int) -> None:
    with pytest.raises(DataError, match="outside"):
        evaluate(loaded(), None, UNIT, poisoned=images_for([0, 1], [1, 2]), target=target)


def test_all_triggered_images_labelled_target_is_data_error() -> None:
    poisoned = images_for([1, 1, 1], [1, 1, 1])
    with pytest.raises(DataError, match="target label 1"):
        evaluate(loaded(), None, UNIT, poisoned=poisoned)
    with pytest.raises(DataError):
        evaluate(loaded(), None, UNIT, poisoned=images_for([0, 1, 2], [2, 2, 2]), target=2)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("batch_size", [256, 3])
def test_fixed_batch_dimension_evaluates_every_image(batch: int, batch_size: int) -> None:
    model = loaded(batch=batch)
    assert model.input.batch == batch
    preds = [0, 1, 2, 2, 1, 0, 1]  # 7 images: not a multiple of 4 (or of 3)
    labels = [0, 1, 2, 0, 1, 0, 0]  # 5 of 7 right
    assert predict(model, images_for(preds, labels), UNIT, batch_size=batch_size).tolist() == preds
    result = evaluate(model, images_for(preds, labels), UNIT,
                      poisoned=images_for([2, 2, 1, 2, 0], [0, 1, 2, 2, 0], seed=3), batch_size=batch_size)
    assert result.n_clean == 7 and result.accuracy == pytest.approx(5 / 7, abs=1e-12)
    assert result.target == 2 and result.n_poisoned == 3 and result.asr == pytest.approx(2 / 3, abs=1e-12)


def test_progress_events_and_cancel() -> None:
    events = []
    preds = [0, 1, 2, 0, 1, 2, 0]
    evaluate(loaded(), images_for(preds, preds), UNIT, batch_size=3, progress=events.append)
    assert [(e.stage, e.step, e.total) for e in events] == [("evaluate", 1, 3), ("evaluate", 2, 3),
                                                           ("evaluate", 3, 3)]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        evaluate(loaded(), images_for(preds, preds), UNIT, cancel=token)


def test_preprocessing_is_applied() -> None:
    # channel 2 is brightest by ~0.6; subtracting 0.7 from it makes channel 0 or 1 win
    x = images_for([2, 2], [2, 2])
    assert evaluate(loaded(), x, UNIT).accuracy == 1.0
    assert evaluate(loaded(), x, Preprocessing(mean=(0.0, 0.0, 0.7))).accuracy == 0.0


def test_empty_sets_give_no_scores() -> None:
    empty = ImageSet(np.zeros((0, 3, 4, 4), np.float32), np.zeros(0, np.int64))
    assert evaluate(loaded(), empty, UNIT, poisoned=empty) == EvalResult()


# ----------------------------------------------------------------------------- NHWC, from files


def _ort_predictions(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def test_nhwc_model_matches_manual_ort_and_nchw_twin(tmp_path: Path) -> None:
    nhwc_path = tiny_model(tmp_path / "nhwc.onnx", nhwc=True, seed=4)
    nchw_path = tiny_model(tmp_path / "nchw.onnx", seed=4)
    images = random_images(50, seed=2)
    nchw_preds = _ort_predictions(nchw_path, images.x)
    nhwc_manual = _ort_predictions(nhwc_path, np.ascontiguousarray(images.x.transpose(0, 2, 3, 1)))
    assert nhwc_manual.tolist() == nchw_preds.tolist()  # the twins agree

    y = np.where(np.arange(50) < 31, nchw_preds, (nchw_preds + 1) % 10)  # 31 of 50 right
    data = ImageSet(images.x, y)
    model = load_model(nhwc_path)
    assert model.input.layout == "NHWC"
    assert (model.input.height, model.input.width, model.input.channels) == (16, 16, 3)
    assert predict(model, data, UNIT).tolist() == nchw_preds.tolist()
    result = evaluate(model, data, UNIT)
    assert result.n_clean == 50 and result.accuracy == pytest.approx(31 / 50, abs=1e-12)
    assert evaluate(load_model(nchw_path), data, UNIT).accuracy == pytest.approx(31 / 50, abs=1e-12)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def test_evaluate_model_from_files(tmp_path: Path) -> None:
    model = _save(argmax_model(), tmp_path / "m.onnx")
    clean = images_for([0, 1, 2, 0, 1, 2], [0, 1, 2, 2, 2, 2])  # 4 of 6
    poisoned = images_for([1, 1, 1, 0, 1], [0, 1, 2, 2, 1], seed=5)
    save_npz(clean, tmp_path / "clean.npz")
    save_npz(poisoned, tmp_path / "poisoned.npz")

    result = anp_onnx.evaluate_model(model, tmp_path / "clean.npz", poisoned=tmp_path / "poisoned.npz")
    assert result.accuracy == pytest.approx(4 / 6, abs=1e-12) and result.n_clean == 6
    # target inferred 1: labels != 1 are images 0, 2, 3 predicted 1, 1, 0
    assert (result.target, result.target_inferred, result.n_poisoned) == (1, True, 3)
    assert result.asr == pytest.approx(2 / 3, abs=1e-12)

    given = anp_onnx.evaluate_model(str(model), poisoned=str(tmp_path / "poisoned.npz"), target=0)
    assert (given.accuracy, given.target, given.target_inferred, given.n_poisoned) == (None, 0, False, 4)
    assert given.asr == 0.25

    only_clean = anp_onnx.evaluate_model(model, tmp_path / "clean.npz")
    assert (only_clean.asr, only_clean.n_poisoned, only_clean.target) == (None, 0, None)


def test_evaluate_model_errors(tmp_path: Path) -> None:
    model = _save(argmax_model(), tmp_path / "m.onnx")
    with pytest.raises(SettingsError):
        anp_onnx.evaluate_model(model)
    save_npz(images_for([0, 1, 2], [0, 1, 5]), tmp_path / "bad_labels.npz")
    with pytest.raises(DataError, match="3 classes"):
        anp_onnx.evaluate_model(model, tmp_path / "bad_labels.npz")
    with pytest.raises(DataError):
        anp_onnx.evaluate_model(model, tmp_path / "missing.npz")
    save_npz(images_for([0, 1], [0, 1]), tmp_path / "p.npz")
    with pytest.raises(DataError):
        anp_onnx.evaluate_model(model, poisoned=tmp_path / "p.npz", target=7)


def _with_preprocessing_metadata(pre: Optional[dict]) -> onnx.ModelProto:
    model = argmax_model()
    if pre is not None:
        prop = model.metadata_props.add()
        prop.key, prop.value = "anp_onnx.preprocessing", json.dumps(pre)
    return model


def test_evaluate_model_uses_recorded_preprocessing(tmp_path: Path) -> None:
    data = images_for([2, 2, 0, 1], [2, 2, 0, 1])
    save_npz(data, tmp_path / "d.npz")
    plain = _save(_with_preprocessing_metadata(None), tmp_path / "plain.onnx")
    shifted = _save(_with_preprocessing_metadata({"mean": [0.0, 0.0, 0.7], "std": None, "scale": 1.0}),
                    tmp_path / "shifted.onnx")
    assert anp_onnx.evaluate_model(plain, tmp_path / "d.npz").accuracy == 1.0
    # channel 2 loses 0.7 in the recorded preprocessing: the two images of class 2 are now wrong
    assert anp_onnx.evaluate_model(shifted, tmp_path / "d.npz").accuracy == 0.5
    # an explicit preprocessing wins over the recorded one
    assert anp_onnx.evaluate_model(shifted, tmp_path / "d.npz", preprocessing=Preprocessing()).accuracy == 1.0
