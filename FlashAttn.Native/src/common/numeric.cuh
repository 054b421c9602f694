// Numerics the kernels share: the log2-domain exponential, element conversions and aligned vector access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace flashattn {

// Softmaxes work in the log2 domain: exp(x) = 2^(x log2 e), and back with ln 2.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x by the multi-function unit alone (ex2.approx.ftz: relative error below 2^-22, results under 2^-126 flushed to 0).
// exp2f adds range fix-ups the callers do not need: their arguments are <= 0 or -inf (exponents after subtracting a
// running max), where a flushed term never changes a sum of at least 1.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

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

// One 16-byte global store whatever the compiler knows of the address: NVVM may split a vector assignment into 32- or
// 16-bit stores where it cannot prove the alignment (the fused cross-entropy kernel's output loop), each of which
// then writes a quarter or less of its sectors.
__device__ __forceinline__ void store_global_16(void* p, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// The split form of load_float for kernels that keep several loads in flight: a vector is loaded as packed
// 32-bit words (nothing waits on them; a Vec of 16-bit elements would be split into one register per element
// as soon as it arrives) and converted later, one instruction per element.
template <typename T, int N>
struct Packed {
  static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte vectors");
  static constexpr int kWords = N * int(sizeof(T)) / 4;
  uint32_t w[kWords];
};

// Loads a vector as packed words: through L2 only (ld.global.cg) when kStream, for data read once by the kernel
// (streamed data then leaves L1 to what is read again, such as weights read for every row), else through L1.
template <bool kStream, typename T, int N>
__device__ __forceinline__ Packed<T, N> load_packed_words(const T* p) {
  Packed<T, N> r;
#pragma unroll
  for (int i = 0; i < Packed<T, N>::kWords / 4; ++i) {
    const uint4* q = reinterpret_cast<const uint4*>(p) + i;
    const uint4 v = kStream ? __ldcg(q) : *q;
    r.w[4 * i] = v.x;
    r.w[4 * i + 1] = v.y;
    r.w[4 * i + 2] = v.z;
    r.w[4 * i + 3] = v.w;
  }
  return r;
}

template <typename T, int N>
__device__ __forceinline__ Packed<T, N> load_packed_stream(const T* p) { return load_packed_words<true, T, N>(p); }

template <typename T, int N>
__device__ __forceinline__ Packed<T, N> load_packed(const T* p) { return load_packed_words<false, T, N>(p); }

template <typename T, int N>
__device__ __forceinline__ void to_floats(const Packed<T, N>& r, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < Packed<T, N>::kWords; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = __uint_as_float(r.w[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      // a bfloat16 is the high half of a float32
      out[2 * i] = __uint_as_float(r.w[i] << 16);
      out[2 * i + 1] = __uint_as_float(r.w[i] & 0xffff0000u);
    } else {
      static_assert(std::is_same_v<T, __half>, "float, __half or __nv_bfloat16");
      __half2 h;
      *reinterpret_cast<uint32_t*>(&h) = r.w[i];
      const float2 f = __half22float2(h);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
}

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  to_floats(load_packed<T, N>(p), out);
}

// The store side of load_floats: N floats rounded to T (to nearest, two at a time for the 16-bit types) into packed
// 32-bit words, stored 16 bytes at a time as uint4, which NVVM keeps one vector store. A Vec of 16-bit elements is an
// aggregate that NVVM may split into one store per element and not merge back: the rowsca backward without dropout
// stored each of its bf16 vectors as eight 16-bit stores (norm/NOTES.md, "rowsca32's slow case"), each writing part
// of a sector, at half the speed of the same kernel with dropout.
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte vectors");
  constexpr int kWords = N * int(sizeof(T)) / 4;
  uint32_t w[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      w[i] = __float_as_uint(in[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    } else {
      static_assert(std::is_same_v<T, __half>, "float, __half or __nv_bfloat16");
      const __half2 h = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
  }
#pragma unroll
  for (int i = 0; i < kWords / 4; ++i)
    reinterpret_cast<uint4*>(p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
}

// Rounds N floats to T, two at a time for the 16-bit types (one packed conversion per pair).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> from_floats(const float (&in)[N]) {
  Vec<T, N> r;
  if constexpr (std::is_same_v<T, __nv_bfloat16> && N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) *reinterpret_cast<__nv_bfloat162*>(&r.v[i]) = __floats2bfloat162_rn(in[i], in[i + 1]);
  } else if constexpr (std::is_same_v<T, __half> && N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) *reinterpret_cast<__half2*>(&r.v[i]) = __floats2half2_rn(in[i], in[i + 1]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = from_float<T>(in[i]);
  }
  return r;
}

}  // namespace flashattn
