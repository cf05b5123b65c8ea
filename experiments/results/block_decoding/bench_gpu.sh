#!/bin/bash
# Block-diffusion decoding speed at Fast-dLLM v2 7B geometry (random bf16 weights), one H200:
#   bash experiments/results/block_decoding/bench_gpu.sh       (OUT=<folder for the results>)
# Batch 1: uncached (full forwards) and the exact block cache; batch 32 and 128: the block cache.
# One token per step (LowConfidence), prompt 256, gen 256, block 32, all 256 steps timed.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
common="model=fast_dllm_v2_7b layout.attention_impl=null timed_steps=256 repeats=3 deadline_s=240"
python3 -m experiments.benchmark $common batch_sizes=[1] caches=[none,block] out=$OUT/bench_b1.json \
  hydra.run.dir=/tmp/hydra1 2>&1 | grep -v INFO | tee $OUT/bench_b1.log
python3 -m experiments.benchmark $common batch_sizes=[32,128] caches=[block] out=$OUT/bench_b32_b128.json \
  hydra.run.dir=/tmp/hydra2 2>&1 | grep -v INFO | tee $OUT/bench_b32_b128.log
