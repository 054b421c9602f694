// Fused dropout + residual add + LayerNorm / RMSNorm, forward and backward.
// Memory-bound: the forward reads x0 (x1, residual) once and writes z (and the new residual) once,
// the row held in registers; the backward reads x and dz once and writes dx once, accumulating
// dweight/dbias partials per block (or lane), then a small deterministic kernel sums the partials.
// Two kernel families, chosen per size by the tables in the launchers (NOTES.md: floors, predictions,
// measurements):
//  - rows: a group of wpr warps per row, each thread owning kIters 16-byte vectors of kVec columns; a
//    persistent grid walks the rows and loads the next row before reducing the current one (into registers
//    where they have room, else, with the l2 variants, as an L2 prefetch at the start of the row); reductions
//    by warp shuffles, with one exchange through shared memory when the row spans several warps.
//  - block: (threads_per_row, rows_per_block) blocks, a row per thread group and launch slot; the only
//    family for the scalar path (kVec = 1: a hidden size, stride or pointer that 16-byte vectors do not fit).

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/cp_async.cuh"
#include "common/cuda_check.cuh"
#include "common/device.h"
#include "common/dtype.h"
#include "common/numeric.cuh"
#include "common/static_switch.h"
#include "norm/norm.h"
#include "norm/norm_variants.h"
#include "common/philox.cuh"

namespace flashattn {

namespace {

constexpr int kMaxThreads = 512;

// Tensors whose dtype is the op's T or float32, chosen at run time (uniform branch).
template <typename T, int N>
__device__ __forceinline__ void load_mixed(const void* base, bool f32, int64_t idx, float (&out)[N]) {
  if (f32) load_float<float, N>(static_cast<const float*>(base) + idx, out);
  else load_float<T, N>(static_cast<const T*>(base) + idx, out);
}

template <typename T, int N>
__device__ __forceinline__ void store_mixed(void* base, bool f32, int64_t idx, const float (&in)[N]) {
  if (f32) store_float<float, N>(static_cast<float*>(base) + idx, in);
  else store_float<T, N>(static_cast<T*>(base) + idx, in);
}

template <int N>
__device__ __forceinline__ void store_mask(uint8_t* p, const bool (&keep)[N]) {
  Vec<uint8_t, N> r;
#pragma unroll
  for (int j = 0; j < N; ++j) r.v[j] = keep[j] ? 1 : 0;
  *reinterpret_cast<Vec<uint8_t, N>*>(p) = r;
}

// Sums v over the blockDim.x threads of this thread's row (threadIdx.y); every thread of the block
// must call it. The order of the additions is fixed: the result is deterministic.
template <int N>
__device__ __forceinline__ void row_sum(float (&v)[N]) {
  __shared__ float red[kMaxThreads / 32][N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], m);
  }
  const int warps_per_row = blockDim.x / 32;
  if (warps_per_row == 1) return;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  if ((tid & 31) == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) red[tid / 32][i] = v[i];
  }
  __syncthreads();
  const int first = threadIdx.y * warps_per_row;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.f;
    for (int w = 0; w < warps_per_row; ++w) s += red[first + w][i];
    v[i] = s;
  }
  __syncthreads();
}

// ----------------------------------------------------------------------------
// block kernels: forward

template <typename T, int kVec, int kIters>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_block_kernel(const NormFwdParams p) {
  const int tx = threadIdx.x, tpr = blockDim.x;
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < p.rows;
  const int64_t H = p.hidden;
  const bool res_f32 = p.residual_dtype == FLASHATTN_DTYPE_FLOAT32;
  const bool rout_f32 = p.residual_out_dtype == FLASHATTN_DTYPE_FLOAT32;
  const bool w_f32 = p.weight_dtype == FLASHATTN_DTYPE_FLOAT32;
  const bool dropout = p.dropout_p > 0.f;
  const float rs = active && p.rowscale != nullptr ? p.rowscale[row] : 1.f;

  float x[kIters][kVec];
  float sum[1] = {0.f};
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t col = (int64_t(it) * tpr + tx) * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[it][j] = 0.f;
    if (!active || col >= H) continue;
    const int64_t e = row * H + col;
    float a[kVec];
    load_float<T, kVec>(static_cast<const T*>(p.x0) + row * p.x0_row_stride + col, a);
    if (dropout) {
      bool keep[kVec];
      dropout_keep<kVec>(p.seed, p.offset, p.keep_threshold, uint64_t(e), keep);
#pragma unroll
      for (int j = 0; j < kVec; ++j) a[j] = keep[j] ? a[j] * p.dropout_scale : 0.f;
      if (p.mask0 != nullptr) store_mask<kVec>(p.mask0 + e, keep);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[it][j] = a[j] * rs;
    if (p.x1 != nullptr) {
      load_float<T, kVec>(static_cast<const T*>(p.x1) + row * p.x1_row_stride + col, a);
      if (dropout) {
        bool keep[kVec];
        dropout_keep<kVec>(p.seed, p.offset, p.keep_threshold, uint64_t(p.rows * H + e), keep);
#pragma unroll
        for (int j = 0; j < kVec; ++j) a[j] = keep[j] ? a[j] * p.dropout_scale : 0.f;
        if (p.mask1 != nullptr) store_mask<kVec>(p.mask1 + e, keep);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[it][j] += a[j];
    }
    if (p.residual != nullptr) {
      load_mixed<T, kVec>(p.residual, res_f32, row * p.residual_row_stride + col, a);
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[it][j] += a[j];
    }
    if (p.residual_out != nullptr) store_mixed<T, kVec>(p.residual_out, rout_f32, row * p.residual_out_row_stride + col, x[it]);
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum[0] += p.is_rms ? x[it][j] * x[it][j] : x[it][j];
  }
  row_sum<1>(sum);
  float mean = 0.f, var;
  if (p.is_rms) {
    var = sum[0] / float(H);
  } else {
    // two passes over the registers: the variance of centred values, no cancellation
    mean = sum[0] / float(H);
    float sq[1] = {0.f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t col = (int64_t(it) * tpr + tx) * kVec;
      if (!active || col >= H) continue;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = x[it][j] - mean;
        sq[0] += d * d;
      }
    }
    row_sum<1>(sq);
    var = sq[0] / float(H);
  }
  const float rstd = rsqrtf(var + p.epsilon);
  if (!active) return;
  if (tx == 0) {
    p.rstd[row] = rstd;
    if (p.mean != nullptr) p.mean[row] = mean;
  }
  const float wadd = p.zero_centered ? 1.f : 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t col = (int64_t(it) * tpr + tx) * kVec;
    if (col >= H) continue;
    float xhat[kVec], w[kVec], b[kVec], z[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) xhat[j] = (x[it][j] - mean) * rstd;
    load_mixed<T, kVec>(p.weight0, w_f32, col, w);
    if (p.bias0 != nullptr) load_mixed<T, kVec>(p.bias0, w_f32, col, b);
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = xhat[j] * (w[j] + wadd) + (p.bias0 != nullptr ? b[j] : 0.f);
    store_float<T, kVec>(static_cast<T*>(p.z0) + row * p.z_row_stride + col, z);
    if (p.z1 != nullptr) {
      load_mixed<T, kVec>(p.weight1, w_f32, col, w);
      if (p.bias1 != nullptr) load_mixed<T, kVec>(p.bias1, w_f32, col, b);
#pragma unroll
      for (int j = 0; j < kVec; ++j) z[j] = xhat[j] * (w[j] + wadd) + (p.bias1 != nullptr ? b[j] : 0.f);
      store_float<T, kVec>(static_cast<T*>(p.z1) + row * p.z_row_stride + col, z);
    }
  }
}

// ----------------------------------------------------------------------------
// block kernels: backward

// Lane (blockIdx.x * rows_per_block + threadIdx.y) handles rows lane, lane + lanes, ... and keeps
// its dweight/dbias partials in registers; they land in workspace slot s at [s][lane][col].
template <typename T, int kVec, int kIters, bool kParallel>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_block_kernel(const NormBwdParams p, int slot_dw0, int slot_db0,
                                                               int slot_dw1, int slot_db1) {
  constexpr bool kHold = kIters * kVec <= 16;  // keep xhat and w*dz of the row in registers
  constexpr int kH = kHold ? kIters : 1;
  const int tx = threadIdx.x, tpr = blockDim.x, rpb = blockDim.y;
  const int64_t lanes = int64_t(gridDim.x) * rpb;
  const int64_t lane = int64_t(blockIdx.x) * rpb + threadIdx.y;
  const int64_t H = p.hidden;
  const bool x_f32 = p.x_dtype == FLASHATTN_DTYPE_FLOAT32;
  const bool w_f32 = p.weight_dtype == FLASHATTN_DTYPE_FLOAT32;
  const bool res_f32 = p.residual_dtype == FLASHATTN_DTYPE_FLOAT32;
  const bool dropout = p.dropout_p > 0.f;
  const float wadd = p.zero_centered ? 1.f : 0.f;

  float dw0[kIters][kVec], db0[kIters][kVec];
  float dw1[kParallel ? kIters : 1][kVec], db1[kParallel ? kIters : 1][kVec];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      dw0[it][j] = 0.f;
      db0[it][j] = 0.f;
      if constexpr (kParallel) {
        dw1[it][j] = 0.f;
        db1[it][j] = 0.f;
      }
    }
  }
  float hx[kH][kVec], hg[kH][kVec];

  // Computes xhat and w * dz (summed over both norms) of one vector; accumulates dw/db when asked.
  auto row_values = [&](int64_t row, int64_t col, float mean, float rstd, float (&xhat)[kVec], float (&wdy)[kVec],
                        int it, bool accumulate) {
    float v[kVec], w[kVec];
    load_mixed<T, kVec>(p.x, x_f32, row * p.x_row_stride + col, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) xhat[j] = (v[j] - mean) * rstd;
    load_float<T, kVec>(static_cast<const T*>(p.dz0) + row * p.dz_row_stride + col, v);
    load_mixed<T, kVec>(p.weight0, w_f32, col, w);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      wdy[j] = (w[j] + wadd) * v[j];
      if (accumulate) {
        dw0[it][j] += v[j] * xhat[j];
        db0[it][j] += v[j];
      }
    }
    if constexpr (kParallel) {
      load_float<T, kVec>(static_cast<const T*>(p.dz1) + row * p.dz_row_stride + col, v);
      load_mixed<T, kVec>(p.weight1, w_f32, col, w);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        wdy[j] += (w[j] + wadd) * v[j];
        if (accumulate) {
          dw1[it][j] += v[j] * xhat[j];
          db1[it][j] += v[j];
        }
      }
    }
  };

  for (int64_t base = int64_t(blockIdx.x) * rpb; base < p.rows; base += lanes) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < p.rows;
    const float mean = active && p.mean != nullptr ? p.mean[row] : 0.f;
    const float rstd = active ? p.rstd[row] : 0.f;
    const float rs = active && p.rowscale != nullptr ? p.rowscale[row] : 1.f;
    float sums[2] = {0.f, 0.f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t col = (int64_t(it) * tpr + tx) * kVec;
      if (!active || col >= H) continue;
      float xhat[kVec], wdy[kVec];
      row_values(row, col, mean, rstd, xhat, wdy, it, true);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sums[0] += wdy[j] * xhat[j];
        sums[1] += wdy[j];
      }
      if constexpr (kHold) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          hx[it][j] = xhat[j];
          hg[it][j] = wdy[j];
        }
      }
    }
    row_sum<2>(sums);
    const float c1 = sums[0] / float(H), c2 = p.is_rms ? 0.f : sums[1] / float(H);
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t col = (int64_t(it) * tpr + tx) * kVec;
      if (!active || col >= H) continue;
      float xhat[kVec], wdy[kVec], dx[kVec];
      if constexpr (kHold) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          xhat[j] = hx[it][j];
          wdy[j] = hg[it][j];
        }
      } else {
        row_values(row, col, mean, rstd, xhat, wdy, it, false);  // second read, from L1/L2
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) dx[j] = rstd * (wdy[j] - (xhat[j] * c1 + c2));
      if (p.dresidual_out != nullptr) {
        float d[kVec];
        load_mixed<T, kVec>(p.dresidual_out, x_f32, row * p.dresidual_out_row_stride + col, d);
#pragma unroll
        for (int j = 0; j < kVec; ++j) dx[j] += d[j];
      }
      if (p.dresidual != nullptr) store_mixed<T, kVec>(p.dresidual, res_f32, row * p.dresidual_row_stride + col, dx);
      const int64_t e = row * H + col;
      float o[kVec];
      if (dropout) {
        bool keep[kVec];
        dropout_keep<kVec>(p.seed, p.offset, p.keep_threshold, uint64_t(e), keep);
#pragma unroll
        for (int j = 0; j < kVec; ++j) o[j] = keep[j] ? dx[j] * (p.dropout_scale * rs) : 0.f;
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) o[j] = dx[j] * rs;
      }
      store_float<T, kVec>(static_cast<T*>(p.dx0) + row * p.dx_row_stride + col, o);
      if (p.dx1 != nullptr) {
        if (dropout) {
          bool keep[kVec];
          dropout_keep<kVec>(p.seed, p.offset, p.keep_threshold, uint64_t(p.rows * H + e), keep);
#pragma unroll
          for (int j = 0; j < kVec; ++j) o[j] = keep[j] ? dx[j] * p.dropout_scale : 0.f;
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) o[j] = dx[j];
        }
        store_float<T, kVec>(static_cast<T*>(p.dx1) + row * p.dx_row_stride + col, o);
      }
    }
  }

  // This lane's partials (zeros when it had no row).
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t col = (int64_t(it) * tpr + tx) * kVec;
    if (col >= H) continue;
    auto put = [&](int slot, const float(&v)[kVec]) {
      if (slot >= 0) store_float<float, kVec>(p.workspace + (slot * lanes + lane) * H + col, v);
    };
    put(slot_dw0, dw0[it]);
    put(slot_db0, db0[it]);
    if constexpr (kParallel) {
      put(slot_dw1, dw1[it]);
      put(slot_db1, db1[it]);
    }
  }
}

struct FinalizeArgs {
  void* out[4];  // per workspace slot
};

// Sums the lanes of each slot column by column in a fixed order: 32 columns x 32 lane groups.
template <typename W>
__global__ void __launch_bounds__(1024) norm_bwd_finalize_kernel(const float* ws, int64_t lanes, int64_t H,
                                                                 FinalizeArgs args) {
  __shared__ float red[32][33];
  const int slot = blockIdx.y;
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (col < H) {
    const float* base = ws + int64_t(slot) * lanes * H + col;
    for (int64_t l = threadIdx.y; l < lanes; l += 32) s += base[l * H];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < H) {
    float t = 0.f;
#pragma unroll 8
    for (int i = 0; i < 32; ++i) t += red[i][threadIdx.x];
    static_cast<W*>(args.out[slot])[col] = from_float<W>(t);
  }
}

// ----------------------------------------------------------------------------
// rows kernels

template <typename T>
struct TypeTag {
  using type = T;
};

// Sums over this thread's row group (the blockDim.x threads of row threadIdx.y) in a fixed order, so that
// every thread of the group gets the same deterministic sum: warp shuffles, then, when the row spans several
// warps, one exchange through shared memory behind a barrier of the group alone. Successive calls alternate
// between two halves of the shared buffer, so a call's writes cannot overtake the previous call's reads.
// The addresses are set up once per thread; red is the kernel's __shared__ float[2][32][N].
template <int N>
class GroupSum {
 public:
  __device__ __forceinline__ explicit GroupSum(float (*red)[32][N]) {
    const int wpr = blockDim.x >> 5, lane = threadIdx.x & 31, first = threadIdx.y * wpr;
    single_ = wpr == 1;
    writer_ = lane == 0;
    reader_ = lane < wpr;
    mine_ = &red[0][first + (threadIdx.x >> 5)][0];
    lane_slot_ = &red[0][first + (reader_ ? lane : 0)][0];
  }

  __device__ __forceinline__ void operator()(float (&v)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
    if (single_) return;
    if (writer_) {
#pragma unroll
      for (int i = 0; i < N; ++i) mine_[half_ + i] = v[i];
    }
    // named barrier 1 + row group (barrier 0 is __syncthreads), its threads only
    asm volatile("bar.sync %0, %1;" ::"r"(threadIdx.y + 1), "r"(blockDim.x) : "memory");
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(reader_ ? lane_slot_[half_ + i] : 0.f);
    half_ ^= 32 * N;
  }

 private:
  __device__ __forceinline__ static float warp_sum(float v) {
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
  }

  float* mine_;
  const float* lane_slot_;
  int half_ = 0;
  bool single_, writer_, reader_;
};

// The vectors of a row that thread threadIdx.x owns: vector `it` starts at column col0 + it * step; those with
// it < count lie inside the row (a prefix, since columns grow with it).
struct RowSlots {
  int col0, step, count;
};

template <int kVec, int kIters>
__device__ __forceinline__ RowSlots row_slots(int H) {
  const int col0 = int(threadIdx.x) * kVec, step = int(blockDim.x) * kVec;
  return {col0, step, col0 < H ? min(kIters, (H - col0 + step - 1) / step) : 0};
}

// x[j] = keep ? x[j] * scale : 0 for the N elements from element e (e % N == 0 for vectors of 4 or 8: a Philox call
// serves eight elements, common/philox.cuh); mask (nullptr: none) receives the keep bytes of these elements.
template <int N>
__device__ __forceinline__ void apply_dropout(float (&x)[N], uint64_t seed, uint64_t offset, uint32_t keep_threshold,
                                              float scale, uint64_t e, uint8_t* mask) {
  bool keep[N];
  dropout_keep<N>(seed, offset, keep_threshold, e, keep);
#pragma unroll
  for (int j = 0; j < N; ++j) x[j] = keep[j] ? x[j] * scale : 0.f;
  if (mask != nullptr) store_mask<N>(mask, keep);
}

// One vector of N outputs, one 16-byte access (two for 32 bytes) in the rows kernels' SASS (rowsca stores with
// store_floats, whose uint4 stores NVVM cannot split: it split this form in one rowsca kernel, numeric.cuh).
template <typename TO, int N>
__device__ __forceinline__ void store_vec(TO* p, const float (&v)[N]) {
  *reinterpret_cast<Vec<TO, N>*>(p) = from_floats<TO, N>(v);
}

// w (+ 1 for zero-centred weights) of one vector, read for every row: L1 keeps the weights, since the
// streamed tensors bypass it.
template <typename TW, bool kZeroCentered, int N>
__device__ __forceinline__ void load_weight(const void* w, int col, float (&out)[N]) {
  load_floats<TW, N>(static_cast<const TW*>(w) + col, out);
  if constexpr (kZeroCentered) {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] += 1.f;
  }
}

// Asks L2 for the line holding p: no register waits on it, and the load that follows a row later finds the line
// in L2 instead of waiting for DRAM. Every thread asks for its own vector; the lines of a warp's request are
// merged as a load's are.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

template <typename TE, int kIters>
__device__ __forceinline__ void prefetch_row_l2(const TE* p, const RowSlots& s) {
#pragma unroll
  for (int it = 0; it < kIters; ++it)
    if (it < s.count) prefetch_l2(p + it * s.step);
}

// Forward, one row per row group at a time. TR is the residual's dtype (T or float). The next row's x0 and
// residual are loaded before this row's reductions where their raw vectors take at most 32 registers (more
// would spill); with l2_prefetch, the next row's tensors that are not held in registers (all of them at 64
// columns a thread) are asked of L2 at the start of each row.
//   x0, x1, residual (rows, H) -> x = dropout(x0 * rowscale) + dropout(x1) + residual (float32, registers)
//   -> residual_out (rows, H), mean / rstd (rows,), z0 / z1 (rows, H)
template <typename T, typename TR, int kVec, int kIters, bool kDropout, bool kRms>
__global__ void __launch_bounds__(512) norm_fwd_rows_kernel(const NormFwdParams p, bool l2_prefetch) {
  constexpr bool kPrefetch = kIters * kVec * (sizeof(T) + sizeof(TR)) <= 128;
  const int H = int(p.hidden);
  const RowSlots s = row_slots<kVec, kIters>(H);
  const int64_t row_step = int64_t(gridDim.x) * blockDim.y;
  const bool has_res = p.residual != nullptr;

  Packed<T, kVec> a0[kIters];
  Packed<TR, kVec> ar[kIters];
  // x0 and (kPrefetch) the residual of `row`, left in flight
  auto fetch = [&](int64_t row) {
    const T* x0 = static_cast<const T*>(p.x0) + row * p.x0_row_stride + s.col0;
#pragma unroll
    for (int it = 0; it < kIters; ++it)
      if (it < s.count) a0[it] = load_packed_stream<T, kVec>(x0 + it * s.step);
    if (kPrefetch && has_res) {
      const TR* r = static_cast<const TR*>(p.residual) + row * p.residual_row_stride + s.col0;
#pragma unroll
      for (int it = 0; it < kIters; ++it)
        if (it < s.count) ar[it] = load_packed_stream<TR, kVec>(r + it * s.step);
    }
  };

  __shared__ float red[2][32][1];
  GroupSum<1> group_sum(red);
  int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (kPrefetch && row < p.rows) fetch(row);
  for (; row < p.rows; row += row_step) {
    if (l2_prefetch && row + row_step < p.rows) {
      const int64_t next = row + row_step;
      if (!kPrefetch) {
        prefetch_row_l2<T, kIters>(static_cast<const T*>(p.x0) + next * p.x0_row_stride + s.col0, s);
        if (has_res)
          prefetch_row_l2<TR, kIters>(static_cast<const TR*>(p.residual) + next * p.residual_row_stride + s.col0, s);
      }
      if (p.x1 != nullptr)
        prefetch_row_l2<T, kIters>(static_cast<const T*>(p.x1) + next * p.x1_row_stride + s.col0, s);
    }
    if constexpr (!kPrefetch) fetch(row);
    const int64_t e0 = row * H + s.col0;  // element (dropout counter, mask byte) of vector 0
    float x[kIters][kVec];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (it >= s.count) continue;
      to_floats(a0[it], x[it]);
      if constexpr (kDropout) {
        const int64_t e = e0 + it * s.step;
        apply_dropout(x[it], p.seed, p.offset, p.keep_threshold, p.dropout_scale, uint64_t(e),
                      p.mask0 != nullptr ? p.mask0 + e : nullptr);
      }
    }
    if (p.rowscale != nullptr) {
      const float rs = p.rowscale[row];
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (it >= s.count) continue;
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[it][j] *= rs;
      }
    }
    if (p.x1 != nullptr) {
      const T* x1 = static_cast<const T*>(p.x1) + row * p.x1_row_stride + s.col0;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (it >= s.count) continue;
        float a[kVec];
        to_floats(load_packed_stream<T, kVec>(x1 + it * s.step), a);
        if constexpr (kDropout) {
          const int64_t e = e0 + it * s.step;
          apply_dropout(a, p.seed, p.offset, p.keep_threshold, p.dropout_scale, uint64_t(p.rows * H + e),
                        p.mask1 != nullptr ? p.mask1 + e : nullptr);
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[it][j] += a[j];
      }
    }
    if (has_res) {
      // without kPrefetch the residual is loaded only now, so that its raw words and x0's are never all held
      const TR* res = static_cast<const TR*>(p.residual) + row * p.residual_row_stride + s.col0;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (it >= s.count) continue;
        float r[kVec];
        to_floats(kPrefetch ? ar[it] : load_packed_stream<TR, kVec>(res + it * s.step), r);
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[it][j] += r[j];
      }
    }
    // the next row's loads go out before this row's reductions
    if (kPrefetch && row + row_step < p.rows) fetch(row + row_step);
    if (p.residual_out != nullptr) {
      auto put = [&](auto tag) {
        using TO = typename decltype(tag)::type;
        TO* o = static_cast<TO*>(p.residual_out) + row * p.residual_out_row_stride + s.col0;
#pragma unroll
        for (int it = 0; it < kIters; ++it)
          if (it < s.count) store_vec<TO, kVec>(o + it * s.step, x[it]);
      };
      if (p.residual_out_dtype == FLASHATTN_DTYPE_FLOAT32) put(TypeTag<float>{});
      else put(TypeTag<T>{});
    }

    float mean = 0.f, var;
    if constexpr (kRms) {
      float sq[1] = {0.f};
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (it >= s.count) continue;
#pragma unroll
        for (int j = 0; j < kVec; ++j) sq[0] += x[it][j] * x[it][j];
      }
      group_sum(sq);
      var = sq[0] / float(H);
    } else {
      // two passes over the registers: the variance of centred values, no cancellation
      float sum[1] = {0.f};
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (it >= s.count) continue;
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum[0] += x[it][j];
      }
      group_sum(sum);
      mean = sum[0] / float(H);
      float sq[1] = {0.f};
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (it >= s.count) continue;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float d = x[it][j] - mean;
          sq[0] += d * d;
        }
      }
      group_sum(sq);
      var = sq[0] / float(H);
    }
    const float rstd = rsqrtf(var + p.epsilon);
    if (threadIdx.x == 0) {
      p.rstd[row] = rstd;
      if (p.mean != nullptr) p.mean[row] = mean;
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (it >= s.count) continue;
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[it][j] = kRms ? x[it][j] * rstd : (x[it][j] - mean) * rstd;
    }
    // z = xhat * w + b, for each norm
    auto affine = [&](const void* w, const void* b, void* z) {
      T* zr = static_cast<T*>(z) + row * p.z_row_stride + s.col0;
      auto run = [&](auto wtag, auto zc) {
        using TW = typename decltype(wtag)::type;
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
          if (it >= s.count) continue;
          const int col = s.col0 + it * s.step;
          float wv[kVec], bv[kVec], o[kVec];
          load_weight<TW, decltype(zc)::value>(w, col, wv);
          if (b != nullptr) {
            load_floats<TW, kVec>(static_cast<const TW*>(b) + col, bv);
          } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) bv[j] = 0.f;
          }
#pragma unroll
          for (int j = 0; j < kVec; ++j) o[j] = x[it][j] * wv[j] + bv[j];
          store_vec<T, kVec>(zr + it * s.step, o);
        }
      };
      const bool zc = p.zero_centered;
      if (p.weight_dtype == FLASHATTN_DTYPE_FLOAT32) {
        if (zc) run(TypeTag<float>{}, std::true_type{});
        else run(TypeTag<float>{}, std::false_type{});
      } else {
        if (zc) run(TypeTag<T>{}, std::true_type{});
        else run(TypeTag<T>{}, std::false_type{});
      }
    };
    affine(p.weight0, p.bias0, p.z0);
    if (p.z1 != nullptr) affine(p.weight1, p.bias1, p.z1);
  }
}

// acc[j] += v[j] for N floats of shared memory (16-byte accesses).
template <int N>
__device__ __forceinline__ void smem_add(float* acc, const float (&v)[N]) {
  Vec<float, N>* a = reinterpret_cast<Vec<float, N>*>(acc);
  Vec<float, N> t = *a;
#pragma unroll
  for (int j = 0; j < N; ++j) t.v[j] += v[j];
  *a = t;
}

// The backward's arithmetic of one vector: the rows kernel's (rowsca shares bwd_wdy and forms dx with fewer
// instructions, above it).

// xhat = (x - mean) * rstd.
template <typename TX, int kVec>
__device__ __forceinline__ void bwd_xhat(const Packed<TX, kVec>& raw, float mean, float rstd, float (&xhat)[kVec]) {
  to_floats(raw, xhat);
#pragma unroll
  for (int j = 0; j < kVec; ++j) xhat[j] = (xhat[j] - mean) * rstd;
}

// One norm's share of w * dz at column col: g = dz, wdy = (w + wadd) * g (first) or wdy + (w + wadd) * g.
template <typename T, typename TW, int kVec>
__device__ __forceinline__ void bwd_wdy(const Packed<T, kVec>& graw, const void* w, int col, float wadd, bool first,
                                        float (&g)[kVec], float (&wdy)[kVec]) {
  float wv[kVec];
  to_floats(graw, g);
  load_floats<TW, kVec>(static_cast<const TW*>(w) + col, wv);
#pragma unroll
  for (int j = 0; j < kVec; ++j) wdy[j] = first ? (wv[j] + wadd) * g[j] : wdy[j] + (wv[j] + wadd) * g[j];
}

// dx = rstd * (w dz - (xhat * c1 + c2)), before dresidual_out is added.
template <int kVec>
__device__ __forceinline__ void bwd_dx(const float (&xhat)[kVec], const float (&wdy)[kVec], float rstd, float c1,
                                       float c2, float (&dx)[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) dx[j] = rstd * (wdy[j] - (xhat[j] * c1 + c2));
}

// The outputs of the vector at (row, col) from dx (dresidual_out added): dresidual = dx, dx0 = dropout(dx) *
// rowscale, dx1 = dropout(dx), the keep bits regenerated from the element's counter as the forward drew them.
template <typename T, int kVec, bool kDropout>
__device__ __forceinline__ void bwd_store(const NormBwdParams& p, const float (&dx)[kVec], float rs, int64_t row,
                                          int col) {
  [[maybe_unused]] const int64_t e = row * p.hidden + col;  // element (dropout counter)
  if (p.dresidual != nullptr) {
    const int64_t off = row * p.dresidual_row_stride + col;
    if (p.residual_dtype == FLASHATTN_DTYPE_FLOAT32)
      store_vec<float, kVec>(static_cast<float*>(p.dresidual) + off, dx);
    else store_vec<T, kVec>(static_cast<T*>(p.dresidual) + off, dx);
  }
  const int64_t dx_off = row * p.dx_row_stride + col;
  float o[kVec];
  if constexpr (kDropout) {
    bool keep[kVec];
    dropout_keep<kVec>(p.seed, p.offset, p.keep_threshold, uint64_t(e), keep);
#pragma unroll
    for (int j = 0; j < kVec; ++j) o[j] = keep[j] ? dx[j] * (p.dropout_scale * rs) : 0.f;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) o[j] = dx[j] * rs;
  }
  store_vec<T, kVec>(static_cast<T*>(p.dx0) + dx_off, o);
  if (p.dx1 != nullptr) {
    if constexpr (kDropout) {
      bool keep[kVec];
      dropout_keep<kVec>(p.seed, p.offset, p.keep_threshold, uint64_t(p.rows * p.hidden + e), keep);
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = keep[j] ? dx[j] * p.dropout_scale : 0.f;
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = dx[j];
    }
    store_vec<T, kVec>(static_cast<T*>(p.dx1) + dx_off, o);
  }
}

// Zeroes this thread's columns of its row group's partials (my_acc: [slot][H] floats).
template <int kVec>
__device__ __forceinline__ void zero_partials(float* my_acc, const RowSlots& s, int nslots, int H) {
  for (int it = 0; it < s.count; ++it) {
    for (int slot = 0; slot < nslots; ++slot) {
      float* a = my_acc + slot * H + s.col0 + it * s.step;
#pragma unroll
      for (int j = 0; j < kVec; ++j) a[j] = 0.f;
    }
  }
}

// The block's partials (acc: [row group][slot][H] floats, complete) into workspace row blockIdx.x (slot s at
// [s][blockIdx.x][col]): its row groups summed in order (a row group without rows adds zeros). Every thread of the
// block calls it.
template <int kVec>
__device__ __forceinline__ void block_partials_out(const NormBwdParams& p, const float* acc, const RowSlots& s,
                                                   int nslots) {
  const int H = int(p.hidden);
  float* out = p.workspace + int64_t(blockIdx.x) * H;  // slot s at out + s * gridDim.x * H
  const int64_t slot_stride = int64_t(gridDim.x) * H;
  if (blockDim.y == 1) {
    // only this thread's own columns: no barrier
    for (int it = 0; it < s.count; ++it) {
      const int col = s.col0 + it * s.step;
      for (int slot = 0; slot < nslots; ++slot)
        *reinterpret_cast<Vec<float, kVec>*>(out + slot * slot_stride + col) =
            *reinterpret_cast<const Vec<float, kVec>*>(acc + slot * H + col);
    }
  } else {
    __syncthreads();
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
    for (int i = tid; i < nslots * H; i += nthreads) {
      float t = acc[i];
      for (int g = 1; g < int(blockDim.y); ++g) t += acc[int64_t(g) * nslots * H + i];
      const int slot = i / H;
      out[slot * slot_stride + (i - slot * H)] = t;
    }
  }
}

// Backward. Row group threadIdx.y of block b handles rows b * rpb + threadIdx.y, then + gridDim.x * rpb, ...;
// the dweight/dbias partials of its columns accumulate in shared memory (acc: [row group][slot][H] floats,
// `nslots` slots), and at the end the block sums its row groups in a fixed order into workspace row b (slot s at
// [s][b][col]). TX is the dtype of x and dresidual_out (T or float).
// kPrefetch: xhat and w * dz of the row stay in registers between the two passes, and the next row's x and dz go
// out before the reduction; otherwise the second pass recomputes them from the raw x and dz (fewer registers,
// for 32 and 64 columns per thread).
// l2_prefetch: at the start of each row, the next row's dresidual_out (read only after the reduction, its wait
// otherwise exposed on every row) and, without kPrefetch, its x and dz are asked of L2.
//   x, dz0, dz1, dresidual_out (rows, H) -> dx = rstd * (w dz - (xhat * c1 + c2)) + dresidual_out
//   -> dresidual, dx0 = dropout(dx) * rowscale, dx1 = dropout(dx) (rows, H); partials of dz * xhat, dz
template <typename T, typename TX, int kVec, int kIters, bool kDropout, bool kParallel, bool kPrefetch>
__global__ void __launch_bounds__(512)
    norm_bwd_rows_kernel(const NormBwdParams p, int slot_dw0, int slot_db0, int slot_dw1, int slot_db1, int nslots,
                         bool l2_prefetch) {
  constexpr int kP = kParallel ? kIters : 1;
  constexpr int kHeld = kPrefetch ? kIters : 1;
  extern __shared__ __align__(16) float acc[];
  const int H = int(p.hidden);
  const RowSlots s = row_slots<kVec, kIters>(H);
  const int64_t row_step = int64_t(gridDim.x) * blockDim.y;
  const float wadd = p.zero_centered ? 1.f : 0.f;
  float* my_acc = acc + int64_t(threadIdx.y) * nslots * H;  // this row group's partials
  zero_partials<kVec>(my_acc, s, nslots, H);

  Packed<TX, kVec> ax[kIters];
  Packed<T, kVec> ag0[kIters], ag1[kP];
  // x and dz of `row`, left in flight
  auto fetch = [&](int64_t row) {
    const TX* x = static_cast<const TX*>(p.x) + row * p.x_row_stride + s.col0;
    const int64_t g = row * p.dz_row_stride + s.col0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (it >= s.count) continue;
      ax[it] = load_packed_stream<TX, kVec>(x + it * s.step);
      ag0[it] = load_packed_stream<T, kVec>(static_cast<const T*>(p.dz0) + g + it * s.step);
      if constexpr (kParallel) ag1[it] = load_packed_stream<T, kVec>(static_cast<const T*>(p.dz1) + g + it * s.step);
    }
  };
  float hx[kHeld][kVec], hg[kHeld][kVec];  // kPrefetch: xhat, w * dz of the row

  // One row, weights of dtype TW (the branch on the weights' dtype taken once per row, outside the loops).
  __shared__ float red[2][32][2];
  GroupSum<2> group_sum(red);
  auto row_body = [&](int64_t row, auto wtag) {
    using TW = typename decltype(wtag)::type;
    const float mean = p.mean != nullptr ? p.mean[row] : 0.f;
    const float rstd = p.rstd[row];
    // xhat and w * dz (summed over both norms) of vector it; with `accumulate`, the partials of dz * xhat and dz
    auto values = [&](int it, float (&xhat)[kVec], float (&wdy)[kVec], bool accumulate) {
      const int col = s.col0 + it * s.step;
      bwd_xhat(ax[it], mean, rstd, xhat);
      auto one = [&](const Packed<T, kVec>& graw, const void* wp, int slot_dw, int slot_db, bool first) {
        float g[kVec];
        bwd_wdy<T, TW, kVec>(graw, wp, col, wadd, first, g, wdy);
        if (accumulate) {
          float gx[kVec];
#pragma unroll
          for (int j = 0; j < kVec; ++j) gx[j] = g[j] * xhat[j];
          if (slot_dw >= 0) smem_add(my_acc + slot_dw * H + col, gx);
          if (slot_db >= 0) smem_add(my_acc + slot_db * H + col, g);
        }
      };
      one(ag0[it], p.weight0, slot_dw0, slot_db0, true);
      if constexpr (kParallel) one(ag1[it], p.weight1, slot_dw1, slot_db1, false);
    };

    float sums[2] = {0.f, 0.f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (it >= s.count) continue;
      float xhat[kVec], wdy[kVec];
      values(it, xhat, wdy, true);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sums[0] += wdy[j] * xhat[j];
        sums[1] += wdy[j];
        if constexpr (kPrefetch) {
          hx[it][j] = xhat[j];
          hg[it][j] = wdy[j];
        }
      }
    }
    // the next row's x and dz go out before the reduction
    if (kPrefetch && row + row_step < p.rows) fetch(row + row_step);
    group_sum(sums);
    const float c1 = sums[0] / float(H), c2 = p.is_rms ? 0.f : sums[1] / float(H);
    const float rs = p.rowscale != nullptr ? p.rowscale[row] : 1.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (it >= s.count) continue;
      float xhat[kVec], wdy[kVec], dx[kVec];
      if constexpr (kPrefetch) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          xhat[j] = hx[it][j];
          wdy[j] = hg[it][j];
        }
      } else {
        // dz1 again (from L2: the row was just read), which frees its registers across the reduction
        if constexpr (kParallel)
          ag1[it] = load_packed_stream<T, kVec>(static_cast<const T*>(p.dz1) + row * p.dz_row_stride + s.col0 + it * s.step);
        values(it, xhat, wdy, false);
      }
      bwd_dx(xhat, wdy, rstd, c1, c2, dx);
      if (p.dresidual_out != nullptr) {
        float d[kVec];
        const int64_t off = row * p.dresidual_out_row_stride + s.col0 + it * s.step;
        to_floats(load_packed_stream<TX, kVec>(static_cast<const TX*>(p.dresidual_out) + off), d);
#pragma unroll
        for (int j = 0; j < kVec; ++j) dx[j] += d[j];
      }
      bwd_store<T, kVec, kDropout>(p, dx, rs, row, s.col0 + it * s.step);
    }
  };

  auto prefetch_l2_row = [&](int64_t row, bool with_x_dz) {
    if (with_x_dz) {
      const int64_t g = row * p.dz_row_stride + s.col0;
      prefetch_row_l2<TX, kIters>(static_cast<const TX*>(p.x) + row * p.x_row_stride + s.col0, s);
      prefetch_row_l2<T, kIters>(static_cast<const T*>(p.dz0) + g, s);
      if constexpr (kParallel) prefetch_row_l2<T, kIters>(static_cast<const T*>(p.dz1) + g, s);
    }
    if (p.dresidual_out != nullptr)
      prefetch_row_l2<TX, kIters>(static_cast<const TX*>(p.dresidual_out) + row * p.dresidual_out_row_stride + s.col0, s);
  };

  int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (l2_prefetch && row < p.rows) prefetch_l2_row(row, false);
  if (kPrefetch && row < p.rows) fetch(row);
  for (; row < p.rows; row += row_step) {
    if (l2_prefetch && row + row_step < p.rows) prefetch_l2_row(row + row_step, !kPrefetch);
    if constexpr (!kPrefetch) fetch(row);
    if (p.weight_dtype == FLASHATTN_DTYPE_FLOAT32) row_body(row, TypeTag<float>{});
    else row_body(row, TypeTag<T>{});
  }

  block_partials_out<kVec>(p, acc, s, nslots);
}

// rowsca: the backward streaming its rows through shared memory (NOTES.md, "Third round"). A row group keeps the
// inputs of its next `stages - 1` rows (x, dz0, dz1, dresidual_out, and the row's rstd, mean, rowscale) in flight by
// cp.async into a ring of `stages` buffers while it computes the current row out of shared memory: the loads never
// wait for a reduction or a store, and hold no registers. Each thread copies, and reads back, only its own vectors,
// so the data needs no barrier (cp.async.wait_group makes a thread's copies visible to that thread); lanes 0-2 of
// each warp copy the row's scalars into the warp's slot and shuffle them to the others. The dweight/dbias partials
// of the thread's (at most kIters) vectors accumulate in registers, which the row's data no longer takes; at the
// end they go through shared memory into the block's workspace row as the rows kernel's do.
// Shared memory: [warp][stage][4] floats of scalars, then [row group][stage][stage_bytes] (rowsca_layout); at the
// end [row group][slot][H] float partials.
struct RowscaLayout {
  int dz0, dz1, dres, stage_bytes;  // bytes from a stage's start: x at 0, then dz0, dz1 (kParallel), dresidual_out
};

__host__ __device__ inline RowscaLayout rowsca_layout(int H, int x_bytes, int t_bytes, bool parallel, bool dres) {
  RowscaLayout l;
  l.dz0 = H * x_bytes;
  l.dz1 = l.dz0 + H * t_bytes;
  l.dres = l.dz1 + (parallel ? H * t_bytes : 0);
  l.stage_bytes = l.dres + (dres ? H * x_bytes : 0);
  return l;
}

// Copies one vector of N elements (16 or 32 bytes) into shared memory.
template <typename TE, int N>
__device__ __forceinline__ void cp_async_vec(TE* dst, const TE* src) {
#pragma unroll
  for (int i = 0; i < N * int(sizeof(TE)) / 16; ++i)
    cp_async_16(reinterpret_cast<char*>(dst) + 16 * i, reinterpret_cast<const char*>(src) + 16 * i);
}

// Waits until at most `ahead` (1 to 3) of the thread's commit groups are in flight.
__device__ __forceinline__ void cp_async_wait_ahead(int ahead) {
  if (ahead >= 3) cp_async_wait<3>();
  else if (ahead == 2) cp_async_wait<2>();
  else cp_async_wait<1>();
}

// Keeps the compiler from moving shared-memory accesses across it (the cp.async asm statements do not say they
// touch memory).
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }

//   x, dz0, dz1, dresidual_out (rows, H) -> dresidual, dx0, dx1 (rows, H); partials of dz * xhat, dz (as the rows
//   kernel). keys: philox_keys(p.seed); stages: 2 to 4.
// The row loop is bound by instruction issue (NOTES.md, "Fourth round"), hence: the Philox round keys are operands
// from the constant bank (not derived again in every call), xhat is one FMA, and the second pass does not form xhat:
// dx = rstd * (w dz - (xhat * c1 + c2)) = rstd * w dz - (a * x - b) with a = rstd^2 c1, b = a * mean - rstd * c2, two
// FMAs an element.
// kMinBlocks 3 (the variant rowscao3): 256-thread blocks capped at 80 registers, three a multiprocessor, 24 warps
// where 128 registers leave 16 (NOTES.md, "Fifth round"). kEarlyKeep (the variant rowsca32e): dx0's dropout decisions
// made before the first pass, as one bit an element, so that their integer work runs beside the first pass's
// shared-memory loads and floating point instead of in the second pass's chain (NOTES.md, "Eleventh round").
template <typename T, typename TX, int kVec, int kIters, bool kDropout, bool kParallel, int kMinBlocks = 1,
          bool kEarlyKeep = false>
__global__ void __launch_bounds__(kMinBlocks > 1 ? 256 : 512, kMinBlocks > 1 ? kMinBlocks : 0)
    norm_bwd_rowsca_kernel(const NormBwdParams p, const PhiloxKeys keys, int slot_dw0, int slot_db0, int slot_dw1,
                           int slot_db1, int nslots, int stages) {
  static_assert(!kEarlyKeep || (kDropout && kIters * kVec <= 32), "one bit an element of a thread's row, in a word");
  constexpr int kP = kParallel ? kIters : 1;
  extern __shared__ __align__(16) unsigned char smem[];
  const int H = int(p.hidden);
  const RowSlots s = row_slots<kVec, kIters>(H);
  const int64_t row_step = int64_t(gridDim.x) * blockDim.y;
  const float wadd = p.zero_centered ? 1.f : 0.f;
  const int lane = threadIdx.x & 31, wpr = blockDim.x >> 5;
  const bool has_dres = p.dresidual_out != nullptr;
  const RowscaLayout l = rowsca_layout(H, sizeof(TX), sizeof(T), kParallel, has_dres);
  float* const scalars = reinterpret_cast<float*>(smem) + (threadIdx.y * wpr + (threadIdx.x >> 5)) * stages * 4;
  unsigned char* const ring =
      smem + int(blockDim.y) * wpr * stages * 16 + int(threadIdx.y) * stages * l.stage_bytes;

  int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  int64_t next = row;  // the next row to issue
  // The inputs of row `next` into stage `stage`, as one commit group (an empty one past the last row, so that the
  // groups in flight are always the rows ahead); lanes 0-2 copy the row's rstd, mean, rowscale.
  auto issue = [&](int stage) {
    if (next < p.rows) {
      unsigned char* b = ring + stage * l.stage_bytes;
      const TX* x = static_cast<const TX*>(p.x) + next * p.x_row_stride + s.col0;
      const int64_t og = next * p.dz_row_stride + s.col0;
      const TX* dres = has_dres ? static_cast<const TX*>(p.dresidual_out) + next * p.dresidual_out_row_stride + s.col0
                                : nullptr;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (it >= s.count) continue;
        const int col = s.col0 + it * s.step, d = it * s.step;
        cp_async_vec<TX, kVec>(reinterpret_cast<TX*>(b) + col, x + d);
        cp_async_vec<T, kVec>(reinterpret_cast<T*>(b + l.dz0) + col, static_cast<const T*>(p.dz0) + og + d);
        if constexpr (kParallel)
          cp_async_vec<T, kVec>(reinterpret_cast<T*>(b + l.dz1) + col, static_cast<const T*>(p.dz1) + og + d);
        if (has_dres) cp_async_vec<TX, kVec>(reinterpret_cast<TX*>(b + l.dres) + col, dres + d);
      }
      const float* scalar = lane == 0 ? p.rstd : lane == 1 ? p.mean : lane == 2 ? p.rowscale : nullptr;
      if (scalar != nullptr) cp_async_4(scalars + stage * 4 + lane, scalar + next);
    }
    cp_async_commit();
    next += row_step;
  };

  float pdw0[kIters][kVec], pdb0[kIters][kVec], pdw1[kP][kVec], pdb1[kP][kVec];  // the partials
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      pdw0[it][j] = pdb0[it][j] = 0.f;
      if constexpr (kParallel) pdw1[it][j] = pdb1[it][j] = 0.f;
    }
  }

  // One row out of stage `stage`, weights of dtype TW.
  __shared__ float red[2][32][2];
  GroupSum<2> group_sum(red);
  auto row_body = [&](int stage, auto wtag) {
    using TW = typename decltype(wtag)::type;
    const unsigned char* buf = ring + stage * l.stage_bytes;
    const float v = scalars[stage * 4 + (lane < 3 ? lane : 0)];  // lane i's own copy (i < 3)
    const float rstd = __shfl_sync(0xffffffffu, v, 0);
    const float mean = p.mean != nullptr ? __shfl_sync(0xffffffffu, v, 1) : 0.f;
    const float rs = p.rowscale != nullptr ? __shfl_sync(0xffffffffu, v, 2) : 1.f;
    const float shift = -mean * rstd;  // xhat = x * rstd + shift
    // kEarlyKeep: bit it * kVec + j keeps element j of the thread's vector it in dx0
    [[maybe_unused]] uint32_t keep0 = 0;
    if constexpr (kEarlyKeep) {
      const int64_t e0 = row * p.hidden + s.col0;  // the dropout counter at this thread's first column
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        if (it >= s.count) continue;
        bool keep[kVec];
        dropout_keep<kVec>(keys, p.offset, p.keep_threshold, uint64_t(e0 + it * s.step), keep);
#pragma unroll
        for (int j = 0; j < kVec; ++j) keep0 |= uint32_t(keep[j]) << (it * kVec + j);
      }
    }

    float sums[2] = {0.f, 0.f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (it >= s.count) continue;
      const int col = s.col0 + it * s.step;
      float xhat[kVec], g[kVec], wdy[kVec];
      to_floats(load_packed<TX, kVec>(reinterpret_cast<const TX*>(buf) + col), xhat);
#pragma unroll
      for (int j = 0; j < kVec; ++j) xhat[j] = xhat[j] * rstd + shift;
      bwd_wdy<T, TW, kVec>(load_packed<T, kVec>(reinterpret_cast<const T*>(buf + l.dz0) + col), p.weight0, col, wadd,
                           true, g, wdy);
#pragma unroll
      for (int j = 0; j < kVec; ++j) pdw0[it][j] += g[j] * xhat[j];
      if (slot_db0 >= 0) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) pdb0[it][j] += g[j];
      }
      if constexpr (kParallel) {
        bwd_wdy<T, TW, kVec>(load_packed<T, kVec>(reinterpret_cast<const T*>(buf + l.dz1) + col), p.weight1, col,
                             wadd, false, g, wdy);
#pragma unroll
        for (int j = 0; j < kVec; ++j) pdw1[it][j] += g[j] * xhat[j];
        if (slot_db1 >= 0) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) pdb1[it][j] += g[j];
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sums[0] += wdy[j] * xhat[j];
        sums[1] += wdy[j];
      }
    }
    group_sum(sums);
    const float c1 = sums[0] / float(H), c2 = p.is_rms ? 0.f : sums[1] / float(H);
    const float a = rstd * rstd * c1, b = a * mean - rstd * c2;
    const float scale0 = kDropout ? p.dropout_scale * rs : rs;  // dx0's factor of the kept elements
    // the row's outputs and dropout counter at this thread's first column
    [[maybe_unused]] const int64_t e = row * p.hidden + s.col0;
    const int64_t odx = row * p.dx_row_stride + s.col0, ores = row * p.dresidual_row_stride + s.col0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (it >= s.count) continue;
      const int col = s.col0 + it * s.step, d = it * s.step;
      float x[kVec], g[kVec], wdy[kVec], dx[kVec];
      to_floats(load_packed<TX, kVec>(reinterpret_cast<const TX*>(buf) + col), x);  // again from shared memory
      bwd_wdy<T, TW, kVec>(load_packed<T, kVec>(reinterpret_cast<const T*>(buf + l.dz0) + col), p.weight0, col, wadd,
                           true, g, wdy);
      if constexpr (kParallel)
        bwd_wdy<T, TW, kVec>(load_packed<T, kVec>(reinterpret_cast<const T*>(buf + l.dz1) + col), p.weight1, col,
                             wadd, false, g, wdy);
#pragma unroll
      for (int j = 0; j < kVec; ++j) dx[j] = rstd * wdy[j] - (a * x[j] - b);
      if (has_dres) {
        float dr[kVec];
        to_floats(load_packed<TX, kVec>(reinterpret_cast<const TX*>(buf + l.dres) + col), dr);
#pragma unroll
        for (int j = 0; j < kVec; ++j) dx[j] += dr[j];
      }
      if (p.dresidual != nullptr) {
        if (p.residual_dtype == FLASHATTN_DTYPE_FLOAT32)
          store_floats<float, kVec>(static_cast<float*>(p.dresidual) + ores + d, dx);
        else store_floats<T, kVec>(static_cast<T*>(p.dresidual) + ores + d, dx);
      }
      // dx0 = dropout(dx) * rowscale, dx1 = dropout(dx), the keep bits regenerated as the forward drew them
      float o[kVec];
      [[maybe_unused]] bool keep[kVec];
      if constexpr (kEarlyKeep) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) keep[j] = (keep0 >> (it * kVec + j)) & 1u;
      } else if constexpr (kDropout) {
        dropout_keep<kVec>(keys, p.offset, p.keep_threshold, uint64_t(e + d), keep);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = !kDropout || keep[j] ? dx[j] * scale0 : 0.f;
      store_floats<T, kVec>(static_cast<T*>(p.dx0) + odx + d, o);
      if (p.dx1 != nullptr) {
        if constexpr (kDropout) {
          dropout_keep<kVec>(keys, p.offset, p.keep_threshold, uint64_t(p.rows * p.hidden + e + d), keep);
#pragma unroll
          for (int j = 0; j < kVec; ++j) o[j] = keep[j] ? dx[j] * p.dropout_scale : 0.f;
          store_floats<T, kVec>(static_cast<T*>(p.dx1) + odx + d, o);
        } else {
          store_floats<T, kVec>(static_cast<T*>(p.dx1) + odx + d, dx);
        }
      }
    }
  };

  for (int k = 0; k + 1 < stages; ++k) issue(k);
  for (int stage = 0; row < p.rows; row += row_step) {
    // the row stages - 1 ahead, into the stage the previous row used (read by this thread alone, before the fence)
    compiler_fence();
    issue(stage == 0 ? stages - 1 : stage - 1);
    cp_async_wait_ahead(stages - 1);  // this row's group has landed
    compiler_fence();
    if (p.weight_dtype == FLASHATTN_DTYPE_FLOAT32) row_body(stage, TypeTag<float>{});
    else row_body(stage, TypeTag<T>{});
    stage = stage + 1 == stages ? 0 : stage + 1;
  }

  cp_async_wait<0>();
  __syncthreads();  // every row group is done with the ring, which now takes the partials
  float* const acc = reinterpret_cast<float*>(smem);
  float* const my_acc = acc + int(threadIdx.y) * nslots * H;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (it >= s.count) continue;
    const int col = s.col0 + it * s.step;
    auto put = [&](int slot, const float (&v)[kVec]) {
      if (slot >= 0) store_vec<float, kVec>(my_acc + slot * H + col, v);
    };
    put(slot_dw0, pdw0[it]);
    put(slot_db0, pdb0[it]);
    if constexpr (kParallel) {
      put(slot_dw1, pdw1[it]);
      put(slot_db1, pdb1[it]);
    }
  }
  block_partials_out<kVec>(p, acc, s, nslots);
}

// ----------------------------------------------------------------------------
// launchers

template <int N>
using IntC = std::integral_constant<int, N>;

// kIters for `nvec` vectors per row: the fewest that keep threads per row <= kMaxThreads.
template <typename T, int kVec, typename F>
FlashAttnStatus with_iters(int64_t nvec, F&& f) {
  if constexpr (kVec == 1) {
    if (nvec <= 4 * kMaxThreads) return f(IntC<4>{});
    if (nvec <= 16 * kMaxThreads) return f(IntC<16>{});
    return f(IntC<32>{});
  } else {
    if (nvec <= kMaxThreads) return f(IntC<1>{});
    if (nvec <= 2 * kMaxThreads) return f(IntC<2>{});
    if constexpr (sizeof(T) == 4) {
      if (nvec <= 4 * kMaxThreads) return f(IntC<4>{});
      return f(IntC<8>{});
    } else {
      return f(IntC<4>{});
    }
  }
}

bool aligned_to(const void* ptr, FlashAttnDType t, int vec) {
  return ptr == nullptr || is_aligned(ptr, dtype_size(t) * vec);
}

int fwd_vector_width(const NormFwdParams& p) {
  const int vec = int(16 / dtype_size(p.dtype));
  if (p.hidden % vec != 0) return 1;
  for (int64_t s : {p.x0_row_stride, p.x1_row_stride, p.residual_row_stride, p.z_row_stride, p.residual_out_row_stride})
    if (s % vec != 0) return 1;
  const bool ok = aligned_to(p.x0, p.dtype, vec) && aligned_to(p.x1, p.dtype, vec) &&
                  aligned_to(p.z0, p.dtype, vec) && aligned_to(p.z1, p.dtype, vec) &&
                  aligned_to(p.residual, p.residual_dtype, vec) &&
                  aligned_to(p.residual_out, p.residual_out_dtype, vec) &&
                  aligned_to(p.weight0, p.weight_dtype, vec) && aligned_to(p.bias0, p.weight_dtype, vec) &&
                  aligned_to(p.weight1, p.weight_dtype, vec) && aligned_to(p.bias1, p.weight_dtype, vec) &&
                  is_aligned(p.mask0, vec) && is_aligned(p.mask1, vec);
  return ok ? vec : 1;
}

int bwd_vector_width(const NormBwdParams& p) {
  const int vec = int(16 / dtype_size(p.dtype));
  if (p.hidden % vec != 0) return 1;
  for (int64_t s : {p.dz_row_stride, p.dresidual_out_row_stride, p.x_row_stride, p.dx_row_stride, p.dresidual_row_stride})
    if (s % vec != 0) return 1;
  const bool ok = aligned_to(p.dz0, p.dtype, vec) && aligned_to(p.dz1, p.dtype, vec) &&
                  aligned_to(p.dx0, p.dtype, vec) && aligned_to(p.dx1, p.dtype, vec) &&
                  aligned_to(p.x, p.x_dtype, vec) && aligned_to(p.dresidual_out, p.x_dtype, vec) &&
                  aligned_to(p.dresidual, p.residual_dtype, vec) && aligned_to(p.weight0, p.weight_dtype, vec) &&
                  aligned_to(p.weight1, p.weight_dtype, vec) && aligned_to(p.workspace, FLASHATTN_DTYPE_FLOAT32, vec);
  return ok ? vec : 1;
}

// block family: a row per thread group sized to the row (threads_per_row, rows_per_block), kIters vectors each.
template <typename T, int kVec>
FlashAttnStatus launch_fwd_block(const NormFwdParams& p, cudaStream_t stream, const char* function) {
  const int64_t nvec = p.hidden / kVec;
  return with_iters<T, kVec>(nvec, [&](auto iters) {
    constexpr int kIters = decltype(iters)::value;
    const int tpr = norm_threads_per_row(nvec, kIters);
    const int rpb = norm_rows_per_block(tpr);
    const int64_t blocks = (p.rows + rpb - 1) / rpb;
    if (blocks > 0x7fffffff) return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function, "too many rows (%lld)", (long long)p.rows);
    norm_fwd_block_kernel<T, kVec, kIters><<<unsigned(blocks), dim3(tpr, rpb), 0, stream>>>(p);
    return check_launch(function, "norm_fwd_block_kernel");
  });
}

// The workspace slot of each parameter gradient asked for (-1: none), in the order dweight0, dbias0, dweight1, dbias1.
struct BwdSlots {
  int slot[4] = {-1, -1, -1, -1};
  int count = 0;
  FinalizeArgs args{};
};

BwdSlots bwd_slots(const NormBwdParams& p) {
  BwdSlots s;
  void* outs[4] = {p.dweight0, p.dbias0, p.dweight1, p.dbias1};
  for (int i = 0; i < 4; ++i) {
    if (outs[i] != nullptr) {
      s.args.out[s.count] = outs[i];
      s.slot[i] = s.count++;
    }
  }
  return s;
}

// Writes the workspace lanes used (each lane one row of partials per slot) to *lanes.
template <typename T, int kVec>
FlashAttnStatus launch_bwd_block(const NormBwdParams& p, const BwdSlots& sl, int64_t* lanes, cudaStream_t stream,
                                 const char* function) {
  const int64_t nvec = p.hidden / kVec;
  return with_iters<T, kVec>(nvec, [&](auto iters) {
    constexpr int kIters = decltype(iters)::value;
    const int tpr = norm_threads_per_row(nvec, kIters);
    const int rpb = norm_rows_per_block(tpr);
    const int64_t want = p.lanes - 8;  // see norm_bwd_lanes
    const int64_t blocks = (want + rpb - 1) / rpb;
    *lanes = blocks * rpb;
    return BOOL_SWITCH(p.weight1 != nullptr, kParallel, [&] {
      norm_bwd_block_kernel<T, kVec, kIters, kParallel>
          <<<unsigned(blocks), dim3(tpr, rpb), 0, stream>>>(p, sl.slot[0], sl.slot[1], sl.slot[2], sl.slot[3]);
      return check_launch(function, "norm_bwd_block_kernel");
    });
  });
}

// rows family (16-byte vectors only: the block family takes the scalar path)

// Warps per row group: the fewest (a power of 2) whose threads' kIters vectors cover the row's nvec vectors.
int warps_per_row(int64_t nvec, int iters) {
  int w = 1;
  while (int64_t(w) * 32 * iters < nvec) w *= 2;
  return w;
}
constexpr int kRowsMaxWarps = 16;  // the rows kernels' __launch_bounds__(512): up to 128 registers

// Rows per block: blocks of 256 threads where rows are short.
int rows_per_block(int wpr) { return std::max(1, 8 / wpr); }

// Blocks of a persistent grid: as many as fit on the device at once, at most `want` (the kernel's shared-memory opt-in
// and occupancy asked of the driver once, device.h).
FlashAttnStatus persistent_blocks(const void* kernel, int threads, size_t smem, const DeviceInfo& d, int64_t want,
                                  int64_t* blocks, const char* function) {
  int per_sm = 0;
  FlashAttnStatus s = allow_dynamic_smem(kernel, d.device, smem, "norm kernel", function);
  if (s == FLASHATTN_STATUS_OK) s = blocks_per_sm(kernel, d.device, threads, smem, &per_sm, function);
  if (s != FLASHATTN_STATUS_OK) return s;
  *blocks = std::min<int64_t>(want, int64_t(std::max(per_sm, 1)) * d.sms);
  return FLASHATTN_STATUS_OK;
}

// Columns per thread and row (kIters * kVec) for the variant's `elems`, 16, 32 or 64: 16 falls back to 32 where
// the row would need more than kRowsMaxWarps warps.
int rows_elems(int64_t nvec, int vec, int elems) {
  return elems == 16 && warps_per_row(nvec, 16 / vec) > kRowsMaxWarps ? 32 : elems;
}

// kWide: the widest columns per thread instantiated, 16, 32 or 64 (see rows_elems_f32, bwd_rows_elems).
template <typename T, int kVec, int kWide, typename F>
FlashAttnStatus with_rows_iters(int64_t nvec, int elems, F&& f) {
  const int e = std::min(rows_elems(nvec, kVec, elems), kWide);
  if constexpr (kWide >= 64) {
    if (e == 64) return f(IntC<64 / kVec>{});
  }
  if constexpr (kWide >= 32) {
    if (e == 32) return f(IntC<32 / kVec>{});
  }
  return f(IntC<16 / kVec>{});
}

// Columns per thread the rows kernels use for the variant's `elems` where the data (the tensors, or the
// forward's residual) has float32 elements: 16, where that fits kRowsMaxWarps warps (up to 8192 columns;
// 32 would spill), else 0 (the block family).
int rows_elems_f32(bool f32, int64_t hidden, int vec, int elems) {
  if (!f32) return rows_elems(hidden / vec, vec, elems);
  return warps_per_row(hidden / vec, 16 / vec) <= kRowsMaxWarps ? 16 : 0;
}

bool fwd_res_f32(const NormFwdParams& p) {
  return p.residual != nullptr && p.residual_dtype == FLASHATTN_DTYPE_FLOAT32;
}

// elems from rows_elems_f32.
template <typename T, int kVec>
FlashAttnStatus launch_fwd_rows(const NormFwdParams& p, int elems, bool l2_prefetch, cudaStream_t stream,
                                const char* function) {
  const int64_t nvec = p.hidden / kVec;
  DeviceInfo d{};
  FlashAttnStatus s = current_device_info(&d, function);
  if (s != FLASHATTN_STATUS_OK) return s;
  return BOOL_SWITCH(fwd_res_f32(p), kResF32, [&] {
    using TR = std::conditional_t<kResF32, float, T>;
    constexpr int kWide = sizeof(T) == 2 && sizeof(TR) == 2 ? 64 : 16;
    return with_rows_iters<T, kVec, kWide>(nvec, elems, [&](auto iters) {
      constexpr int kIters = decltype(iters)::value;
      const int wpr = warps_per_row(nvec, kIters), rpb = rows_per_block(wpr);
      return BOOL_SWITCH(p.dropout_p > 0.f, kDropout, [&] {
        return BOOL_SWITCH(p.is_rms, kRms, [&] {
          auto kernel = norm_fwd_rows_kernel<T, TR, kVec, kIters, kDropout, kRms>;
          int64_t blocks = 0;
          FlashAttnStatus st = persistent_blocks(reinterpret_cast<const void*>(kernel), 32 * wpr * rpb, 0, d,
                                                 (p.rows + rpb - 1) / rpb, &blocks, function);
          if (st != FLASHATTN_STATUS_OK) return st;
          kernel<<<unsigned(blocks), dim3(32 * wpr, rpb), 0, stream>>>(p, l2_prefetch);
          return check_launch(function, "norm_fwd_rows_kernel");
        });
      });
    });
  });
}

// Shared memory of the rows backward: [row group][slot][H] float partials.
size_t bwd_rows_smem(const NormBwdParams& p, const BwdSlots& sl, int rpb) {
  return size_t(rpb) * size_t(sl.count) * size_t(p.hidden) * sizeof(float);
}

// Columns per thread of the rows backward for the variant's `elems` (rows_elems_f32), or 0 for the block
// family: float32 with both norms (their held values would spill), or one row group's partials too large
// for shared memory (the parallel norms' four slots at 16384 columns). 64 columns only for 16-bit x and one
// norm (the raw x and dz of a row alone take 64 registers); 32 otherwise.
int bwd_rows_elems(const NormBwdParams& p, const BwdSlots& sl, int vec, int elems, int smem_optin) {
  if (p.dtype == FLASHATTN_DTYPE_FLOAT32 && p.weight1 != nullptr) return 0;
  if (bwd_rows_smem(p, sl, 1) > size_t(smem_optin)) return 0;
  if (elems == 64 && (p.x_dtype == FLASHATTN_DTYPE_FLOAT32 || p.weight1 != nullptr)) elems = 32;
  return rows_elems_f32(p.dtype == FLASHATTN_DTYPE_FLOAT32, p.hidden, vec, elems);
}

// elems 16: xhat and w * dz held, the next row prefetched; 32 and 64: recomputed from the raw x and dz (from
// bwd_rows_elems).
template <typename T, int kVec>
FlashAttnStatus launch_bwd_rows(const NormBwdParams& p, int elems, bool l2_prefetch, const BwdSlots& sl,
                                const DeviceInfo& d, int64_t* lanes, cudaStream_t stream, const char* function) {
  const int64_t nvec = p.hidden / kVec;
  return with_rows_iters<T, kVec, sizeof(T) == 2 ? 64 : 16>(nvec, elems, [&](auto iters) {
    constexpr int kIters = decltype(iters)::value;
    const int wpr = warps_per_row(nvec, kIters);
    int rpb = rows_per_block(wpr);
    while (rpb > 1 && bwd_rows_smem(p, sl, rpb) > size_t(d.smem_optin)) rpb /= 2;
    const size_t smem = bwd_rows_smem(p, sl, rpb);
    return BOOL_SWITCH(p.x_dtype == FLASHATTN_DTYPE_FLOAT32, kXF32, [&] {
      using TX = std::conditional_t<kXF32, float, T>;
      return BOOL_SWITCH(p.dropout_p > 0.f, kDropout, [&] {
        return BOOL_SWITCH(p.weight1 != nullptr, kParallel, [&] {
          if constexpr ((sizeof(T) == 4 && kParallel) || (kIters * kVec == 64 && (kXF32 || kParallel))) {
            return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function, "norm_bwd_rows_kernel: %d columns a thread",
                        kIters * kVec);  // see bwd_rows_elems
          } else {
            constexpr bool kPrefetch = kIters * kVec == 16;
            const auto kernel = norm_bwd_rows_kernel<T, TX, kVec, kIters, kDropout, kParallel, kPrefetch>;
            const int64_t want = std::min((p.rows + rpb - 1) / rpb, p.lanes - 8);  // see norm_bwd_lanes
            FlashAttnStatus st =
                persistent_blocks(reinterpret_cast<const void*>(kernel), 32 * wpr * rpb, smem, d, want, lanes, function);
            if (st != FLASHATTN_STATUS_OK) return st;
            kernel<<<unsigned(*lanes), dim3(32 * wpr, rpb), smem, stream>>>(p, sl.slot[0], sl.slot[1], sl.slot[2],
                                                                            sl.slot[3], sl.count, l2_prefetch);
            return check_launch(function, "norm_bwd_rows_kernel");
          }
        });
      });
    });
  });
}

// rowsca (16-bit data): 16 columns a thread up to 8192 columns (kIters 2, up to 16 warps a row), 32 above (kIters 4,
// one norm: two norms' partials at 32 columns would take 128 registers). rpb 0 where it does not apply (the caller
// falls back to rows32): float32 data, two norms past 8192 columns, or two stages of one row group larger than a
// block's shared memory (float32 x past about 11000 columns).
struct RowscaShape {
  int elems = 0, wpr = 0, rpb = 0;
  bool o3 = false;     // the kernel for three 256-thread blocks a multiprocessor
  bool early = false;  // the kernel making dx0's dropout decisions before the first pass
  RowscaLayout layout{};
};

// Shared memory of a rowsca block (the layout above the kernel).
size_t rowsca_smem(const RowscaShape& sh, int stages, int nslots, int64_t hidden) {
  const size_t ring = size_t(sh.rpb) * (size_t(sh.wpr) * stages * 16 + size_t(stages) * size_t(sh.layout.stage_bytes));
  return std::max(ring, size_t(sh.rpb) * size_t(nslots) * size_t(hidden) * sizeof(float));
}

// wide: 32 columns a thread at every size for one norm (the variant rowsca32), which spreads a row's fixed
// instructions (the scalars, the group sum, the ring's bookkeeping) over twice the columns at the cost of 32 more
// registers of partials; two norms keep 16 up to 8192. o3: one norm, 16 columns, blocks of 256 threads at most (up
// to 4096 columns) for three a multiprocessor (the variant rowscao3). early: dx0's dropout decisions before the first
// pass, for one norm with dropout (the variant rowsca32e, wide).
RowscaShape rowsca_shape(const NormBwdParams& p, const BwdSlots& sl, int vec, int smem_optin, bool wide, bool o3,
                         bool early) {
  RowscaShape sh;
  const bool parallel = p.weight1 != nullptr;
  if (dtype_size(p.dtype) != 2 || vec == 1 || (o3 && parallel)) return sh;
  sh.early = early && wide && !parallel && p.dropout_p > 0.f;
  sh.elems = (wide && !parallel) || p.hidden > int64_t(32) * kRowsMaxWarps * 16 ? 32 : 16;
  if (sh.elems == 32 && (parallel || o3)) return RowscaShape{};
  sh.wpr = warps_per_row(p.hidden / vec, sh.elems / vec);
  sh.layout = rowsca_layout(int(p.hidden), int(dtype_size(p.x_dtype)), 2, parallel, p.dresidual_out != nullptr);
  sh.rpb = rows_per_block(sh.wpr);
  sh.o3 = o3;
  if (o3 && 32 * sh.wpr * sh.rpb > 256) return RowscaShape{};
  while (sh.rpb > 0 && rowsca_smem(sh, 2, sl.count, p.hidden) > size_t(smem_optin)) sh.rpb /= 2;
  return sh;
}

// Rows' inputs in flight a multiprocessor that rowsca aims for (the H200 moves about 32 KB a microsecond a
// multiprocessor, at 1-2 us of loaded latency); past it, more row groups (warps) count for more than more stages.
constexpr int64_t kRowscaInFlight = 96 * 1024;

// The o3 kernels exist for one norm at 16 columns a thread alone (rowsca_shape): two norms' partials spill 540-900
// bytes at 80 registers. The early kernels, for one norm with dropout at 32 columns a thread alone.
template <typename T, typename TX, int kVec, int kIters, bool kDropout, bool kParallel>
auto pick_rowsca_kernel(bool o3, bool early) {
  if constexpr (kIters * kVec == 16 && !kParallel)
    if (o3) return norm_bwd_rowsca_kernel<T, TX, kVec, kIters, kDropout, kParallel, 3>;
  if constexpr (kIters * kVec == 32 && kDropout && !kParallel)
    if (early) return norm_bwd_rowsca_kernel<T, TX, kVec, kIters, kDropout, kParallel, 1, true>;
  return norm_bwd_rowsca_kernel<T, TX, kVec, kIters, kDropout, kParallel, 1>;
}

template <typename T, int kVec>
FlashAttnStatus launch_bwd_rowsca(const NormBwdParams& p, const RowscaShape& sh, const BwdSlots& sl, const DeviceInfo& d,
                                  int64_t* lanes, cudaStream_t stream, const char* function) {
  if constexpr (sizeof(T) != 2) {
    return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function, "norm_bwd_rowsca_kernel: 16-bit data only");  // rowsca_shape
  } else {
    auto run = [&](auto iters) {
      constexpr int kIters = decltype(iters)::value;
      return BOOL_SWITCH(p.x_dtype == FLASHATTN_DTYPE_FLOAT32, kXF32, [&] {
        using TX = std::conditional_t<kXF32, float, T>;
        return BOOL_SWITCH(p.dropout_p > 0.f, kDropout, [&] {
          return BOOL_SWITCH(p.weight1 != nullptr, kParallel, [&] {
            if constexpr (kParallel && kIters * kVec > 16) {
              return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function, "norm_bwd_rowsca_kernel: two norms at %d columns a thread",
                          kIters * kVec);  // rowsca_shape
            } else {
              const auto kernel = pick_rowsca_kernel<T, TX, kVec, kIters, kDropout, kParallel>(sh.o3, sh.early);
              const int threads = 32 * sh.wpr * sh.rpb;
              const int64_t want = std::min((p.rows + sh.rpb - 1) / sh.rpb, p.lanes - 8);  // see norm_bwd_lanes
              // The stage count: the rows in flight a multiprocessor up to kRowscaInFlight, then the most row groups,
              // then the fewest stages (shared memory left to L1, which holds the weights).
              int stages = 0;
              int64_t blocks = 0, best_bytes = -1, best_groups = -1;
              for (int st = 2; st <= 4; ++st) {
                const size_t smem = rowsca_smem(sh, st, sl.count, p.hidden);
                if (smem > size_t(d.smem_optin)) break;
                int64_t b = 0;
                const FlashAttnStatus st_occ =
                    persistent_blocks(reinterpret_cast<const void*>(kernel), threads, smem, d, want, &b, function);
                if (st_occ != FLASHATTN_STATUS_OK) return st_occ;
                const int64_t groups = b * sh.rpb;
                const int64_t bytes = std::min(kRowscaInFlight, groups * (st - 1) * sh.layout.stage_bytes / d.sms);
                if (bytes > best_bytes || (bytes == best_bytes && groups > best_groups)) {
                  stages = st;
                  blocks = b;
                  best_bytes = bytes;
                  best_groups = groups;
                }
              }
              *lanes = blocks;
              kernel<<<unsigned(blocks), dim3(32 * sh.wpr, sh.rpb), rowsca_smem(sh, stages, sl.count, p.hidden), stream>>>(
                  p, philox_keys(p.seed), sl.slot[0], sl.slot[1], sl.slot[2], sl.slot[3], sl.count, stages);
              return check_launch(function, "norm_bwd_rowsca_kernel");
            }
          });
        });
      });
    };
    return sh.elems == 16 ? run(IntC<16 / kVec>{}) : run(IntC<32 / kVec>{});
  }
}

// ----------------------------------------------------------------------------
// variants

// The kernel for each size: the tables below, or one variant for every size with FLASHATTN_NORM_VARIANT (read once per
// process; the variants in norm_variants.h).
int variant_elems(int v) {
  return v == kRows16 || v == kRows16L2 ? 16 : v == kRows64L2 ? 64 : 32;
}
bool variant_l2(int v) { return v == kRows16L2 || v == kRows32L2 || v == kRows64L2; }

int env_variant() {
  static const int v = [] {
    const char* s = std::getenv("FLASHATTN_NORM_VARIANT");
    if (s != nullptr) {
      for (int i = 0; i < kNumVariants; ++i)
        if (std::strcmp(s, kNormVariantNames[i]) == 0) return i;
    }
    return int(kAuto);
  }();
  return v;
}

// Largest hidden size (up to 16384) each variant is chosen for, from ops_bench on the H200 (bf16, 16384 rows, every
// variant at every size; ms, LayerNorm prenorm with dropout / RMSNorm):
//   forward, rows32 vs rows16 vs block: 768 0.037/0.042/0.043, 2048 0.086/0.092/0.110, 4096 0.166/0.180/0.231,
//     8192 0.328/0.379/0.447, 16384 0.691/0.685/1.253 (RMSNorm alike): rows32 everywhere (16384 a tie).
//   backward alone (ops_bench's norm_bwd / rms_bwd lines, each variant's backward after its own forward), the best
//     against the one picked before (rows32 to 1024, rows16 to 4096, rows32 above; RMSNorm rows64l2 at 16384):
//     LayerNorm 768 rows16l2 0.059 / 0.067, 2048 rows16l2 0.130 / 0.140, 4096 rows16l2 0.261 / 0.278, 8192 rows32
//     0.557, 16384 rows32 1.175 (rows16l2 and rows32l2 1.178); RMSNorm 768 rows16 0.037 / 0.043, 2048 and 4096
//     rows16 (rows16l2 within 1%), 8192 rows16 0.293 / rows32's 0.365, 16384 block 0.818 / rows64l2's 0.920.
//     The l2 prefetch pays in LayerNorm's backward and not in RMSNorm's.
//   LayerNorm backward with 16-bit x (ops_bench norm_bwd, bf16 residual, a later run): rowsca below every other
//     variant at every size, 768 0.0551 / auto's 0.0603, 2048 0.119 / 0.132, 4096 0.224 / 0.264, 8192 0.442 / 0.542,
//     16384 1.064 / 1.107 (where rowsca does not apply it falls back to rows32). After rowsca's fewer instructions,
//     rowsca32 against rowsca: 768 0.0556 / 0.0539, 2048 0.1128 / 0.1156, 4096 0.2090 / 0.2177, 8192 0.4076 / 0.4316,
//     16384 0.996 / 1.005; RMSNorm's rowsca32 is slower than every rows variant from 2048 up (0.094 / rowsca's 0.074
//     at 2048), so RMSNorm's table stays.
//   Backward alone with float32 x (ops_bench norm_step_bwd: bf16 dy, a float32 residual stream as GPT training runs it)
//     and RMSNorm (rms_bwd, bf16), a later run, the best against the table before: LayerNorm 768 block 0.0624 / rows16l2's
//     0.0667, 2048 and 4096 rows16l2 within 2% of the best, 8192 rowsca 0.580 / rows32's 0.605, 16384 all rows variants
//     within 0.2% (1.217); RMSNorm 768 rows32 0.0355 / rows16's 0.0368, 2048 rowsca 0.0745 / 0.0781, 4096 rowsca 0.139 /
//     0.145, 8192 rowsca 0.279 / 0.291, 16384 rows16l2 0.544 / block's 0.824 (rows16 and rows32 0.571).
//   RMSNorm backward (no dropout), rowscao3 (rowsca at three blocks a multiprocessor) against the table, a later
//     run: 2048 0.0709 / rowsca's 0.0733, 4096 0.1289 / 0.1349, 768 0.0363 / rows32's 0.0357; LayerNorm with dropout
//     2048 0.1187 / rowsca32's 0.1108 (rowscao3's dropout kernels spill at 80 registers), so the tables with
//     dropout (or two norms, which rowscao3 does not cover) keep rowsca.
//   LayerNorm backward with 16-bit x without dropout (ops_bench with OPS_NORM_DROPOUT=0, a later run): rowsca at 32
//     columns a thread at half the speed it has with dropout (rowsca32 2048 0.200 / 0.105 with dropout, 8192 0.756 /
//     0.382; rowsca at 16384, which takes 32 columns there, 2.005 / 0.952; RMSNorm's rowsca32 alike); the best:
//     768 rowscao3 0.0450 (rowsca 0.0453), 2048 rowscao3 0.0976 / rowsca's 0.1028, 4096 rowscao3 0.1821 / 0.1873,
//     8192 rowsca 0.392 / rows32's 0.484, 16384 rows32 0.973 (rows16 alike).
//   The same after rowsca's stores became packed words (store_floats; a later run): rowsca32 without dropout 2048
//     0.1064 / 0.197 before, 8192 0.3653 / 0.753, 16384 0.810 / 2.005. LayerNorm: rowscao3 stays the best to 4096
//     (768 0.0449, rowsca alike; 2048 0.0983 / rowsca32's 0.1064; 4096 0.1842 / 0.1915), rowsca32 above it (8192
//     0.3653 / rowsca's 0.3802, 16384 0.810 / rowsca's 0.819, rows32's 0.971). RMSNorm: rowsca32 the best to 8192
//     (768 0.0320 / rows32's 0.0354, 2048 0.0679 / rowscao3's 0.0710, 4096 0.1264 / 0.1300, 8192 0.2474 / rows32l2's
//     0.2608, rowsca's 0.2755), rows16l2 at 16384 (0.5451 / rowsca32's 0.578).
//   LayerNorm backward with dropout, rowsca32e (dx0's dropout decisions before the first pass) against rowsca32, a
//     later run: 2048 0.1056 / 0.1049, 4096 0.2001 / 0.1974, 8192 0.3839 / 0.3742, 16384 0.8436 / 0.9434; so it takes
//     the sizes above 8192 alone.
struct SizeRule {
  int64_t max_hidden;
  NormVariant variant;
};
constexpr SizeRule kFwdRules[] = {{kNormMaxHidden, kRows32}};
constexpr SizeRule kBwdRules[] = {{768, kBlock}, {4096, kRows16L2}, {8192, kRowsCa}, {kNormMaxHidden, kRows32}};
constexpr SizeRule kBwdRules16[] = {{768, kRowsCa}, {8192, kRowsCa32}, {kNormMaxHidden, kRowsCa32E}};
constexpr SizeRule kBwdRules16Plain[] = {{4096, kRowsCaO3}, {kNormMaxHidden, kRowsCa32}};
constexpr SizeRule kBwdRmsRules[] = {{768, kRows32}, {8192, kRowsCa}, {kNormMaxHidden, kRows16L2}};
constexpr SizeRule kBwdRmsRulesPlain[] = {{768, kRows32}, {4096, kRowsCaO3}, {8192, kRowsCa}, {kNormMaxHidden, kRows16L2}};
constexpr SizeRule kBwdRmsRules16Plain[] = {{8192, kRowsCa32}, {kNormMaxHidden, kRows16L2}};

template <size_t N>
int pick_variant(const SizeRule (&rules)[N], int64_t hidden) {
  const int forced = env_variant();
  if (forced != kAuto) return forced;
  for (const SizeRule& r : rules)
    if (hidden <= r.max_hidden) return r.variant;
  return rules[N - 1].variant;
}

template <typename T, int kVec>
FlashAttnStatus launch_fwd(const NormFwdParams& p, cudaStream_t stream, const char* function) {
  if constexpr (kVec == 1) {
    return launch_fwd_block<T, kVec>(p, stream, function);
  } else {
    const int variant = pick_variant(kFwdRules, p.hidden);
    const int elems = variant == kBlock ? 0
                                        : rows_elems_f32(p.dtype == FLASHATTN_DTYPE_FLOAT32 || fwd_res_f32(p), p.hidden,
                                                         kVec, variant_elems(variant));
    if (elems == 0) return launch_fwd_block<T, kVec>(p, stream, function);
    return launch_fwd_rows<T, kVec>(p, elems, variant_l2(variant), stream, function);
  }
}

template <typename T, int kVec>
FlashAttnStatus launch_bwd(const NormBwdParams& p, cudaStream_t stream, const char* function) {
  const BwdSlots sl = bwd_slots(p);
  int64_t lanes = 0;
  FlashAttnStatus s = FLASHATTN_STATUS_OK;
  int elems = 0;  // columns per thread of the rows family; 0: the block family
  int variant = kBlock;
  DeviceInfo d{};
  RowscaShape rowsca;  // rpb 0: not rowsca
  if constexpr (kVec > 1) {
    s = current_device_info(&d, function);
    if (s != FLASHATTN_STATUS_OK) return s;
    // One norm without dropout has tables of its own: rowscao3 spills nothing there (its dropout kernels do). RMSNorm
    // with float32 x keeps the older one: ops_bench times RMSNorm with 16-bit x alone, and LayerNorm with float32 x
    // (norm_step_bwd) has rowsca32 8% behind rowsca at 2048.
    const bool plain = p.dropout_p == 0.f && p.weight1 == nullptr;
    const bool x16 = p.x_dtype != FLASHATTN_DTYPE_FLOAT32;
    if (p.is_rms) {
      variant = !plain ? pick_variant(kBwdRmsRules, p.hidden)
                : x16  ? pick_variant(kBwdRmsRules16Plain, p.hidden)
                       : pick_variant(kBwdRmsRulesPlain, p.hidden);
    } else if (!x16) {
      variant = pick_variant(kBwdRules, p.hidden);
    } else {
      variant = plain ? pick_variant(kBwdRules16Plain, p.hidden) : pick_variant(kBwdRules16, p.hidden);
    }
    if (variant == kRowsCa || variant == kRowsCa32 || variant == kRowsCaO3 || variant == kRowsCa32E)
      rowsca = rowsca_shape(p, sl, kVec, d.smem_optin, variant == kRowsCa32 || variant == kRowsCa32E,
                            variant == kRowsCaO3, variant == kRowsCa32E);
    if (variant != kBlock) elems = bwd_rows_elems(p, sl, kVec, variant_elems(variant), d.smem_optin);
  }
  if (rowsca.rpb > 0) {
    if constexpr (kVec > 1) s = launch_bwd_rowsca<T, kVec>(p, rowsca, sl, d, &lanes, stream, function);
  } else if (elems == 0) {
    s = launch_bwd_block<T, kVec>(p, sl, &lanes, stream, function);
  } else if constexpr (kVec > 1) {
    s = launch_bwd_rows<T, kVec>(p, elems, variant_l2(variant), sl, d, &lanes, stream, function);
  }
  if (s != FLASHATTN_STATUS_OK) return s;
  const dim3 grid(unsigned((p.hidden + 31) / 32), unsigned(sl.count));
  if (p.weight_dtype == FLASHATTN_DTYPE_FLOAT32) {
    norm_bwd_finalize_kernel<float><<<grid, dim3(32, 32), 0, stream>>>(p.workspace, lanes, p.hidden, sl.args);
  } else {
    norm_bwd_finalize_kernel<T><<<grid, dim3(32, 32), 0, stream>>>(p.workspace, lanes, p.hidden, sl.args);
  }
  return check_launch(function, "norm_bwd_finalize_kernel");
}

}  // namespace

FlashAttnStatus run_norm_fwd(const NormFwdParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int vec = fwd_vector_width(p);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    constexpr int kWide = 16 / sizeof(T);
    return vec == 1 ? launch_fwd<T, 1>(p, stream, function) : launch_fwd<T, kWide>(p, stream, function);
  });
}

FlashAttnStatus run_norm_bwd(const NormBwdParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int vec = bwd_vector_width(p);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    constexpr int kWide = 16 / sizeof(T);
    return vec == 1 ? launch_bwd<T, 1>(p, stream, function) : launch_bwd<T, kWide>(p, stream, function);
  });
}

}  // namespace flashattn
