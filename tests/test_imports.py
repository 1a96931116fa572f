"""The package root imports lazily; the onnxruntime-side modules never load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import anp_onnx

TORCH_FREE = ["anp_onnx", "anp_onnx.evaluate", "anp_onnx.model", "anp_onnx.data", "anp_onnx.preprocessing",
              "anp_onnx.runtime", "anp_onnx.passes", "anp_onnx.metadata", "anp_onnx.results", "anp_onnx.options"]


ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter from the repository root (so this checkout is imported)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    done = _fresh(f"import {module}, sys; assert 'torch' not in sys.modules, sorted(sys.modules)")
    assert done.returncode == 0, done.stderr


def test_every_public_name_is_exported():
    assert "__version__" in anp_onnx.__all__ and anp_onnx.__version__ == "0.1.0"
    for name in anp_onnx.__all__:
        assert getattr(anp_onnx, name) is not None, name
    assert set(anp_onnx.__all__) <= set(dir(anp_onnx))
    with pytest.raises(AttributeError):
        anp_onnx.no_such_name  # noqa: B018


def test_prune_stays_the_function_whatever_is_imported_first():
    # importing the submodule anp_onnx.prune first must not make anp_onnx.prune the module
    done = _fresh("import anp_onnx.prune, anp_onnx, inspect\n"
                  "from anp_onnx import Repairer, prune\n"
                  "assert inspect.isfunction(prune) and inspect.isfunction(anp_onnx.prune), anp_onnx.prune\n"
                  "assert prune is anp_onnx.api.prune\n")
    assert done.returncode == 0, done.stderr
