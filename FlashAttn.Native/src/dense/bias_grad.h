// The bias gradient of a linear, db (N,) = sum over the M rows of dy (M, N), as a kernel of our own beside cuBLASLt's
// BGRADB epilogue: the params struct filled once at the ABI (bias_grad_api.cpp), the launcher (bias_grad.cu, or
// cuda_stub.cpp in the CPU-only flavour) and the workspace rule both sides share. All strides are in elements.
#pragma once

#include <cstdint>

#include "flashattn.h"

namespace flashattn {

// A block is kBiasGradThreadsX x kBiasGradThreadsY threads (columns x rows); each thread keeps kBiasGradUnroll rows'
// loads in flight, so a split of the rows is at least kBiasGradMinRows long (the partial sums' bytes then stay at
// most 4 / (2 * 64) = 3% of a bf16 dy's).
constexpr int kBiasGradThreadsX = 32;
constexpr int kBiasGradThreadsY = 8;
constexpr int kBiasGradUnroll = 8;
constexpr int64_t kBiasGradMinRows = int64_t(kBiasGradThreadsY) * kBiasGradUnroll;
// At most this many row splits (grid.y), whatever the GPU: the workspace size depends on the sizes alone.
constexpr int64_t kBiasGradMaxSplits = 1024;

// The most row splits the launcher may choose for `rows` rows (1: db is written directly, no workspace).
inline int64_t bias_grad_max_splits(int64_t rows) {
  const int64_t by_rows = (rows + kBiasGradMinRows - 1) / kBiasGradMinRows;
  return by_rows < 1 ? 1 : by_rows > kBiasGradMaxSplits ? kBiasGradMaxSplits : by_rows;
}

// Bytes of workspace: float32 partial sums (splits, cols), none when one split covers every row.
inline int64_t bias_grad_workspace_bytes(int64_t rows, int64_t cols) {
  const int64_t splits = bias_grad_max_splits(rows);
  if (splits <= 1 || cols <= 0) return 0;
  return splits * cols * int64_t(sizeof(float));
}

struct BiasGradParams {
  const void* dy;       // (rows, cols), rows row_stride apart
  void* db;             // (cols,), dy's dtype
  FlashAttnDType dtype;  // of dy and db
  int64_t rows, cols, row_stride;
  float* workspace;     // (max splits, cols) float32, or nullptr when bias_grad_workspace_bytes is 0
};

FlashAttnStatus run_bias_grad(const BiasGradParams& params, void* stream, const char* function);

}  // namespace flashattn
