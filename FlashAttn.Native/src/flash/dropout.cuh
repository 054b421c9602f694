// The attention kernels' dropout: which elements of S = Q K^T one Philox-4x32-10 call (common/philox.cuh) decides.
#pragma once

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
// forward and one per element in the backward, which holds S^T.
struct Dropout {
  uint2 key;
  uint32_t bh_lo, off_hi, threshold;
  __device__ __forceinline__ Dropout(uint64_t seed, uint64_t offset, int64_t bh, uint32_t threshold_)
      : key(make_uint2(uint32_t(seed), uint32_t(seed >> 32))),
        bh_lo(uint32_t(bh) + uint32_t(offset)),
        off_hi(uint32_t(offset >> 32)),
        threshold(threshold_) {}
  // Decisions k[di][dj] for (i + 8 di, j + 8 dj); i % 16 < 8 and j % 16 < 8.
  __device__ __forceinline__ void keep4(int i, int j, bool (&k)[2][2]) const {
    const uint32_t ci = ((uint32_t(i) >> 4) << 3) | (uint32_t(i) & 7u);
    const uint32_t cj = ((uint32_t(j) >> 4) << 3) | (uint32_t(j) & 7u);
    const uint4 r = philox4x32_10(key, make_uint4(cj, ci, bh_lo, off_hi));
    k[0][0] = r.x < threshold;
    k[0][1] = r.y < threshold;
    k[1][0] = r.z < threshold;
    k[1][1] = r.w < threshold;
  }
  // Decision for element (i, j) alone: one call for one word (where registers hold no quad's decisions).
  __device__ __forceinline__ bool keep1(int i, int j) const {
    bool k[2][2];
    keep4(i & ~8, j & ~8, k);
    return k[(i >> 3) & 1][(j >> 3) & 1];
  }
};

}  // namespace flash
}  // namespace flashattn
