#!/usr/bin/env bash
# The GPU checks of issue 11, in one go (under 8 minutes on one H100): the scale bench on CUDA,
# every registry solver on CUDA vs CPU (float64 network, <= 1e-6), and the diffusers pipeline
# with every diffsolve scheduler on CUDA. Writes to $OUT (the device tool's folder) or
# ./gpu-check; record the printed tables in BENCHMARKS.md with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
[ -x .venv/bin/python ] || ./setup.sh
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 300 .venv/bin/diffsolve bench --profile scale --device cuda \
  --json "$OUT/scale-cuda.json" --plot "$OUT/bench-scale-cuda.png" | tee "$OUT/scale-cuda.txt"
timeout 150 "$PY" scripts/gpu_check.py "$OUT" | tee "$OUT/gpu-check.txt"
