// sm_90 shared-memory barriers and the 1-D bulk copy engine in inline PTX (PTX ISA 8.0), shared by the Hopper
// attention kernels (flash/hopper/sm90.cuh) and the norms' bulk-copy backward (norm/norm.cu):
//  - mbarriers: init, arrive, arrive.expect_tx (the copy engine's byte count), try_wait.parity;
//  - cp.async.bulk global -> shared of a contiguous run of bytes, completing on an mbarrier;
//  - named barriers (bar.sync / bar.arrive with an id).
// try_wait, expect_tx and the bulk copy need sm_90: a kernel compiled for an older architecture must not reach them.
// Addresses are shared-window addresses (smem_addr, cp_async.cuh).
#pragma once

#include <cstdint>

namespace flashattn {

// ---- mbarriers ----
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the inits visible to the other threads and to the copy engine (before the __syncthreads that publishes
// them).
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// The producer's arrive: completes the phase once `bytes` more have landed through complete_tx.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Whether the phase of parity `parity` has completed (acquire: the data it guards is then visible);
// waits a hardware-chosen while first. A fresh barrier is in phase 0, so parity 1 counts as
// completed at once: the producer's first pass over the empty barriers.
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ---- the bulk copy engine ----
// `bytes` (a multiple of 16) from global `src` to shared `dst`, both 16-byte aligned; counts towards the current
// phase of `bar` (set up by an arrive.expect_tx of the same bytes).
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// ---- named barriers (id 0 is __syncthreads') ----
// `threads` counts every thread that arrives or syncs on `id` in one phase, a multiple of 32; whole
// warps execute these.
__device__ __forceinline__ void named_bar_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace flashattn
