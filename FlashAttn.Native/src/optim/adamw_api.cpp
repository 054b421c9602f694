// FlashAttn_optim_*: validates every argument, fills the tensor list once, launches.
#include <climits>
#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "common/error.h"
#include "optim/optim.h"

using namespace flashattn;

namespace {

constexpr int32_t kKnownFlags = FLASHATTN_OPTIM_TENSOR_MASTER | FLASHATTN_OPTIM_TENSOR_GRAD_SUM;

// The per-tensor checks both functions share; fills `out` from the arrays. `params` is NULL for the accumulation.
FlashAttnStatus read_tensors(const char* kFunction, int32_t count, void** params, const void** grads,
                             const int32_t* dtypes, const int64_t* numels, const int64_t* offsets,
                             const int32_t* flags, int64_t state_numel, std::vector<OptimTensor>& out) {
  FA_CHECK(grads != nullptr, "grads must not be NULL (count %d)", count);
  FA_CHECK(dtypes != nullptr, "dtypes must not be NULL (count %d)", count);
  FA_CHECK(numels != nullptr, "numels must not be NULL (count %d)", count);
  FA_CHECK(offsets != nullptr, "offsets must not be NULL (count %d)", count);
  FA_CHECK(flags != nullptr, "flags must not be NULL (count %d)", count);
  FA_CHECK(state_numel >= 0, "state_numel (%lld) must be >= 0", (long long)state_numel);
  out.resize(size_t(count));
  for (int32_t i = 0; i < count; ++i) {
    const auto dtype = FlashAttnDType(dtypes[i]);
    FA_CHECK(is_float_dtype(dtype), "dtypes[%d] (%d) must be float32, float16 or bfloat16", i, dtypes[i]);
    FA_CHECK((flags[i] & ~kKnownFlags) == 0, "flags[%d] (%d) holds unknown bits", i, flags[i]);
    FA_CHECK(!(flags[i] & FLASHATTN_OPTIM_TENSOR_MASTER) || dtype != FLASHATTN_DTYPE_FLOAT32,
             "flags[%d] has MASTER but dtypes[%d] is float32 (a float32 weight is its own master)", i, i);
    FA_CHECK(numels[i] >= 0, "numels[%d] (%lld) must be >= 0", i, (long long)numels[i]);
    // A chunk index of the kernels is an int32 (chunks of 8192 elements; 2^44 elements is far beyond any tensor).
    FA_CHECK(numels[i] < (int64_t(1) << 44), "numels[%d] (%lld) must be < 2^44", i, (long long)numels[i]);
    FA_CHECK(offsets[i] >= 0 && offsets[i] % 4 == 0, "offsets[%d] (%lld) must be >= 0 and a multiple of 4", i,
             (long long)offsets[i]);
    FA_CHECK(offsets[i] <= state_numel - numels[i], "offsets[%d] (%lld) + numels[%d] (%lld) exceed state_numel (%lld)",
             i, (long long)offsets[i], i, (long long)numels[i], (long long)state_numel);
    if (numels[i] > 0 && params != nullptr) {
      FA_CHECK(params[i] != nullptr, "params[%d] must not be NULL", i);
      FA_CHECK(grads[i] != nullptr || (flags[i] & FLASHATTN_OPTIM_TENSOR_GRAD_SUM),
               "grads[%d] must not be NULL unless flags[%d] has GRAD_SUM", i, i);
    } else if (numels[i] > 0) {
      FA_CHECK(grads[i] != nullptr, "grads[%d] must not be NULL", i);
    }
    OptimTensor& t = out[size_t(i)];
    t.param = params != nullptr ? params[i] : nullptr;
    t.grad = grads[i];
    t.numel = numels[i];
    t.offset = offsets[i];
    t.dtype = dtype;
    t.flags = flags[i];
  }
  return FLASHATTN_STATUS_OK;
}

}  // namespace

FLASHATTN_API int64_t FlashAttn_optim_adamw_workspace_size(int32_t count) {
  return adamw_workspace_bytes(count < 0 ? 0 : count);
}

FLASHATTN_API FlashAttnStatus FlashAttn_optim_adamw_step(
    int32_t count, void** params, const void** grads, const int32_t* dtypes, const int64_t* numels,
    const int64_t* offsets, const int32_t* flags, const int32_t* step_indices, const int32_t* groups, float* master,
    float* exp_avg, float* exp_avg_sq, const float* grad_sum, int64_t state_numel, float* steps, int32_t num_steps,
    const double* group_hparams, int32_t num_groups, const float* grad_scale, float max_norm, float* grad_norm,
    float* found_inf, void* workspace, int64_t workspace_bytes, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_optim_adamw_step";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(count >= 0, "count (%d) must be >= 0", count);
    FA_CHECK(!std::isnan(max_norm), "max_norm must not be NaN (<= 0: no clipping)");
    const int64_t need = adamw_workspace_bytes(count);
    FA_CHECK(workspace != nullptr, "workspace must not be NULL (%lld bytes needed)", (long long)need);
    FA_CHECK(workspace_bytes >= need, "workspace_bytes (%lld) must be >= %lld (FlashAttn_optim_adamw_workspace_size)",
             (long long)workspace_bytes, (long long)need);
    FA_CHECK(is_aligned(workspace, 16), "workspace must be 16-byte aligned");

    AdamWParams p{};
    if (count > 0) {
      FA_CHECK(params != nullptr, "params must not be NULL (count %d)", count);
      FA_CHECK(step_indices != nullptr, "step_indices must not be NULL (count %d)", count);
      FA_CHECK(groups != nullptr, "groups must not be NULL (count %d)", count);
      FA_CHECK(exp_avg != nullptr && is_aligned(exp_avg, 16), "exp_avg must be a 16-byte aligned device pointer");
      FA_CHECK(exp_avg_sq != nullptr && is_aligned(exp_avg_sq, 16),
               "exp_avg_sq must be a 16-byte aligned device pointer");
      FA_CHECK(steps != nullptr, "steps must not be NULL (count %d)", count);
      FA_CHECK(group_hparams != nullptr, "group_hparams must not be NULL (count %d)", count);
      FA_CHECK(num_groups >= 1 && num_groups <= 65535, "num_groups (%d) must be in [1, 65535]", num_groups);
      FlashAttnStatus s = read_tensors(kFunction, count, params, grads, dtypes, numels, offsets, flags, state_numel,
                                       p.tensors);
      if (s != FLASHATTN_STATUS_OK) return s;
      // a step count shared by two tensors would be read after the first launch incremented it (bias correction off)
      FA_CHECK(num_steps >= count, "num_steps (%d) must be >= count (%d): one step count per tensor", num_steps, count);
      std::vector<char> step_taken(size_t(num_steps), 0);
      for (int32_t i = 0; i < count; ++i) {
        FA_CHECK(step_indices[i] >= 0 && step_indices[i] < num_steps, "step_indices[%d] (%d) must be in [0, %d)", i,
                 step_indices[i], num_steps);
        FA_CHECK(!step_taken[size_t(step_indices[i])], "step_indices[%d] (%d) is another tensor's: each tensor has its own",
                 i, step_indices[i]);
        step_taken[size_t(step_indices[i])] = 1;
        FA_CHECK(groups[i] >= 0 && groups[i] < num_groups, "groups[%d] (%d) must be in [0, %d)", i, groups[i],
                 num_groups);
        if (flags[i] & FLASHATTN_OPTIM_TENSOR_MASTER) {
          FA_CHECK(master != nullptr && is_aligned(master, 16),
                   "master must be a 16-byte aligned device pointer (flags[%d] has MASTER)", i);
        }
        if (flags[i] & FLASHATTN_OPTIM_TENSOR_GRAD_SUM) {
          FA_CHECK(grad_sum != nullptr && is_aligned(grad_sum, 16),
                   "grad_sum must be a 16-byte aligned device pointer (flags[%d] has GRAD_SUM)", i);
        }
        p.tensors[size_t(i)].step_index = step_indices[i];
        p.tensors[size_t(i)].group = groups[i];
      }
    }
    p.master = master;
    p.exp_avg = exp_avg;
    p.exp_avg_sq = exp_avg_sq;
    p.grad_sum = grad_sum;
    p.steps = steps;
    p.group_hparams = group_hparams;
    p.grad_scale = grad_scale;
    p.max_norm = max_norm;
    p.grad_norm = grad_norm;
    p.found_inf = found_inf;
    p.workspace = workspace;
    return run_adamw_step(p, stream, kFunction);
  });
}

FLASHATTN_API FlashAttnStatus FlashAttn_optim_grad_accumulate(int32_t count, const void** grads, const int32_t* dtypes,
                                                             const int64_t* numels, const int64_t* offsets,
                                                             const int32_t* flags, float* grad_sum,
                                                             int64_t state_numel, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_optim_grad_accumulate";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(count >= 0, "count (%d) must be >= 0", count);
    if (count == 0) return FLASHATTN_STATUS_OK;
    FA_CHECK(grad_sum != nullptr && is_aligned(grad_sum, 16), "grad_sum must be a 16-byte aligned device pointer");
    GradAccumulateParams p{};
    FlashAttnStatus s =
        read_tensors(kFunction, count, nullptr, grads, dtypes, numels, offsets, flags, state_numel, p.tensors);
    if (s != FLASHATTN_STATUS_OK) return s;
    p.grad_sum = grad_sum;
    return run_grad_accumulate(p, stream, kFunction);
  });
}
