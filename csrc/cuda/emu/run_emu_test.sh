#!/bin/sh
# Build and run a CPU emulation test of the CUDA kernels (no GPU needed):
#   sh run_emu_test.sh [reps]          the norm kernels (emu_test.cpp vs cpu/norm.cpp)
#   sh run_emu_test.sh mla [quick]     MLA decoding (emu_mla_test.cpp vs cpu/mla.cpp)
#   sh run_emu_test.sh scan [quick]    the selective scan (emu_scan_test.cpp vs cpu/scan.cpp)
set -e
here=$(cd "$(dirname "$0")" && pwd)
csrc=$here/../..
case "$1" in
  mla) shift; name=emu_mla_test; cpu=mla.cpp; opt=-O0 ;;   # small runs: compile time dominates
  scan) shift; name=emu_scan_test; cpu=scan.cpp; opt=-O0 ;;
  *) name=emu_test; cpu=norm.cpp; opt=-O1 ;;
esac
out=${TMPDIR:-/tmp}/fastlayers_$name
${CXX:-g++} -std=c++20 $opt -fopenmp -pthread -I"$csrc/include" "$here/$name.cpp" "$csrc/cpu/$cpu" -o "$out"
exec "$out" "$@"
