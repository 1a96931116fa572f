"""Tests for anp_onnx.data: loading folders and .npz files, preprocessing, splits, augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anp_onnx.augment import augment_batch, default_crop_padding
from anp_onnx.data import ImageSet, load_images, save_image_folder, save_npz
from anp_onnx.errors import DataError, SettingsError
from anp_onnx.preprocessing import PRESETS, Preprocessing


def _rgb(seed: int, h: int = 8, w: int = 8, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _write(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _imageset(n_per_class: int = 6, classes: int = 3, size: int = 8, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    n = n_per_class * classes
    x = rng.integers(0, 256, size=(n, 3, size, size)).astype(np.float32) / 255.0
    y = np.repeat(np.arange(classes), n_per_class)
    return ImageSet(x, rng.permutation(y), source="synthetic")


# ----------------------------------------------------------------------------- folders


def test_folder_string_names_png_jpeg_nested_and_skips(tmp_path: Path) -> None:
    a, b, c = _rgb(1), _rgb(2), _rgb(3)
    _write(tmp_path / "dog" / "b.png", b)
    _write(tmp_path / "cat" / "a.png", a)
    _write(tmp_path / "dog" / "sub" / "deeper" / "c.PNG", c)
    _write(tmp_path / "cat" / "j.jpg", np.full((8, 8, 3), 200, np.uint8))
    (tmp_path / "dog" / "README.txt").write_text("not an image")
    _write(tmp_path / "dog" / ".hidden.png", _rgb(4))
    _write(tmp_path / ".git" / "x.png", _rgb(5))  # hidden class folder

    data = load_images(tmp_path, size=None, channels=3)

    assert data.class_names == ("cat", "dog")
    assert data.y.tolist() == [0, 0, 1, 1]  # cat/a.png, cat/j.jpg, dog/b.png, dog/sub/deeper/c.PNG
    assert data.x.shape == (4, 3, 8, 8) and data.x.dtype == np.float32
    np.testing.assert_array_equal(data.x[0], a.transpose(2, 0, 1) / np.float32(255))
    np.testing.assert_array_equal(data.x[2], b.transpose(2, 0, 1) / np.float32(255))
    np.testing.assert_array_equal(data.x[3], c.transpose(2, 0, 1) / np.float32(255))
    assert abs(float(data.x[1].mean()) - 200 / 255) < 3 / 255  # JPEG, lossy
    assert data.source == str(tmp_path) and len(data) == 4


def test_folder_integer_names_sort_numerically(tmp_path: Path) -> None:
    for label in range(11):
        _write(tmp_path / str(label) / "img.png", np.full((4, 4, 3), label * 20, np.uint8))
    data = load_images(tmp_path, size=None, channels=3, num_classes=11)
    assert data.y.tolist() == list(range(11))
    assert data.class_names is not None and data.class_names[10] == "10" and data.class_names[2] == "2"
    np.testing.assert_allclose(data.x[:, 0, 0, 0], np.arange(11) * 20 / 255, atol=1e-7)
    assert data.num_classes_seen == 11


def test_folder_integer_names_with_gaps(tmp_path: Path) -> None:
    for label in (10, 2, 0):
        _write(tmp_path / str(label) / "img.png", _rgb(label))
    data = load_images(tmp_path, size=None, channels=3)
    assert data.y.tolist() == [0, 2, 10]
    assert data.class_names is None
    with pytest.raises(DataError, match="go up to 10 but the model has 10 classes"):
        load_images(tmp_path, size=None, channels=3, num_classes=10)


def test_folder_corrupt_image_names_file(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "good.png", _rgb(0))
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken.png"):
        load_images(tmp_path, size=None, channels=3)


def test_folder_empty_or_without_classes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class sub-folders"):
        load_images(tmp_path, size=None, channels=3)
    _write(tmp_path / "loose.png", _rgb(0))
    with pytest.raises(DataError, match="1 images but no class sub-folders"):
        load_images(tmp_path, size=None, channels=3)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="1 class folders but no image files"):
        load_images(tmp_path, size=None, channels=3)


def test_folder_mixed_sizes_need_size(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "small.png", np.full((8, 8, 3), 100, np.uint8))
    _write(tmp_path / "a" / "zbig.png", np.full((16, 12, 3), 50, np.uint8))
    with pytest.raises(DataError, match="zbig.png is 16x12"):
        load_images(tmp_path, size=None, channels=3)
    data = load_images(tmp_path, size=(8, 8), channels=1)
    assert data.x.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(data.x[0], 100 / 255, atol=1e-6)
    np.testing.assert_allclose(data.x[1], 50 / 255, atol=1e-6)


def test_folder_limit_keeps_file_order(tmp_path: Path) -> None:
    for i, name in enumerate(["b", "a", "c"]):
        _write(tmp_path / name / "x.png", np.full((4, 4, 3), i * 10, np.uint8))
    data = load_images(tmp_path, size=None, channels=3, limit=2)
    assert data.y.tolist() == [0, 1] and data.class_names == ("a", "b", "c")
    np.testing.assert_allclose(data.x[:, 0, 0, 0], [10 / 255, 0.0], atol=1e-7)


# ----------------------------------------------------------------------------- npz


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_uint8_nhwc(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    data = load_images(_npz(tmp_path / "d.npz", x=x, y=y), size=None, channels=3, num_classes=3)
    assert data.x.shape == (5, 3, 6, 7) and data.x.dtype == np.float32 and data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x, x.transpose(0, 3, 1, 2) / np.float32(255))
    assert data.y.tolist() == y.tolist()


def test_npz_layouts_and_aliases(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    nchw = rng.random((4, 3, 5, 6), dtype=np.float32)
    y = np.arange(4)
    a = load_images(_npz(tmp_path / "f.npz", x=nchw, y=y), size=None, channels=3)
    np.testing.assert_array_equal(a.x, nchw)
    nhwc = nchw.transpose(0, 2, 3, 1)
    b = load_images(_npz(tmp_path / "g.npz", images=nhwc, labels=y), size=None, channels=3)
    np.testing.assert_array_equal(b.x, nchw)
    u8 = rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    c = load_images(_npz(tmp_path / "h.npz", x=u8, y=y), size=None, channels=3)
    np.testing.assert_array_equal(c.x, u8 / np.float32(255))
    onehot = np.eye(4)[[3, 1, 0, 2]]
    d = load_images(_npz(tmp_path / "i.npz", x=u8, y=onehot), size=None, channels=3)
    assert d.y.tolist() == [3, 1, 0, 2]


def test_npz_grayscale_to_three_channels(tmp_path: Path) -> None:
    x = np.random.default_rng(2).integers(0, 256, (3, 5, 5), dtype=np.uint8)
    data = load_images(_npz(tmp_path / "g.npz", x=x, y=np.zeros(3, np.int64)), size=None, channels=3)
    assert data.x.shape == (3, 3, 5, 5)
    for ch in range(3):
        np.testing.assert_array_equal(data.x[:, ch], x / np.float32(255))


def test_npz_rgb_to_one_channel_and_rgba_to_rgb(tmp_path: Path) -> None:
    x = np.zeros((2, 2, 2, 4), np.uint8)
    x[..., 0], x[..., 1], x[..., 2], x[..., 3] = 255, 128, 10, 7
    path = _npz(tmp_path / "c.npz", x=x, y=np.array([0, 1]))
    gray = load_images(path, size=None, channels=1)
    expected = (0.299 * 255 + 0.587 * 128 + 0.114 * 10) / 255
    assert gray.x.shape == (2, 1, 2, 2)
    np.testing.assert_allclose(gray.x, expected, atol=1e-6)
    rgb = load_images(path, size=None, channels=3)
    np.testing.assert_allclose(rgb.x[0, :, 0, 0], [1.0, 128 / 255, 10 / 255], atol=1e-7)


def test_npz_resize_32_to_16(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x[2] = 77  # a constant image must stay constant
    data = load_images(_npz(tmp_path / "r.npz", x=x, y=np.arange(3)), size=(16, 16), channels=3)
    assert data.x.shape == (3, 3, 16, 16)
    assert data.x.min() >= 0.0 and data.x.max() <= 1.0
    np.testing.assert_allclose(data.x[2], 77 / 255, atol=1e-5)
    # antialiasing averages 2x2 blocks: the image mean is preserved
    np.testing.assert_allclose(data.x[:2].mean(axis=(2, 3)), (x[:2] / 255).mean(axis=(1, 2)), atol=2e-3)
    # 4x down: antialiasing averages many pixels, so noise is smoothed far more than by 2x2 sampling
    small = load_images(tmp_path / "r.npz", size=(8, 8), channels=3)
    assert small.x.shape == (3, 3, 8, 8) and float(small.x[:2].std()) < 0.1


def test_npz_label_and_content_errors(tmp_path: Path) -> None:
    x = np.zeros((3, 4, 4, 3), np.uint8)
    path = _npz(tmp_path / "l.npz", x=x, y=np.array([0, 11, 2]))
    with pytest.raises(DataError, match=r"l\.npz go up to 11 but the model has 10 classes"):
        load_images(path, size=None, channels=3, num_classes=10)
    with pytest.raises(DataError, match=r"m\.npz has arrays \['x', 'target'\]"):
        load_images(_npz(tmp_path / "m.npz", x=x, target=np.arange(3)), size=None, channels=3)
    bad = np.full((3, 3, 4, 4), 255.0, np.float32)
    with pytest.raises(DataError, match=r"floats must be in \[0,1\]"):
        load_images(_npz(tmp_path / "f.npz", x=bad, y=np.arange(3)), size=None, channels=3)
    with pytest.raises(DataError, match="3 images and 2 labels"):
        load_images(_npz(tmp_path / "n.npz", x=x, y=np.arange(2)), size=None, channels=3)
    with pytest.raises(DataError, match="must be"):
        load_images(_npz(tmp_path / "d.npz", x=np.zeros((3, 4)), y=np.arange(3)), size=None, channels=3)
    with pytest.raises(DataError, match="no arrays"):
        load_images(_npz(tmp_path / "e.npz"), size=None, channels=3)
    with pytest.raises(DataError, match="contains no images"):
        empty = np.zeros((0, 4, 4, 3), np.uint8)
        load_images(_npz(tmp_path / "z.npz", x=empty, y=np.zeros(0, np.int64)), size=None, channels=3)
    with pytest.raises(DataError, match="2 channels; cannot convert"):
        x2 = np.zeros((3, 5, 5, 2), np.uint8)  # neither axis 1 nor the last is 1/3/4 -> NHWC with C=2
        load_images(_npz(tmp_path / "c2.npz", x=x2, y=np.arange(3)), size=None, channels=3)


def test_other_paths_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "missing", size=None, channels=3)
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"a\.csv is neither a folder nor an \.npz"):
        load_images(tmp_path / "a.csv", size=None, channels=3)
    (tmp_path / "fake.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"cannot read .*fake\.npz"):
        load_images(tmp_path / "fake.npz", size=None, channels=3)
    with pytest.raises(DataError, match="6-channel"):
        load_images(tmp_path, size=None, channels=6)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocessing_numpy_and_torch_agree() -> None:
    x = np.random.default_rng(4).random((2, 3, 4, 4), dtype=np.float32)
    x_before = x.copy()
    pre = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=2.0)
    out_np = pre.apply(x)
    out_t = pre.apply(torch.from_numpy(x))
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_array_equal(out_np, out_t.numpy())
    np.testing.assert_allclose(out_np[1, 2], (x[1, 2] * 2 - 0.406) / 0.225, rtol=1e-6)
    np.testing.assert_array_equal(x, x_before)
    t64 = torch.from_numpy(x).double()
    assert pre.apply(t64).dtype == torch.float64
    ident = PRESETS["unit"].apply(x)
    assert ident is not x
    np.testing.assert_array_equal(ident, x)
    np.testing.assert_allclose(PRESETS["minus1_1"].apply(x[:, :1]), x[:, :1] * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(PRESETS["0_255"].apply(x), x * 255, rtol=1e-6)
    with pytest.raises(SettingsError, match="3 values but the images have 1 channels"):
        pre.apply(x[:, :1])


def test_preprocessing_parse_and_roundtrip() -> None:
    assert Preprocessing.parse("imagenet") == PRESETS["imagenet"]
    assert Preprocessing.parse(" CIFAR10 ").mean == (0.4914, 0.4822, 0.4465)
    custom = Preprocessing.parse("mean=0.5,0.5,0.5; std=0.25,0.25,0.25;scale=1")
    assert custom == Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert Preprocessing.parse("scale=255") == PRESETS["0_255"]
    for bad in ("", "imagenett", "mean=a,b", "std=0,1,1", "scale=1,2", "mean=1;mean=2", "gamma=2"):
        with pytest.raises(SettingsError, match="imagenet"):
            Preprocessing.parse(bad)
    for pre in [*PRESETS.values(), custom]:
        assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocessing.from_dict({"mean": [0.1]}) == Preprocessing(mean=(0.1,))
    with pytest.raises(SettingsError):
        Preprocessing.from_dict({"mean": [0.1], "gamma": 1})
    with pytest.raises(SettingsError, match="> 0"):
        Preprocessing(std=(0.2, -1.0, 0.2))
    desc = PRESETS["imagenet"].describe()
    assert "imagenet" in desc and "mean (0.485, 0.456, 0.406)" in desc and "std (0.229" in desc
    assert PRESETS["0_255"].describe() == "0_255: [0,255] scale, no mean/std"


# ----------------------------------------------------------------------------- ImageSet


def test_split_stratified_deterministic_disjoint() -> None:
    data = _imageset(n_per_class=10, classes=3)
    train, hold = data.split(0.2, seed=5)
    assert len(train) == 24 and len(hold) == 6
    assert np.bincount(hold.y).tolist() == [2, 2, 2]
    train2, hold2 = data.split(0.2, seed=5)
    np.testing.assert_array_equal(hold.x, hold2.x)
    np.testing.assert_array_equal(train.y, train2.y)
    _, hold3 = data.split(0.2, seed=6)
    assert not np.array_equal(hold.x, hold3.x)
    # disjoint and complete: match images back to their original rows
    keys = {data.x[i].tobytes(): i for i in range(len(data))}
    rows_t = {keys[img.tobytes()] for img in train.x}
    rows_h = {keys[img.tobytes()] for img in hold.x}
    assert not rows_t & rows_h and len(rows_t | rows_h) == len(data)


def test_split_counts_and_keeps_one_per_class() -> None:
    x = np.zeros((7, 1, 2, 2), np.float32)
    data = ImageSet(x, np.array([0, 0, 0, 0, 0, 1, 2]))
    train, hold = data.split(4)
    assert len(hold) == 4 and sorted(set(train.y.tolist())) == [0, 1, 2]
    train, hold = data.split(6)  # impossible to keep every class: train still gets one image
    assert len(train) == 1
    with pytest.raises(SettingsError, match="leaves no training images"):
        data.split(7)
    with pytest.raises(SettingsError):
        data.split(1.0)


def test_take_per_class_and_subset() -> None:
    data = _imageset(n_per_class=5, classes=3)
    few = data.take_per_class(2, seed=1)
    assert np.bincount(few.y).tolist() == [2, 2, 2]
    assert np.array_equal(data.take_per_class(2, seed=1).x, few.x)
    sub = data.subset([3, 0])
    np.testing.assert_array_equal(sub.x, data.x[[3, 0]])
    assert sub.source == "synthetic"


# ----------------------------------------------------------------------------- saving


def test_folder_and_npz_roundtrips_agree(tmp_path: Path) -> None:
    data = _imageset(n_per_class=3, classes=3, size=6)
    data = ImageSet(data.x, data.y, ("airplane", "bird", "cat"), "synthetic")
    save_image_folder(data, tmp_path / "folder")
    save_npz(data, tmp_path / "data.npz")
    from_folder = load_images(tmp_path / "folder", size=None, channels=3)
    from_npz = load_images(tmp_path / "data.npz", size=None, channels=3)
    assert from_folder.class_names == from_npz.class_names == ("airplane", "bird", "cat")
    order = np.argsort(data.y, kind="stable")  # the folder groups images by class
    np.testing.assert_array_equal(from_folder.y, data.y[order])
    np.testing.assert_allclose(from_folder.x, from_npz.x[order], atol=1 / 255 + 1e-7)
    np.testing.assert_allclose(from_npz.x, data.x, atol=0.5 / 255 + 1e-7)
    with pytest.raises(DataError, match="not an empty folder"):
        save_image_folder(data, tmp_path / "folder")


def test_save_folder_unsorted_names_fall_back_to_indices(tmp_path: Path) -> None:
    data = ImageSet(np.zeros((2, 1, 3, 3), np.float32), np.array([0, 1]), ("zebra", "ant"))
    save_image_folder(data, tmp_path / "out", fmt="bmp")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0", "1"]
    back = load_images(tmp_path / "out", size=None, channels=1)
    assert back.y.tolist() == [0, 1] and back.x.shape == (2, 1, 3, 3)


# ----------------------------------------------------------------------------- augmentation


def _batch(n: int = 16, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0)) + 0.1  # no zeros


def test_augment_is_seeded() -> None:
    x = _batch()
    a = augment_batch(x, torch.Generator().manual_seed(1), padding=2)
    b = augment_batch(x, torch.Generator().manual_seed(1), padding=2)
    c = augment_batch(x, torch.Generator().manual_seed(2), padding=2)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_identity_and_flip() -> None:
    x = _batch()
    same = augment_batch(x, torch.Generator().manual_seed(0), padding=0, flip=False)
    assert torch.equal(same, x)
    x_before = x.clone()
    out = augment_batch(x, torch.Generator().manual_seed(3), padding=0, flip=True)
    assert torch.equal(x, x_before)
    flipped = [torch.equal(o, torch.flip(i, dims=[2])) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two
    assert 0 < sum(flipped) < len(x)


def test_augment_crop_values_come_from_padded_image() -> None:
    x = torch.full((64, 1, 8, 8), 0.5)
    out = augment_batch(x, torch.Generator().manual_seed(4), padding=3, flip=False)
    assert set(out.unique().tolist()) <= {0.0, 0.5}
    nonzero = out[:, 0] != 0
    # the non-padded part is one contiguous rectangle of at least 5x5 pixels
    rows, cols = nonzero.any(dim=2), nonzero.any(dim=1)
    assert (rows.sum(1) >= 5).all() and (cols.sum(1) >= 5).all()
    assert torch.equal(nonzero, rows[:, :, None] & cols[:, None, :])
    # zeros only in border bands: rows/cols with content are contiguous
    for r in rows:
        idx = torch.nonzero(r).flatten()
        assert idx.max() - idx.min() + 1 == len(idx)
    assert (out == 0).any(dim=(1, 2, 3)).sum() > 32  # most images are shifted (48 of 49 offsets)
    # a real image: every output pixel equals the original at a shifted position
    img = _batch(1)
    shifted = augment_batch(img, torch.Generator().manual_seed(9), padding=2, flip=False)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    windows = [padded[..., i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
    assert any(torch.equal(shifted, win) for win in windows)


def test_default_crop_padding() -> None:
    assert default_crop_padding(32, 32) == 4
    assert default_crop_padding(224, 224) == 28
    assert default_crop_padding(64, 20) == 3
    assert default_crop_padding(4, 4) == 1
    with pytest.raises(SettingsError):
        default_crop_padding(0, 5)
