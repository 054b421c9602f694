// The keep rule of the dropout streams (the attention kernels' and the norms'): an element is kept when its 16-bit
// half of a Philox word is below floor((1 - p) * 2^16), so p is honoured within 2^-16; 2^16 (every half kept) at p = 0.
// A plain header: the ABI's host code fills the threshold into the params structs, the sm_80 attention kernels derive
// it on the device, and both streams decide with half_kept.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FLASHATTN_HOST_DEVICE __host__ __device__
#else
#define FLASHATTN_HOST_DEVICE
#endif

namespace flashattn {

FLASHATTN_HOST_DEVICE inline uint32_t dropout_threshold16(float p) {
  const double t = (1.0 - double(p)) * 65536.0;
  return uint32_t(t < 65536.0 ? t : 65536.0);
}

// Whether half `half` (0 low, 1 high) of `word` keeps its element.
FLASHATTN_HOST_DEVICE inline bool half_kept(uint32_t word, int half, uint32_t threshold) {
  return (half != 0 ? word >> 16 : word & 0xffffu) < threshold;
}

}  // namespace flashattn
