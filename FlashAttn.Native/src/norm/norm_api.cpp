// FlashAttn_norm_*: validates every argument, fills NormFwdParams / NormBwdParams once, launches.
#include <cmath>
#include <climits>

#include "common/dropout_threshold.h"
#include "common/dtype.h"
#include "common/error.h"
#include "norm/norm.h"

using namespace flashattn;

namespace {

int norm_slots(bool has_bias0, bool has_weight1, bool has_bias1) {
  return 1 + (has_bias0 ? 1 : 0) + (has_weight1 ? 1 + (has_bias1 ? 1 : 0) : 0);
}

}  // namespace

FLASHATTN_API int64_t FlashAttn_norm_bwd_workspace_size(int64_t rows, int64_t hidden, int32_t has_bias0,
                                                        int32_t has_weight1, int32_t has_bias1) {
  if (rows <= 0 || hidden <= 0 || hidden > kNormMaxHidden) return 0;
  return norm_bwd_workspace_bytes(rows, hidden, norm_slots(has_bias0 != 0, has_weight1 != 0, has_bias1 != 0));
}

FLASHATTN_API FlashAttnStatus FlashAttn_norm_fwd(
    const void* x0, const void* x1, const void* residual, FlashAttnDType dtype, FlashAttnDType residual_dtype,
    const void* weight0, const void* bias0, const void* weight1, const void* bias1, FlashAttnDType weight_dtype,
    const float* rowscale, void* z0, void* z1, void* residual_out, FlashAttnDType residual_out_dtype,
    float* mean, float* rstd, uint8_t* dropout_mask0, uint8_t* dropout_mask1, int64_t rows, int64_t hidden,
    int64_t x0_row_stride, int64_t x1_row_stride, int64_t residual_row_stride, int64_t z_row_stride,
    int64_t residual_out_row_stride, float epsilon, float dropout_p, uint64_t seed, uint64_t offset,
    int32_t is_rms_norm, int32_t zero_centered_weight, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_norm_fwd";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(is_float_dtype(dtype), "dtype (%s) must be float32, float16 or bfloat16", dtype_name(dtype));
    FA_CHECK(residual_dtype == dtype || residual_dtype == FLASHATTN_DTYPE_FLOAT32,
             "residual_dtype (%s) must be dtype (%s) or float32", dtype_name(residual_dtype), dtype_name(dtype));
    FA_CHECK(residual_out_dtype == dtype || residual_out_dtype == FLASHATTN_DTYPE_FLOAT32,
             "residual_out_dtype (%s) must be dtype (%s) or float32", dtype_name(residual_out_dtype), dtype_name(dtype));
    FA_CHECK(weight_dtype == dtype || weight_dtype == FLASHATTN_DTYPE_FLOAT32,
             "weight_dtype (%s) must be dtype (%s) or float32", dtype_name(weight_dtype), dtype_name(dtype));
    FA_CHECK(rows >= 0, "rows (%lld) must be >= 0", (long long)rows);
    FA_CHECK(hidden >= 1 && hidden <= kNormMaxHidden, "hidden (%lld) must be between 1 and %lld", (long long)hidden,
             (long long)kNormMaxHidden);
    FA_CHECK(std::isfinite(epsilon) && epsilon >= 0.f, "epsilon (%g) must be finite and >= 0", double(epsilon));
    FA_CHECK(dropout_p >= 0.f && dropout_p < 1.f, "dropout_p (%g) must be in [0, 1)", double(dropout_p));
    FA_CHECK(is_rms_norm == 0 || is_rms_norm == 1, "is_rms_norm (%d) must be 0 or 1", is_rms_norm);
    FA_CHECK(zero_centered_weight == 0 || zero_centered_weight == 1, "zero_centered_weight (%d) must be 0 or 1",
             zero_centered_weight);
    FA_CHECK(!(is_rms_norm && mean != nullptr), "mean must be NULL for RMSNorm");
    FA_CHECK(bias1 == nullptr || weight1 != nullptr, "bias1 needs weight1");
    FA_CHECK((z1 != nullptr) == (weight1 != nullptr), "z1 must be given exactly when weight1 is");
    FA_CHECK(dropout_mask1 == nullptr || x1 != nullptr, "dropout_mask1 needs x1");
    FA_CHECK(dropout_mask0 == nullptr || dropout_p > 0.f, "dropout_mask0 needs dropout_p > 0");
    FA_CHECK(dropout_mask1 == nullptr || dropout_p > 0.f, "dropout_mask1 needs dropout_p > 0");
    if (rows == 0) return FLASHATTN_STATUS_OK;

    FA_CHECK(x0 != nullptr, "x0 must not be NULL");
    FA_CHECK(weight0 != nullptr, "weight0 must not be NULL");
    FA_CHECK(z0 != nullptr, "z0 must not be NULL");
    FA_CHECK(rstd != nullptr, "rstd must not be NULL");
    FA_CHECK(is_rms_norm || mean != nullptr, "mean must not be NULL for LayerNorm");
    FA_CHECK(x0_row_stride >= hidden, "x0_row_stride (%lld) must be >= hidden (%lld)", (long long)x0_row_stride,
             (long long)hidden);
    FA_CHECK(x1 == nullptr || x1_row_stride >= hidden, "x1_row_stride (%lld) must be >= hidden (%lld)",
             (long long)x1_row_stride, (long long)hidden);
    FA_CHECK(residual == nullptr || residual_row_stride >= hidden,
             "residual_row_stride (%lld) must be >= hidden (%lld)", (long long)residual_row_stride, (long long)hidden);
    FA_CHECK(z_row_stride >= hidden, "z_row_stride (%lld) must be >= hidden (%lld)", (long long)z_row_stride,
             (long long)hidden);
    FA_CHECK(residual_out == nullptr || residual_out_row_stride >= hidden,
             "residual_out_row_stride (%lld) must be >= hidden (%lld)", (long long)residual_out_row_stride,
             (long long)hidden);
    FA_CHECK(rows <= (int64_t(INT_MAX) - 1) / 2 && rows * hidden <= (INT64_MAX / 4),
             "rows (%lld) is too large", (long long)rows);

    NormFwdParams p{};
    p.x0 = x0;
    p.x1 = x1;
    p.residual = residual;
    p.weight0 = weight0;
    p.bias0 = bias0;
    p.weight1 = weight1;
    p.bias1 = bias1;
    p.rowscale = rowscale;
    p.z0 = z0;
    p.z1 = z1;
    p.residual_out = residual_out;
    p.mean = mean;
    p.rstd = rstd;
    p.mask0 = dropout_mask0;
    p.mask1 = dropout_mask1;
    p.dtype = dtype;
    p.residual_dtype = residual_dtype;
    p.residual_out_dtype = residual_out_dtype;
    p.weight_dtype = weight_dtype;
    p.rows = rows;
    p.hidden = hidden;
    p.x0_row_stride = x0_row_stride;
    p.x1_row_stride = x1 != nullptr ? x1_row_stride : hidden;
    p.residual_row_stride = residual != nullptr ? residual_row_stride : hidden;
    p.z_row_stride = z_row_stride;
    p.residual_out_row_stride = residual_out != nullptr ? residual_out_row_stride : hidden;
    p.epsilon = epsilon;
    p.dropout_p = dropout_p;
    p.dropout_scale = dropout_p > 0.f ? float(1.0 / (1.0 - double(dropout_p))) : 1.f;
    p.keep_threshold = dropout_threshold16(dropout_p);
    p.seed = seed;
    p.offset = offset;
    p.is_rms = is_rms_norm != 0;
    p.zero_centered = zero_centered_weight != 0;
    return run_norm_fwd(p, stream, kFunction);
  });
}

FLASHATTN_API FlashAttnStatus FlashAttn_norm_bwd(
    const void* dz0, const void* dz1, const void* dresidual_out, const void* x, FlashAttnDType x_dtype,
    const void* weight0, const void* weight1, FlashAttnDType weight_dtype, const float* mean, const float* rstd,
    const float* rowscale, void* dx0, void* dx1, void* dresidual, FlashAttnDType residual_dtype, void* dweight0,
    void* dbias0, void* dweight1, void* dbias1, FlashAttnDType dtype, int64_t rows, int64_t hidden,
    int64_t dz_row_stride, int64_t dresidual_out_row_stride, int64_t x_row_stride, int64_t dx_row_stride,
    int64_t dresidual_row_stride, float dropout_p, uint64_t seed, uint64_t offset, int32_t is_rms_norm,
    int32_t zero_centered_weight, void* workspace, int64_t workspace_bytes, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_norm_bwd";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(is_float_dtype(dtype), "dtype (%s) must be float32, float16 or bfloat16", dtype_name(dtype));
    FA_CHECK(x_dtype == dtype || x_dtype == FLASHATTN_DTYPE_FLOAT32, "x_dtype (%s) must be dtype (%s) or float32",
             dtype_name(x_dtype), dtype_name(dtype));
    FA_CHECK(residual_dtype == dtype || residual_dtype == FLASHATTN_DTYPE_FLOAT32,
             "residual_dtype (%s) must be dtype (%s) or float32", dtype_name(residual_dtype), dtype_name(dtype));
    FA_CHECK(weight_dtype == dtype || weight_dtype == FLASHATTN_DTYPE_FLOAT32,
             "weight_dtype (%s) must be dtype (%s) or float32", dtype_name(weight_dtype), dtype_name(dtype));
    FA_CHECK(rows >= 0, "rows (%lld) must be >= 0", (long long)rows);
    FA_CHECK(hidden >= 1 && hidden <= kNormMaxHidden, "hidden (%lld) must be between 1 and %lld", (long long)hidden,
             (long long)kNormMaxHidden);
    FA_CHECK(dropout_p >= 0.f && dropout_p < 1.f, "dropout_p (%g) must be in [0, 1)", double(dropout_p));
    FA_CHECK(is_rms_norm == 0 || is_rms_norm == 1, "is_rms_norm (%d) must be 0 or 1", is_rms_norm);
    FA_CHECK(zero_centered_weight == 0 || zero_centered_weight == 1, "zero_centered_weight (%d) must be 0 or 1",
             zero_centered_weight);
    FA_CHECK((dz1 != nullptr) == (weight1 != nullptr), "dz1 must be given exactly when weight1 is");
    FA_CHECK((dweight1 != nullptr) == (weight1 != nullptr), "dweight1 must be given exactly when weight1 is");
    FA_CHECK(dbias1 == nullptr || weight1 != nullptr, "dbias1 needs weight1");
    if (rows == 0) {
      // no rows: the parameter gradients are zero, but nothing may run without CUDA work; the
      // managed side zero-fills them itself.
      return FLASHATTN_STATUS_OK;
    }
    FA_CHECK(dz0 != nullptr, "dz0 must not be NULL");
    FA_CHECK(x != nullptr, "x must not be NULL");
    FA_CHECK(weight0 != nullptr, "weight0 must not be NULL");
    FA_CHECK(rstd != nullptr, "rstd must not be NULL");
    FA_CHECK(is_rms_norm || mean != nullptr, "mean must not be NULL for LayerNorm");
    FA_CHECK(dx0 != nullptr, "dx0 must not be NULL");
    FA_CHECK(dweight0 != nullptr, "dweight0 must not be NULL");
    FA_CHECK(dz_row_stride >= hidden, "dz_row_stride (%lld) must be >= hidden (%lld)", (long long)dz_row_stride,
             (long long)hidden);
    FA_CHECK(x_row_stride >= hidden, "x_row_stride (%lld) must be >= hidden (%lld)", (long long)x_row_stride,
             (long long)hidden);
    FA_CHECK(dx_row_stride >= hidden, "dx_row_stride (%lld) must be >= hidden (%lld)", (long long)dx_row_stride,
             (long long)hidden);
    FA_CHECK(dresidual_out == nullptr || dresidual_out_row_stride >= hidden,
             "dresidual_out_row_stride (%lld) must be >= hidden (%lld)", (long long)dresidual_out_row_stride,
             (long long)hidden);
    FA_CHECK(dresidual == nullptr || dresidual_row_stride >= hidden,
             "dresidual_row_stride (%lld) must be >= hidden (%lld)", (long long)dresidual_row_stride,
             (long long)hidden);
    FA_CHECK(rows <= (int64_t(INT_MAX) - 1) / 2, "rows (%lld) is too large", (long long)rows);
    const int slots = norm_slots(dbias0 != nullptr, weight1 != nullptr, dbias1 != nullptr);
    const int64_t need = norm_bwd_workspace_bytes(rows, hidden, slots);
    FA_CHECK(workspace != nullptr, "workspace must not be NULL (%lld bytes needed)", (long long)need);
    FA_CHECK(workspace_bytes >= need, "workspace_bytes (%lld) must be >= %lld (FlashAttn_norm_bwd_workspace_size)",
             (long long)workspace_bytes, (long long)need);
    FA_CHECK(is_aligned(workspace, 16), "workspace must be 16-byte aligned");

    NormBwdParams p{};
    p.dz0 = dz0;
    p.dz1 = dz1;
    p.dresidual_out = dresidual_out;
    p.x = x;
    p.weight0 = weight0;
    p.weight1 = weight1;
    p.mean = is_rms_norm ? nullptr : mean;
    p.rstd = rstd;
    p.rowscale = rowscale;
    p.dx0 = dx0;
    p.dx1 = dx1;
    p.dresidual = dresidual;
    p.dweight0 = dweight0;
    p.dbias0 = dbias0;
    p.dweight1 = dweight1;
    p.dbias1 = dbias1;
    p.dtype = dtype;
    p.x_dtype = x_dtype;
    p.weight_dtype = weight_dtype;
    p.residual_dtype = residual_dtype;
    p.rows = rows;
    p.hidden = hidden;
    p.dz_row_stride = dz_row_stride;
    p.dresidual_out_row_stride = dresidual_out != nullptr ? dresidual_out_row_stride : hidden;
    p.x_row_stride = x_row_stride;
    p.dx_row_stride = dx_row_stride;
    p.dresidual_row_stride = dresidual != nullptr ? dresidual_row_stride : hidden;
    p.dropout_p = dropout_p;
    p.dropout_scale = dropout_p > 0.f ? float(1.0 / (1.0 - double(dropout_p))) : 1.f;
    p.keep_threshold = dropout_threshold16(dropout_p);
    p.seed = seed;
    p.offset = offset;
    p.is_rms = is_rms_norm != 0;
    p.zero_centered = zero_centered_weight != 0;
    p.workspace = static_cast<float*>(workspace);
    p.lanes = norm_bwd_lanes(rows, hidden);
    return run_norm_bwd(p, stream, kFunction);
  });
}
