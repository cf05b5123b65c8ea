#!/bin/bash
# dKV-Cache (issue 24) on the H200, one call:   bash experiments/results/dkv/gpu.sh   (OUT=<results folder>)
# 1. tasks-base, gen 128 / block 32, 100 held-out prompts per task: one token per step and threshold 0.9
#    uncached, over the prefix and dual caches, and over dKV-Cache (reload 0 and 8), five processes at once;
# 2. step cost at LLaDA-8B geometry (random bf16 weights, prompt 256, gen 256, block 32, batch 1): a whole
#    one-token-per-step decode (256 timed steps) per cache (dKV-Cache with reload 0).
set -u
OUT=${OUT:-/tmp/out}
if [ "${1:-}" = second ]; then
  export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  python3 -m experiments.benchmark batch_sizes=[8] caches=[none,prefix,dual,dkv] timed_steps=256 repeats=3 \
    deadline_s=300 out=$OUT/benchmark_dkv_batch8.json hydra.run.dir=/tmp/hydra 2>&1 | grep -v "^\s*$" | tail -8
  python3 -m experiments.benchmark batch_sizes=[1] caches=[dkv] timed_steps=256 repeats=3 cache_refresh_every=8 \
    peak_tflops=738 peak_tb_s=3.87 out=$OUT/benchmark_dkv_reload8.json hydra.run.dir=/tmp/hydra8 2>&1 | tail -3
  exit
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.15
run() {  # label, cache, reload
  python3 -m experiments.compare_samplers --preset tasks-base --cache $2 --cache-refresh-every $3 --n-per-task 100 \
    --batch-size 600 --samplers low_confidence threshold --out $OUT/tasks_base_$1.json > /tmp/tasks_base_$1.log 2>&1
}
run none none 0 & run prefix prefix 0 & run dual dual 0 & run dkv dkv 0 & run dkv8 dkv 8 &
wait
for f in none prefix dual dkv dkv8; do echo "== $f"; grep -v "it/s\]" /tmp/tasks_base_$f.log | tail -8; done
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
python3 -m experiments.benchmark batch_sizes=[1] caches=[none,prefix,dual,dkv] timed_steps=256 repeats=3 \
  deadline_s=300 out=$OUT/benchmark_dkv.json hydra.run.dir=/tmp/hydra 2>&1 | grep -v "^\s*$" | tail -12
# second call (the same lease): batch 8 for every cache, and dKV-Cache with reload 8 at batch 1
#   bash experiments/results/dkv/gpu.sh second
