#!/usr/bin/env bash
# Issue 15 on a lent GPU machine (one H100, 16 CPU cores), as one command:
#   GPU:  v3 on its own grid against our other solvers, 4096 held-out seeds per demo
#         (scripts/v3_same_grid.py), and the bench at NFE 3-10 on the tune study's held-out
#         seeds 10000-10511 (the untuned and diffusers baselines of the tune table);
#   CPUs: the tune study (scripts/tune_study.py), one process per model, solver and NFE.
# The device returns only a few files from $OUT, so everything is written under $WORK and
# packed into $OUT/results.tgz at the end; the tune phase stops at $BUDGET seconds so that the
# packing happens before the call's limit (run it with timeout_s >= BUDGET + 60).
set -u
BUDGET=${BUDGET:-480}
WORK=/tmp/issue15
mkdir -p "$WORK"
export PYTHONPATH=$PWD/.gpu_site:$PWD/src:$PWD/scripts PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export OMP_NUM_THREADS=1
MODELS="digits digits-cond digits-flow"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$WORK/gpu.txt"
OMP_NUM_THREADS= nproc >> "$WORK/gpu.txt"  # nproc honours OMP_NUM_THREADS
cd scripts
for m in $MODELS; do  # the tune table's references, on the GPU
  python tune_study.py --model "$m" --reference "/tmp/ref-$m.pt" --reference-only \
    > "$WORK/ref-$m.log" 2>&1
done
(
  for m in $MODELS; do
    python v3_same_grid.py --model "$m" --device cuda --samples 4096 --first-seed 20000 \
      --variants default,degenerate,smooth0.1,smooth0.2,half_low > "$WORK/samegrid-$m.txt" 2>&1
  done
  for m in $MODELS; do
    python -m diffsolve bench --model "$m" --seed 10000 --nfe 3,4,5,6,8,10 --device cuda \
      --no-overhead --json "$WORK/bench10000-$m.json" > "$WORK/bench10000-$m.txt" 2>&1
  done
) &
jobs_file=/tmp/tune-jobs.txt
: > "$jobs_file"
for n in 10 8 6 5 4 3; do  # longest first
  for m in $MODELS; do
    echo "--model $m --solvers dpm-solver-v3 --nfe $n --smooth-ems 0.2" >> "$jobs_file"
    echo "--model $m --solvers dpm-solver-v3 --nfe $n" >> "$jobs_file"
  done
done
for n in 10 8 6 5 4 3; do
  for m in $MODELS; do
    for s in dpm-solver++-2m unipc-bh2-3; do
      echo "--model $m --solvers $s --nfe $n" >> "$jobs_file"
    done
  done
done
mkdir -p "$WORK/logs"
i=0
while read -r job; do
  i=$((i + 1))
  m=$(echo "$job" | awk '{print $2}')
  n=$(echo "$job" | awk '{print $6}')
  teleport=0,1
  [ "$n" -ge 8 ] && teleport=1
  echo "python tune_study.py $job --teleport $teleport --reference /tmp/ref-$m.pt \
--schedules $WORK/schedules --json $WORK/tune.jsonl > $WORK/logs/job$i.txt 2>&1"
done < "$jobs_file" | timeout "$BUDGET" xargs -P 14 -I{} bash -c "{}"
wait
echo done >> "$WORK/gpu.txt"
tar czf "$OUT/results.tgz" -C "$WORK" .
