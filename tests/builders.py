"""Small real ONNX models built in code for the tests (opset <= 21, IR <= 10)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn


class TinyBNNet(nn.Module):
    """Conv-BN-ReLU x2, global pool, linear: 8 + 16 BatchNorm neurons."""

    def __init__(self, channels: int = 3, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def randomize_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return net


def export(net: nn.Module, path: Path, *, size: int = 16, channels: int = 3, opset: int = 13,
           fold_bn: bool = False, nhwc: bool = False, dynamic_batch: bool = True) -> Path:
    """Export ``net`` (eval mode) with the legacy exporter; BN kept unless ``fold_bn``."""
    net = net.eval()
    module: nn.Module = _NHWC(net) if nhwc else net
    shape = (1, size, size, channels) if nhwc else (1, channels, size, size)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.rand(shape), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=fold_bn, input_names=["input"], output_names=["logits"],
                          dynamic_axes=axes)
    return path


class _NHWC(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


def tiny_model(path: Path, *, seed: int = 0, **kwargs) -> Path:
    """A TinyBNNet with random weights exported to ``path``."""
    torch.manual_seed(seed)
    net = randomize_bn(TinyBNNet(channels=kwargs.get("channels", 3)), seed)
    return export(net, path, **kwargs)


def random_images(n: int = 64, size: int = 16, channels: int = 3, classes: int = 10, seed: int = 0):
    from anp_onnx.data import ImageSet

    rng = np.random.default_rng(seed)
    x = rng.random((n, channels, size, size), dtype=np.float32)
    return ImageSet(x, (np.arange(n) % classes).astype(np.int64), source="random")


def model_bytes(model: onnx.ModelProto) -> bytes:
    buf = io.BytesIO()
    onnx.save_model(model, buf)
    return buf.getvalue()


def initializer(model: onnx.ModelProto, name: str) -> Optional[np.ndarray]:
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    return None


# --- a small model with a planted backdoor, trained in seconds on synthetic images ----------------

PATCH = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)


def synthetic_images(n: int, seed: int, size: int = 16, classes: int = 10):
    """Class = one of ``classes`` smooth colour patterns (fixed) plus per-image noise."""
    from anp_onnx.data import ImageSet

    protos = np.random.default_rng(123).random((classes, 3, 4, 4)).astype(np.float32)
    protos = torch.nn.functional.interpolate(torch.from_numpy(protos), size=(size, size), mode="bilinear",
                                             align_corners=False).numpy()
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = 0.6 * protos[y] + 0.4 * rng.random((n, 3, size, size), dtype=np.float32)
    return ImageSet(x.astype(np.float32), y.astype(np.int64), source=f"synthetic-{seed}")


def add_trigger(images):
    """BadNets-style 3x3 checkerboard near the bottom-right corner (labels kept)."""
    from anp_onnx.data import ImageSet

    x = images.x.copy()
    x[:, :, -4:-1, -4:-1] = PATCH
    return ImageSet(x, images.y.copy(), source=images.source + "+trigger")


class BackdoorNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.f = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def train_backdoored(path: Path, *, target: int = 0, n: int = 3000, poison: float = 0.1, epochs: int = 4,
                     seed: int = 0, fold_bn: bool = False) -> Path:
    """Train BackdoorNet on synthetic images with ``poison`` of them triggered and relabelled; export it."""
    net = train_backdoor_net(target=target, n=n, poison=poison, epochs=epochs, seed=seed)
    return export(net, path, fold_bn=fold_bn)


def train_backdoor_net(*, target: int = 0, n: int = 3000, poison: float = 0.1, epochs: int = 4,
                       seed: int = 0) -> nn.Module:
    """BackdoorNet trained on synthetic images with ``poison`` of them triggered and relabelled."""
    torch.manual_seed(seed)
    data = synthetic_images(n, seed=seed + 1)
    k = int(poison * n)
    x, y = data.x.copy(), data.y.copy()
    x[:k, :, -4:-1, -4:-1] = PATCH
    y[:k] = target
    net = BackdoorNet()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def torch_with_plan(rep, plan, x: np.ndarray) -> np.ndarray:
    """Logits of ``rep``'s torch model with ``plan`` applied (masks reset afterwards)."""
    from anp_onnx.convert import torch_logits

    rep.apply_plan(plan)
    try:
        rep.net.eval()
        return torch_logits(rep.net, x)
    finally:
        rep.reset_masks()


def ort_on(path, x: np.ndarray) -> np.ndarray:
    """onnxruntime logits of the ONNX file at ``path`` on images ``x`` (no preprocessing)."""
    from anp_onnx.runtime import ort_logits, to_model_input
    from anp_onnx.preprocessing import Preprocessing
    from anp_onnx.model import load_model

    loaded = load_model(path)
    return ort_logits(loaded, to_model_input(loaded, x, Preprocessing()))


def command_files(root: Path) -> dict[str, Path]:
    """A tiny model with clean, test and triggered-looking .npz sets in ``root`` (the CLI tests' files)."""
    from anp_onnx.data import ImageSet, save_npz

    f = {"root": root, "model": tiny_model(root / "model.onnx", seed=0)}
    save_npz(random_images(64, seed=0), root / "clean.npz")
    save_npz(random_images(40, seed=1), root / "test.npz")
    poisoned = random_images(30, seed=2)
    save_npz(ImageSet(poisoned.x, (np.arange(30) % 3).astype(np.int64)), root / "poisoned.npz")
    f.update(clean=root / "clean.npz", test=root / "test.npz", poisoned=root / "poisoned.npz")
    return f
