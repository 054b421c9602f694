// Fused dropout + residual add + LayerNorm / RMSNorm: the params structs filled once at the ABI
// (norm_api.cpp), the launch configuration shared by the ABI's workspace query and the launchers
// (norm.cu, or cuda_stub.cpp in the CPU-only flavour). All strides are in elements.
#pragma once

#include <algorithm>
#include <cstdint>

#include "flashattn.h"

namespace flashattn {

constexpr int64_t kNormMaxHidden = 16384;

struct NormFwdParams {
  const void* x0;
  const void* x1;        // or nullptr
  const void* residual;  // or nullptr
  const void* weight0;
  const void* bias0;     // or nullptr
  const void* weight1;   // or nullptr: no second norm
  const void* bias1;     // or nullptr
  const float* rowscale; // or nullptr
  void* z0;
  void* z1;              // or nullptr
  void* residual_out;    // or nullptr
  float* mean;           // nullptr for RMSNorm
  float* rstd;
  uint8_t* mask0;
  uint8_t* mask1;
  FlashAttnDType dtype, residual_dtype, residual_out_dtype, weight_dtype;
  int64_t rows, hidden;
  int64_t x0_row_stride, x1_row_stride, residual_row_stride, z_row_stride, residual_out_row_stride;
  float epsilon;
  float dropout_p;
  float dropout_scale;          // 1 / (1 - p)
  uint32_t keep_threshold;      // dropout_threshold16(dropout_p): keep when the 16-bit half < keep_threshold
  uint64_t seed, offset;
  bool is_rms, zero_centered;
};

struct NormBwdParams {
  const void* dz0;
  const void* dz1;            // or nullptr
  const void* dresidual_out;  // or nullptr
  const void* x;
  const void* weight0;
  const void* weight1;        // or nullptr
  const float* mean;          // nullptr for RMSNorm
  const float* rstd;
  const float* rowscale;      // or nullptr
  void* dx0;
  void* dx1;                  // or nullptr
  void* dresidual;            // or nullptr
  void* dweight0;
  void* dbias0;               // or nullptr
  void* dweight1;             // or nullptr
  void* dbias1;               // or nullptr
  FlashAttnDType dtype, x_dtype, weight_dtype, residual_dtype;
  int64_t rows, hidden;
  int64_t dz_row_stride, dresidual_out_row_stride, x_row_stride, dx_row_stride, dresidual_row_stride;
  float dropout_p;
  float dropout_scale;
  uint32_t keep_threshold;
  uint64_t seed, offset;
  bool is_rms, zero_centered;
  float* workspace;           // slots x lanes x hidden float32 partials
  int64_t lanes;              // lanes the workspace was sized for (norm_bwd_lanes)
};

// Threads per row (a multiple of 32, at most kNormMaxThreadsPerRow) and rows per block for
// `nvec` vectors of a row handled kIters at a time by each thread.
constexpr int kNormMaxThreadsPerRow = 512;
constexpr int kNormBlockThreads = 256;  // target block size when several rows share a block

inline int norm_threads_per_row(int64_t nvec, int iters) {
  const int64_t t = (nvec + iters - 1) / iters;
  return int(std::max<int64_t>(32, (t + 31) / 32 * 32));
}
inline int norm_rows_per_block(int threads_per_row) {
  return std::max(1, kNormBlockThreads / threads_per_row);
}

// Lanes of the backward (each owns one row of dweight/dbias partials): enough to fill the GPU,
// few enough that the partials stay small next to the activations.
inline int64_t norm_bwd_lanes(int64_t rows, int64_t hidden) {
  const int64_t cap = std::min<int64_t>(1024, std::max<int64_t>(128, (int64_t(1) << 22) / std::max<int64_t>(hidden, 1)));
  return std::min(rows, cap) + 8;  // + the rounding up to whole blocks (at most 8 rows per block)
}

inline int64_t norm_bwd_workspace_bytes(int64_t rows, int64_t hidden, int slots) {
  if (rows <= 0 || hidden <= 0) return 0;
  return norm_bwd_lanes(rows, hidden) * hidden * slots * int64_t(sizeof(float));
}

FlashAttnStatus run_norm_fwd(const NormFwdParams& params, void* stream, const char* function);
FlashAttnStatus run_norm_bwd(const NormBwdParams& params, void* stream, const char* function);

}  // namespace flashattn
