#!/usr/bin/env bash
# The project's one GPU check. On a machine with an NVIDIA GPU and torch + triton installed:
# builds fastlayers (CPU and CUDA modules), runs the tests' CUDA-tensor cases, runs the GPU
# benchmarks and ends with one short table (op, shape, dtype, backend, time, GB/s, % of the
# measured device-to-device copy; HybridNorm rows: attention vs SDPA, block vs compiled reference).
# Budget (estimate, not yet timed): build ~2 min, tests <= 5 min, table <= 5 min, training <= 2 min
# (each step has a timeout); with GPU_CHECK_QUICK=1 the table is short. Not yet run on a GPU.
#
#   bash benchmarks/gpu_check.sh            # results land in $OUT (or ./gpu_check_out)
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh   # one shape per op in the table
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); assert torch.cuda.is_available(), 'no CUDA device visible to torch'" 2>&1 | tee -a "$OUT/device.txt" || exit 1

step "build (CPU + CUDA modules, in place)"
CC_ARCH=$($PY -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
# Build only for this GPU: the 80;90 build is checked by CI's compile.
FASTLAYERS_CUDA_ARCHS=${FASTLAYERS_CUDA_ARCHS:-$CC_ARCH} $PY setup.py -q build_ext --inplace -j 8 > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
$PY -c "import fastlayers; print(fastlayers.available_backends())"

step "tests on CUDA tensors"
# Only the CUDA-tensor cases (CI runs the CPU suite; the emulator tests are CPU-only), spread over
# 8 processes where pytest-xdist is installed (the GPU image has it): Triton compiles dominate.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 300 $PY -m pytest tests/ -q -p no:cacheprovider -rs -k "cuda and not emulation" $XDIST 2>&1 \
  | tee "$OUT/tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "TESTS FAILED"; status=1; }

step "benchmark table"
timeout 300 $PY benchmarks/gpu_table.py ${GPU_CHECK_QUICK:+--quick} --md "$OUT/gpu_table.md" 2>&1 | tee "$OUT/bench.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "BENCHMARK FAILED"; status=1; }
step "training on the GPU: tokens/s, fastlayers vs reference (bf16 autocast), zebra-small (MLA + Mamba-2)"
for preset in zebra-small; do
  timeout 120 $PY -m fastlayers.train --preset $preset --device cuda --steps 20 --batch 16 --seq-len 256 \
    --check-reference 20 --quiet --json "$OUT/train-$preset.json" 2>&1 | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "TRAINING CHECK FAILED ($preset)"; status=1; }
done
step "done (status $status)"
exit $status
