#!/bin/bash
# Speed round 2 (issue 25) on the GPU, one call:   OUT=<results folder> bash experiments/results/speed2/gpu.sh
# PARTS (default all four, in this order) picks what runs; PARTS="continuous fp8" fits about five minutes.
# continuous: continuous batching on tasks-base, 1000 held-out prompts (tasks mixed), gen 128 / block 32,
#             batch 64, threshold 0.9, uncached and over the dual cache;
# train:      training throughput at the 90M and 300M geometries (experiments.benchmark_train), XLA's and
#             cuDNN's attention (TRAIN_ATTENTION, default "null cudnn");
# decode:     LLaDA-8B decode steps at batch 1 (none, dual) against the floors, the chained-GEMM floor included;
# fp8:        FP8-rounded weights against the bf16 ones on tasks-base (accuracy only), two processes at once;
# train_variants: where the 300M train step's time goes (train_variants.py: layouts, kernels, parts, profile);
# fp8_gemm:   the FP8 Pallas GEMM against XLA's bf16 GEMMs on LLaDA-8B's shapes, alone and chained (fp8_gemm_bench.py);
# profile_full: the kernels of LLaDA-8B's full (uncached) step at batch 1 (experiments.profile_decode, 32 steps),
#             and the step's GEMMs alone at its 512 rows (full_step_gemms.py);
# fp8_ncu:    Nsight Compute's reading of the FP8 kernel and cuBLAS's bf16 GEMM on q/k/v's shape (fp8_ncu.py;
#             the default kernel, then transposed=1; FP8_NCU_CONFIGS: configs
#             separated by spaces, each keyword=value settings joined by commas, or default).
# fp8_decode: LLaDA-8B decode steps at batch 1 (none, dual), bf16 weights then Layout.fp8_weights (the FP8
#             Pallas GEMM in window steps, dequantized weights in full forwards), against the floors;
#             FP8_PROFILE=1 adds a kernel profile of the FP8 dual-cache steps.
# Timing parts run alone on the GPU; decode and fp8 are skipped when the call's time runs short.
source experiments/results/gpu_setup.sh
PARTS=${PARTS:-continuous train decode fp8}
has() { [[ " $PARTS " == *" $1 "* ]]; }
if has continuous; then
  for cache in none dual; do
    timeout 200 python3 -m experiments.benchmark_continuous --preset tasks-base --n 1000 --batch-size 64 \
      --sampler threshold --cache $cache --out $OUT/continuous_threshold_$cache.json 2>&1 | grep -v "it/s\]\|prompt/s\]" | tail -2
  done
  echo "== $SECONDS s"
fi
if has train; then
  for impl in ${TRAIN_ATTENTION:-null cudnn}; do
    timeout 150 python3 -m experiments.benchmark_train attention_impl=$impl out=$OUT/benchmark_train_$impl.json \
      hydra.run.dir=/tmp/hydra_train 2>&1 | grep "^{" | tail -2
  done
  echo "== $SECONDS s"
fi
if has decode && [ $SECONDS -lt ${BENCH_BEFORE_S:-300} ]; then
  timeout 170 python3 -m experiments.benchmark batch_sizes=[1] caches=[none,dual] timed_steps=64 repeats=3 deadline_s=110 \
    out=$OUT/benchmark_llada8b_b1.json hydra.run.dir=/tmp/hydra_bench 2>&1 | grep -v "^\s*$" | tail -4
  echo "== $SECONDS s"
fi
if has fp8 && [ $SECONDS -lt ${FP8_BEFORE_S:-420} ]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
  for w in bf16 fp8; do
    flag=$([ $w = fp8 ] && echo "--weight-rounding fp8")
    timeout $((570 - SECONDS)) python3 -m experiments.compare_samplers --preset tasks-base --n-per-task 100 \
      --batch-size 600 $flag --samplers low_confidence threshold "threshold(tau=0.7)" credit local_leap \
      --out $OUT/fp8_accuracy_$w.json > /tmp/fp8_$w.log 2>&1 &
  done
  wait
  for w in bf16 fp8; do echo "== fp8 accuracy: $w"; grep "^| " /tmp/fp8_$w.log | head -8; done
  unset XLA_PYTHON_CLIENT_MEM_FRACTION
fi
if has train_variants; then
  timeout 240 python3 experiments/results/speed2/train_variants.py --out $OUT/train_variants.json --profile-dir /tmp/prof \
    --only ${TRAIN_VARIANTS:-nomask_cudnn nomask_cudnn_unroll2 nomask_cudnn_unroll24 cudnn nomask_cudnn_forward nomask_cudnn_grad} 2>&1 \
    | grep "^{" | cut -c1-2500
  echo "== $SECONDS s"
fi
if has fp8_gemm; then
  timeout ${FP8_GEMM_TIMEOUT_S:-260} python3 experiments/results/speed2/fp8_gemm_bench.py ${FP8_GEMM_ARGS:-} \
    --out $OUT/fp8_gemm.json 2>&1 | grep "^{" | tee $OUT/fp8_gemm.log
fi
if has profile_full; then
  timeout 200 python3 -m experiments.profile_decode batch_sizes=[1] caches=[none] timed_steps=32 \
    hydra.run.dir=$OUT/profile_full 2>&1 | grep -v INFO | tee $OUT/profile_full.log
  rm -f $OUT/profile_full/*.trace.json.gz
  timeout 120 python3 experiments/results/speed2/full_step_gemms.py --out $OUT/full_step_gemms.json 2>&1 | grep "^{"
  echo "== $SECONDS s"
fi
if has fp8_ncu; then
  for config in ${FP8_NCU_CONFIGS:-default transposed=1}; do
    name=fp8_ncu_qkv_${config//[=,]/_}
    [ $config = default ] && config=""
    XLA_FLAGS="--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false" timeout 150 ncu --clock-control none \
      --kernel-name regex:"fp8_matmul|nvjet|gemm|cutlass|sm90" --launch-skip 2 --launch-count 4 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section Occupancy --section LaunchStats --section SchedulerStats \
      python3 experiments/results/speed2/fp8_ncu.py --shape qkv ${config//,/ } > $OUT/$name.txt 2>&1
    echo "== ncu $name"
    grep -E "^  [a-zA-Z_].*\(|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Warp" $OUT/$name.txt | head -40
  done
  echo "== $SECONDS s"
fi
if has fp8_decode; then
  for fp8 in false true; do
    timeout 240 python3 -m experiments.benchmark batch_sizes=[1] caches=[none,dual] timed_steps=64 repeats=3 \
      deadline_s=170 layout.fp8_weights=$fp8 out=$OUT/benchmark_llada8b_b1_fp8_weights_$fp8.json \
      hydra.run.dir=/tmp/hydra_fp8_$fp8 2>&1 | grep "^{\|window steps" | cut -c1-1200
    echo "== $SECONDS s"
  done
  if [ "${FP8_PROFILE:-0}" = 1 ]; then
    timeout 200 python3 -m experiments.profile_decode batch_sizes=[1] caches=[dual] timed_steps=32 layout.fp8_weights=true \
      hydra.run.dir=$OUT/profile_fp8_dual 2>&1 | grep -v INFO | tail -14
    rm -rf $OUT/profile_fp8_dual/*.trace.json.gz $OUT/profile_fp8_dual/.hydra $OUT/profile_fp8_dual/*.log
  fi
fi
echo "== $SECONDS s"
