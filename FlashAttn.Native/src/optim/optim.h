// Multi-tensor AdamW and float32 gradient accumulation: the tensor list filled once at the ABI (adamw_api.cpp)
// and the launchers (adamw.cu, or cuda_stub.cpp in the CPU-only flavour).
#pragma once

#include <cstdint>
#include <vector>

#include "flashattn.h"

namespace flashattn {

// One tensor of a multi-tensor call. Its float32 state (master weight, exp_avg, exp_avg_sq, gradient sum) lies at
// `offset` of each flat state array, which the caller allocates once for all its tensors.
struct OptimTensor {
  void* param;         // (numel,) of dtype, contiguous; written by the AdamW step
  const void* grad;    // (numel,) of dtype, contiguous; nullptr: none since the last accumulation (GRAD_SUM only)
  int64_t numel;
  int64_t offset;      // elements, a multiple of 4 (16-byte aligned float32 state)
  int32_t step_index;  // into AdamWParams::steps
  int32_t group;       // row of AdamWParams::group_hparams
  FlashAttnDType dtype;
  int32_t flags;       // FlashAttnOptimTensorFlag bits
};

struct AdamWParams {
  std::vector<OptimTensor> tensors;
  float* master;               // flat float32 state; master only read/written for MASTER tensors
  float* exp_avg;
  float* exp_avg_sq;
  const float* grad_sum;       // read for GRAD_SUM tensors
  float* steps;                // float32 step counts (t of the bias corrections)
  const double* group_hparams; // (groups, 5): lr, beta1, beta2, eps, weight_decay
  const float* grad_scale;     // device scalar the gradients are divided by; nullptr: 1
  float max_norm;              // <= 0: no clipping
  float* grad_norm;            // device scalar or nullptr
  float* found_inf;            // device scalar or nullptr
  void* workspace;             // adamw_workspace_bytes(tensors.size())
};

struct GradAccumulateParams {
  std::vector<OptimTensor> tensors;  // step_index and group unused
  float* grad_sum;
};

// Tensors per launch: the per-launch table travels as kernel parameters (4 KB at most).
constexpr int kOptimTensorsPerLaunch = 80;
// Blocks of the norm kernel per launch: fixed, so that the partial sums (one per block) and their reduction order
// depend on the inputs only, never on the GPU. 1024 blocks of 256 threads are one wave on an H100/H200 (132 SMs x 8).
constexpr int kOptimNormBlocks = 1024;

inline int64_t optim_launches(int64_t count) { return (count + kOptimTensorsPerLaunch - 1) / kOptimTensorsPerLaunch; }

// Workspace layout: 16 bytes of control (clip coefficient, skip flag), one uint32 ticket per launch (padded to 16
// bytes), then kOptimNormBlocks float32 partial sums per launch.
inline int64_t optim_tickets_offset() { return 16; }
inline int64_t optim_partials_offset(int64_t count) { return 16 + (optim_launches(count) * 4 + 15) / 16 * 16; }
inline int64_t adamw_workspace_bytes(int64_t count) {
  return optim_partials_offset(count) + optim_launches(count) * kOptimNormBlocks * 4;
}

FlashAttnStatus run_adamw_step(const AdamWParams& params, void* stream, const char* function);
FlashAttnStatus run_grad_accumulate(const GradAccumulateParams& params, void* stream, const char* function);

}  // namespace flashattn
