#!/usr/bin/env bash
# The main job: set up (if needed), then repair the default sample model with the bundled clean
# data (500 CIFAR-10 images), and print ACC/ASR before and after, measured in onnxruntime.
# Writes out/repaired.onnx plus masks and a report (out/repaired.report.md).
# Extra arguments go to `anp-onnx repair` (e.g. --iterations 2000 for the reference setting).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
MODEL=${MODEL:-sample_models/badnets_preact.onnx}
TRIGGER=${TRIGGER:-badnets}
mkdir -p out
# the triggered test set: the bundled clean test images with the model's trigger (true labels kept)
python sample_models/triggers.py "$TRIGGER" sample_models/data/test_clean.npz "out/test_$TRIGGER.npz"
exec anp-onnx repair "$MODEL" --data sample_models/data/clean_500.npz \
    --test sample_models/data/test_clean.npz --poisoned "out/test_$TRIGGER.npz" \
    --out out/repaired.onnx --overwrite "$@"
