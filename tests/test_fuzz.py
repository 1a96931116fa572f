"""Property-based fuzzing (hypothesis) of everything anp-onnx reads from its user (issue #13).

ONNX files (random, truncated, byte-flipped and structurally edited models), image data (.npz
archives of random arrays, random or damaged archives, folders of random or damaged image files)
and masks files (random JSON, edited masks documents, random text): each input must either load or
raise anp-onnx's own :class:`~anp_onnx.errors.AnpOnnxError` (a one-line message for the user).
Any other exception is a bug, and hypothesis shrinks the input that raised it.

The normal suite runs a short, deterministic pass (about 200 inputs in all, seconds). A longer run:

    ANP_ONNX_FUZZ_EXAMPLES=2500 python -m pytest -q tests/test_fuzz.py   # inputs per target (4 targets)
    python benchmarks/fuzz.py --examples 2500                           # the same, counted and saved

``ANP_ONNX_FUZZ_EXAMPLES`` makes the run random (a new seed each time) instead of deterministic;
``ANP_ONNX_FUZZ_REPORT=FILE`` writes how many inputs each target tried and how they ended;
``ANP_ONNX_FUZZ_LAST=FOLDER`` writes each model, .npz and masks input there before it is read, so
that one that kills the process (a crash in a native library, which hypothesis cannot report) is
left behind.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anp_onnx.data import load_images
from anp_onnx.errors import AnpOnnxError
from anp_onnx.masks_io import load_masks
from anp_onnx.model import load_model
from builders import model_bytes, tiny_model

LONG = int(os.environ.get("ANP_ONNX_FUZZ_EXAMPLES", "0") or 0)
#: Inputs per target in the normal suite (four targets: about 200 in all).
SHORT = {"model": 60, "npz": 50, "images": 40, "masks": 60}
COUNTS: dict[str, Counter] = {name: Counter() for name in SHORT}


def _settings(target: str):
    return settings(max_examples=LONG or SHORT[target], deadline=None, database=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], print_blob=True)


def _outcome(target: str, load) -> None:
    """Run ``load``: it may return or raise AnpOnnxError, nothing else (hypothesis reports anything else)."""
    try:
        load()
    except AnpOnnxError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not a one-line message: {message!r}"
        COUNTS[target]["refused"] += 1
    else:
        COUNTS[target]["loaded"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("ANP_ONNX_FUZZ_REPORT")
    if path:
        summary = {name: {"tried": sum(c.values()), **c} for name, c in COUNTS.items()}
        Path(path).write_text(json.dumps({"examples_per_target": LONG or SHORT, "targets": summary}, indent=1))


def _keep(target: str, data: bytes | str) -> None:
    """With ANP_ONNX_FUZZ_LAST, the input about to be read, saved where a crash leaves it."""
    folder = os.environ.get("ANP_ONNX_FUZZ_LAST")
    if folder:
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        with open(Path(folder) / f"last_{target}", "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())


def _workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="anp-fuzz-")


# ----------------------------------------------------------------------------- mutations of valid bytes


def _damaged(valid: bytes):
    """``valid`` truncated, with bytes replaced, or with a random slice inserted."""
    truncated = st.integers(0, len(valid)).map(lambda k: valid[:k])
    flips = st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=12)

    def flip(changes):
        out = bytearray(valid)
        for pos, byte in changes:
            out[pos] = byte
        return bytes(out)

    inserted = st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=64)).map(
        lambda t: valid[:t[0]] + t[1] + valid[t[0]:])
    return st.one_of(truncated, flips.map(flip), inserted)


# ----------------------------------------------------------------------------- 1. ONNX models


with _workdir() as _folder:
    _VALID_MODEL = tiny_model(Path(_folder) / "tiny.onnx", seed=1, size=8).read_bytes()

_ODD_INTS = st.one_of(st.integers(-3, 70), st.sampled_from([0, 2**31, 2**40, 10**9, -(2**63), 2**63 - 1]))
_OPS = ["Relu", "Conv", "Hardmax", "QuantizeLinear", "Loop", "Identity", "Gemm", "NoSuchOp", "Softmax", ""]


def _set_dims(value_info, values) -> None:
    """Replace the declared shape of a graph input/output by ``values``."""
    dims = value_info.type.tensor_type.shape.dim
    del dims[:]
    for value in values:
        dims.add().dim_value = value


@st.composite
def _edited_model(draw) -> bytes:
    """The tiny model with a few structural edits, each one thing a hostile or broken file may hold."""
    model = onnx.load_from_string(_VALID_MODEL)
    graph = model.graph
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["input dims", "op", "drop node", "init dims", "raw data", "external",
                                     "opset", "ir", "output dims", "attribute", "input type", "rename"]))
        if edit == "input dims":
            _set_dims(graph.input[0], draw(st.lists(_ODD_INTS, max_size=6)))
        elif edit == "op":
            draw(st.sampled_from(list(graph.node))).op_type = draw(st.sampled_from(_OPS))
        elif edit == "drop node" and len(graph.node) > 1:
            del graph.node[draw(st.integers(0, len(graph.node) - 1))]
        elif edit == "init dims":
            tensor = draw(st.sampled_from(list(graph.initializer)))
            del tensor.dims[:]
            tensor.dims.extend(draw(st.lists(_ODD_INTS, max_size=4)))
        elif edit == "raw data":
            tensor = draw(st.sampled_from(list(graph.initializer)))
            tensor.raw_data = tensor.raw_data[:draw(st.integers(0, len(tensor.raw_data)))]
        elif edit == "external":
            tensor = draw(st.sampled_from(list(graph.initializer)))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", draw(st.sampled_from(
                ["../../etc/passwd", "/etc/passwd", "missing.bin", "tiny.onnx", "", "sub/../../x", "\x00"]))
            for key in draw(st.lists(st.sampled_from(["offset", "length"]), max_size=2, unique=True)):
                item = tensor.external_data.add()
                item.key, item.value = key, str(draw(_ODD_INTS))
        elif edit == "opset":
            model.opset_import[0].version = draw(_ODD_INTS)
        elif edit == "ir":
            model.ir_version = draw(_ODD_INTS)
        elif edit == "output dims":
            _set_dims(graph.output[0], draw(st.lists(_ODD_INTS, max_size=4)))
        elif edit == "attribute":
            node = draw(st.sampled_from([n for n in graph.node if n.attribute] or list(graph.node)))
            if node.attribute:
                attr = draw(st.sampled_from(list(node.attribute)))
                if attr.ints:
                    attr.ints[:] = draw(st.lists(_ODD_INTS, max_size=4))
                else:
                    attr.f, attr.i = draw(st.floats(allow_nan=True)), draw(_ODD_INTS)
        elif edit == "input type":
            graph.input[0].type.tensor_type.elem_type = draw(st.integers(0, 25))
        elif edit == "rename":
            draw(st.sampled_from(list(graph.node))).input[0] = draw(st.text(max_size=8))
    return model_bytes(model)


@_settings("model")
@given(data=st.one_of(st.binary(max_size=3000), _damaged(_VALID_MODEL), _edited_model()))
def test_fuzz_model_files(data: bytes) -> None:
    _keep("model", data)
    with _workdir() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(data)
        _outcome("model", lambda: load_model(path))


# ----------------------------------------------------------------------------- 2. .npz data


_DTYPES = ["uint8", "int8", "int16", "int64", "uint16", "float16", "float32", "float64", "bool", "complex64",
           "<U3", "S2", "object", "datetime64[s]"]
_SHAPES = st.lists(st.integers(0, 6), max_size=5).map(tuple)


@st.composite
def _array(draw) -> np.ndarray:
    dtype, shape = draw(st.sampled_from(_DTYPES)), draw(_SHAPES)
    size = int(np.prod(shape))
    if dtype == "object":
        return np.array([None] * size, dtype=object).reshape(shape)
    if dtype.startswith("<U") or dtype.startswith("S"):
        return np.array(draw(st.lists(st.text("ab", max_size=2), min_size=size, max_size=size)),
                        dtype=dtype).reshape(shape)
    if dtype.startswith("datetime"):
        return np.zeros(shape, dtype=dtype)
    special = [0.0, 1.0, 255.0, -1.0, 256.0, 0.5, float("nan"), float("inf"), 1e300]
    values = draw(st.lists(st.sampled_from(special), min_size=size, max_size=size))
    with np.errstate(all="ignore"):
        return np.array(values, dtype=np.float64).astype(dtype).reshape(shape)


@st.composite
def _random_npz(draw) -> bytes:
    keys = draw(st.lists(st.sampled_from(["x", "y", "images", "labels", "class_names", "other"]), max_size=4,
                         unique=True))
    arrays = {key: draw(_array()) for key in keys}
    buf = io.BytesIO()
    np.savez(buf, **arrays) if draw(st.booleans()) else np.savez_compressed(buf, **arrays)
    return buf.getvalue()


@st.composite
def _plausible_npz(draw) -> bytes:
    """Close to a real image set: x (N, H, W, C) or (N, C, H, W), y of about N labels (deeper paths)."""
    odd = draw(st.booleans())  # half of them break one rule or more, half are valid but for chance
    n = draw(st.integers(0, 6) if odd else st.integers(1, 6))
    h, w = (draw(st.integers(0, 10)), draw(st.integers(0, 10))) if odd else (draw(st.integers(1, 10)),) * 2
    c = draw(st.sampled_from([0, 1, 2, 3, 4, 5] if odd else [1, 3, 4]))
    shape = (n, h, w, c) if draw(st.booleans()) else (n, c, h, w)
    dtype = draw(st.sampled_from(["uint8", "float32", "float16", "int16", "float64"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1.0, 255.0, 300.0, -1.0] if odd else [1.0]))
    with np.errstate(all="ignore"):
        x = (rng.random(shape) * scale).astype(dtype)
    count = max(0, n + draw(st.sampled_from([0, 1, -1]))) if odd else n
    y = np.array(draw(st.lists(st.integers(-1, 12) if odd else st.integers(0, 2), min_size=count, max_size=count)),
                 dtype=np.int64)
    arrays = {"x": x, "y": y.astype(draw(st.sampled_from(["int64", "uint8", "float32"])))}
    if draw(st.booleans()):
        arrays["class_names"] = np.array([f"c{i}" for i in range(draw(st.integers(0, 12)))])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _valid_npz() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez_compressed(buf, x=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), y=np.arange(6) % 3)
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


@st.composite
def _lying_header(draw) -> bytes:
    """An archive whose x claims a huge shape in its .npy header (a zip bomb's cheap cousin)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        shape = tuple(draw(st.lists(st.sampled_from([10**6, 10**9, 2**40, 3, 8]), min_size=1, max_size=4)))
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + _padded(repr(header)) + b"\x00" * 64)
        z.writestr("y.npy", _npy_bytes(np.zeros(3, np.int64)))
    return buf.getvalue()


def _padded(text: str) -> bytes:
    raw = text.encode("latin1")
    pad = 64 - (10 + len(raw) + 1) % 64
    raw += b" " * pad + b"\n"
    return len(raw).to_bytes(2, "little") + raw


_LOAD_ARGS = st.tuples(st.sampled_from([None, (8, 8), (5, 3)]), st.sampled_from([1, 3, 4]),
                       st.sampled_from([None, 3, 10]), st.sampled_from([None, 1, 4]))


@_settings("npz")
@given(data=st.one_of(st.binary(max_size=600), _damaged(_valid_npz()), _random_npz(), _plausible_npz(),
                      _lying_header(), _array().map(_npy_bytes)), args=_LOAD_ARGS)
def test_fuzz_npz_data(data: bytes, args) -> None:
    _keep("npz", data)
    size, channels, classes, limit = args
    with _workdir() as folder:
        path = Path(folder) / "data.npz"
        path.write_bytes(data)
        _outcome("npz", lambda: load_images(path, size=size, channels=channels, num_classes=classes, limit=limit))


# ----------------------------------------------------------------------------- 3. image folders


def _encoded(fmt: str, mode: str, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(size[0] * 31 + size[1])
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "P": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, "L" if mode == "P" else mode)
    image = image.convert("P") if mode == "P" else image
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp",
            "PPM": ".ppm", "ICO": ".ico"}
_VALID_IMAGES = {fmt: _encoded(fmt, "RGB", (9, 7)) for fmt in _FORMATS}


@st.composite
def _image_file(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(_FORMATS)))
    ext = draw(st.sampled_from([_FORMATS[fmt], _FORMATS[fmt], ".png", ".jpg"]))  # sometimes a wrong extension
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P"]))
    size = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    kind = draw(st.sampled_from(["valid", "damaged", "random", "empty"]))
    if kind == "random":
        return ext, draw(st.binary(max_size=300))
    if kind == "empty":
        return ext, b""
    try:
        valid = _encoded(fmt, mode, size) if kind == "valid" else _VALID_IMAGES[fmt]
    except (OSError, ValueError, KeyError):  # a mode the format cannot store
        valid = _VALID_IMAGES[fmt]
    return ext, valid if kind == "valid" else draw(_damaged(valid))


@_settings("images")
@given(files=st.lists(st.tuples(st.sampled_from(["0", "1", "cat", ".hidden"]), _image_file()), min_size=1,
                      max_size=5), args=_LOAD_ARGS)
def test_fuzz_image_folders(files, args) -> None:
    size, channels, classes, limit = args
    with _workdir() as folder:
        root = Path(folder) / "data"
        for i, (label, (ext, data)) in enumerate(files):
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / f"{i}{ext}").write_bytes(data)
        _outcome("images", lambda: load_images(root, size=size, channels=channels, num_classes=classes,
                                               limit=limit))


# ----------------------------------------------------------------------------- 4. masks files


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers()
    | st.sampled_from([10**400, -(10**400), 2**64]) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "mask", "mean_mask", "centre", "spread", "layers", "format", "centres",
                         "mean_masks", "model", "suspected_target", "x"]), inner, max_size=4),
    max_leaves=20)

_VALID_MASKS = {"format": "anp-onnx-masks", "version": 1, "suspected_target": 0,
                "layers": [{"name": "a", "mask": [0.1, 0.9, 1.0], "mean_mask": [0.2, 0.8, 1.0]},
                           {"name": "b", "mask": [0.5], "centre": [0.0], "spread": [1.0]}]}


@st.composite
def _edited_masks(draw) -> str:
    doc = json.loads(json.dumps(_VALID_MASKS))
    for _ in range(draw(st.integers(1, 3))):
        layer = doc["layers"][draw(st.integers(0, len(doc["layers"]) - 1))]
        key = draw(st.sampled_from(["name", "mask", "mean_mask", "centre", "spread", "other"]))
        if draw(st.booleans()):
            layer.pop(key, None)
        else:
            layer[key] = draw(_JSON)
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["layers", "centres", "mean_masks", "model", "suspected_target"]))] = draw(_JSON)
    return json.dumps(doc)


def _nested(depth: int) -> str:
    return '{"layers": ' + "[" * depth + "]" * depth + "}"


_MASKS_TEXT = st.one_of(
    _JSON.map(json.dumps), _JSON.map(lambda v: json.dumps({"layers": v})), _edited_masks(),
    st.integers(10, 200_000).map(_nested), st.text(max_size=200),
    st.lists(st.tuples(st.integers(-2, 5), st.sampled_from(["a", "b", " "]), st.integers(-2, 5),
                       st.sampled_from(["0.5", "nan", "x", "1e99999", ""])), max_size=6).map(
        lambda rows: "No \t Layer Name \t Neuron Idx \t Mask Score \n"
                     + "".join(f"{r[0]} \t {r[1]} \t {r[2]} \t {r[3]} \n" for r in rows)),
)


@_settings("masks")
@given(text=_MASKS_TEXT, suffix=st.sampled_from([".json", ".txt"]))
def test_fuzz_masks_files(text: str, suffix: str) -> None:
    _keep("masks", text)
    with _workdir() as folder:
        path = Path(folder) / f"m{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _outcome("masks", lambda: _load_masks_checked(path))


def _load_masks_checked(path: Path) -> None:
    """load_masks, and what it returns is what prune and the app expect."""
    masks, facts = load_masks(path)
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) and v.ndim == 1 for k, v in masks.items())
    for key in ("mean_masks", "centres"):  # only what the layers held, never the document's own keys
        assert isinstance(facts.get(key, {}), dict), (key, facts.get(key))
    for name, (centre, spread) in facts.get("centres", {}).items():
        assert centre.shape == spread.shape == masks[name].shape
