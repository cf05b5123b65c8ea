#!/bin/bash
# Accuracy and NFE of tiny-ar / tiny-block over the exact block cache and tiny-full over the dual cache:
#   bash experiments/results/block_decoding/accuracy_gpu.sh      (OUT=<folder for the results>)
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -m experiments.check_models --only block-decoding --n-per-task 200 --out $OUT/block_decoding.json \
  2>&1 | grep -v INFO | tee $OUT/block_decoding.log
