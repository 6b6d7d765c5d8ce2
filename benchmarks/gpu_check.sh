#!/usr/bin/env bash
# The project's one GPU check. On a machine with an NVIDIA GPU and torch + triton installed:
# builds fastlayers (CPU and CUDA modules), runs the tests' CUDA-tensor cases, runs the GPU
# benchmarks and ends with one short table (op, shape, dtype, backend, time, GB/s, % of the
# measured device-to-device copy; HybridNorm rows: attention vs SDPA, block vs compiled reference),
# then a short check-reference training on the GPU.
#
# Time: the whole script keeps inside GPU_CHECK_BUDGET seconds (default 480): each step gets at most
# its own cap (build 400 s, tests 150, table 300, training 100) and what is left after the later steps'
# reserve, but never less than its share of what is left (tests 35%, table 60%). Measured on an H200
# machine (2026-11-27): device check 6 s, build 70 s, tests 70-80 s (12 processes), full table 150 s,
# each training 30 s; the whole script 309 s. The table starts with the MLA and scan
# rows and reports rows it had no time for as not run; the test log lists every test as it finishes.
# GPU_CHECK_FAMILIES=mla,ssd (say) limits the table to those row families (gpu_table.py --families).
# Files in $OUT (8, a lent machine's limit): device.txt, build.log, prebuilt.tar (the built modules:
# GPU_CHECK_PREBUILT=that.tar skips the build on a rerun with unchanged csrc/), tests.log, bench.log,
# gpu_table.md, train.log, train-zebra-small.json.
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
BUDGET=${GPU_CHECK_BUDGET:-480}
T0=$SECONDS
status=0
step() { echo; echo "=== $* ($(date +%T), ${SECONDS}s)"; }
# left RESERVE CAP [SHARE]: seconds this step may take: what is left of the budget minus RESERVE, at
# least SHARE % of what is left (default 100), at most CAP, at least 10.
left() {
  local rem=$((BUDGET - (SECONDS - T0))); local l=$((rem - $1)) floor=$((rem * ${3:-100} / 100))
  [ "$l" -lt "$floor" ] && l=$floor; [ "$l" -gt "$2" ] && l=$2; [ "$l" -lt 10 ] && l=10; echo $l
}

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm,temperature.gpu,power.draw --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); assert torch.cuda.is_available(), 'no CUDA device visible to torch'" 2>&1 | tee -a "$OUT/device.txt" || exit 1

if [ -n "${GPU_CHECK_PREBUILT:-}" ] && [ -f "$GPU_CHECK_PREBUILT" ]; then
  step "prebuilt modules from $GPU_CHECK_PREBUILT (no build)"
  tar xf "$GPU_CHECK_PREBUILT" || exit 1
else
  step "build (CPU + CUDA modules, in place)"
  CC_ARCH=$($PY -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
  # Build only for this GPU: the 80;90 build is checked by CI's compile.
  FASTLAYERS_CUDA_ARCHS=${FASTLAYERS_CUDA_ARCHS:-$CC_ARCH} timeout "$(left 200 400)" $PY setup.py -q build_ext --inplace -j 8 > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  tar cf "$OUT/prebuilt.tar" fastlayers/*.so fastlayers/_build_info.py
fi
$PY -c "import fastlayers; print(fastlayers.available_backends())" 2>&1 | tee -a "$OUT/device.txt"

step "tests on CUDA tensors"
# Only the CUDA-tensor cases (CI runs the CPU suite; the emulator tests are CPU-only), spread over
# 12 processes where pytest-xdist is installed (the GPU image has it): Triton compiles dominate.
# -v: each test's result is in tests.log as it finishes, so a step cut short still says what ran.
# SIGINT at the step's limit: pytest prints its summary of what ran.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
PTO=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
timeout -s INT -k 20 "$(left 260 150 35)" $PY -m pytest tests/ -v -p no:cacheprovider -rfE --tb=short $PTO $XDIST \
  -k "cuda and not emulation" > "$OUT/tests.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -40
tail -3 "$OUT/tests.log"
[ "$rc" -eq 0 ] || { echo "TESTS FAILED OR CUT SHORT (rc $rc)"; status=1; }

step "benchmark table"
TB=$(left 90 300 60)
timeout -k 10 $((TB + 40)) $PY benchmarks/gpu_table.py ${GPU_CHECK_QUICK:+--quick} --budget "$TB" --md "$OUT/gpu_table.md" \
  ${GPU_CHECK_FAMILIES:+--families "$GPU_CHECK_FAMILIES"} \
  > "$OUT/bench.log" 2>&1
rc=$?
grep -v "^| " "$OUT/bench.log" | tail -20
[ "$rc" -eq 0 ] || { echo "BENCHMARK FAILED (rc $rc)"; status=1; }

step "training on the GPU: tokens/s, fastlayers vs reference (bf16 autocast), zebra-small (MLA + Mamba-2)"
for preset in zebra-small; do
  timeout -k 10 "$(left 0 100)" $PY -m fastlayers.train --preset $preset --device cuda --steps 20 --batch 16 --seq-len 256 \
    --check-reference 20 --quiet --json "$OUT/train-$preset.json" > "$OUT/train.log" 2>&1
  rc=$?
  tail -15 "$OUT/train.log"
  [ "$rc" -eq 0 ] || { echo "TRAINING CHECK FAILED ($preset, rc $rc)"; status=1; }
done
step "table: the MLA and scan rows (all rows: gpu_table.md)"
grep -E "^\| (mla|ssd|selective|causal)" "$OUT/gpu_table.md" 2>/dev/null | cut -c1-110
step "done (status $status)"
exit $status
