// The attention kernels' dropout: which elements of S = Q K^T one Philox-4x32-10 call (common/philox.cuh) decides.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/philox.cuh"

namespace flashattn {
namespace flash {

// The dropout stream: element (i, j) of (b, h) (query i, key j, positions inside the sequence) takes
// word 2 ((i / 8) % 2) + (j / 8) % 2 of philox(seed, {8 (j / 16) + j % 8, 8 (i / 16) + i % 8,
// (b * H + h) + offset_lo, offset_hi}). Kept when the word is below keep_threshold =
// floor((1 - p) * 2^32). One call thus decides the quad {i, i + 8} x {j, j + 8}, which one lane
// holds both in the forward's S fragments (rows g, g + 8 of an m16 tile, columns 2t, 2t + 1 of two
// n8 tiles) and in the backward's S^T fragments (keys g, g + 8; queries 2t, 2t + 1 of two n8
// tiles): up to d128, one call per four elements in both directions, the backward regenerating the
// forward's decisions. A stream keyed by (i, j / 4) would cost one call per element pair in the
// forward and one per element in the backward, which holds S^T. Host code too: flash_selftest
// reproduces the stream from this definition to check the kernels that do not return the mask.
struct Dropout {
  uint2 key;
  uint32_t bh_lo, off_hi, threshold;
  __host__ __device__ __forceinline__ Dropout(uint64_t seed, uint64_t offset, int64_t bh, uint32_t threshold_)
      : key(make_uint2(uint32_t(seed), uint32_t(seed >> 32))),
        bh_lo(uint32_t(bh) + uint32_t(offset)),
        off_hi(uint32_t(offset >> 32)),
        threshold(threshold_) {}
  // Decisions k[di][dj] for (i + 8 di, j + 8 dj); i % 16 < 8 and j % 16 < 8.
  __host__ __device__ __forceinline__ void keep4(int i, int j, bool (&k)[2][2]) const {
    const uint32_t ci = ((uint32_t(i) >> 4) << 3) | (uint32_t(i) & 7u);
    const uint32_t cj = ((uint32_t(j) >> 4) << 3) | (uint32_t(j) & 7u);
    const uint4 r = philox4x32_10(key, make_uint4(cj, ci, bh_lo, off_hi));
    k[0][0] = r.x < threshold;
    k[0][1] = r.y < threshold;
    k[1][0] = r.z < threshold;
    k[1][1] = r.w < threshold;
  }
  // Decision for element (i, j) alone: one call for one word (where registers hold no quad's decisions).
  __host__ __device__ __forceinline__ bool keep1(int i, int j) const {
    bool k[2][2];
    keep4(i & ~8, j & ~8, k);
    return k[(i >> 3) & 1][(j >> 3) & 1];
  }
  // Decisions of one thread's N elements of an accumulator fragment in the m16n8 layout (mma.sync's C
  // fragments side by side, and each warp's 16 rows of a wgmma accumulator, the Hopper kernels'):
  // element e is row r0 + 8 ((e / 2) % 2) and column c0 + 8 (e / 4) + e % 2, where r0 % 16 < 8 and
  // c0 % 16 <= 6 (c0: the fragment's first column + 2 t). Rows are queries and columns keys, or with
  // kKeyRows (the backward's S^T) the other way round. Bit e % 32 of bits[e / 32]; one call per four
  // elements (the column pairs 16 np + c and 16 np + 8 + c of both row halves).
  template <int N, bool kKeyRows>
  __device__ __forceinline__ void keep_bits(int r0, int c0, uint32_t (&bits)[(N + 31) / 32]) const {
    static_assert(N % 8 == 0, "whole calls: 8 elements are 2 calls");
#pragma unroll
    for (int w = 0; w < (N + 31) / 32; ++w) bits[w] = 0u;
#pragma unroll
    for (int np = 0; np < N / 8; ++np)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        bool k[2][2];  // [query half][key half]
        if constexpr (kKeyRows) keep4(c0 + 16 * np + c, r0, k);
        else keep4(r0, c0 + 16 * np + c, k);
#pragma unroll
        for (int rh = 0; rh < 2; ++rh)
#pragma unroll
          for (int ch = 0; ch < 2; ++ch) {
            const int e = 4 * (2 * np + ch) + 2 * rh + c;
            const bool kept = kKeyRows ? k[ch][rh] : k[rh][ch];
            bits[e / 32] |= uint32_t(kept) << (e % 32);
          }
      }
  }
};

// The keep threshold of keep4: floor((1 - p) * 2^32), at most 2^32 - 1.
__host__ __device__ __forceinline__ uint32_t dropout_threshold(float p) {
  return uint32_t(fmin((1.0 - double(p)) * 4294967296.0, 4294967295.0));
}

}  // namespace flash
}  // namespace flashattn
