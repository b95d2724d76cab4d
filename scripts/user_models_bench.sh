#!/usr/bin/env bash
# BENCHMARKS.md, "Your own model": every command on three models that are not demos, timed.
#
#   cosine-unet   examples/models/cosine-unet             diffusers DDPMPipeline folder (pixels)
#   flow-reversed examples/models/flow-reversed/model.py  .py entry point, flow with reversed time
#   sd-tiny       a tiny StableDiffusionPipeline folder    random weights, CLIP tokenizer made
#                 (tests/tiny_folders.py), with prompts    locally: the commands and their cost
#
# Outputs (command output, JSON, wall times) go to docs/bench/user-models/; the statistics and
# samples to $WORK. Run from the repository root: scripts/user_models_bench.sh [MODEL...]
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/diffsolve
PY=.venv/bin/python
OUT=${OUT:-docs/bench/user-models}
WORK=${WORK:-/tmp/diffsolve-user-models}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT" "$WORK"

# held-out data for the Fréchet distance: the digits test split at 16x16, as the models were
# trained (bilinear upsampling of the 8x8 images)
$PY - "$WORK/digits16-test.npy" <<'EOF'
import sys
import numpy as np
import torch
from diffsolve.app.data import load_digits
x = torch.nn.functional.interpolate(load_digits("test"), size=16, mode="bilinear", align_corners=False)
np.save(sys.argv[1], x.numpy())
EOF
# the tiny SD pipeline folder and its prompts
$PY - "$WORK/sd-tiny" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_folders import sd_folder
sd_folder(Path(sys.argv[1]))
EOF
printf 'a photo of a red cat\na blue dog\na small green drawing\n' > "$WORK/prompts.txt"

# timed NAME COMMAND...: stdout to $OUT/NAME.txt, the wall time appended to $OUT/times.txt
timed() {
    local name=$1
    shift
    local start end
    start=$(date +%s.%N)
    "$@" > "$OUT/$name.txt" 2> "$WORK/$name.err" || { echo "$name failed: see $WORK/$name.err"; return 1; }
    end=$(date +%s.%N)
    printf '%-28s %8.1f s   %s\n' "$name" "$(echo "$end - $start" | bc)" "$*" >> "$OUT/times.txt"
}

run_model() {
    local name=$1 data=$2
    shift 2
    local model=("$@")
    local ems="$WORK/$name-ems.safetensors" stats="$WORK/$name-stats.safetensors"
    rm -rf "$ems" "$stats" "$WORK/$name-samples" "$WORK/$name-schedule.json"
    local held=()
    [ -n "$data" ] && held=(--data "$data")
    timed "$name-check-model" $D check-model "${model[@]}"
    timed "$name-ems" $D ems "${model[@]}" --out "$ems" --yes
    timed "$name-gaussian-stats" $D gaussian-stats "${model[@]}" --out "$stats"
    timed "$name-sample" $D sample "${model[@]}" --ems "$ems" --seeds 0-63 --nfe 10 \
        --out "$WORK/$name-samples"
    timed "$name-bench" $D bench "${model[@]}" --ems "$ems" "${held[@]}" --nfe 5,10,20 \
        --samples 256 --json "$OUT/$name-bench.json"
    timed "$name-tune" $D tune "${model[@]}" --ems "$ems" --gaussian-stats "$stats" \
        --solver dpm-solver-v3 --nfe 5 --out "$WORK/$name-schedule.json"
    cp "$WORK/$name-samples/grid.png" "$OUT/$name-samples.png"
}

models=("${@:-cosine-unet flow-reversed sd-tiny}")
for m in ${models[*]}; do
    case $m in
        cosine-unet) run_model cosine-unet "$WORK/digits16-test.npy" --model examples/models/cosine-unet ;;
        flow-reversed) run_model flow-reversed "$WORK/digits16-test.npy" \
            --model examples/models/flow-reversed/model.py:load ;;
        sd-tiny) run_model sd-tiny "" --model "$WORK/sd-tiny" --prompts "$WORK/prompts.txt" ;;
        *) echo "unknown model $m" >&2; exit 2 ;;
    esac
done
cat "$OUT/times.txt"
