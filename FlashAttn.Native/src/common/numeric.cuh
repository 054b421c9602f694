// Element conversions and aligned vector access for memory-bound kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flashattn {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T loaded or stored with one aligned access (two when N * sizeof(T) is 32 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_float(const T* p, float (&out)[N]) {
  Vec<T, N> r = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(r.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* p, const float (&in)[N]) {
  Vec<T, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = r;
}

}  // namespace flashattn
