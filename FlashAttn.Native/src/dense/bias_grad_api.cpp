// FlashAttn_dense_bias_grad: validates every argument, fills BiasGradParams once, launches.
#include "common/dtype.h"
#include "common/error.h"
#include "dense/bias_grad.h"

using namespace flashattn;

FLASHATTN_API int64_t FlashAttn_dense_bias_grad_workspace_size(int64_t rows, int64_t cols) {
  return bias_grad_workspace_bytes(rows, cols);
}

FLASHATTN_API FlashAttnStatus FlashAttn_dense_bias_grad(const void* dy, void* db, FlashAttnDType dtype, int64_t rows,
                                                        int64_t cols, int64_t row_stride, void* workspace,
                                                        int64_t workspace_bytes, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_dense_bias_grad";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(is_float_dtype(dtype), "dtype (%s) must be float32, float16 or bfloat16", dtype_name(dtype));
    FA_CHECK(rows >= 0, "rows (%lld) must be >= 0", (long long)rows);
    FA_CHECK(cols >= 0, "cols (%lld) must be >= 0", (long long)cols);
    FA_CHECK(workspace_bytes >= 0, "workspace_bytes (%lld) must be >= 0", (long long)workspace_bytes);
    if (cols == 0) return FLASHATTN_STATUS_OK;  // an empty bias

    FA_CHECK(db != nullptr, "db must not be NULL");
    FA_CHECK(rows == 0 || dy != nullptr, "dy must not be NULL");
    FA_CHECK(row_stride >= cols, "row_stride (%lld) must be >= cols (%lld)", (long long)row_stride, (long long)cols);
    const int64_t es = dtype_size(dtype);
    FA_CHECK(is_aligned(dy, es) && is_aligned(db, es), "dy and db must be aligned to %s elements", dtype_name(dtype));
    const int64_t need = bias_grad_workspace_bytes(rows, cols);
    if (need > 0) {
      FA_CHECK(workspace != nullptr, "workspace must not be NULL (%lld bytes needed)", (long long)need);
      FA_CHECK(workspace_bytes >= need,
               "workspace_bytes (%lld) must be >= %lld (FlashAttn_dense_bias_grad_workspace_size)",
               (long long)workspace_bytes, (long long)need);
      FA_CHECK(is_aligned(workspace, 4), "workspace must be 4-byte aligned");
    }

    BiasGradParams p{};
    p.dy = dy;
    p.db = db;
    p.dtype = dtype;
    p.rows = rows;
    p.cols = cols;
    p.row_stride = row_stride;
    if (need > 0) {
      p.counters = static_cast<uint32_t*>(workspace);
      p.partial = reinterpret_cast<float*>(p.counters + bias_grad_col_blocks(cols));
    }
    return run_bias_grad(p, stream, kFunction);
  });
}
