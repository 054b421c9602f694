// FlashAttn_rotary_apply: validates every argument, fills RotaryParams once, launches.
#include <climits>

#include "common/dtype.h"
#include "common/error.h"
#include "rotary/rotary.h"

using namespace flashattn;

FLASHATTN_API FlashAttnStatus FlashAttn_rotary_apply(
    void* out, const void* x, FlashAttnDType dtype, const void* cos, const void* sin,
    FlashAttnDType cs_dtype, const int32_t* cu_seqlens, const int32_t* seqlen_offsets,
    int64_t seqlen_offset, int64_t batch, int64_t seqlen, int64_t nheads, int64_t headdim,
    int64_t rotary_dim, int64_t seqlen_ro, int64_t cs_row_stride, int64_t x_batch_stride,
    int64_t x_seq_stride, int64_t x_head_stride, int64_t out_batch_stride, int64_t out_seq_stride,
    int64_t out_head_stride, int32_t interleaved, int32_t conjugate, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_rotary_apply";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(is_float_dtype(dtype), "dtype (%s) must be float32, float16 or bfloat16", dtype_name(dtype));
    FA_CHECK(cs_dtype == dtype || cs_dtype == FLASHATTN_DTYPE_FLOAT32,
             "cos/sin dtype (%s) must be x's dtype (%s) or float32", dtype_name(cs_dtype), dtype_name(dtype));
    FA_CHECK(batch >= 0, "batch (%lld) must be >= 0", (long long)batch);
    FA_CHECK(seqlen >= 0, "seqlen (%lld) must be >= 0", (long long)seqlen);
    FA_CHECK(nheads >= 1, "nheads (%lld) must be >= 1", (long long)nheads);
    FA_CHECK(headdim >= 2, "headdim (%lld) must be >= 2", (long long)headdim);
    FA_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= headdim,
             "rotary_dim (%lld) must be even, >= 2 and <= headdim (%lld)", (long long)rotary_dim,
             (long long)headdim);
    FA_CHECK(headdim <= 1024 && nheads <= 65536, "headdim (%lld) must be <= 1024 and nheads (%lld) <= 65536",
             (long long)headdim, (long long)nheads);
    FA_CHECK(interleaved == 0 || interleaved == 1, "interleaved (%d) must be 0 or 1", interleaved);
    FA_CHECK(conjugate == 0 || conjugate == 1, "conjugate (%d) must be 0 or 1", conjugate);
    if (batch == 0 || seqlen == 0) return FLASHATTN_STATUS_OK;  // nothing to rotate

    FA_CHECK(out != nullptr, "out must not be NULL");
    FA_CHECK(x != nullptr, "x must not be NULL");
    FA_CHECK(cos != nullptr, "cos must not be NULL");
    FA_CHECK(sin != nullptr, "sin must not be NULL");
    FA_CHECK(seqlen_ro >= 1, "seqlen_ro (%lld) must be >= 1", (long long)seqlen_ro);
    FA_CHECK(cs_row_stride >= rotary_dim / 2, "cs_row_stride (%lld) must be >= rotary_dim / 2 (%lld)",
             (long long)cs_row_stride, (long long)(rotary_dim / 2));
    FA_CHECK(x_seq_stride >= 0 && x_head_stride >= 0 && x_batch_stride >= 0,
             "x strides (%lld, %lld, %lld) must be >= 0", (long long)x_batch_stride,
             (long long)x_seq_stride, (long long)x_head_stride);
    FA_CHECK(out_seq_stride >= 0 && out_head_stride >= 0 && out_batch_stride >= 0,
             "out strides (%lld, %lld, %lld) must be >= 0", (long long)out_batch_stride,
             (long long)out_seq_stride, (long long)out_head_stride);
    const bool inplace = out == x;
    if (inplace) {
      FA_CHECK(out_seq_stride == x_seq_stride && out_head_stride == x_head_stride &&
                   (cu_seqlens != nullptr || out_batch_stride == x_batch_stride),
               "out aliases x, so its strides must equal x's");
    }
    // The kernel indexes blocks with 32-bit grid coordinates.
    FA_CHECK(batch * seqlen <= INT_MAX, "batch * seqlen (%lld) must fit in int32", (long long)(batch * seqlen));

    RotaryParams p{};
    p.out = out;
    p.x = x;
    p.dtype = dtype;
    p.cos = cos;
    p.sin = sin;
    p.cs_dtype = cs_dtype;
    p.cu_seqlens = cu_seqlens;
    p.seqlen_offsets = seqlen_offsets;
    p.seqlen_offset = seqlen_offset;
    p.batch = batch;
    p.seqlen = seqlen;
    p.nheads = nheads;
    p.headdim = headdim;
    p.rotary_dim = rotary_dim;
    p.seqlen_ro = seqlen_ro;
    p.cs_row_stride = cs_row_stride;
    p.x_batch_stride = x_batch_stride;
    p.x_seq_stride = x_seq_stride;
    p.x_head_stride = x_head_stride;
    p.out_batch_stride = out_batch_stride;
    p.out_seq_stride = out_seq_stride;
    p.out_head_stride = out_head_stride;
    p.interleaved = interleaved != 0;
    p.conjugate = conjugate != 0;
    p.inplace = inplace;
    return run_rotary(p, stream, kFunction);
  });
}
