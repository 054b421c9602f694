// The bias gradient of a linear: dy (M, N) -> db (N,) = sum over rows, float32 accumulation, db in dy's dtype.
// Memory-bound: dy is read once (16-byte vectors along N, kVec columns a thread), db written once, in one launch. A
// block takes 64 columns of a split of the rows; the rows are split over grid.y so that even N = 768 fills every SM.
// Each split's column sums go to a float32 workspace, and the last block of a column block to finish (an arrival
// counter a column block) adds that column block's splits up and writes db:
//   dy (M, N) -> partial (splits, N) float32 -> db (N,)
// It adds them in split order whichever block it is: the same bits on every run (no float atomics). It also zeroes
// what it read and its counter, so the workspace is zero after every call (its owner zeroes it once, at allocation).
// One split (few rows) writes db directly.

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

constexpr int kThreads = kBiasGradThreads;
constexpr int kBlockCols = kBiasGradBlockCols;
constexpr int kUnroll = kBiasGradUnroll;
// The last block's sum of the partials: kLanes threads a column, each a strided share of the splits.
constexpr int kLanes = kThreads / kBlockCols;

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

// A block's threads: kX across its kBlockCols columns (kVec each), kY down the rows.
template <int kVec>
struct BlockShape {
  static constexpr int kX = kBlockCols / kVec;
  static constexpr int kY = kThreads / kX;
  static_assert(kBiasGradMinRows % (kY * kUnroll) == 0, "a split is whole unrolled steps of every thread");
};

// ----------------------------------------------------------------------------
// CUDA kernels

// Counts a block's arrival at its column block; the count before it. Acquire-release at device scope: the stores that
// a __syncthreads ordered before it are seen by the block that reads the final count, and that block sees every
// earlier-counted block's stores (as CUTLASS's split-K semaphore: one thread's release after the barrier).
__device__ __forceinline__ uint32_t arrive(uint32_t* counter) {
  uint32_t before;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
  return before;
}

// The last block of column block blockIdx.x to finish: partial (splits, N) -> db for its columns. Thread (c, lane) adds
// the splits lane, lane + kLanes, ... of column c in order (through L2: other SMs wrote them), then kLanes sums are
// added in order: the same order whichever block runs it. What it read, and the counter, go back to zero.
template <typename T>
__device__ void add_splits(const BiasGradParams& p, int64_t col0) {
  __shared__ float lanes[kLanes][kBlockCols];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int c = t % kBlockCols, lane = t / kBlockCols;
  const int splits = int(gridDim.y);
  float s = 0.f;
  if (col0 + c < p.cols) {
    float* partial = p.partial + col0 + c;
#pragma unroll 8
    for (int k = lane; k < splits; k += kLanes) s += __ldcg(partial + int64_t(k) * p.cols);
#pragma unroll 8
    for (int k = lane; k < splits; k += kLanes) partial[int64_t(k) * p.cols] = 0.f;
  }
  lanes[lane][c] = s;
  __syncthreads();
  if (t < kBlockCols && col0 + t < p.cols) {
    float total = 0.f;
#pragma unroll
    for (int l = 0; l < kLanes; ++l) total += lanes[l][t];
    static_cast<T*>(p.db)[col0 + t] = from_float<T>(total);
  }
  if (t == 0) p.counters[blockIdx.x] = 0;
}

// Block (kX, kY) at (blockIdx.x, blockIdx.y): columns [blockIdx.x * kBlockCols, + kBlockCols) of rows
// [blockIdx.y * rows_per_split, + rows_per_split). Thread (x, y) sums kVec columns over the rows y, y + kY, ... of the
// split, kUnroll loads in flight; the block then adds its kY row-sums in order, one column a thread: into db itself
// when kFinal (a single split), else into partial[blockIdx.y], and the column block's last block adds the splits.
template <typename T, int kVec, bool kFinal>
__global__ void __launch_bounds__(kThreads) bias_grad_kernel(const BiasGradParams p, int64_t rows_per_split) {
  using Load = RowLoad<T, kVec>;
  constexpr int kX = BlockShape<kVec>::kX, kY = BlockShape<kVec>::kY;
  // rows of row-sums, kVec + 1 floats a thread: a warp's stores of one j fall in 32 banks
  __shared__ float sums[kY][kX * (kVec + 1)];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col0 = int64_t(blockIdx.x) * kBlockCols;
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
    for (; r + (kUnroll - 1) * kY < row_end; r += kUnroll * kY) {
      typename Load::Raw v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = Load::load(base + (r + u * kY) * p.row_stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) Load::add(v[u], acc);
    }
    for (; r < row_end; r += kY) Load::add(Load::load(base + r * p.row_stride), acc);
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) sums[ty][tx * (kVec + 1) + j] = acc[j];
  __syncthreads();

  // column c of the block, one a thread: (tx, j) = (c / kVec, c % kVec) of the row-sums
  const int c = ty * kX + tx;
  if (c < kBlockCols && col0 + c < p.cols) {
    const int at = (c / kVec) * (kVec + 1) + c % kVec;
    float s = 0.f;
#pragma unroll
    for (int y = 0; y < kY; ++y) s += sums[y][at];
    if constexpr (kFinal) {
      static_cast<T*>(p.db)[col0 + c] = from_float<T>(s);
    } else {
      p.partial[int64_t(blockIdx.y) * p.cols + col0 + c] = s;
    }
  }
  if constexpr (!kFinal) {
    __shared__ bool last;
    __syncthreads();  // the block's partial sums are stored before thread 0 counts its arrival
    if (c == 0) last = arrive(p.counters + blockIdx.x) == gridDim.y - 1;
    __syncthreads();
    if (last) add_splits<T>(p, col0);
  }
}

// ----------------------------------------------------------------------------
// kernel launchers

// 16 bytes of dy a thread where pointer, stride and width allow; 1 otherwise (odd N, a view at an odd offset).
int vector_width(const BiasGradParams& p) {
  const int vec = int(16 / dtype_size(p.dtype));
  return p.cols % vec == 0 && p.row_stride % vec == 0 && is_aligned(p.dy, 16) ? vec : 1;
}

// As many splits as fill one wave of resident blocks, each at least kBiasGradMinRows rows; rows_per_split is then
// rounded up to such steps and the splits recounted. One split (few rows, or column blocks enough for the wave) skips
// the workspace.
template <typename T, int kVec>
FlashAttnStatus launch(const BiasGradParams& p, cudaStream_t stream, const char* function) {
  const int64_t col_blocks = bias_grad_col_blocks(p.cols);
  if (col_blocks > 0x7fffffff) {
    return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function, "cols (%lld) too large for one launch",
                (long long)p.cols);
  }
  const auto split_kernel = bias_grad_kernel<T, kVec, false>;
  int64_t splits = 1, rows_per_split = std::max<int64_t>(p.rows, 1);
  if (bias_grad_max_splits(p.rows) > 1) {
    DeviceInfo d;
    int per_sm = 0;
    FlashAttnStatus s = current_device_info(&d, function);
    if (s == FLASHATTN_STATUS_OK) {
      s = blocks_per_sm(reinterpret_cast<const void*>(split_kernel), d.device, kThreads, 0, &per_sm, function);
    }
    if (s != FLASHATTN_STATUS_OK) return s;
    const int64_t want = (int64_t(d.sms) * std::max(per_sm, 1) + col_blocks - 1) / col_blocks;
    splits = std::max<int64_t>(1, std::min(want, bias_grad_max_splits(p.rows)));
    rows_per_split = (p.rows + splits - 1) / splits;
    rows_per_split = (rows_per_split + kBiasGradMinRows - 1) / kBiasGradMinRows * kBiasGradMinRows;
    splits = (p.rows + rows_per_split - 1) / rows_per_split;
  }
  const dim3 block(BlockShape<kVec>::kX, BlockShape<kVec>::kY);
  if (splits == 1) {
    bias_grad_kernel<T, kVec, true><<<unsigned(col_blocks), block, 0, stream>>>(p, rows_per_split);
  } else {
    split_kernel<<<dim3(unsigned(col_blocks), unsigned(splits)), block, 0, stream>>>(p, rows_per_split);
  }
  return check_launch(function, "bias_grad_kernel");
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
