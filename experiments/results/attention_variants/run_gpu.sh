#!/bin/bash
# Trains tiny-ar, tiny-block and tiny-full side by side on one GPU (three processes), then measures
# them with experiments.check_models. Run from the repository root by the device tool:
#   bash experiments/results/attention_variants/run_gpu.sh      (OUT=<folder for the results>)
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
for model in tiny_ar tiny_block tiny_full; do
  python3 -m experiments.train model=$model train=tiny_compare train.progress=false train.tensorboard=false \
    > "$OUT/train_$model.log" 2>&1 &
done
wait
echo "three trainings, side by side: $(( $(date +%s) - start )) s wall"
declare -A RUN=([tiny_ar]=block_causal_1 [tiny_block]=block_causal_8 [tiny_full]=bidirectional_None)
for model in tiny_ar tiny_block tiny_full; do
  tail -3 "$OUT/train_$model.log"
  name=${model/_/-}
  run=runs/tiny_compare/${RUN[$model]}
  cp $run/metrics.jsonl $run/model/train_metrics.jsonl
  rm -rf checkpoints/$name && cp -r $run/model checkpoints/$name
  tar -cf "$OUT/$name.tar" -C checkpoints $name
done
python3 -m experiments.check_models --only attention-variants --n-per-task 200 --out "$OUT/check_models.json" \
  2>&1 | grep -v INFO | tee "$OUT/check_models.log"
