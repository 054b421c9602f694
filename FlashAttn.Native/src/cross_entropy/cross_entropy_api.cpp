// FlashAttn_cross_entropy_*: validates every argument, fills CrossEntropyParams once, launches.
#include <climits>
#include <cmath>

#include "common/dtype.h"
#include "common/error.h"
#include "cross_entropy/cross_entropy.h"

using namespace flashattn;

namespace {

// Shared checks of the options; returns OK or the failure.
FlashAttnStatus check_options(const char* kFunction, FlashAttnDType dtype, int64_t rows, int64_t vocab,
                              float label_smoothing, float logit_scale, float lse_square_scale) {
  FA_CHECK(is_float_dtype(dtype), "dtype (%s) must be float32, float16 or bfloat16", dtype_name(dtype));
  FA_CHECK(rows >= 0, "rows (%lld) must be >= 0", (long long)rows);
  FA_CHECK(vocab >= 1, "vocab (%lld) must be >= 1", (long long)vocab);
  FA_CHECK(label_smoothing >= 0.f && label_smoothing <= 1.f, "label_smoothing (%g) must be in [0, 1]",
           double(label_smoothing));
  FA_CHECK(std::isfinite(logit_scale), "logit_scale (%g) must be finite", double(logit_scale));
  FA_CHECK(std::isfinite(lse_square_scale) && lse_square_scale >= 0.f, "lse_square_scale (%g) must be finite and >= 0",
           double(lse_square_scale));
  FA_CHECK(rows * cross_entropy_chunks(vocab, kCrossEntropyWarpChunk) <= INT_MAX,
           "rows (%lld) x vocabulary chunks (%lld) must fit in int32", (long long)rows,
           (long long)cross_entropy_chunks(vocab, kCrossEntropyWarpChunk));
  return FLASHATTN_STATUS_OK;
}

// The gradient's inputs and layout, shared by the backward and the fused forward + backward: the pointers every
// gradient needs and dlogits' rows against the logits' (in place when they alias).
FlashAttnStatus check_gradient(const char* kFunction, const void* logits, const void* dlogits, const int64_t* labels,
                               const float* dloss, int64_t vocab, int64_t logits_row_stride, int64_t dlogits_row_stride) {
  FA_CHECK(logits != nullptr, "logits must not be NULL");
  FA_CHECK(dlogits != nullptr, "dlogits must not be NULL");
  FA_CHECK(labels != nullptr, "labels must not be NULL");
  FA_CHECK(dloss != nullptr, "dloss must not be NULL");
  FA_CHECK(logits_row_stride >= vocab, "logits_row_stride (%lld) must be >= vocab (%lld)",
           (long long)logits_row_stride, (long long)vocab);
  FA_CHECK(dlogits_row_stride >= vocab, "dlogits_row_stride (%lld) must be >= vocab (%lld)",
           (long long)dlogits_row_stride, (long long)vocab);
  FA_CHECK(dlogits != logits || dlogits_row_stride == logits_row_stride,
           "dlogits aliases logits, so its row stride must equal logits_row_stride");
  return FLASHATTN_STATUS_OK;
}

// The caller's workspace: present, at least `need` bytes (what `size_query` reports), 4-byte aligned.
FlashAttnStatus check_workspace(const char* kFunction, const void* workspace, int64_t workspace_bytes, int64_t need,
                                const char* size_query) {
  FA_CHECK(workspace != nullptr, "workspace must not be NULL (%lld bytes needed)", (long long)need);
  FA_CHECK(workspace_bytes >= need, "workspace_bytes (%lld) must be >= %lld (%s)", (long long)workspace_bytes,
           (long long)need, size_query);
  FA_CHECK(is_aligned(workspace, 4), "workspace must be 4-byte aligned");
  return FLASHATTN_STATUS_OK;
}

// The options check_options validated, as every kernel of the loss reads them.
CrossEntropyParams options_params(FlashAttnDType dtype, int64_t rows, int64_t vocab, float label_smoothing,
                                  float logit_scale, float lse_square_scale, int64_t ignore_index) {
  CrossEntropyParams p{};
  p.dtype = dtype;
  p.rows = rows;
  p.vocab = vocab;
  p.label_smoothing = label_smoothing;
  p.logit_scale = logit_scale;
  p.lse_square_scale = lse_square_scale;
  p.ignore_index = ignore_index;
  return p;
}

}  // namespace

FLASHATTN_API int64_t FlashAttn_cross_entropy_fwd_workspace_size(int64_t rows, int64_t vocab) {
  return cross_entropy_fwd_workspace_bytes(rows, vocab);
}

FLASHATTN_API FlashAttnStatus FlashAttn_cross_entropy_fwd(
    const void* logits, FlashAttnDType dtype, const int64_t* labels, float* loss, float* z_loss, float* lse,
    int64_t rows, int64_t vocab, int64_t row_stride, float label_smoothing, float logit_scale,
    float lse_square_scale, int64_t ignore_index, void* workspace, int64_t workspace_bytes, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_cross_entropy_fwd";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FlashAttnStatus s = check_options(kFunction, dtype, rows, vocab, label_smoothing, logit_scale, lse_square_scale);
    if (s != FLASHATTN_STATUS_OK) return s;
    if (rows == 0) return FLASHATTN_STATUS_OK;
    FA_CHECK(logits != nullptr, "logits must not be NULL");
    FA_CHECK(labels != nullptr, "labels must not be NULL");
    FA_CHECK(loss != nullptr, "loss must not be NULL");
    FA_CHECK(lse != nullptr, "lse must not be NULL");
    FA_CHECK(row_stride >= vocab, "row_stride (%lld) must be >= vocab (%lld)", (long long)row_stride, (long long)vocab);
    s = check_workspace(kFunction, workspace, workspace_bytes, cross_entropy_fwd_workspace_bytes(rows, vocab),
                        "FlashAttn_cross_entropy_fwd_workspace_size");
    if (s != FLASHATTN_STATUS_OK) return s;
    CrossEntropyParams p =
        options_params(dtype, rows, vocab, label_smoothing, logit_scale, lse_square_scale, ignore_index);
    p.logits = logits;
    p.labels = labels;
    p.loss = loss;
    p.z_loss = z_loss;
    p.lse = lse;
    p.logits_row_stride = row_stride;
    p.workspace = static_cast<float*>(workspace);
    s = device_error_record(&p.error, kFunction);
    if (s != FLASHATTN_STATUS_OK) return s;
    return run_cross_entropy_fwd(p, stream, kFunction);
  });
}

FLASHATTN_API FlashAttnStatus FlashAttn_cross_entropy_bwd(
    const float* dloss, int64_t dloss_stride, const void* logits, const int64_t* labels, const float* lse,
    void* dlogits, FlashAttnDType dtype, int64_t rows, int64_t vocab, int64_t logits_row_stride,
    int64_t dlogits_row_stride, float label_smoothing, float logit_scale, float lse_square_scale,
    int64_t ignore_index, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_cross_entropy_bwd";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FlashAttnStatus s = check_options(kFunction, dtype, rows, vocab, label_smoothing, logit_scale, lse_square_scale);
    if (s != FLASHATTN_STATUS_OK) return s;
    FA_CHECK(dloss_stride >= 0, "dloss_stride (%lld) must be >= 0", (long long)dloss_stride);
    if (rows == 0) return FLASHATTN_STATUS_OK;
    s = check_gradient(kFunction, logits, dlogits, labels, dloss, vocab, logits_row_stride, dlogits_row_stride);
    if (s != FLASHATTN_STATUS_OK) return s;
    FA_CHECK(lse != nullptr, "lse must not be NULL");
    CrossEntropyParams p =
        options_params(dtype, rows, vocab, label_smoothing, logit_scale, lse_square_scale, ignore_index);
    p.logits = logits;
    p.dlogits = dlogits;
    p.labels = labels;
    p.lse = const_cast<float*>(lse);
    p.dloss = dloss;
    p.dloss_stride = dloss_stride;
    p.logits_row_stride = logits_row_stride;
    p.dlogits_row_stride = dlogits_row_stride;
    return run_cross_entropy_bwd(p, stream, kFunction);
  });
}

FLASHATTN_API int64_t FlashAttn_cross_entropy_fwd_bwd_workspace_size(int64_t rows, int64_t vocab) {
  return cross_entropy_fwd_bwd_workspace_bytes(rows, vocab);
}

FLASHATTN_API FlashAttnStatus FlashAttn_cross_entropy_fwd_bwd(
    const void* logits, void* dlogits, FlashAttnDType dtype, const int64_t* labels, const float* dloss,
    int64_t dloss_stride, float* loss, float* z_loss, float* dloss_applied, int64_t rows, int64_t vocab,
    int64_t logits_row_stride, int64_t dlogits_row_stride, float label_smoothing, float logit_scale,
    float lse_square_scale, int64_t ignore_index, void* workspace, int64_t workspace_bytes, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_cross_entropy_fwd_bwd";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FlashAttnStatus s = check_options(kFunction, dtype, rows, vocab, label_smoothing, logit_scale, lse_square_scale);
    if (s != FLASHATTN_STATUS_OK) return s;
    FA_CHECK(dloss_stride >= 0, "dloss_stride (%lld) must be >= 0", (long long)dloss_stride);
    if (rows == 0) return FLASHATTN_STATUS_OK;
    s = check_gradient(kFunction, logits, dlogits, labels, dloss, vocab, logits_row_stride, dlogits_row_stride);
    if (s != FLASHATTN_STATUS_OK) return s;
    FA_CHECK(loss != nullptr, "loss must not be NULL");
    FA_CHECK(dloss_applied != nullptr, "dloss_applied must not be NULL");
    s = check_workspace(kFunction, workspace, workspace_bytes, cross_entropy_fwd_bwd_workspace_bytes(rows, vocab),
                        "FlashAttn_cross_entropy_fwd_bwd_workspace_size");
    if (s != FLASHATTN_STATUS_OK) return s;
    CrossEntropyParams p =
        options_params(dtype, rows, vocab, label_smoothing, logit_scale, lse_square_scale, ignore_index);
    p.logits = logits;
    p.dlogits = dlogits;
    p.labels = labels;
    p.loss = loss;
    p.z_loss = z_loss;
    p.dloss = dloss;
    p.dloss_stride = dloss_stride;
    p.dloss_applied = dloss_applied;
    p.logits_row_stride = logits_row_stride;
    p.dlogits_row_stride = dlogits_row_stride;
    p.workspace = static_cast<float*>(workspace);
    s = device_error_record(&p.error, kFunction);
    if (s != FLASHATTN_STATUS_OK) return s;
    return run_cross_entropy_fwd_bwd(p, stream, kFunction);
  });
}

FLASHATTN_API FlashAttnStatus FlashAttn_cross_entropy_bwd_rescale(
    void* dlogits, FlashAttnDType dtype, const int64_t* labels, const float* dloss, int64_t dloss_stride,
    float* dloss_applied, int64_t rows, int64_t vocab, int64_t dlogits_row_stride, int64_t ignore_index,
    void* stream) {
  static constexpr const char* kFunction = "FlashAttn_cross_entropy_bwd_rescale";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(is_float_dtype(dtype), "dtype (%s) must be float32, float16 or bfloat16", dtype_name(dtype));
    FA_CHECK(rows >= 0, "rows (%lld) must be >= 0", (long long)rows);
    FA_CHECK(vocab >= 1, "vocab (%lld) must be >= 1", (long long)vocab);
    FA_CHECK(dloss_stride >= 0, "dloss_stride (%lld) must be >= 0", (long long)dloss_stride);
    if (rows == 0) return FLASHATTN_STATUS_OK;
    FA_CHECK(dlogits != nullptr, "dlogits must not be NULL");
    FA_CHECK(labels != nullptr, "labels must not be NULL");
    FA_CHECK(dloss != nullptr, "dloss must not be NULL");
    FA_CHECK(dloss_applied != nullptr, "dloss_applied must not be NULL");
    FA_CHECK(dlogits_row_stride >= vocab, "dlogits_row_stride (%lld) must be >= vocab (%lld)",
             (long long)dlogits_row_stride, (long long)vocab);
    FA_CHECK(rows <= INT_MAX, "rows (%lld) must fit in int32", (long long)rows);
    CrossEntropyParams p{};
    p.dlogits = dlogits;
    p.dtype = dtype;
    p.labels = labels;
    p.dloss = dloss;
    p.dloss_stride = dloss_stride;
    p.dloss_applied = dloss_applied;
    p.rows = rows;
    p.vocab = vocab;
    p.dlogits_row_stride = dlogits_row_stride;
    p.ignore_index = ignore_index;
    return run_cross_entropy_bwd_rescale(p, stream, kFunction);
  });
}
