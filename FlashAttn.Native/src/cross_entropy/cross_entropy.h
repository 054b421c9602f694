// Softmax cross-entropy (with label smoothing, logit scale and z-loss): the params struct filled at
// the ABI (cross_entropy_api.cpp) and the launchers (cross_entropy.cu, or cuda_stub.cpp).
#pragma once

#include <cstdint>

#include "common/device_error.h"
#include "flashattn.h"

namespace flashattn {

// Columns of one row handled by one warp; the forward combines the chunks of a row.
constexpr int64_t kCrossEntropyWarpChunk = 4096;

inline int64_t cross_entropy_chunks(int64_t vocab, int64_t width) { return (vocab + width - 1) / width; }

// Per (row, chunk): running max, sum of exponentials and sum of logits (float32 each).
inline int64_t cross_entropy_fwd_workspace_bytes(int64_t rows, int64_t vocab) {
  if (rows <= 0 || vocab <= 0) return 0;
  return rows * cross_entropy_chunks(vocab, kCrossEntropyWarpChunk) * 3 * int64_t(sizeof(float));
}

// fwd_bwd: the forward's workspace, then lse (rows,) for rows that do not fit the one-pass kernel.
inline int64_t cross_entropy_fwd_bwd_workspace_bytes(int64_t rows, int64_t vocab) {
  if (rows <= 0 || vocab <= 0) return 0;
  return cross_entropy_fwd_workspace_bytes(rows, vocab) + rows * int64_t(sizeof(float));
}

struct CrossEntropyParams {
  const void* logits;
  void* dlogits;         // backward only; may be logits
  FlashAttnDType dtype;
  const int64_t* labels;
  float* loss;           // forward
  float* z_loss;         // forward, or nullptr
  float* lse;            // written by the forward, read by the backward
  const float* dloss;    // backward; fwd_bwd: the expected one
  int64_t dloss_stride;
  float* dloss_applied;  // fwd_bwd and rescale: the dloss each row's dlogits hold
  int64_t rows, vocab, logits_row_stride, dlogits_row_stride;
  float label_smoothing, logit_scale, lse_square_scale;
  int64_t ignore_index;
  float* workspace;      // forward
  DeviceErrorRecord* error;  // forward: where a label outside [0, vocab) is recorded
};

FlashAttnStatus run_cross_entropy_fwd(const CrossEntropyParams& params, void* stream, const char* function);
FlashAttnStatus run_cross_entropy_bwd(const CrossEntropyParams& params, void* stream, const char* function);
// Forward and backward in one pass (a row per block in shared memory), or fwd then bwd where a row does not fit.
FlashAttnStatus run_cross_entropy_fwd_bwd(const CrossEntropyParams& params, void* stream, const char* function);
FlashAttnStatus run_cross_entropy_bwd_rescale(const CrossEntropyParams& params, void* stream, const char* function);

}  // namespace flashattn
