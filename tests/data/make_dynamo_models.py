"""Regenerate the torch *dynamo* exporter fixtures of tests/test_dynamo.py (needs onnxscript).

    python tests/data/make_dynamo_models.py

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
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from builders import train_backdoor_net  # noqa: E402


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


def export_dynamo(net: nn.Module, path: Path, **kwargs) -> None:
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (torch.rand(2, 3, 16, 16),), dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                    verbose=False, **kwargs)
    program.save(str(path))
    print(f"wrote {path.name}")


def main() -> int:
    backdoored = train_backdoor_net(target=0)
    export_dynamo(backdoored, HERE / "dynamo_backdoor.onnx")
    export_dynamo(backdoored, HERE / "dynamo_backdoor_unoptimized.onnx", optimize=False)
    torch.manual_seed(0)
    export_dynamo(NormNet(), HERE / "dynamo_norms.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
