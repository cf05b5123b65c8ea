#!/usr/bin/env bash
# tasks-base trained alone on one GPU and then evaluated, as one background pipeline that
# outlives the device calls watching it (a call runs at most 10 minutes; the whole takes ~20).
# Run from the repository root on the device machine, the wheels in .whl/
# (../shared/reference/gpu.md):
#
#   bash experiments/results/models/gpu_train_tasks_base.sh launch   # call 1: starts the pipeline, watches it
#   bash experiments/results/models/gpu_train_tasks_base.sh watch    # calls 2, 3: waits, returns what is done
#
# The pipeline (`pipeline`, started by `launch` in its own process session):
#   1. the documented Hydra command, python -m experiments.train model=tasks_base train=tasks_base;
#   2. experiments/results/parallel/gpu_evaluate.sh with TEXT_BASE=0: check_models --only tasks-base and
#      the sampler sweep per cache policy, side by side on the one GPU, on the new model where it was
#      saved (each call syncs the working tree, bundled checkpoints included, onto the device);
#   3. if a watch call said THEN_BLOCK_BENCH=1 before step 2 ended: block_decoding/bench_gpu.sh PARTS=b1.
# `watch` returns the metrics, the logs, the evaluation's files and (once saved) the model as tar
# pieces under 16 MB. The machine stays held only a short while after a call: if it was given
# back between calls, `watch` says so and exits 1, and the run is lost with it.
set -u
OUT=${OUT:-/tmp/out}
WORKDIR=runs/tasks_base
WATCH_S=${WATCH_S:-570}
mkdir -p runs "$OUT"
export PYTHONUNBUFFERED=1

last_row() { grep '"split": "train"' "$WORKDIR/metrics.jsonl" 2>/dev/null | tail -n 1 | cut -c1-300; }

gather() {
  cp "$WORKDIR/metrics.jsonl" "$OUT/tasks_base_metrics.jsonl" 2>/dev/null
  cp runs/tasks_base_train.log runs/pipeline.log "$OUT/" 2>/dev/null
  [[ -d runs/eval_out ]] && cp -r runs/eval_out "$OUT/evaluation"
  if [[ -f "$WORKDIR/model/metadata.json" && ! -f runs/model_sent ]]; then
    tar -C "$WORKDIR" -cf - model | split -b 15M - "$OUT/tasks_base_model.tar.part-" && touch runs/model_sent
  fi
  ls -laR "$OUT" | head -n 60
}

watch_pipeline() {
  local began=$(date +%s)
  while kill -0 "$(cat runs/pipeline.pid)" 2>/dev/null && (( $(date +%s) - began < WATCH_S )); do
    sleep 30
    echo "[$(date +%T)] $(tail -n 1 runs/pipeline.log) | $(last_row)"
  done
  kill -0 "$(cat runs/pipeline.pid)" 2>/dev/null && echo "the pipeline is still running" || echo "the pipeline ended"
  tail -n 15 runs/tasks_base_train.log
  gather
}

case "${1:-}" in
  pipeline)
    echo "[$(date +%T)] train: python -m experiments.train model=tasks_base train=tasks_base train.workdir=$WORKDIR"
    python3 -m experiments.train model=tasks_base train=tasks_base "train.workdir=$WORKDIR" \
      train.progress=false > runs/tasks_base_train.log 2>&1 < /dev/null || { echo "training failed"; exit 1; }
    echo "[$(date +%T)] evaluate $WORKDIR/model"
    OUT=runs/eval_out TEXT_BASE=0 CHECKPOINT="$WORKDIR/model" LIMIT=${LIMIT:-420} bash experiments/results/parallel/gpu_evaluate.sh
    if [[ -f runs/then_block_bench ]]; then  # a later call opted in (touch runs/then_block_bench)
      echo "[$(date +%T)] block-decoding bench, batch 1"
      mkdir -p runs/eval_out/block_bench
      OUT=runs/eval_out/block_bench PARTS=b1 bash experiments/results/block_decoding/bench_gpu.sh
    fi
    echo "[$(date +%T)] done"
    ;;
  launch)
    source experiments/results/gpu_setup.sh
    setsid nohup bash "$0" pipeline > runs/pipeline.log 2>&1 < /dev/null &
    echo $! > runs/pipeline.pid
    watch_pipeline
    ;;
  watch)
    if [[ ! -f runs/pipeline.pid ]]; then echo "no pipeline here: the machine was given back after 'launch'"; exit 1; fi
    [[ "${THEN_BLOCK_BENCH:-0}" == 1 ]] && touch runs/then_block_bench
    watch_pipeline
    ;;
  *)
    echo "usage: $0 launch|watch (pipeline: what launch starts)"; exit 2 ;;
esac
