// 16 bytes global -> shared memory without a register round trip (cp.async, sm_80+): the copies a thread has issued
// stay in flight until it waits for them, so a kernel can put a whole tile or row in flight at once without holding
// registers for it.
#pragma once

#include <cstdint>

namespace flashattn {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// valid = false zero-fills the destination (src-size 0 reads nothing, so `src` only needs to be some mapped address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
// 4 bytes (cp.async.ca: the 16-byte form alone may bypass L1), for a scalar that travels with a row.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of the thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

}  // namespace flashattn
