#!/usr/bin/env bash
# Builds FlashAttn.Native (libflashattn.so) and copies it to artifacts/native/.
#   build/native.sh            CPU flavour here (no nvcc), CUDA flavour where nvcc is found
#   FLASHATTN_CUDA=ON build/native.sh     insist on CUDA (fails without nvcc)
# Extra arguments go to the CMake configure step (e.g. -DFLASHATTN_CUDA_ARCHS=90a).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${FLASHATTN_NATIVE_BUILD_DIR:-$root/native-build}
out_dir=${FLASHATTN_NATIVE_OUT:-$root/artifacts/native}
# a warm device machine's build folder outlives the tree it was built from (build/keep_mtimes.py)
if command -v python3 >/dev/null; then python3 "$root/build/keep_mtimes.py" "$root" "$build_dir"; fi
cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DFLASHATTN_CUDA="${FLASHATTN_CUDA:-AUTO}" "$@" >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
mkdir -p "$out_dir"
cp "$build_dir/FlashAttn.Native/libflashattn.so" "$out_dir/libflashattn.so"
echo "native: $out_dir/libflashattn.so"
