#!/bin/bash
# The short form of speed2/gpu.sh for a call of about five minutes: continuous batching on tasks-base
# (1000 held-out prompts, threshold 0.9, uncached, batch 64), then FP8-rounded weights' accuracy against
# bf16 (tasks-base, 100 prompts per task, low_confidence and threshold, two processes at once).
set -u
SECONDS=0
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
timeout 170 python3 -m experiments.benchmark_continuous --preset tasks-base --n 1000 --batch-size 64 \
  --sampler threshold --cache none --out $OUT/continuous_threshold_none.json 2>&1 | grep -v "it/s\]\|prompt/s\]" | tail -2
echo "== $SECONDS s"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
for w in bf16 fp8; do
  flag=$([ $w = fp8 ] && echo "--weight-rounding fp8")
  timeout $((290 - SECONDS)) python3 -m experiments.compare_samplers --preset tasks-base --n-per-task 100 \
    --batch-size 600 $flag --samplers low_confidence threshold --out $OUT/fp8_accuracy_$w.json > /tmp/fp8_$w.log 2>&1 &
done
wait
for w in bf16 fp8; do echo "== fp8 accuracy: $w"; grep "^| " /tmp/fp8_$w.log | head -4; done
echo "== $SECONDS s"
