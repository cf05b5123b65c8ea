# Sourced by the GPU scripts under experiments/results/ (run from the repository root on the device):
# the results folder $OUT, hydra-core from the wheels carried in .whl/ (the device image has none; see
# ../shared/reference/gpu.md) and interegular for samplers.dingo (`pip download interegular --no-deps -d .whl`),
# the repository on PYTHONPATH, the GPU named, and the clock started.
set -u
SECONDS=0
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
