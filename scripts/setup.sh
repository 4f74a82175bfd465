#!/usr/bin/env bash
# Install latentdiff (editable, with the test extras and ONNX Runtime) into the current Python.
# An installed torch is kept as it is; only when none is importable is torch==2.13.0 installed
# (a local CPU build on this project's machines; with CUDA, install the torch you want first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev,onnx,serve,browser,provenance,text,tensorboard]"  # browser: Playwright, driving the system chromium
