#!/usr/bin/env bash
# One command for the whole "train the fashion-mnist preset, then measure it" job, on any device:
#   bash bench/pretrained_run.sh [RUN_DIR] [--device cuda]
# Writes RUN_DIR (the model), RUN_DIR/bench.json (throughput) and RUN_DIR/eval.json (quality).
# Needs the full Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist, or --data-dir via
# LATENTDIFF_FASHION_MNIST_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/fashion-mnist}
shift || true
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
python -m latentdiff train-autoencoder --config configs/fashion-mnist.yaml --run-dir "$RUN" --no-progress "$@"
mid=$(date +%s)
python -m latentdiff train --config configs/fashion-mnist.yaml --run-dir "$RUN" --no-progress "$@"
end=$(date +%s)
echo "{\"autoencoder_seconds\": $((mid - start)), \"denoiser_seconds\": $((end - mid))}" > "$RUN/train_time.json"
python bench/run.py --parts speed --speed-model "$RUN" --out "$RUN/bench" "$@"
cp "$RUN/bench/results.json" "$RUN/bench.json"
python -m latentdiff eval --model "$RUN" --n 10000 --json --no-progress | tail -n 1 > "$RUN/eval.json"
python -m latentdiff eval-autoencoder --model "$RUN" --json | tail -n 1 > "$RUN/eval_autoencoder.json"
cat "$RUN/train_time.json" "$RUN/bench.json" "$RUN/eval.json" "$RUN/eval_autoencoder.json"
