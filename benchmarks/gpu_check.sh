#!/usr/bin/env bash
# The project's one GPU check. On a machine with an NVIDIA GPU and torch + triton installed: builds fastlayers
# (CPU and CUDA modules), installs the peer wheels, runs the tests' CUDA-tensor cases, the GPU table
# (fastlayers next to torch eager / torch.compile, Liger-Kernel, mamba_ssm's Triton kernels, causal-conv1d;
# plain, CUDA-graph and kernel-alone times), bf16-autocast check-reference training of both model families,
# a torch.compile training step checked against eager, decode tokens/s, and an ncu profile of a few kernels.
#
#   bash benchmarks/fetch_peers.sh                 # first, where PyPI is reachable: benchmarks/peers/*.whl
#   bash benchmarks/gpu_check.sh                   # results land in $OUT (or ./gpu_check_out)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # no GPU: every step walked on the CPU (see below)
# Device tool: carry ["benchmarks/peers"] (the wheels are git-ignored) and, where the copy has no .git,
# set FASTLAYERS_COMMIT=<commit> so the results name their commit.
#
# Files in $OUT (8, a lent machine's limit):
#   setup.log       nvidia-smi, versions, the build's log, the peer wheels' install
#   prebuilt.tar    the built modules (GPU_CHECK_PREBUILT=that.tar skips the build on a rerun with unchanged csrc/)
#   tests.log       the CUDA-tensor tests, each test's result as it finishes
#   bench.log       the table's progress and errors
#   gpu_table.md    the table as markdown
#   YYYY-MM-DD-<card>.json  the run's results (e.g. 2026-12-04-h200.json; gpu_table.py --results-name): the
#                   table's rows and metadata, plus "models" (the trainings, compile check, decode tokens/s) and
#                   "gpu_check" (each step's seconds, the profile's mode). Commit it under benchmarks/results/.
#   models.log      the two check-reference trainings, the compile check, decode tokens/s
#   profile.txt     ncu --csv --page details (SpeedOfLight, MemoryWorkloadAnalysis, Occupancy, WarpStateStats,
#                   LaunchStats; DRAM and local-memory bytes) of benchmarks/gpu_profile.py's kernels, or
#                   torch.profiler's kernel table where ncu is missing or its counters are refused
#                   (ERR_NVGPUCTRPERM), which the file's first line says
#
# Time: the whole script keeps inside GPU_CHECK_BUDGET seconds (default 480; a step never starts with less
# than 10 s): each step gets at most its cap and what is left after the later steps' reserve, but never less
# than its share of what is left. The plan on an H200 (device check 6 s, build 70 s, tests 70-80 s with 12
# processes, each training 30 s measured 2026-11-27; the rest estimated):
#   device + peers 10 | build 70 (cap 150; 0 with GPU_CHECK_PREBUILT) | tests 70 | table 130 (its --budget: the
#   rows past it are "not run", every family keeps its share) | 2 trainings 40 + 40 | compile check 45 |
#   decode 25 | ncu 45 (cap GPU_CHECK_NCU_CAP; GPU_CHECK_NCU=0: off) | merge 5   = 480 s.
# Each step's reserve is the sum of the later steps' caps; a step squeezed by an earlier overrun still gets
# 20-30% of what is left (the build: all of it, up to its cap: a cut build ends the run).
# GPU_CHECK_TRANSFORMERS=1 adds (outside the plan, cap GPU_CHECK_TRANSFORMERS_CAP, default 90 s) the Hugging Face
# rows of benchmarks/test_bench_transformers.py (patched vs unpatched Llama and Mamba-2) to models.log and the JSON.
# GPU_CHECK_FAMILIES=mla,ssd (say) limits the table to those row families (gpu_table.py --families);
# GPU_CHECK_QUICK=1: one shape per op in the table. GPU_CHECK_REP (default 50) and GPU_CHECK_GRAPH_REP (10):
# the ms of repeats per timing (do_bench, do_bench_cudagraph; gpu_table.py's own default is 100 and 10): the
# full table (about 350 rows with the peers) does not fit 130 s even so, and its last rows are "not run".
#
# Dry run (GPU_CHECK_DRY_RUN=1; no GPU, default budget 1800 s, caps x4): nvidia-smi skipped, the build skipped
# when the modules import (else a CPU-only build), the peers installed the same way, the tests collected only
# (--collect-only), the table in --cpu-smoke, tiny CPU trainings / compile check / decode, and ncu's step
# prints that ncu is missing and runs the torch.profiler fallback on the CPU. It ends with exit code 0 when
# every step ran.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-}
[ "$DRY" = 0 ] && DRY=
SCALE=$([ -n "$DRY" ] && echo 4 || echo 1)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build below
BUDGET=${GPU_CHECK_BUDGET:-$([ -n "$DRY" ] && echo 1800 || echo 480)}
PARTS=$(mktemp -d)  # JSON parts folded into the results JSON at the end
T0=$SECONDS
status=0
STEP="" STEP_T=$SECONDS
step() {
  [ -n "$STEP" ] && echo "$STEP	$((SECONDS - STEP_T))" >> "$PARTS/steps.tsv"
  STEP=$1 STEP_T=$SECONDS
  echo; echo "=== $1: ${*:2} ($(date +%T), ${SECONDS}s)"
}
# left RESERVE CAP [SHARE]: seconds this step may take: what is left of the budget minus RESERVE, at
# least SHARE % of what is left (default 100), at most CAP (x4 in a dry run), at least 10.
left() {
  local rem=$((BUDGET - (SECONDS - T0))); local l=$((rem - $1)) floor=$((rem * ${3:-100} / 100)) cap=$(($2 * SCALE))
  [ "$l" -lt "$floor" ] && l=$floor; [ "$l" -gt "$cap" ] && l=$cap; [ "$l" -lt 10 ] && l=10; echo $l
}
fail() { echo "$*"; status=1; }

step device "the GPU, torch, triton${DRY:+ (dry run: no GPU)}"
if [ -n "$DRY" ]; then
  echo "dry run: nvidia-smi skipped" | tee "$OUT/setup.log"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/setup.log" || exit 1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.sm,temperature.gpu,power.draw --format=csv 2>&1 | tee "$OUT/setup.log"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); assert torch.cuda.is_available(), 'no CUDA device visible to torch'" 2>&1 | tee -a "$OUT/setup.log" || exit 1
fi

if [ -n "$DRY" ] && $PY -c "import fastlayers._C" 2>/dev/null; then
  step build "dry run: skipped, the modules are in place"
elif [ -n "${GPU_CHECK_PREBUILT:-}" ] && [ -f "$GPU_CHECK_PREBUILT" ]; then
  step build "prebuilt modules from $GPU_CHECK_PREBUILT (no build)"
  tar xf "$GPU_CHECK_PREBUILT" || exit 1
else
  step build "CPU + CUDA modules, in place"
  if [ -n "$DRY" ]; then
    export FASTLAYERS_NO_CUDA=1
  else
    # Build only for this GPU: the 80;90 build is checked by CI's compile.
    CC_ARCH=$($PY -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
    export FASTLAYERS_CUDA_ARCHS=${FASTLAYERS_CUDA_ARCHS:-$CC_ARCH}
  fi
  echo "--- build" >> "$OUT/setup.log"
  timeout "$(left 300 150)" $PY setup.py -q build_ext --inplace -j 8 >> "$OUT/setup.log" 2>&1 \
    || { tail -50 "$OUT/setup.log"; echo "BUILD FAILED"; exit 1; }
  [ -n "$DRY" ] || tar cf "$OUT/prebuilt.tar" fastlayers/*.so fastlayers/_build_info.py
fi
$PY -c "import fastlayers; print(fastlayers.available_backends())" 2>&1 | tee -a "$OUT/setup.log"

step peers "Liger-Kernel, mamba_ssm (Triton), einops from benchmarks/peers/*.whl"
# Into a folder of their own on PYTHONPATH (after everything else): the machine's site-packages stay as they are.
PEERS_SITE=${TMPDIR:-/tmp}/fastlayers-peers
if ls benchmarks/peers/*.whl > /dev/null 2>&1; then
  rm -rf "$PEERS_SITE"
  # pip where it works; else unpacked (a pure-Python wheel is a zip of the installed files and their metadata).
  if $PY -m pip install -q --no-deps --no-index --target "$PEERS_SITE" benchmarks/peers/*.whl >> "$OUT/setup.log" 2>&1 \
     || ( echo "peers: pip failed (setup.log): unpacking the wheels instead" | tee -a "$OUT/setup.log"
          for w in benchmarks/peers/*.whl; do $PY -m zipfile -e "$w" "$PEERS_SITE" || exit 1; done ); then
    export PYTHONPATH="$PYTHONPATH:$PEERS_SITE"
    echo "peers: installed $(cd benchmarks/peers && ls *.whl | tr '\n' ' ')into $PEERS_SITE" | tee -a "$OUT/setup.log"
  else
    echo "peers: install FAILED (setup.log): the peer rows will say not installed" | tee -a "$OUT/setup.log"
  fi
else
  echo "peers: no wheels in benchmarks/peers (run benchmarks/fetch_peers.sh where PyPI is reachable, carry the" \
       "folder): the peer rows will say not installed" | tee -a "$OUT/setup.log"
fi
$PY -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_peers as p; print('peers:', p.versions())" 2>&1 | tee -a "$OUT/setup.log"

step tests "the CUDA-tensor cases${DRY:+ (dry run: collected only)}"
# Only the CUDA-tensor cases (CI runs the CPU suite; the emulator tests are CPU-only), spread over
# 12 processes where pytest-xdist is installed (the GPU image has it): Triton compiles dominate.
# -v: each test's result is in tests.log as it finishes, so a step cut short still says what ran.
# SIGINT at the step's limit: pytest prints its summary of what ran.
if [ -n "$DRY" ]; then
  timeout -s INT -k 20 "$(left 335 70 20)" $PY -m pytest tests/ -q -p no:cacheprovider --collect-only -k "cuda and not emulation" \
    > "$OUT/tests.log" 2>&1
  rc=$?
else
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
  PTO=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
  timeout -s INT -k 20 "$(left 335 70 20)" $PY -m pytest tests/ -v -p no:cacheprovider -rfE --tb=short $PTO $XDIST \
    -k "cuda and not emulation" > "$OUT/tests.log" 2>&1
  rc=$?
fi
grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -40
tail -3 "$OUT/tests.log"
[ "$rc" -eq 0 ] || fail "TESTS FAILED OR CUT SHORT (rc $rc)"

RESULTS=$($PY benchmarks/gpu_table.py --results-name ${DRY:+--cpu-smoke} 2>/dev/null | tail -1)
case "$RESULTS" in *.json) ;; *) RESULTS=$(date -u +%F)-unknown.json ;; esac
step table "fastlayers and peers, plain / CUDA graph / kernel alone -> $RESULTS, gpu_table.md"
# No timing starts after TB - 10 s; the row in flight (a torch.compile, say) may take the rest.
TB=$(left 200 130 45)
timeout -k 10 $((TB + 10)) $PY benchmarks/gpu_table.py ${DRY:+--cpu-smoke} ${GPU_CHECK_QUICK:+--quick} --budget $((TB > 20 ? TB - 10 : 10)) \
  --rep "${GPU_CHECK_REP:-50}" --graph-rep "${GPU_CHECK_GRAPH_REP:-10}" \
  --md "$OUT/gpu_table.md" --json "$OUT/$RESULTS" ${GPU_CHECK_FAMILIES:+--families "$GPU_CHECK_FAMILIES"} \
  > "$OUT/bench.log" 2>&1
rc=$?
grep -v "^| " "$OUT/bench.log" | grep -v "^|---" | tail -20
[ "$rc" -eq 0 ] || fail "BENCHMARK FAILED (rc $rc)"

: > "$OUT/models.log"
for preset in zebra-small hybridnorm-small; do
  step "train-$preset" "check-reference training, bf16 autocast: tokens/s fastlayers vs reference, steady state"
  case $preset in zebra-small) R=160 ;; *) R=120 ;; esac
  if [ -n "$DRY" ]; then
    ARGS=(--device cpu --dtype bf16 --steps 3 --batch 2 --seq-len 32 --check-reference 3 --timing-warmup 1
          --data-bytes 262144 --eval-batches 1)
  else
    ARGS=(--device cuda --steps 20 --batch 16 --seq-len 256 --check-reference 20 --timing-warmup 3)
  fi
  echo "--- $preset: fastlayers.train ${ARGS[*]}" >> "$OUT/models.log"
  timeout -k 10 "$(left $R 40 30)" $PY -m fastlayers.train --preset $preset "${ARGS[@]}" --quiet \
    --json "$PARTS/train-$preset.json" > "$PARTS/train.log" 2>&1
  rc=$?
  cat "$PARTS/train.log" >> "$OUT/models.log"
  grep -E "check-reference|speed:|steady state|Error|error" "$PARTS/train.log" | tail -6
  [ "$rc" -eq 0 ] || fail "TRAINING CHECK FAILED ($preset, rc $rc)"
done

step compile "torch.compile of a hybridnorm-tiny training step, loss vs eager within the bf16 tolerance"
echo "--- compile check" >> "$OUT/models.log"
timeout -k 10 "$(left 75 45 30)" $PY benchmarks/gpu_models.py compile ${DRY:+--device cpu --tiny} \
  --json "$PARTS/compile.json" > "$PARTS/compile.log" 2>&1
rc=$?
cat "$PARTS/compile.log" >> "$OUT/models.log"; tail -4 "$PARTS/compile.log"
[ "$rc" -eq 0 ] || fail "COMPILE CHECK FAILED (rc $rc)"

step decode "zebra-small and hybridnorm-small decode tokens/s, fastlayers vs reference"
echo "--- decode" >> "$OUT/models.log"
timeout -k 10 "$(left 50 25 30)" $PY benchmarks/gpu_models.py decode ${DRY:+--device cpu --tiny} \
  --json "$PARTS/decode.json" > "$PARTS/decode.log" 2>&1
rc=$?
cat "$PARTS/decode.log" >> "$OUT/models.log"; tail -6 "$PARTS/decode.log"
[ "$rc" -eq 0 ] || fail "DECODE FAILED (rc $rc)"

EXTRA_PARTS=()
if [ -n "${GPU_CHECK_TRANSFORMERS:-}" ]; then  # opt-in (outside the 480 s plan): issue 20's GPU rows
  step transformers "HF Llama / Mamba-2 patched by fastlayers.transformers.apply vs unpatched: train step, decode"
  echo "--- transformers" >> "$OUT/models.log"
  ${DRY:+env FASTLAYERS_BENCH_SMOKE=1} timeout -k 10 "$(left 50 "${GPU_CHECK_TRANSFORMERS_CAP:-90}" 30)" \
    $PY -m pytest benchmarks/test_bench_transformers.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$PARTS/transformers-raw.json" > "$PARTS/transformers.log" 2>&1
  rc=$?
  cat "$PARTS/transformers.log" >> "$OUT/models.log"
  grep -A12 "fastlayers benchmark summary" "$PARTS/transformers.log" | cut -c1-160
  [ "$rc" -eq 0 ] || fail "TRANSFORMERS BENCHMARK FAILED (rc $rc)"
  # The rows' case, provider, median and tokens/s (pytest-benchmark's own JSON is mostly raw timings).
  $PY -c "import json, sys; d = json.load(open(sys.argv[1])); json.dump([dict(b['extra_info'], median_s=b['stats']['median']) for b in d['benchmarks']], open(sys.argv[2], 'w'), indent=1)" \
    "$PARTS/transformers-raw.json" "$PARTS/transformers.json" && EXTRA_PARTS+=("$PARTS/transformers.json")
fi

PROFILE=off
if [ "${GPU_CHECK_NCU:-1}" != 0 ]; then
  step ncu "profile of benchmarks/gpu_profile.py's kernels -> profile.txt"
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  NT=$(left 5 "${GPU_CHECK_NCU_CAP:-45}")
  fallback() {
    echo "ncu: $1: torch.profiler fallback (kernel times only)"
    timeout -k 5 "$NT" $PY benchmarks/gpu_profile.py --torch-profiler ${DRY:+--device cpu} --reason "$1" \
      >> "$OUT/profile.txt" 2>&1 || fail "PROFILE FALLBACK FAILED"
  }
  if [ -n "$DRY" ] || [ -z "$NCU" ]; then
    echo "ncu: not available on this machine${DRY:+ (dry run)}" > "$OUT/profile.txt"
    PROFILE="torch.profiler (no ncu)"; fallback "ncu not available"
  else
    # --clock-control none: the clocks as they run (not ncu's base clocks); --profile-from-start off: only the
    # launches between gpu_profile.py's cudaProfilerStart/Stop (after its warm-up); --launch-count caps them.
    echo "ncu $($NCU --version | tail -1): --clock-control none, launches between cudaProfilerStart/Stop" > "$OUT/profile.txt"
    timeout -k 5 "$NT" "$NCU" --clock-control none --profile-from-start off --launch-count "${GPU_CHECK_NCU_LAUNCHES:-40}" \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --section LaunchStats --metrics dram__bytes_read.sum,dram__bytes_write.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum \
      --nvtx --csv --page details $PY benchmarks/gpu_profile.py >> "$OUT/profile.txt" 2>&1
    rc=$?
    PROFILE=ncu
    if grep -q ERR_NVGPUCTRPERM "$OUT/profile.txt"; then
      PROFILE="torch.profiler (ncu: ERR_NVGPUCTRPERM)"; fallback "ncu's performance counters refused (ERR_NVGPUCTRPERM)"
    elif [ "$rc" -ne 0 ]; then
      PROFILE="ncu failed (rc $rc)"; echo "ncu: rc $rc (124: cut at its ${NT} s cap)"; tail -5 "$OUT/profile.txt"
    fi
  fi
  echo "profile.txt: $(wc -l < "$OUT/profile.txt") lines ($PROFILE)"
fi

step merge "fold the trainings, compile check, decode and step times into $RESULTS"
$PY - "$PARTS" "$BUDGET" "$status" "$PROFILE" "${DRY:+1}" <<'EOF'
import json, sys
parts, budget, status, profile, dry = sys.argv[1:6]
steps = {}
for line in open(f"{parts}/steps.tsv"):
    name, sec = line.rstrip("\n").split("\t")
    steps[name] = int(sec)
json.dump(dict(budget_s=int(budget), steps_s=steps, total_s=sum(steps.values()), status_so_far=int(status),
               profile=profile, dry_run=bool(dry)), open(f"{parts}/gpu_check.json", "w"), indent=1)
EOF
if [ -f "$OUT/$RESULTS" ]; then
  $PY benchmarks/gpu_models.py merge "$OUT/$RESULTS" "$PARTS"/train-*.json "$PARTS/compile.json" "$PARTS/decode.json" \
    "${EXTRA_PARTS[@]}" "$PARTS/gpu_check.json" || fail "MERGE FAILED"
else
  fail "NO RESULTS JSON ($OUT/$RESULTS)"
fi

step summary "the MLA and scan rows (all rows: gpu_table.md)"
grep -E "^\| (mla|ssd|selective|causal)" "$OUT/gpu_table.md" 2>/dev/null | cut -c1-140
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$PARTS"
echo; echo "=== done (status $status, ${SECONDS}s of the ${BUDGET}s budget)"
exit $status
