#!/bin/bash
# Speed round 2 (issue 25) on the GPU, one call:   OUT=<results folder> bash experiments/results/speed2/gpu.sh
# 1. continuous batching: tasks-base, 1000 held-out prompts (tasks mixed), gen 128 / block 32, batch 64,
#    threshold 0.9, uncached and dual cache;
# 2. training throughput at the 90M and 300M geometries (experiments.benchmark_train);
# 3. LLaDA-8B decode steps at batch 1 (none, dual) against the floors, the chained-GEMM floor included;
# 4. FP8-rounded weights against the bf16 ones on tasks-base (accuracy only), two processes at once.
# Timing parts run alone on the GPU; each later part is skipped when the call's time runs short.
set -u
SECONDS=0
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
for cache in none dual; do
  timeout 200 python3 -m experiments.benchmark_continuous --preset tasks-base --n 1000 --batch-size 64 \
    --sampler threshold --cache $cache --out $OUT/continuous_threshold_$cache.json 2>&1 | grep -v "it/s\]\|prompt/s\]" | tail -2
done
echo "== $SECONDS s"
timeout 150 python3 -m experiments.benchmark_train out=$OUT/benchmark_train.json hydra.run.dir=/tmp/hydra_train 2>&1 \
  | grep -v "^\s*$" | tail -3
echo "== $SECONDS s"
if [ $SECONDS -lt ${BENCH_BEFORE_S:-300} ]; then
  timeout 170 python3 -m experiments.benchmark batch_sizes=[1] caches=[none,dual] timed_steps=64 repeats=3 deadline_s=110 \
    out=$OUT/benchmark_llada8b_b1.json hydra.run.dir=/tmp/hydra_bench 2>&1 | grep -v "^\s*$" | tail -4
  echo "== $SECONDS s"
fi
if [ $SECONDS -lt ${FP8_BEFORE_S:-420} ]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
  for w in bf16 fp8; do
    flag=$([ $w = fp8 ] && echo "--weight-rounding fp8")
    timeout $((570 - SECONDS)) python3 -m experiments.compare_samplers --preset tasks-base --n-per-task 100 \
      --batch-size 600 $flag --samplers low_confidence threshold "threshold(tau=0.7)" credit local_leap \
      --out $OUT/fp8_accuracy_$w.json > /tmp/fp8_$w.log 2>&1 &
  done
  wait
  for w in bf16 fp8; do echo "== fp8 accuracy: $w"; grep "^| " /tmp/fp8_$w.log | head -8; done
fi
echo "== $SECONDS s"
