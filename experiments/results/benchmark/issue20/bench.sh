#!/bin/bash
# Issue 20: the GPU benchmark rows at the parent commit (915447e, .gpu/base) and at this tree, one call.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
ARGS="batch_sizes=[1,32] caches=[none,dual,prefix] repeats=3 floor_matmul_sizes=[8192] floor_copy_mib=2048 deadline_s=150"
for run in ${RUNS:-base new base2}; do
  case $run in base*) dir=.gpu/base;; *) dir=$PWD;; esac
  [ -e $OUT/stop ] && break
  ( cd $dir && PYTHONPATH=/tmp/site:$PWD timeout 250 python3 -m experiments.benchmark $ARGS out=$OUT/$run.json \
      hydra.run.dir=/tmp/h_$run > $OUT/$run.log 2>&1 ) ; echo "$run rc=$? $(date +%T)"
  grep -h '"ms_per_nfe"' $OUT/$run.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); print(' ', r['batch'], r['cache'], r['ms_per_nfe'], r.get('tokens_sha1'))"
done
