// The bias gradient of a linear: dy (M, N) -> db (N,) = sum over rows, float32 accumulation, db in dy's dtype.
// Memory-bound: dy is read once (16-byte vectors along N, kVec columns a thread), db written once. The rows are split
// over grid.y so that even N = 768 fills every SM; each split's column sums go to a float32 workspace
//   dy (M, N) -> partial (splits, N) float32 -> db (N,)
// and a second kernel adds the splits up in a fixed order: the same bits on every run (no atomics). One split (few
// rows) writes db directly.

#include <algorithm>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/device.h"
#include "common/dtype.h"
#include "common/numeric.cuh"
#include "common/static_switch.h"
#include "dense/bias_grad.h"

namespace flashattn {

namespace {

constexpr int kThreadsX = kBiasGradThreadsX;
constexpr int kThreadsY = kBiasGradThreadsY;
constexpr int kUnroll = kBiasGradUnroll;
constexpr int kThreads = kThreadsX * kThreadsY;
// Resident blocks of kThreads an SM takes (2048 threads): the grid aims at one full wave.
constexpr int kBlocksPerSm = 2048 / kThreads;
// The finalize kernel: 32 columns x 32 split-rows a block, each thread a few of the splits' loads in flight at once.
constexpr int kFinalThreadsY = 32;

// kVec elements of dy as floats: one 16-byte load kept packed until used (ld.global.cg: dy is read once), or a
// scalar.
template <typename T, int kVec>
struct RowLoad {
  static constexpr bool kPacked = kVec * sizeof(T) == 16;
  using Raw = std::conditional_t<kPacked, Packed<T, kVec>, T>;
  static __device__ __forceinline__ Raw load(const T* p) {
    if constexpr (kPacked) return load_packed_stream<T, kVec>(p);
    else return __ldcg(p);
  }
  static __device__ __forceinline__ void add(const Raw& r, float (&acc)[kVec]) {
    if constexpr (kPacked) {
      float f[kVec];
      to_floats(r, f);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] += f[j];
    } else {
      acc[0] += to_float(r);
    }
  }
};

// ----------------------------------------------------------------------------
// CUDA kernels

// Block (kThreadsX, kThreadsY) at (blockIdx.x, blockIdx.y): columns [blockIdx.x * kThreadsX * kVec, + kThreadsX * kVec)
// of rows [blockIdx.y * rows_per_split, + rows_per_split). Thread (x, y) sums kVec columns over the rows y, y + 8, ...
// of the split, kUnroll loads in flight; the block then adds its kThreadsY row-sums in order, one column a thread:
// into partial[blockIdx.y] (float32), or db itself when kFinal (a single split).
template <typename T, int kVec, bool kFinal>
__global__ void __launch_bounds__(kThreads) bias_grad_rows_kernel(const BiasGradParams p, int64_t rows_per_split) {
  using Load = RowLoad<T, kVec>;
  constexpr int kCols = kThreadsX * kVec;  // columns of a block
  static_assert(kCols <= kThreads, "one column a thread in the block's sum");
  // rows of row-sums, kVec + 1 floats a thread: the stores of a warp (one j, 32 threads) fall in 32 banks
  __shared__ float sums[kThreadsY][kThreadsX * (kVec + 1)];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col0 = int64_t(blockIdx.x) * kCols;
  const int64_t col = col0 + int64_t(tx) * kVec;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t row_end = min(row_begin + rows_per_split, p.rows);
  const T* dy = static_cast<const T*>(p.dy);

  float acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
  if (col < p.cols) {
    const T* base = dy + col;
    int64_t r = row_begin + ty;
    for (; r + (kUnroll - 1) * kThreadsY < row_end; r += kUnroll * kThreadsY) {
      typename Load::Raw v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = Load::load(base + (r + u * kThreadsY) * p.row_stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) Load::add(v[u], acc);
    }
    for (; r < row_end; r += kThreadsY) Load::add(Load::load(base + r * p.row_stride), acc);
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) sums[ty][tx * (kVec + 1) + j] = acc[j];
  __syncthreads();

  // column c of the block, one a thread: (tx, j) = (c / kVec, c % kVec) of the row-sums
  const int c = ty * kThreadsX + tx;
  if (c < kCols && col0 + c < p.cols) {
    const int at = (c / kVec) * (kVec + 1) + c % kVec;
    float s = 0.f;
#pragma unroll
    for (int y = 0; y < kThreadsY; ++y) s += sums[y][at];
    if constexpr (kFinal) static_cast<T*>(p.db)[col0 + c] = from_float<T>(s);
    else p.workspace[int64_t(blockIdx.y) * p.cols + col0 + c] = s;
  }
}

// partial (splits, N) float32 -> db (N,): block (kThreadsX, kFinalThreadsY), kThreadsX columns; thread (x, y) adds the
// splits y, y + 32, ... of its column, then the block adds its kFinalThreadsY sums in order.
template <typename T>
__global__ void __launch_bounds__(kThreadsX * kFinalThreadsY) bias_grad_finalize_kernel(const BiasGradParams p,
                                                                                        int splits) {
  __shared__ float sums[kFinalThreadsY][kThreadsX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * kThreadsX + tx;
  float s = 0.f;
  if (col < p.cols) {
#pragma unroll 4
    for (int k = ty; k < splits; k += kFinalThreadsY) s += __ldcg(p.workspace + int64_t(k) * p.cols + col);
  }
  sums[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && col < p.cols) {
    float t = 0.f;
#pragma unroll
    for (int y = 0; y < kFinalThreadsY; ++y) t += sums[y][tx];
    static_cast<T*>(p.db)[col] = from_float<T>(t);
  }
}

// ----------------------------------------------------------------------------
// kernel launchers

// 16 bytes of dy a thread where pointer, stride and width allow; 1 otherwise (odd N, a view at an odd offset).
int vector_width(const BiasGradParams& p) {
  const int vec = int(16 / dtype_size(p.dtype));
  return p.cols % vec == 0 && p.row_stride % vec == 0 && is_aligned(p.dy, 16) ? vec : 1;
}

template <typename T, int kVec>
FlashAttnStatus launch(const BiasGradParams& p, cudaStream_t stream, const char* function) {
  DeviceInfo d;
  FlashAttnStatus s = current_device_info(&d, function);
  if (s != FLASHATTN_STATUS_OK) return s;
  const int64_t col_blocks = (p.cols + kThreadsX * kVec - 1) / (kThreadsX * kVec);
  // As many splits as fill one wave of resident blocks, each at least kBiasGradMinRows rows (a whole unrolled step of
  // every thread); rows_per_split is then rounded up to such steps and the splits recounted.
  const int64_t want = (int64_t(d.sms) * kBlocksPerSm + col_blocks - 1) / col_blocks;
  int64_t splits = std::max<int64_t>(1, std::min(want, bias_grad_max_splits(p.rows)));
  int64_t rows_per_split = (p.rows + splits - 1) / splits;
  rows_per_split = std::max<int64_t>(1, (rows_per_split + kBiasGradMinRows - 1) / kBiasGradMinRows) * kBiasGradMinRows;
  splits = std::max<int64_t>(1, (p.rows + rows_per_split - 1) / rows_per_split);
  if (col_blocks > 0x7fffffff) {
    return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function, "cols (%lld) too large for one launch",
                (long long)p.cols);
  }
  const dim3 block(kThreadsX, kThreadsY);
  if (splits == 1) {
    bias_grad_rows_kernel<T, kVec, true><<<dim3(unsigned(col_blocks), 1), block, 0, stream>>>(p, rows_per_split);
    return check_launch(function, "bias_grad_rows_kernel");
  }
  bias_grad_rows_kernel<T, kVec, false>
      <<<dim3(unsigned(col_blocks), unsigned(splits)), block, 0, stream>>>(p, rows_per_split);
  s = check_launch(function, "bias_grad_rows_kernel");
  if (s != FLASHATTN_STATUS_OK) return s;
  const int64_t final_blocks = (p.cols + kThreadsX - 1) / kThreadsX;
  bias_grad_finalize_kernel<T>
      <<<unsigned(final_blocks), dim3(kThreadsX, kFinalThreadsY), 0, stream>>>(p, int(splits));
  return check_launch(function, "bias_grad_finalize_kernel");
}

}  // namespace

FlashAttnStatus run_bias_grad(const BiasGradParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int vec = vector_width(p);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    constexpr int kWide = 16 / sizeof(T);
    return vec == 1 ? launch<T, 1>(p, stream, function) : launch<T, kWide>(p, stream, function);
  });
}

}  // namespace flashattn
