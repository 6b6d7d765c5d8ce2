#!/usr/bin/env bash
# Fetch the peer libraries of the GPU table as pure-Python wheels into benchmarks/peers/ (git-ignored), on a
# machine with PyPI (the GPU machine has no network): benchmarks/gpu_check.sh installs them there with
#   pip install --no-deps --no-index --target DIR benchmarks/peers/*.whl
# Carry the folder to the GPU machine with the working tree (device tool: carry ["benchmarks/peers"]).
#
#   liger-kernel  Liger-Kernel's Triton kernels (RMSNorm, LayerNorm, SwiGLU, RoPE): a pure-Python wheel.
#   mamba-ssm     built here without its CUDA extensions (MAMBA_SKIP_CUDA_BUILD=TRUE): its Triton kernels
#                 (mamba_chunk_scan_combined, selective_state_update) need none; benchmarks/gpu_peers.py
#                 imports them with the package's __init__ (which imports selective_scan_cuda) skipped.
#   einops        mamba_ssm's Triton modules import it.
# Not fetched: causal-conv1d (every call goes to its CUDA extension, which needs nvcc against the GPU
# image's torch) and FlashMLA (a CUDA build): the table has rows saying so.
#
#   bash benchmarks/fetch_peers.sh            # LIGER_VERSION=0.8.5 MAMBA_VERSION=2.3.2.post1 pin versions
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=benchmarks/peers
PY=${PYTHON:-python3}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
spec() { if [ -n "${2:-}" ]; then echo "$1==$2"; else echo "$1"; fi; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "fetch_peers: liger-kernel, einops (wheels from PyPI)"
$PY -m pip download -q --no-deps --only-binary=:all: -d "$DEST" "$(spec liger-kernel "${LIGER_VERSION:-}")" \
  "$(spec einops "${EINOPS_VERSION:-}")"

echo "fetch_peers: mamba-ssm (built here without its CUDA extensions; setup.py needs torch, --no-build-isolation)"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
  "$(spec mamba-ssm "${MAMBA_VERSION:-}")"

# Pure-Python wheels only (no compiled code travels to the GPU machine), well under the 64 MiB the working
# tree may weigh there.
status=0
for w in "$DEST"/*.whl; do
  case "$(basename "$w")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
    *) echo "fetch_peers: $(basename "$w") is not a pure-Python wheel"; status=1 ;;
  esac
done
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"/*.whl | awk '{printf "  %-60s %9d bytes\n", $9, $5}'
echo "fetch_peers: $(ls "$DEST"/*.whl | wc -l) wheels, $total bytes in $DEST"
[ "$total" -lt $((16 << 20)) ] || { echo "fetch_peers: more than 16 MiB of wheels"; status=1; }
exit $status
