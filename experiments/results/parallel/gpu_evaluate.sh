#!/usr/bin/env bash
# The GPU call that measured experiments/results/parallel/*: run from the repository root on
# the device machine (hydra-core from ../shared/wheels on PYTHONPATH, the corpus in data/corpus).
# Five processes share the one GPU: the sampler sweep of tasks-base per cache policy, and
# experiments.check_models for tasks-base and text-base (TEXT_BASE=0: tasks-base only).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p runs "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.17
LIMIT=${LIMIT:-450}
CHECKPOINT=${CHECKPOINT:-checkpoints/tasks-base}  # the tasks-base to evaluate
for cache in none prefix dual; do
  timeout "$LIMIT" python3 -m experiments.compare_samplers --preset tasks-base --checkpoint "$CHECKPOINT" --cache "$cache" --n-per-task 100 \
    --batch-size 600 --out "$OUT/compare_$cache.json" --results-jsonl "$OUT/results_$cache.jsonl" > "runs/compare_$cache.log" 2>&1 &
done
timeout "$LIMIT" python3 -m experiments.check_models --only tasks-base --tasks-base "$CHECKPOINT" --n-per-task 200 \
  --out "$OUT/check_tasks_base.json" > runs/check_tasks_base.log 2>&1 &
if [[ "${TEXT_BASE:-1}" == 1 ]]; then  # TEXT_BASE=0: tasks-base only (no corpus needed)
  timeout "$LIMIT" python3 -m experiments.check_models --only text-base --out "$OUT/check_text_base.json" \
    > runs/check_text_base.log 2>&1 &
fi
wait
for f in runs/compare_*.log runs/check_*.log; do echo "== $f"; grep -v "INFO\|^$" "$f" | tail -n 40; done > "$OUT/logs.txt"
tail -n 30 runs/check_*.log
