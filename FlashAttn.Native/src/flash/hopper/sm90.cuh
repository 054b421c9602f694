// Hopper (sm_90a) building blocks in inline PTX, each checked against the PTX ISA (8.x):
//  - mbarriers: init, arrive, arrive.expect_tx (the TMA's byte count), try_wait.parity;
//  - TMA: cp.async.bulk.tensor.4d global -> shared, completing on an mbarrier, and the reduce-add
//    shared -> global (cp.reduce.async.bulk.tensor) of the backward's dQ;
//  - wgmma.mma_async m64nNk16 with f32 accumulators, A from shared memory (SS) or registers (RS),
//    and its fence / commit_group / wait_group;
//  - setmaxnreg (the producer warpgroup gives registers to the consumers);
//  - named barriers (the consumer warpgroups' ping-pong).
// Only compiled for sm_90a (CMake builds src/flash/hopper/ for that architecture alone).
//
// Layouts (g = lane / 4, t = lane % 4, w = warp in the warpgroup), from the ISA's figures for
// m64nNk16 (the same as CuTe's CLayout_64xN / ALayout_64x16):
//   accumulator d[i], i < N / 2: row 16 w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2 t + i % 2
//   A in registers, a[q] (two 16-bit values, low half first): row 16 w + g + 8 (q % 2),
//     columns 2 t + 8 (q / 2) .. +1
// so the accumulator pairs (d[2q], d[2q + 1]) of n8 tiles 2 kk and 2 kk + 1, packed, are exactly
// the A registers of k16 step kk: S = Q K^T becomes the A operand of O += P V without shared memory.
//
// Shared-memory operands use the 128-byte swizzle, the layout the TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B: a tile is stored as chunks of 64 head-dim elements (128 bytes a
// row), rows 128 bytes apart, and the 16-byte unit u of row r lands at unit u ^ (r % 8), the XOR
// taken on address bits [4, 7) with bits [7, 10) — so tiles start on 1024-byte boundaries and the
// descriptors' base offset is 0.
//   K-major operand (Q, K: the reduction dim, head dim, contiguous): stride byte offset = 1024
//     (8-row groups), leading byte offset unused (1, as CuTe sets it); k16 step s within a 64-wide
//     chunk starts 32 s bytes into the row: the hardware applies the same address XOR.
//   MN-major operand (V for O += P V: keys are the reduction dim, head dim contiguous; imm-trans-b
//     = 1): the ISA's canonical ((8 x 8 elements, n), (8, k)) : ((1, LBO), (128 bytes, SBO)), i.e.
//     leading byte offset = bytes between 64-wide head-dim chunks, stride byte offset = 1024
//     (8-key groups); k16 step s starts 16 s rows (2048 s bytes) in.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flashattn {
namespace flash {
namespace hopper {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers (addresses are shared-window addresses) ----
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the inits visible to the other threads and to the TMA unit (before the __syncthreads that
// publishes them).
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

// ---- TMA ----
__device__ __forceinline__ void tma_prefetch(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// One box of a 4-D tensor map at coordinates (c0 innermost) into shared memory at dst; rows
// outside the tensor are filled with zeros and still count towards the barrier's bytes.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// ---- register reconfiguration (whole warpgroup, one branch per role) ----
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- named barriers (bar.sync / bar.arrive with an id; id 0 is __syncthreads') ----
// `threads` counts every thread that arrives or syncs on `id` in one phase, a multiple of 32; whole
// warps execute these.
__device__ __forceinline__ void named_bar_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- wgmma ----
// Shared-memory matrix descriptor, 128-byte swizzle: bits [0, 14) start address >> 4, [16, 30)
// leading byte offset >> 4, [32, 46) stride byte offset >> 4, [49, 52) base offset (0), [62, 64)
// swizzle mode (1 = 128 bytes). Adding (bytes >> 4) moves the start address.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes) {
  return uint64_t((addr & 0x3FFFF) >> 4) | uint64_t((lead_bytes & 0x3FFFF) >> 4) << 16 |
         uint64_t((stride_bytes & 0x3FFFF) >> 4) << 32 | uint64_t(1) << 62;
}

// Orders the register accesses around a batch of wgmma: before the first wgmma that reads or
// writes registers other instructions touched.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Pins registers in place across the asynchronous window: the compiler may not move their reads
// above a wait_group, nor the instructions that write them (accumulators, or A fragments) below a
// wgmma.fence, once they pass through this.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void reg_fence(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// D (64 x N, f32) += A (64 x 16) * B (16 x N); T = __nv_bfloat16 or __half.
//   ss: A and B from shared memory, both K-major; scale_d = 0 overwrites D (the first k step).
//   rs: A from registers (4 x 2 values), B from shared memory MN-major (imm-trans-b = 1).
template <typename T, int N>
struct Wgmma;

#define FA_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
               "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FA_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
               "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
               "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "  \
               "%59, %60, %61, %62, %63}"
#define FA_F8(d, i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define FA_F32(d) FA_F8(d, 0), FA_F8(d, 8), FA_F8(d, 16), FA_F8(d, 24)
#define FA_F64(d) FA_F32(d), FA_F8(d, 32), FA_F8(d, 40), FA_F8(d, 48), FA_F8(d, 56)

// Operand numbers after the N / 2 accumulators: n64 -> %32.., n128 -> %64...
#define FA_WGMMA(TYPE, TY, N, DREGS, FOPS, A0, A1, A2, A3, ADESC, BDESC, SC_SS, BRS, SC_RS)                          \
  template <>                                                                                                        \
  struct Wgmma<TYPE, N> {                                                                                            \
    static __device__ __forceinline__ void ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,                   \
                                              uint32_t scale_d) {                                                    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SC_SS ", 0;\n"                                               \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " DREGS ", " ADESC ", " BDESC       \
                   ", p, 1, 1, 0, 0;\n}\n"                                                                           \
                   : FOPS(d)                                                                                         \
                   : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                        \
    }                                                                                                                \
    static __device__ __forceinline__ void rs(float (&d)[N / 2], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, \
                                              uint64_t desc_b) {                                                     \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SC_RS ", 0;\n"                                               \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " DREGS ", {" A0 ", " A1 ", " A2  \
                   ", " A3 "}, " BRS ", p, 1, 1, 1;\n}\n"                                                            \
                   : FOPS(d)                                                                                         \
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1u));                                      \
    }                                                                                                                \
  };

FA_WGMMA(__nv_bfloat16, "bf16", 64, FA_D32, FA_F32, "%32", "%33", "%34", "%35", "%32", "%33", "%34", "%36", "%37")
FA_WGMMA(__nv_bfloat16, "bf16", 128, FA_D64, FA_F64, "%64", "%65", "%66", "%67", "%64", "%65", "%66", "%68", "%69")
FA_WGMMA(__half, "f16", 64, FA_D32, FA_F32, "%32", "%33", "%34", "%35", "%32", "%33", "%34", "%36", "%37")
FA_WGMMA(__half, "f16", 128, FA_D64, FA_F64, "%64", "%65", "%66", "%67", "%64", "%65", "%66", "%68", "%69")

#undef FA_WGMMA
#undef FA_F64
#undef FA_F32
#undef FA_F8
#undef FA_D64
#undef FA_D32

// ---- backward's additions ----
// Orders this thread's generic-proxy shared-memory stores before later async-proxy reads (wgmma
// operands, TMA): after writing a tile that a wgmma will read, before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// One box of a 4-D float32 tensor map at coordinates (c0 innermost), added element-wise from shared
// memory at src into global memory (cp.reduce.async.bulk.tensor, .add: atomic per element in L2);
// elements outside the tensor are skipped. Tracked by bulk groups: commit after issuing, and wait
// (bulk_wait_read) before src is written again.
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2,
                                                  int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// All but the newest kPending bulk groups of this thread have read their shared-memory source.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// All but the newest kPending bulk groups of this thread are complete (their global writes done).
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// D (64 x 64, f32) (+)= A (64 x 16) * B (16 x 64), both from shared memory MN-major (imm-trans-a =
// imm-trans-b = 1: A stored with its M dimension contiguous, B with its N dimension contiguous), the
// same canonical layout as the MN-major B of Wgmma::rs; scale_d = 0 overwrites D.
template <typename T>
struct WgmmaTT;
#define FA_WGMMA_TT(TYPE, TY)                                                                                        \
  template <>                                                                                                        \
  struct WgmmaTT<TYPE> {                                                                                             \
    static __device__ __forceinline__ void ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {  \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                    \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY                                           \
                   " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "   \
                   "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 1, 1;\n}\n"      \
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),             \
                     "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),         \
                     "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),      \
                     "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),      \
                     "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                              \
                   : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                        \
    }                                                                                                                \
  };
FA_WGMMA_TT(__nv_bfloat16, "bf16")
FA_WGMMA_TT(__half, "f16")
#undef FA_WGMMA_TT

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
