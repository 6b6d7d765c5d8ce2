#!/bin/sh
# Build and run the CPU emulation test of the CUDA norm kernels (no GPU needed).
set -e
here=$(cd "$(dirname "$0")" && pwd)
csrc=$here/../..
out=${TMPDIR:-/tmp}/fastlayers_emu_test
${CXX:-g++} -std=c++20 -O1 -fopenmp -pthread -I"$csrc/include" "$here/emu_test.cpp" "$csrc/cpu/norm.cpp" -o "$out"
exec "$out" "$@"
