#!/bin/bash
# Issue 19: the tasks-base cached sweeps re-measured on the per-row refresh engine (prefix and dual side by side).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
for cache in prefix dual; do
  mkdir -p $OUT/$cache
  timeout 520 python3 -m experiments.compare_samplers --preset tasks-base --cache $cache --n-per-task 100 \
      --batch-size 600 --out $OUT/$cache/compare.json --results-jsonl $OUT/$cache/results.jsonl \
      > $OUT/$cache/log.txt 2>&1 &
done
wait
tail -3 $OUT/prefix/log.txt $OUT/dual/log.txt
grep -h "acc " $OUT/prefix/log.txt | head -30
grep -h "acc " $OUT/dual/log.txt | head -30
