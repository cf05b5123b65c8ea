#!/bin/bash
# Continuous batching (issue 25) on the GPU, one call:   OUT=<results folder> bash experiments/results/continuous/gpu.sh
# tasks-base on 1000 held-out prompts of the parallel suite (tasks mixed), gen 128 / block 32, batch 64:
# static batches against 64 continuous-batching slots, threshold 0.9, uncached and over the dual cache, then
# threshold 0.7 uncached. Each run checks that every row's tokens and NFE are identical.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
for run in "threshold none" "threshold dual" "threshold(tau=0.7) none"; do
  set -- $run
  name=$(echo "$1_$2" | tr -d '()=.')
  timeout 240 python3 -m experiments.benchmark_continuous --preset tasks-base --n 1000 --batch-size 64 \
    --sampler "$1" --cache $2 --out $OUT/continuous_$name.json 2>&1 | grep -v "it/s\]\|prompt/s\]" | tail -3
done
