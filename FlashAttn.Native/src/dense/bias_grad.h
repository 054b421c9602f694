// The bias gradient of a linear, db (N,) = sum over the M rows of dy (M, N), as a kernel of our own beside cuBLASLt's
// BGRADB epilogue: the params struct filled once at the ABI (bias_grad_api.cpp), the launcher (bias_grad.cu, or
// cuda_stub.cpp in the CPU-only flavour) and the workspace rule both sides share. All strides are in elements.
#pragma once

#include <cstdint>

#include "flashattn.h"

namespace flashattn {

// A block is kBiasGradThreads threads over kBiasGradBlockCols columns (a 16-bit row's piece is one 128-byte line) of
// one split of the rows; each thread keeps kBiasGradUnroll rows' loads in flight. The 16-bit path's block is 8 threads
// (16 bytes each) across by 32 down, so a split is at least kBiasGradMinRows = 32 x 8 rows (one unrolled step of
// every thread there, several on the float32 and scalar paths' shorter blocks): the partial sums' bytes then stay at
// most 4 / (2 * 256) = 0.8% of a 16-bit dy's.
constexpr int kBiasGradThreads = 256;
constexpr int kBiasGradBlockCols = 64;
constexpr int kBiasGradUnroll = 8;
constexpr int64_t kBiasGradMinRows = int64_t(kBiasGradThreads / (kBiasGradBlockCols / 8)) * kBiasGradUnroll;
// At most this many row splits (grid.y), whatever the GPU: the workspace size depends on the sizes alone, and the last
// block of a column block adds at most 256 x 64 partial sums (64 KB) after the others are done.
constexpr int64_t kBiasGradMaxSplits = 256;

// The most row splits the launcher may choose for `rows` rows (1: db is written directly, no workspace).
inline int64_t bias_grad_max_splits(int64_t rows) {
  const int64_t by_rows = (rows + kBiasGradMinRows - 1) / kBiasGradMinRows;
  return by_rows < 1 ? 1 : by_rows > kBiasGradMaxSplits ? kBiasGradMaxSplits : by_rows;
}

// Column blocks (grid.x): one arrival counter each.
inline int64_t bias_grad_col_blocks(int64_t cols) { return (cols + kBiasGradBlockCols - 1) / kBiasGradBlockCols; }

// Bytes of workspace, none when one split covers every row: an arrival counter a column block (uint32), then the
// float32 partial sums (splits, cols). Zero at the first call; every call leaves it zero again.
inline int64_t bias_grad_workspace_bytes(int64_t rows, int64_t cols) {
  const int64_t splits = bias_grad_max_splits(rows);
  if (splits <= 1 || cols <= 0) return 0;
  return bias_grad_col_blocks(cols) * int64_t(sizeof(uint32_t)) + splits * cols * int64_t(sizeof(float));
}

struct BiasGradParams {
  const void* dy;       // (rows, cols), rows row_stride apart
  void* db;             // (cols,), dy's dtype
  FlashAttnDType dtype;  // of dy and db
  int64_t rows, cols, row_stride;
  uint32_t* counters;   // (col blocks,) blocks of a column block done so far, zero between calls; the workspace's start
  float* partial;       // (max splits, cols) float32, after the counters; both nullptr when bias_grad_workspace_bytes is 0
};

FlashAttnStatus run_bias_grad(const BiasGradParams& params, void* stream, const char* function);

}  // namespace flashattn
