// Fused dropout + residual add + LayerNorm / RMSNorm, forward and backward.
// Memory-bound: the forward reads x0 (x1, residual) once and writes z (and the new residual) once,
// the row held in registers; the backward reads x and dz once and writes dx once, accumulating
// dweight/dbias per lane in registers, then a small deterministic kernel sums the lanes.
// Block = (threads_per_row, rows_per_block); each thread owns kIters vectors of kVec columns
// (16-byte accesses when every pointer, stride and the hidden size allow).

#include <type_traits>
#include <utility>

#include "common/cuda_check.cuh"
#include "common/dtype.h"
#include "common/numeric.cuh"
#include "common/static_switch.h"
#include "norm/norm.h"
#include "norm/philox.cuh"

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
// forward

template <typename T, int kVec, int kIters>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_kernel(const NormFwdParams p) {
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
// backward

// Lane (blockIdx.x * rows_per_block + threadIdx.y) handles rows lane, lane + lanes, ... and keeps
// its dweight/dbias partials in registers; they land in workspace slot s at [s][lane][col].
template <typename T, int kVec, int kIters, bool kParallel>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_kernel(const NormBwdParams p, int slot_dw0, int slot_db0,
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

template <typename T, int kVec>
FlashAttnStatus launch_fwd(const NormFwdParams& p, cudaStream_t stream, const char* function) {
  const int64_t nvec = p.hidden / kVec;
  return with_iters<T, kVec>(nvec, [&](auto iters) {
    constexpr int kIters = decltype(iters)::value;
    const int tpr = norm_threads_per_row(nvec, kIters);
    const int rpb = norm_rows_per_block(tpr);
    const int64_t blocks = (p.rows + rpb - 1) / rpb;
    if (blocks > 0x7fffffff) return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function, "too many rows (%lld)", (long long)p.rows);
    norm_fwd_kernel<T, kVec, kIters><<<unsigned(blocks), dim3(tpr, rpb), 0, stream>>>(p);
    return check_launch(function, "norm_fwd_kernel");
  });
}

template <typename T, int kVec>
FlashAttnStatus launch_bwd(const NormBwdParams& p, cudaStream_t stream, const char* function) {
  const int64_t nvec = p.hidden / kVec;
  int slots[4] = {-1, -1, -1, -1};
  void* outs[4] = {p.dweight0, p.dbias0, p.dweight1, p.dbias1};
  FinalizeArgs args{};
  int nslots = 0;
  for (int i = 0; i < 4; ++i) {
    if (outs[i] != nullptr) {
      args.out[nslots] = outs[i];
      slots[i] = nslots++;
    }
  }
  int64_t lanes = 0;
  FlashAttnStatus s = with_iters<T, kVec>(nvec, [&](auto iters) {
    constexpr int kIters = decltype(iters)::value;
    const int tpr = norm_threads_per_row(nvec, kIters);
    const int rpb = norm_rows_per_block(tpr);
    const int64_t want = p.lanes - 8;  // see norm_bwd_lanes
    const int64_t blocks = (want + rpb - 1) / rpb;
    lanes = blocks * rpb;
    return BOOL_SWITCH(p.weight1 != nullptr, kParallel, [&] {
      norm_bwd_kernel<T, kVec, kIters, kParallel>
          <<<unsigned(blocks), dim3(tpr, rpb), 0, stream>>>(p, slots[0], slots[1], slots[2], slots[3]);
      return check_launch(function, "norm_bwd_kernel");
    });
  });
  if (s != FLASHATTN_STATUS_OK) return s;
  const dim3 grid(unsigned((p.hidden + 31) / 32), unsigned(nslots));
  if (p.weight_dtype == FLASHATTN_DTYPE_FLOAT32) {
    norm_bwd_finalize_kernel<float><<<grid, dim3(32, 32), 0, stream>>>(p.workspace, lanes, p.hidden, args);
  } else {
    norm_bwd_finalize_kernel<T><<<grid, dim3(32, 32), 0, stream>>>(p.workspace, lanes, p.hidden, args);
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
