# cuda_trace_lib: builds build/cuda_trace.cpp (the CUPTI activity trace loaded through CUDA_INJECTION64_PATH) into
# /tmp/libcuda_trace.so and prints its path; sourced by step-profile.sh and device-run.sh, which set $root. It links the
# CUPTI PyTorch loads where there is one (one CUPTI in a process that also loads PyTorch's), else the toolkit's.
cuda_trace_lib() {
  local cuda=${CUDA_HOME:-/usr/local/cuda} site inc lib
  site=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
  for d in "$cuda"/extras/CUPTI/include "$cuda"/include "$site"/nvidia/*/include; do
    [ -f "$d/cupti.h" ] && { inc=$d; break; }
  done
  lib=$(ls "$site"/nvidia/*/lib/libcupti.so* "$cuda"/extras/CUPTI/lib64/libcupti.so* "$cuda"/lib64/libcupti.so* 2>/dev/null | head -1)
  [ -n "${inc:-}" ] && [ -n "$lib" ] || { echo "cuda trace: no CUPTI here (cupti.h: ${inc:-none}, libcupti: ${lib:-none})" >&2; return 1; }
  g++ -std=c++17 -O2 -shared -fPIC "$root/build/cuda_trace.cpp" -I"$cuda/include" -I"$inc" "$lib" \
    -Wl,-rpath,"$(dirname "$lib")" -o /tmp/libcuda_trace.so >&2 || return 1
  echo /tmp/libcuda_trace.so
}
