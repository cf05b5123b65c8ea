#!/bin/bash
# Elastic-Cache (issue 24) on the H200, one call:   bash experiments/results/elastic/gpu.sh   (OUT=<results folder>)
# 1. tasks-base, parallel suite, gen 128, 100 held-out prompts per task, batch 200 (Elastic-Cache's attention
#    weights at batch 600 asked 14 GiB, more than a seventh of an H100), threshold decoding over
#    Elastic-Cache's sliding window of 16 (the authors' setting: the whole generation as one window), uncached and
#    over the cache at gamma 0.9 / 0.99 / -1 (never refreshes) / 2 (refreshes from layer 1 at every step), and
#    in blocks of 32; seven processes at once.
# 2. step cost at LLaDA-8B geometry (random bf16 weights, prompt 256, gen 256, block 32, batch 1, 128 timed
#    steps, one token per step): no cache, dual, dKV-Cache and Elastic-Cache at gamma -1 (never refreshes) in
#    one run, then Elastic-Cache at gamma 2 (refreshes from layer 1 at every step): the drift test of random
#    weights means nothing, so these two bound the cost of a step.
source experiments/results/gpu_setup.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
SWEEP="threshold threshold(tau=0.7) threshold(tau=0.5)"
RUNS=${RUNS:-window16_none elastic elastic_g099 elastic_never elastic_always window16_none_b32 elastic_b32}
run() {  # label, cache, block, gamma, samplers...  (only the labels in RUNS run)
  label=$1 cache=$2 block=$3 gamma=$4; shift 4
  [[ " $RUNS " == *" $label "* ]] || return 0
  timeout 200 python3 -m experiments.compare_samplers --preset tasks-base --cache $cache --block-length $block \
    --sliding-window 16 --elastic-gamma $gamma --n-per-task 100 --batch-size 200 --samplers "$@" \
    --out $OUT/tasks_base_$label.json > /tmp/tasks_base_$label.log 2>&1
}
run window16_none none 128 0.9 $SWEEP & run elastic elastic 128 0.9 $SWEEP &
run elastic_g099 elastic 128 0.99 threshold & run elastic_never elastic 128 -1 threshold &
run elastic_always elastic 128 2 threshold & run window16_none_b32 none 32 0.9 threshold &
run elastic_b32 elastic 32 0.9 threshold &
wait
for f in $RUNS; do
  echo "== $f"; grep -v "it/s\]\|prompt/s\]" /tmp/tasks_base_$f.log | tail -4; done
if [ -n "${NO_STEPS:-}" ] || [ $SECONDS -gt ${BENCH_AFTER_S:-330} ]; then echo "no time left for the step-cost part ($SECONDS s)"; exit 0; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
bench() {  # out name, caches, gamma
  timeout 150 python3 -m experiments.benchmark batch_sizes=[1] caches=$2 elastic_gamma=$3 timed_steps=128 repeats=2 \
    deadline_s=100 out=$OUT/$1.json hydra.run.dir=/tmp/hydra_$1 2>&1 | grep -v "^\s*$" | tail -8
}
bench benchmark_elastic_never [none,dual,dkv,elastic] -1
bench benchmark_elastic_always [elastic] 2
