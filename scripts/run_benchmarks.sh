#!/usr/bin/env bash
# Reproduce every table and plot of BENCHMARKS.md (2 CPU cores: about 25 minutes).
#   scripts/run_benchmarks.sh [STEP ...]     steps: bench scale adapters teleport guidance inversion ems properties
# Outputs: docs/bench/*.txt (the printed tables), docs/bench/*.json, docs/img/bench-*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
DS=.venv/bin/diffsolve
OUT=docs/bench
mkdir -p "$OUT" docs/img
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(bench scale adapters teleport guidance inversion ems properties)

for step in "${steps[@]}"; do
  case "$step" in
    bench)
      for model in digits digits-cond digits-flow gaussian gmm; do
        $DS bench --model "$model" --json "$OUT/bench-$model.json" \
          --plot "docs/img/bench-$model.png" 2>/dev/null | tee "$OUT/bench-$model.txt"
      done ;;
    scale)
      OMP_NUM_THREADS=2 $DS bench --profile scale --json "$OUT/scale-cpu.json" \
        --plot docs/img/bench-scale-cpu.png | tee "$OUT/scale-cpu.txt" ;;
    adapters)
      OMP_NUM_THREADS=1 .venv/bin/python scripts/adapter_pipelines.py --repeats 7 \
        | grep "^|" | tee "$OUT/adapters-cpu.txt" ;;
    teleport)
      $DS bench --sweep teleport --model digits --nfe 5,6,8,10,15 --skips 0,0.1,0.2,0.3,0.4 \
        --json "$OUT/teleport-digits.json" | tee "$OUT/teleport-digits.txt" ;;
    guidance)
      $DS bench --sweep guidance --model digits-cond --nfe 10 --methods cfg,apg \
        --scales 1,2,3,5,7,10 --json "$OUT/guidance-digits-cond.json" \
        | tee "$OUT/guidance-digits-cond.txt" ;;
    inversion)
      $DS bench --sweep inversion --model digits --nfe 5,10,20,50 \
        --json "$OUT/inversion-digits.json" | tee "$OUT/inversion-digits.txt" ;;
    ems)
      /usr/bin/time -f "wall %e s" $DS ems --model digits --samples 1024 --grid 200 \
        --out /tmp/diffsolve-ems-timing.safetensors 2>&1 | tr '\r' '\n' | tail -n 3 \
        | tee "$OUT/ems-timing.txt" ;;
    properties)
      DIFFSOLVE_HYPOTHESIS_EXAMPLES=2000 .venv/bin/python -m pytest -q -s tests/test_properties.py \
        2>&1 | grep -E "property cases|passed|failed" | tee "$OUT/properties.txt" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
