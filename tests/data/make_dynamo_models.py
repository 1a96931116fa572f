"""Regenerate the torch *dynamo* exporter fixtures of tests/test_dynamo.py (needs onnxscript).

    python tests/data/make_dynamo_models.py [NAME ...]   # all fixtures, or only the named ones

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) needs the onnxscript package, which
the test environment does not install; so its output is committed here and the tests run on it.
Models (all made here, from the test builders; no third-party weights):

* ``dynamo_backdoor.onnx``: the planted-backdoor BackdoorNet of tests/builders.py (target 0),
  exported with the exporter's defaults: its optimiser folds every BatchNorm into the Conv before
  it (IR 10, opset 20, no BatchNormalization node).
* ``dynamo_backdoor_unoptimized.onnx``: the same weights with ``optimize=False``: BatchNormalization
  nodes, shape arithmetic from Constant nodes, ``Reshape(allowzero=1)`` on a computed shape.
* ``dynamo_norms.onnx``: a small net with GroupNorm (the exporter decomposes it into
  Reshape / InstanceNormalization / Reshape / Mul / Add) and LayerNorm, random weights.
* ``dynamo_unoptimized_ops.onnx``: :class:`OpsNet` (conv + BatchNorm + linear, random weights) with
  ``optimize=False``: the raw ops onnx2torch 1.5.15 has no converter for (CastLike, Gelu, Mish,
  SplitToSequence + SequenceAt, Split-18 with num_outputs; see anp_onnx/onnx2torch_dynamo.py).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch.nn.functional as F  # noqa: E402

from builders import randomize_bn, train_backdoor_net  # noqa: E402


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.LayerNorm([16, 8, 8]), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class OpsNet(nn.Module):
    """Conv-BN x2 and a linear layer, written with what the unoptimised dynamo export keeps as raw ops:
    arithmetic with Python numbers (CastLike), ReLU6 (Clip with CastLike bounds), GELU (Gelu from
    opset 20), Mish, torch.chunk (SplitToSequence + SequenceAt), torch.unbind (Squeeze/Unsqueeze
    axes as Constant lists) and GLU (Split-18 with num_outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv1(x * 2.0 - 1.0)))
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.stack(torch.unbind(F.gelu(a, approximate="tanh") + F.mish(b), 1)[::-1], 1)
        x = torch.relu(self.bn2(self.conv2(F.glu(torch.cat([x, x.flip(1)], 1), 1))))
        return self.fc(x.mean((2, 3))) / 2


def ops_net(seed: int = 0) -> OpsNet:
    torch.manual_seed(seed)
    return randomize_bn(OpsNet(), seed).eval()


def export_dynamo(net: nn.Module, path: Path, **kwargs) -> None:
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (torch.rand(2, 3, 16, 16),), dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                    verbose=False, **kwargs)
    program.save(str(path))
    print(f"wrote {path.name}")


def main(names: list[str]) -> int:
    wanted = set(names) or {"dynamo_backdoor", "dynamo_backdoor_unoptimized", "dynamo_norms", "dynamo_unoptimized_ops"}
    if wanted & {"dynamo_backdoor", "dynamo_backdoor_unoptimized"}:
        backdoored = train_backdoor_net(target=0)
        if "dynamo_backdoor" in wanted:
            export_dynamo(backdoored, HERE / "dynamo_backdoor.onnx")
        if "dynamo_backdoor_unoptimized" in wanted:
            export_dynamo(backdoored, HERE / "dynamo_backdoor_unoptimized.onnx", optimize=False)
    if "dynamo_norms" in wanted:
        torch.manual_seed(0)
        export_dynamo(NormNet(), HERE / "dynamo_norms.onnx")
    if "dynamo_unoptimized_ops" in wanted:
        export_dynamo(ops_net(), HERE / "dynamo_unoptimized_ops.onnx", optimize=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
