#!/usr/bin/env bash
# Create .venv/ and install anp-onnx with the pinned, known-good stack of constraints.txt.
# Idempotent: does nothing when the environment is already up to date.
#   ANP_ONNX_KEEP_TORCH=1  keep an already-installed torch (e.g. a CUDA build) instead of the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.anp-onnx-setup
want=$(cat constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setting up .venv (first run: about a minute)..." >&2
pip() { python -m pip -q --disable-pip-version-check "$@"; }
# torch first and pinned: a bare "torch" would pull the newest CUDA build (GBs).
if [ "${ANP_ONNX_KEEP_TORCH:-0}" = 1 ] && python -c "import torch" 2>/dev/null; then
    echo "keeping installed torch $(python -c 'import torch; print(torch.__version__)')" >&2
else
    pip install -c constraints.txt torch
fi
pip install -c constraints.txt onnx onnxruntime-training numpy protobuf pillow tqdm matplotlib \
    PySide6-Essentials pytest pytest-qt hypothesis
# onnx2torch declares torchvision, which has no CPU build on the registry: install it without
# dependencies (anp_onnx imports it with a torchvision stand-in when needed), and this package too.
pip install --no-deps -c constraints.txt onnx2torch
pip install --no-deps --no-build-isolation -e . 2>/dev/null || pip install --no-deps -e .
echo "$want" > "$stamp"
