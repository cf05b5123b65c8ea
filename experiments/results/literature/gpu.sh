#!/bin/bash
# The literature methods (issue 24) on tasks-base, one H200 call:
#   bash experiments/results/literature/gpu.sh      (OUT=<folder for the results>)
# 1. compare_samplers at gen 128 / block 32, 100 held-out prompts per task, no cache: one token per step,
#    threshold 0.9 / 0.7 / 0.5, LocalLeap, self-speculative decoding (k = 4 and k = 2), and LocalLeap and
#    threshold over the dual cache; 2. DINGO against its inner rule per task with a format.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3   # three processes share the GPU
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -m experiments.compare_samplers --preset tasks-base --cache none --n-per-task 100 --batch-size 600 \
  --samplers low_confidence threshold "threshold(tau=0.7)" "threshold(tau=0.5)" local_leap self_speculative \
  "self_speculative(k=2)" --out $OUT/methods_none.json > $OUT/methods_none.log 2>&1 &
python3 -m experiments.compare_samplers --preset tasks-base --cache dual --n-per-task 100 --batch-size 600 \
  --samplers threshold "threshold(tau=0.5)" local_leap --out $OUT/methods_dual.json > $OUT/methods_dual.log 2>&1 &
python3 -m experiments.constrained_decoding --preset tasks-base --n-per-task 100 --batch-size 600 \
  --out $OUT/dingo.json > $OUT/dingo.log 2>&1 &
wait
for f in methods_none methods_dual dingo; do echo "== $f"; grep -v "it/s\]" $OUT/$f.log | tail -40; done
