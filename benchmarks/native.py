"""Native torch models for the speed benchmark, and a perturbable BatchNorm as in the ANP reference.

* :class:`NoisyBatchNorm2d`: a BatchNorm2d with a mask, a weight noise and a bias noise per
  channel, the reference ANP layer of docs ANP_SPEC.md ("The perturbed layer"), written here from
  the spec; :func:`install_noisy_bn` swaps every BatchNorm2d of a module for one.
* the native models: the I-BAU VGG and the PreAct sample (classes from
  ``sample_models/make_samples.py``), a CIFAR ResNet-18 and an ImageNet-sized ResNet-50, both
  standard torchvision-style definitions written here (torchvision is not installed);
* :func:`load_from_onnx`: a native module's weights from an ONNX file whose initializers carry the
  state-dict names (the legacy exporter with ``do_constant_folding=False`` keeps them), and
  :func:`onnx_parity`, the largest |torch - onnxruntime| logit difference;
* :func:`export_bn_kept`: the legacy ONNX export with every BatchNorm kept as a node.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
IBAU_DIR = ROOT.parent / "shared" / "data" / "third_party_models" / "ibau"


class NoisyBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose channels can be masked and perturbed (ANP_SPEC, "The perturbed layer").

    With noise: ``BN(x; gamma * (mask + noise), beta * (1 + noise_bias))``; without noise:
    ``BN(x; gamma * mask, beta)``. ``batch_stats=None`` follows ``self.training`` as the reference
    does (train mode: batch statistics, running statistics updated); True or False force batch or
    running statistics whatever the mode. ``update_stats=False`` leaves the running statistics alone
    when batch statistics are used (the floor loop needs no running statistics).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.neuron_mask = nn.Parameter(torch.ones(num_features))
        self.neuron_noise = nn.Parameter(torch.zeros(num_features))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(num_features))
        self.perturbed = False
        self.batch_stats: Optional[bool] = None
        self.update_stats = True

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "NoisyBatchNorm2d":
        """A copy of ``bn`` (same parameters and statistics) with mask 1 and no noise."""
        new = cls(bn.num_features, bn.eps, bn.momentum)
        new.load_state_dict(bn.state_dict(), strict=False)
        new.train(bn.training)
        return new.to(bn.weight.device)

    def reset(self, eps: float = 0.0, generator: Optional[torch.Generator] = None) -> None:
        """Noise drawn uniformly from [-eps, eps] (the reference's ``reset(rand_init=True)``), or 0."""
        with torch.no_grad():
            for p in (self.neuron_noise, self.neuron_noise_bias):
                if eps > 0:
                    p.copy_(torch.rand(p.shape, generator=generator).mul_(2 * eps).sub_(eps))
                else:
                    p.zero_()

    def clip_mask(self) -> None:
        with torch.no_grad():
            self.neuron_mask.clamp_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perturbed:
            weight = self.weight * (self.neuron_mask + self.neuron_noise)
            bias = self.bias * (1.0 + self.neuron_noise_bias)
        else:
            weight, bias = self.weight * self.neuron_mask, self.bias
        batch = self.training if self.batch_stats is None else self.batch_stats
        if not batch:
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        if not self.update_stats:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, True, momentum, self.eps)


def install_noisy_bn(model: nn.Module) -> dict[str, NoisyBatchNorm2d]:
    """Replace every BatchNorm2d of ``model`` in place by a :class:`NoisyBatchNorm2d`; name -> layer."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.BatchNorm2d) and not isinstance(m, NoisyBatchNorm2d)]
    for name, bn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NoisyBatchNorm2d.from_bn(bn))
    return {name: m for name, m in model.named_modules() if isinstance(m, NoisyBatchNorm2d)}


# --------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck (stride on the 3x3 conv): 1x1-BN-ReLU-3x3-BN-ReLU-1x1-BN plus shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class CifarResNet18(nn.Module):
    """The usual CIFAR ResNet-18: 3x3 stem (64), 4 stages of 2 basic blocks (64/128/256/512), GAP, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        cin = 64
        for i, width in enumerate((64, 128, 256, 512)):
            for b in range(2):
                blocks.append(BasicBlock(cin, width, 2 if i > 0 and b == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class ResNet50(nn.Module):
    """ImageNet ResNet-50 (torchvision layout, 224x224 input, 1000 classes, ~25.6M parameters)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: list[nn.Module] = []
        cin = 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            blocks = []
            for b in range(count):
                blocks.append(Bottleneck(cin, width, 2 if i > 0 and b == 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(out), 1), 1))


def sample_classes():
    """(PreActResNetMini, IBAUSmallVGG) from sample_models/make_samples.py."""
    if str(SAMPLES) not in sys.path:
        sys.path.insert(0, str(SAMPLES))
    from make_samples import build_torch_defs  # noqa: E402 - the samples' own definitions

    _, preact, _, vgg = build_torch_defs()
    return preact, vgg


def seeded(model_type: type, seed: int = 0, **kwargs) -> nn.Module:
    """``model_type(**kwargs)`` with weights drawn under ``torch.manual_seed(seed)``, in eval mode.

    BatchNorm layers get random affine parameters and statistics too (gamma, var in [0.5, 1.5],
    beta, mean ~ N(0, 0.1)), so no two layers share values (the exporter would merge identical
    initializers, unlike in a trained model).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_type(**kwargs).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        return model


def ibau_vgg(checkpoint: Path = IBAU_DIR / "badnets_8_02_ckpt.pth") -> nn.Module:
    """The I-BAU BadNets VGG with the authors' weights (the checkpoint's ``net`` state dict)."""
    _, vgg = sample_classes()
    model = vgg()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["net"], strict=True)
    return model.eval()


def preact_from_onnx(path: Path = SAMPLES / "badnets_preact.onnx") -> nn.Module:
    """The PreAct sample rebuilt from its ONNX initializers (no torch checkpoint is shipped)."""
    preact, _ = sample_classes()
    model = preact()
    load_from_onnx(model, path)
    return model.eval()


# --------------------------------------------------------------------------- ONNX


def load_from_onnx(model: nn.Module, path: Path) -> list[str]:
    """Copy into ``model`` the ONNX initializers named like its state-dict entries.

    Every parameter and buffer must be found with the right shape, except BatchNorm's
    ``num_batches_tracked`` (not exported); returns the initializer names not used (constants).
    """
    import onnx
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    state = model.state_dict()
    missing = [k for k in state if k not in inits and not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(f"{path.name}: no initializer for {missing[:5]} ({len(missing)} in all)")
    new = {}
    for key, value in state.items():
        if key in inits:
            array = torch.from_numpy(np.array(inits[key]))
            if tuple(array.shape) != tuple(value.shape):
                raise ValueError(f"{path.name}: {key} has shape {tuple(array.shape)}, the module {tuple(value.shape)}")
            new[key] = array.to(value.dtype)
        else:
            new[key] = value
    model.load_state_dict(new, strict=True)
    return sorted(set(inits) - set(state))


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime (CPU) logits of the model at ``path`` on ``x`` (its first input)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def onnx_parity(model: nn.Module, path: Path, x: np.ndarray) -> float:
    """Max |native eval-mode logits - onnxruntime logits| on ``x`` (NCHW float32)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ours = model(torch.from_numpy(x.astype(np.float32))).numpy()
    model.train(was_training)
    return float(np.max(np.abs(ours - onnx_logits(path, x))))


def export_bn_kept(model: nn.Module, path: Path, input_shape: Sequence[int] = (2, 3, 32, 32)) -> Path:
    """Legacy (TorchScript) ONNX export in eval mode, opset 17, every BatchNorm kept as a node."""
    model = model.eval()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.rand(*input_shape),), str(path), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path
