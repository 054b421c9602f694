// The attention kernels' dropout: which elements of S = Q K^T one Philox-4x32-10 call (common/philox.cuh) decides.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dropout_threshold.h"
#include "common/philox.cuh"

namespace flashattn {
namespace flash {

// The dropout stream: element (i, j) of (b, h) (query i, key j, positions inside the sequence) takes
// 16-bit half j % 2 (low, high) of word 2 ((i / 8) % 2) + (j / 8) % 2 of philox(seed, {4 (j / 16) + (j % 8) / 2,
// 8 (i / 16) + i % 8, (b * H + h) + offset_lo, offset_hi}). Kept when the half is below
// dropout_threshold16(p) = floor((1 - p) * 2^16) (so p within 2^-16 of the one asked for). One call thus decides {i, i + 8} x
// {j, j + 1, j + 8, j + 9} (j even): what one lane holds of the forward's S fragments (rows g, g + 8 of an m16
// tile, columns 2t, 2t + 1 of two n8 tiles), a call per eight elements. The backward holds S^T (keys g, g + 8 as
// rows, queries 2t, 2t + 1 as columns): of a call it takes {i, i + 8} x {j, j + 8} for its key's parity, a call
// per four elements as with 32-bit words. The forward was Philox-bound (about 70 instructions a call against the
// tensor cores' time: hopper/NOTES.md), so halving its calls is what the 16-bit halves buy. Host code too:
// flash_selftest reproduces the stream from this definition to check the kernels that do not return the mask, and
// the managed reference (Reference.DropoutMask) with tensor ops.
struct Dropout {
  uint2 key;
  uint32_t bh_lo, off_hi, threshold;
  __host__ __device__ __forceinline__ Dropout(uint64_t seed, uint64_t offset, int64_t bh, uint32_t threshold_)
      : key(make_uint2(uint32_t(seed), uint32_t(seed >> 32))),
        bh_lo(uint32_t(bh) + uint32_t(offset)),
        off_hi(uint32_t(offset >> 32)),
        threshold(threshold_) {}
  // The call of element (i, j): its four words, word 2 ((i / 8) % 2) + (j / 8) % 2 for (i, j).
  __host__ __device__ __forceinline__ uint4 words(int i, int j) const {
    const uint32_t ci = ((uint32_t(i) >> 4) << 3) | (uint32_t(i) & 7u);
    const uint32_t cj = ((uint32_t(j) >> 4) << 2) | ((uint32_t(j) & 7u) >> 1);
    return philox4x32_10(key, make_uint4(cj, ci, bh_lo, off_hi));
  }
  __host__ __device__ __forceinline__ bool kept(uint32_t word, int half) const {
    return half_kept(word, half, threshold);
  }
  // Decisions k[di][dj][c] for (i + 8 di, j + 8 dj + c); i % 16 < 8, j even and j % 16 < 8: one call.
  __host__ __device__ __forceinline__ void keep8(int i, int j, bool (&k)[2][2][2]) const {
    const uint4 r = words(i, j);
    const uint32_t w[2][2] = {{r.x, r.y}, {r.z, r.w}};
#pragma unroll
    for (int di = 0; di < 2; ++di)
#pragma unroll
      for (int dj = 0; dj < 2; ++dj)
#pragma unroll
        for (int c = 0; c < 2; ++c) k[di][dj][c] = kept(w[di][dj], c);
  }
  // Decisions k[di][dj] for (i + 8 di, j + 8 dj); i % 16 < 8 and j % 16 < 8 (either parity): one call, of whose
  // eight decisions the four of j's parity.
  __host__ __device__ __forceinline__ void keep4(int i, int j, bool (&k)[2][2]) const {
    const uint4 r = words(i, j);
    const int half = j & 1;
    k[0][0] = kept(r.x, half);
    k[0][1] = kept(r.y, half);
    k[1][0] = kept(r.z, half);
    k[1][1] = kept(r.w, half);
  }
  // Decision for element (i, j) alone: one call for one half (where registers hold no quad's decisions).
  __host__ __device__ __forceinline__ bool keep1(int i, int j) const {
    bool k[2][2];
    keep4(i & ~8, j & ~8, k);
    return k[(i >> 3) & 1][(j >> 3) & 1];
  }
  // Decisions of one thread's N elements of an accumulator fragment in the m16n8 layout (mma.sync's C
  // fragments side by side, and each warp's 16 rows of a wgmma accumulator, the Hopper kernels'):
  // element e is row r0 + 8 ((e / 2) % 2) and column c0 + 8 (e / 4) + e % 2, where r0 % 16 < 8 and
  // c0 % 16 <= 6, c0 even (c0: the fragment's first column + 2 t). Rows are queries and columns keys, or with
  // kKeyRows (the backward's S^T) the other way round. Bit e % 32 of bits[e / 32]. Queries as rows: one call
  // per eight elements (columns 16 np + c and 16 np + 8 + c, c = 0, 1, of both row halves); keys as rows: one
  // per four (each column c a call of its own: the queries' pairs are a call's keys' halves).
  template <int N, bool kKeyRows>
  __device__ __forceinline__ void keep_bits(int r0, int c0, uint32_t (&bits)[(N + 31) / 32]) const {
    static_assert(N % 8 == 0, "whole calls: 8 elements are 1 call (queries as rows) or 2 (keys as rows)");
#pragma unroll
    for (int w = 0; w < (N + 31) / 32; ++w) bits[w] = 0u;
#pragma unroll
    for (int np = 0; np < N / 8; ++np) {
      if constexpr (kKeyRows) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          bool k[2][2];  // [query half][key half]
          keep4(c0 + 16 * np + c, r0, k);
#pragma unroll
          for (int rh = 0; rh < 2; ++rh)
#pragma unroll
            for (int ch = 0; ch < 2; ++ch) {
              const int e = 4 * (2 * np + ch) + 2 * rh + c;
              bits[e / 32] |= uint32_t(k[ch][rh]) << (e % 32);
            }
        }
      } else {
        bool k[2][2][2];  // [query half][key half][key parity]
        keep8(r0, c0 + 16 * np, k);
#pragma unroll
        for (int rh = 0; rh < 2; ++rh)
#pragma unroll
          for (int ch = 0; ch < 2; ++ch)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int e = 4 * (2 * np + ch) + 2 * rh + c;
              bits[e / 32] |= uint32_t(k[rh][ch][c]) << (e % 32);
            }
      }
    }
  }
};

}  // namespace flash
}  // namespace flashattn
