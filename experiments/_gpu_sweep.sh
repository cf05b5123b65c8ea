python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
run() {
  S=$1 BK=$2 M=$3 python3 -c '
import os, sys, runpy
import dllm.models.window_attention as w
w.SPLITS = None if os.environ["S"] == "auto" else int(os.environ["S"])
w.BLOCK_K = int(os.environ["BK"])
sys.argv = ["b"] + sys.argv[1:]
runpy.run_module(os.environ["M"], run_name="__main__")' "${@:4}" > /tmp/log.txt 2>&1
  grep '^{' /tmp/log.txt | python3 -c "import sys,json; [print('splits=$1 bk=$2', r.get('batch'), r.get('cache'), r.get('ms_per_nfe'), r.get('ms_per_nfe_runs'), r.get('fraction_of_peak'), r.get('window_attention_impl'), r.get('compiler_options'), r.get('reason','')) for r in map(json.loads, sys.stdin)]"
  grep -v INFO /tmp/log.txt | grep -v '^{' | tail -${TAILN:-2}
  cp /tmp/log.txt $OUT/log_$(date +%s%N).txt 2>/dev/null
}
B=experiments.benchmark
echo "== defaults batch 1"; run auto 128 $B batch_sizes=[1] out=$OUT/b1.json
echo "== batch 1 prefix pallas"; run auto 128 $B batch_sizes=[1] caches=[prefix] window_attention_impl=pallas
echo "== batch 1 dual xla"; run auto 128 $B batch_sizes=[1] caches=[dual] window_attention_impl=xla
echo "== batch 1 XLA default options"; run auto 128 $B batch_sizes=[1] caches=[none,dual] 'compiler_options={}'
echo "== batch 1 dual bk 64"; run auto 64 $B batch_sizes=[1] caches=[dual]
echo "== batch 32 defaults"; run auto 128 $B batch_sizes=[32] caches=[none,dual] repeats=3 out=$OUT/b32.json
echo "== batch 32 XLA default options"; run auto 128 $B batch_sizes=[32] caches=[none,dual] repeats=3 'compiler_options={}'
echo "== batch 32 dual pallas"; run auto 128 $B batch_sizes=[32] caches=[dual] repeats=3 window_attention_impl=pallas
