// Philox-4x32-10 counter-based generator (Salmon et al., SC'11): a pure function of
// (key, counter), so the backward regenerates exactly the dropout decisions of the forward.
#pragma once

#include <cstdint>

namespace flashattn {
namespace flash {

__device__ __forceinline__ uint4 philox4x32_10(uint2 key, uint4 ctr) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kM0, ctr.x), lo0 = kM0 * ctr.x;
    const uint32_t hi1 = __umulhi(kM1, ctr.z), lo1 = kM1 * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += kW0;
    key.y += kW1;
  }
  return ctr;
}

// The dropout stream: element (b, h, i, j) (i, j positions inside the sequence) takes word
// j % 4 of philox(seed, {j / 4, i, (b * H + h) + offset_lo, offset_hi}). Kept when the word is
// below keep_threshold = floor((1 - p) * 2^32).
struct Dropout {
  uint2 key;
  uint32_t bh_lo, off_hi, threshold;
  __device__ __forceinline__ Dropout(uint64_t seed, uint64_t offset, int64_t bh, uint32_t threshold_)
      : key(make_uint2(uint32_t(seed), uint32_t(seed >> 32))),
        bh_lo(uint32_t(bh) + uint32_t(offset)),
        off_hi(uint32_t(offset >> 32)),
        threshold(threshold_) {}
  // Decisions for columns j0 and j0 + 1 (j0 even) of row i.
  __device__ __forceinline__ void keep2(int i, int j0, bool& k0, bool& k1) const {
    const uint4 r = philox4x32_10(key, make_uint4(uint32_t(j0) >> 2, uint32_t(i), bh_lo, off_hi));
    const bool hi = (j0 & 2) != 0;
    k0 = (hi ? r.z : r.x) < threshold;
    k1 = (hi ? r.w : r.y) < threshold;
  }
  // Decision for one element (the backward holds one key row across several queries).
  __device__ __forceinline__ bool keep1(int i, int j) const {
    const uint4 r = philox4x32_10(key, make_uint4(uint32_t(j) >> 2, uint32_t(i), bh_lo, off_hi));
    const uint32_t w = (j & 3) == 0 ? r.x : (j & 3) == 1 ? r.y : (j & 3) == 2 ? r.z : r.w;
    return w < threshold;
  }
};

}  // namespace flash
}  // namespace flashattn
