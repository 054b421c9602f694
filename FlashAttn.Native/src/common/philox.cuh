// Counter-based Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the generator
// curand and PyTorch use for dropout, and every dropout stream of this library: the attention kernels' stream of 16-bit halves
// (flash/dropout.cuh) and the norms' elementwise stream (below). A pure function of (key, counter): the backward
// regenerates the forward's decisions instead of saving a mask. The managed reference path reproduces it
// (Reference.Philox) and must stay byte-identical.
#pragma once

#include <cstdint>

#include "common/dropout_threshold.h"

namespace flashattn {

__host__ __device__ __forceinline__ uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

// Four 32-bit words for counter ctr under key.
__host__ __device__ __forceinline__ uint4 philox4x32_10(uint2 key, uint4 ctr) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = philox_mulhi(kM0, ctr.x), lo0 = kM0 * ctr.x;
    const uint32_t hi1 = philox_mulhi(kM1, ctr.z), lo1 = kM1 * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += kW0;
    key.y += kW1;
  }
  return ctr;
}

// The elementwise stream's call: key `seed`, counter (`counter` low, high, `offset` low, high).
__host__ __device__ __forceinline__ uint4 philox4x32_10(uint64_t seed, uint64_t offset, uint64_t counter) {
  return philox4x32_10(make_uint2(uint32_t(seed), uint32_t(seed >> 32)),
                       make_uint4(uint32_t(counter), uint32_t(counter >> 32), uint32_t(offset), uint32_t(offset >> 32)));
}

// The round keys of key `seed`, (key.x, key.y) of each of the ten rounds, for the kernels that take them as an argument:
// in the constant bank they are an operand of the round's xor, where philox4x32_10 derives them again in every call.
struct PhiloxKeys {
  uint32_t k[10][2];
};

__host__ __device__ inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys r;
  uint32_t kx = uint32_t(seed), ky = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    r.k[round][0] = kx;
    r.k[round][1] = ky;
    kx += 0x9E3779B9u;  // philox4x32_10's kW0, kW1
    ky += 0xBB67AE85u;
  }
  return r;
}

// philox4x32_10(key, ctr) with the key's round keys given: the same words.
__host__ __device__ __forceinline__ uint4 philox4x32_10(const PhiloxKeys& keys, uint4 ctr) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = philox_mulhi(kM0, ctr.x), lo0 = kM0 * ctr.x;
    const uint32_t hi1 = philox_mulhi(kM1, ctr.z), lo1 = kM1 * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ keys.k[round][0], lo1, hi0 ^ ctr.w ^ keys.k[round][1], lo0);
  }
  return ctr;
}

// The norms' elementwise stream: element e is kept when 16-bit half e % 2 (low, high) of word (e / 2) % 4 of
// philox(seed, offset, e / 8) is below threshold = floor((1 - p) * 2^16) (common/dropout_threshold.h; p thus
// within 2^-16 of the one asked for, as the attention's halves): one generator call per 8 elements, half the calls of a
// 32-bit word an element (norm/NOTES.md, "Sixth round").

__host__ __device__ __forceinline__ bool norm_kept(uint32_t word, uint64_t e, uint32_t threshold) {
  return half_kept(word, int(e & 1), threshold);
}

// keep[j] for elements e .. e + N - 1. N a multiple of 8 requires e % 8 == 0 (N / 8 calls), N == 4 requires e % 4 == 0
// (one call, two of its words); other N take a call per element.
template <int N>
__device__ __forceinline__ void dropout_keep(uint64_t seed, uint64_t offset, uint32_t threshold, uint64_t e,
                                             bool (&keep)[N]) {
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int j = 0; j < N; j += 8) {
      const uint4 r = philox4x32_10(seed, offset, (e + j) >> 3);
      const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int k = 0; k < 8; ++k) keep[j + k] = norm_kept(w[k / 2], k, threshold);
    }
  } else if constexpr (N == 4) {
    const uint4 r = philox4x32_10(seed, offset, e >> 3);
    const bool upper = (e & 4) != 0;  // elements 4-7 of the call: words z, w
    const uint32_t w0 = upper ? r.z : r.x, w1 = upper ? r.w : r.y;
    keep[0] = norm_kept(w0, 0, threshold);
    keep[1] = norm_kept(w0, 1, threshold);
    keep[2] = norm_kept(w1, 0, threshold);
    keep[3] = norm_kept(w1, 1, threshold);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const uint64_t ej = e + j;
      const uint4 r = philox4x32_10(seed, offset, ej >> 3);
      const int w = int((ej >> 1) & 3);
      keep[j] = norm_kept(w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w, ej, threshold);
    }
  }
}

// dropout_keep<N> with the round keys of the seed given, for e % N == 0 and N a power of two of at least 8: the
// counters of the N / 8 calls, e / 8 + j, differ from e / 8 in their low word alone (a multiple of N / 8: no carry).
template <int N>
__device__ __forceinline__ void dropout_keep(const PhiloxKeys& keys, uint64_t offset, uint32_t threshold, uint64_t e,
                                             bool (&keep)[N]) {
  static_assert(N >= 8 && (N & (N - 1)) == 0, "whole Philox calls, one carry-free counter word");
  const uint64_t c = e >> 3;
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
    const uint4 r =
        philox4x32_10(keys, make_uint4(uint32_t(c) + j, uint32_t(c >> 32), uint32_t(offset), uint32_t(offset >> 32)));
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) keep[8 * j + k] = norm_kept(w[k / 2], k, threshold);
  }
}

}  // namespace flashattn
