#!/bin/bash
# Block-diffusion decoding speed at Fast-dLLM v2 7B geometry (random bf16 weights), one GPU:
#   bash experiments/results/block_decoding/bench_gpu.sh       (OUT=<folder for the results>)
# Batch 1: uncached (full forwards) and the exact block cache, the block cache's window attention
# once through XLA under the pair mask (layout.window_attention_impl=xla, the first version) and once
# by default (the Pallas kernel with a column limit per query); batch 32 and 128: the block cache.
# One token per step (LowConfidence), prompt 256, gen 256, block 32, all 256 steps timed.
# PARTS (default "b1 b32_b128") picks the runs; "profile" adds a kernel profile of 64 batch-1 block-cache
# steps (experiments.profile_decode: the kernels' ms per step and what each XLA fusion computes, written to
# $OUT/profile_block/profile_1_block.json); "pallas" runs batch 1 and 32 with the Pallas window kernel at
# every window step (a block's 65-row first step and batch 32's 1056 rows too, which by default take XLA's
# attention under the pair mask); "plans" runs batch 1 under three other launch plans of the kernel
# (pallas_splits x pallas_rows_per_program: 1 x 16, 2 x 32, default x 32).
set -u
OUT=${OUT:-/tmp/out}
PARTS=${PARTS:-b1 b32_b128}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
common="model=fast_dllm_v2_7b layout.attention_impl=null timed_steps=256 repeats=3 deadline_s=240"
for part in $PARTS; do
  case $part in
    b1)
      python3 -m experiments.benchmark $common batch_sizes=[1] caches=[block] layout.window_attention_impl=xla \
        out=$OUT/bench_b1_xla_window.json hydra.run.dir=/tmp/hydra0 2>&1 | grep -v INFO | tee $OUT/bench_b1_xla_window.log
      python3 -m experiments.benchmark $common batch_sizes=[1] caches=[none,block] out=$OUT/bench_b1.json \
        hydra.run.dir=/tmp/hydra1 2>&1 | grep -v INFO | tee $OUT/bench_b1.log ;;
    b32_b128)
      python3 -m experiments.benchmark $common batch_sizes=[32,128] caches=[block] out=$OUT/bench_b32_b128.json \
        hydra.run.dir=/tmp/hydra2 2>&1 | grep -v INFO | tee $OUT/bench_b32_b128.log ;;
    pallas)
      python3 -m experiments.benchmark $common batch_sizes=[1,32] caches=[block] layout.window_attention_impl=pallas \
        out=$OUT/bench_pallas.json hydra.run.dir=/tmp/hydra3 2>&1 | grep -v INFO | tee $OUT/bench_pallas.log ;;
    plans)
      for plan in "1 16" "2 32" "null 32"; do set -- $plan
        python3 -m experiments.benchmark $common batch_sizes=[1] caches=[block] pallas_splits=$1 pallas_rows_per_program=$2 \
          out=$OUT/bench_b1_plan_$1_$2.json hydra.run.dir=/tmp/hydra_plan 2>&1 | grep -v INFO | tee -a $OUT/bench_plans.log
      done ;;
    profile)
      python3 -m experiments.profile_decode ${common/timed_steps=256/timed_steps=64} batch_sizes=[1] caches=[block] profile_hlo=true \
        hydra.run.dir=$OUT/profile_block 2>&1 | grep -v INFO | tee $OUT/profile_block.log
      rm -f $OUT/profile_block/*.trace.json.gz ;;
    *) echo "unknown part $part: allowed b1 b32_b128 pallas plans profile"; exit 2 ;;
  esac
done
