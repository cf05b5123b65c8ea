#!/usr/bin/env bash
# tasks-base trained alone on one H200, across two back-to-back device calls (a call runs at
# most 10 minutes; the run takes ~14). Run from the repository root on the device machine,
# hydra-core on PYTHONPATH (../shared/reference/gpu.md):
#
#   bash experiments/results/models/gpu_train_tasks_base.sh launch   # call 1: starts the run, watches it
#   bash experiments/results/models/gpu_train_tasks_base.sh finish   # call 2: waits for it, returns the model
#
# `launch` starts the documented Hydra command in its own process session (setsid), so it
# outlives call 1 on the still-held machine; `finish` waits for its saved model and returns
# it as tar pieces under 16 MB with the metrics. The machine stays held only ~30 s after a
# call: if it was given back between the calls, `finish` says so and exits 1, and the run is
# lost with it (its checkpoints lived on that machine).
set -u
OUT=${OUT:-/tmp/out}
WORKDIR=runs/tasks_base
WATCH_S=${WATCH_S:-560}
WAIT_S=${WAIT_S:-560}
mkdir -p runs "$OUT"
export PYTHONUNBUFFERED=1

last_row() { grep '"split": "train"' "$WORKDIR/metrics.jsonl" 2>/dev/null | tail -n 1 | cut -c1-300; }

case "${1:-}" in
  launch)
    began=$(date +%s)
    echo "[$(date +%T)] python -m experiments.train model=tasks_base train=tasks_base train.workdir=$WORKDIR"
    setsid nohup python3 -m experiments.train model=tasks_base train=tasks_base "train.workdir=$WORKDIR" \
      train.progress=false > runs/tasks_base_train.log 2>&1 < /dev/null &
    echo $! > runs/tasks_base.pid
    while (( $(date +%s) - began < WATCH_S )); do
      sleep 30
      if ! kill -0 "$(cat runs/tasks_base.pid)" 2>/dev/null; then echo "the run stopped"; break; fi
      echo "[$(date +%T)] $(last_row)"
    done
    tail -n 20 runs/tasks_base_train.log
    cp "$WORKDIR/metrics.jsonl" "$OUT/tasks_base_metrics_call1.jsonl" 2>/dev/null
    ;;
  finish)
    if [[ ! -f runs/tasks_base.pid ]]; then echo "no run here: the machine was given back after 'launch'"; exit 1; fi
    began=$(date +%s)
    while kill -0 "$(cat runs/tasks_base.pid)" 2>/dev/null && (( $(date +%s) - began < WAIT_S )); do
      sleep 10
    done
    echo "[$(date +%T)] $(last_row)"
    tail -n 20 runs/tasks_base_train.log
    cp "$WORKDIR/metrics.jsonl" "$OUT/tasks_base_metrics.jsonl"
    cp runs/tasks_base_train.log "$OUT/tasks_base_train.log"
    if [[ ! -f "$WORKDIR/model/metadata.json" ]]; then echo "no saved model in $WORKDIR/model"; exit 1; fi
    tar -C "$WORKDIR" -cf - model | split -b 15M - "$OUT/tasks_base_model.tar.part-"
    ls -la "$OUT"
    ;;
  *)
    echo "usage: $0 launch|finish"; exit 2 ;;
esac
