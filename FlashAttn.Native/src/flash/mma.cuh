// Warp-level tensor-core building blocks in inline PTX (sm_80+): ldmatrix, mma.sync m16n8k16
// with float32 accumulators, cp.async tile copies. Fragment layouts (g = lane / 4, t = lane % 4):
//   A (16x16, row-major) a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   B (16x8, k x n)      b0: (k 2t..2t+1, n g)  b1: (k 2t+8.., n g)
//   C (16x8)             c0 c1: (g, 2t..2t+1)   c2 c3: (g+8, 2t..2t+1)
// Two C tiles side by side (16x16) hold exactly an A fragment, which is why a probability tile
// computed by one mma can feed the next without a trip through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "common/cp_async.cuh"

namespace flashattn {
namespace flash {

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8; register i gets
// matrix i's element (l / 4, 2 (l % 4) ..+1) — transposed with .trans.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one 32-bit register of T pairs (lo = a): the A-fragment element order.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Copies rows [0, rows) x columns [0, cols) of a (R, kHeadDim) tile whose rows are `row_stride`
// elements apart into shared memory with row stride kLds; everything else is zero-filled, so
// partial tiles and padded head dimensions need no masking in the matrix products.
// A thread copies one 16-byte column chunk c of rows r0, r0 + kRowStep, ..., walking one pointer
// down the tile. With a flat chunk index (chunk i -> row i / kChunks, column i % kChunks) the
// compiler keeps each chunk's row and column offset live across the main loop (some 20 registers
// at d128), and the two-tile forward spills; or it recomputes them, some 30 instructions per
// 16-byte copy (the backward's Q/dO tiles: a sixth to a fifth of its instructions, ncu on the
// H100; their removal saved only 1% of its time, which shared-memory traffic bounds). Rows are
// padded to a power-of-two number of chunks so that kThreads is a multiple of it; threads of
// padding chunks (d96, d160, d192, d224) copy nothing. The empty asm hides the row stride, else
// the pointer steps (multiples of the stride) are hoisted out of the main loop too. Both are
// needed for zero spills in the forward at d128 (nvcc 11.8).
template <int R, int kHeadDim, int kLds, int kThreads, typename T>
__device__ __forceinline__ void copy_tile(T* smem, const T* gmem, int64_t row_stride, int rows, int cols) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kChunksPow2 = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  constexpr int kRowStep = kThreads / kChunksPow2;
  static_assert(kChunks <= 32 && kThreads % kChunksPow2 == 0 && R % kRowStep == 0, "copy_tile: tile shape");
  const int r0 = int(threadIdx.x / kChunksPow2), c = int(threadIdx.x % kChunksPow2) * 8;
  if (c >= kHeadDim) return;
  asm volatile("" : "+l"(row_stride));
  const T* src = gmem + r0 * row_stride + c;
  const int64_t step = kRowStep * row_stride;
  const int rows_left = c < cols ? rows - r0 : 0;  // compared with constants, not one row index per step
  T* dst = smem + r0 * kLds + c;
#pragma unroll
  for (int it = 0; it < R / kRowStep; ++it) {
    const bool valid = it * kRowStep < rows_left;
    cp_async_16(dst + it * kRowStep * kLds, valid ? src : gmem, valid);
    src += step;
  }
}

}  // namespace flash
}  // namespace flashattn
