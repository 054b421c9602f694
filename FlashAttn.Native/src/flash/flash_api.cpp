// FlashAttn_flash_*: validates every argument, fills FlashFwdParams / FlashBwdParams once, launches.
// Conventions chosen here (mirroring flash-attn):
//  - causal is window_right = 0, as the caller passes it (the kernels read the window alone).
//  - batch == 0 or seqlen_q == 0: nothing to compute, OK without a launch (the backward still
//    writes dk = dv = 0 when seqlen_q == 0 and seqlen_k > 0). seqlen_k == 0 with seqlen_q > 0:
//    out = 0 and softmax_lse = +inf (rows that see no key), dq = 0.
//  - The kernels copy 16 bytes at a time: q/k/v/out/dout/dq/dk/dv must be 16-byte aligned and
//    their batch/row/head strides multiples of 8 elements (the managed side's contiguous tensors are).
#include <climits>

#include "common/dtype.h"
#include "common/error.h"
#include "flash/flash.h"

using namespace flashattn;

namespace {

constexpr const char* kFwd = "FlashAttn_flash_fwd";
constexpr const char* kBwd = "FlashAttn_flash_bwd";

// Checks one (batch, row, head) stride triple and the base pointer of a tensor.
FlashAttnStatus check_tensor(const char* kFunction, const char* name, const void* ptr, int64_t bs, int64_t rs,
                             int64_t hs) {
  FA_CHECK(ptr != nullptr, "%s must not be NULL", name);
  FA_CHECK(is_aligned(ptr, 16), "%s must be 16-byte aligned", name);
  FA_CHECK(bs >= 0 && rs >= 0 && hs >= 0, "%s strides (%lld, %lld, %lld) must be >= 0", name, (long long)bs,
           (long long)rs, (long long)hs);
  FA_CHECK(bs % 8 == 0 && rs % 8 == 0 && hs % 8 == 0,
           "%s strides (%lld, %lld, %lld) must be multiples of 8 elements (16-byte vector loads)", name,
           (long long)bs, (long long)rs, (long long)hs);
  return FLASHATTN_STATUS_OK;
}

// Everything the forward and backward share; fills the common part of the params.
FlashAttnStatus check_common(const char* kFunction, FlashFwdParams& p, const void* q, const void* k, const void* v,
                             FlashAttnDType dtype, const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                             int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t nheads_k,
                             int64_t headdim, float softmax_scale, int32_t window_left,
                             int32_t window_right, float softcap, const float* alibi_slopes,
                             int64_t alibi_batch_stride, float dropout_p) {
  FA_CHECK(dtype == FLASHATTN_DTYPE_FLOAT16 || dtype == FLASHATTN_DTYPE_BFLOAT16,
           "q dtype (%s) must be float16 or bfloat16", dtype_name(dtype));
  FA_CHECK(batch >= 0, "batch (%lld) must be >= 0", (long long)batch);
  FA_CHECK(seqlen_q >= 0, "seqlen_q (%lld) must be >= 0", (long long)seqlen_q);
  FA_CHECK(seqlen_k >= 0, "seqlen_k (%lld) must be >= 0", (long long)seqlen_k);
  FA_CHECK(nheads >= 1, "nheads (%lld) must be >= 1", (long long)nheads);
  FA_CHECK(nheads_k >= 1, "nheads_k (%lld) must be >= 1", (long long)nheads_k);
  FA_CHECK(nheads % nheads_k == 0, "nheads (%lld) must be a multiple of nheads_k (%lld)", (long long)nheads,
           (long long)nheads_k);
  FA_CHECK(headdim >= 8 && headdim <= 256 && headdim % 8 == 0,
           "headdim (%lld) must be a multiple of 8 in [8, 256] (the managed side pads other sizes)",
           (long long)headdim);
  // Grid limits (y = heads, z = batch) and 32-bit sequence positions inside the kernels.
  FA_CHECK(nheads <= 65535, "nheads (%lld) must be <= 65535", (long long)nheads);
  FA_CHECK(batch <= 65535, "batch (%lld) must be <= 65535", (long long)batch);
  FA_CHECK(seqlen_q <= INT_MAX / 2 && seqlen_k <= INT_MAX / 2, "seqlen_q (%lld) and seqlen_k (%lld) must be < 2^30",
           (long long)seqlen_q, (long long)seqlen_k);
  FA_CHECK((cu_seqlens_q == nullptr) == (cu_seqlens_k == nullptr),
           "cu_seqlens_q and cu_seqlens_k must be both NULL or both set");
  FA_CHECK(softmax_scale == softmax_scale, "softmax_scale must not be NaN");
  FA_CHECK(window_left >= -1, "window_left (%d) must be >= -1", window_left);
  FA_CHECK(window_right >= -1, "window_right (%d) must be >= -1", window_right);
  FA_CHECK(softcap >= 0.f, "softcap (%g) must be >= 0", double(softcap));
  FA_CHECK(dropout_p >= 0.f && dropout_p < 1.f, "dropout_p (%g) must be in [0, 1)", double(dropout_p));
  FA_CHECK(alibi_batch_stride >= 0, "alibi_batch_stride (%lld) must be >= 0", (long long)alibi_batch_stride);
  if (alibi_slopes != nullptr) {
    FA_CHECK(alibi_batch_stride == 0 || alibi_batch_stride >= nheads,
             "alibi_batch_stride (%lld) must be 0 or >= nheads (%lld)", (long long)alibi_batch_stride,
             (long long)nheads);
  }
  (void)q, (void)k, (void)v;
  p.dtype = dtype;
  p.cu_seqlens_q = cu_seqlens_q;
  p.cu_seqlens_k = cu_seqlens_k;
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.nheads = nheads;
  p.nheads_k = nheads_k;
  p.headdim = headdim;
  p.softmax_scale = softmax_scale;
  p.window_left = window_left;
  p.window_right = window_right;
  p.softcap = softcap;
  p.alibi_slopes = alibi_slopes;
  p.alibi_batch_stride = alibi_batch_stride;
  p.dropout_p = dropout_p;
  return FLASHATTN_STATUS_OK;
}

// The tensors and Philox key the forward and the backward share.
void set_tensors(FlashFwdParams& p, const void* q, const void* k, const void* v, void* out, float* softmax_lse,
                 int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride, int64_t k_batch_stride,
                 int64_t k_row_stride, int64_t k_head_stride, int64_t v_batch_stride, int64_t v_row_stride,
                 int64_t v_head_stride, int64_t out_batch_stride, int64_t out_row_stride, int64_t out_head_stride,
                 uint64_t seed, uint64_t offset) {
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.softmax_lse = softmax_lse;
  p.q_batch_stride = q_batch_stride;
  p.q_row_stride = q_row_stride;
  p.q_head_stride = q_head_stride;
  p.k_batch_stride = k_batch_stride;
  p.k_row_stride = k_row_stride;
  p.k_head_stride = k_head_stride;
  p.v_batch_stride = v_batch_stride;
  p.v_row_stride = v_row_stride;
  p.v_head_stride = v_head_stride;
  p.out_batch_stride = out_batch_stride;
  p.out_row_stride = out_row_stride;
  p.out_head_stride = out_head_stride;
  p.seed = seed;
  p.offset = offset;
}

}  // namespace

FLASHATTN_API int64_t FlashAttn_flash_fwd_workspace_size(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  return 0;  // the forward keeps everything on chip
}

FLASHATTN_API FlashAttnStatus FlashAttn_flash_fwd(
    const void* q, const void* k, const void* v, void* out, float* softmax_lse, FlashAttnDType dtype,
    const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
    int64_t nheads, int64_t nheads_k, int64_t headdim, int64_t q_batch_stride, int64_t q_row_stride,
    int64_t q_head_stride, int64_t k_batch_stride, int64_t k_row_stride, int64_t k_head_stride,
    int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride, int64_t out_batch_stride,
    int64_t out_row_stride, int64_t out_head_stride, float softmax_scale, int32_t window_left,
    int32_t window_right, float softcap, const float* alibi_slopes, int64_t alibi_batch_stride, float dropout_p,
    uint64_t seed, uint64_t offset, uint8_t* dropout_mask, void* workspace, int64_t workspace_bytes,
    void* stream) {
  static constexpr const char* kFunction = kFwd;
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FlashFwdParams p{};
    FlashAttnStatus s = check_common(kFunction, p, q, k, v, dtype, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q,
                                     seqlen_k, nheads, nheads_k, headdim, softmax_scale, window_left,
                                     window_right, softcap, alibi_slopes, alibi_batch_stride, dropout_p);
    if (s != FLASHATTN_STATUS_OK) return s;
    FA_CHECK(dropout_mask == nullptr || cu_seqlens_q == nullptr, "dropout_mask is not supported with cu_seqlens");
    FA_CHECK(workspace_bytes >= 0, "workspace_bytes (%lld) must be >= 0", (long long)workspace_bytes);
    (void)workspace;
    if (batch == 0 || seqlen_q == 0) return FLASHATTN_STATUS_OK;  // nothing to compute

    s = check_tensor(kFunction, "q", q, q_batch_stride, q_row_stride, q_head_stride);
    if (s == FLASHATTN_STATUS_OK) s = check_tensor(kFunction, "out", out, out_batch_stride, out_row_stride, out_head_stride);
    if (s != FLASHATTN_STATUS_OK) return s;
    if (seqlen_k > 0 || cu_seqlens_k != nullptr) {
      s = check_tensor(kFunction, "k", k, k_batch_stride, k_row_stride, k_head_stride);
      if (s == FLASHATTN_STATUS_OK) s = check_tensor(kFunction, "v", v, v_batch_stride, v_row_stride, v_head_stride);
      if (s != FLASHATTN_STATUS_OK) return s;
    }
    FA_CHECK(softmax_lse != nullptr, "softmax_lse must not be NULL");

    set_tensors(p, q, k, v, out, softmax_lse, q_batch_stride, q_row_stride, q_head_stride, k_batch_stride, k_row_stride,
                k_head_stride, v_batch_stride, v_row_stride, v_head_stride, out_batch_stride, out_row_stride,
                out_head_stride, seed, offset);
    p.dropout_mask = dropout_p > 0.f ? dropout_mask : nullptr;
    return run_flash_fwd(p, stream, kFunction);
  });
}

FLASHATTN_API int64_t FlashAttn_flash_bwd_workspace_size(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                                         int64_t nheads, int64_t nheads_k, int64_t headdim,
                                                         int32_t varlen) {
  (void)varlen;  // total rows <= batch * longest sequence: the same bound serves both layouts
  if (batch <= 0 || nheads <= 0 || nheads_k <= 0 || headdim <= 0 || seqlen_q < 0 || seqlen_k < 0) return 0;
  return flash_bwd_workspace_layout(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim).total;
}

FLASHATTN_API FlashAttnStatus FlashAttn_flash_bwd_supported(int32_t device, int64_t headdim, int32_t* supported) {
  static constexpr const char* kFunction = "FlashAttn_flash_bwd_supported";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(supported != nullptr, "supported must not be NULL");
    FA_CHECK(device >= 0, "device (%d) must be >= 0", device);
    FA_CHECK(headdim > 0 && headdim <= 256, "headdim (%lld) must be in [1, 256]", (long long)headdim);
    return flash_bwd_supported(device, headdim, supported, kFunction);
  });
}

FLASHATTN_API FlashAttnStatus FlashAttn_flash_bwd(
    const void* dout, const void* q, const void* k, const void* v, const void* out, const float* softmax_lse,
    void* dq, void* dk, void* dv, FlashAttnDType dtype, const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t nheads_k, int64_t headdim,
    int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride, int64_t k_batch_stride,
    int64_t k_row_stride, int64_t k_head_stride, int64_t v_batch_stride, int64_t v_row_stride,
    int64_t v_head_stride, int64_t out_batch_stride, int64_t out_row_stride, int64_t out_head_stride,
    int64_t dout_batch_stride, int64_t dout_row_stride, int64_t dout_head_stride, int64_t dq_batch_stride,
    int64_t dq_row_stride, int64_t dq_head_stride, int64_t dk_batch_stride, int64_t dk_row_stride,
    int64_t dk_head_stride, int64_t dv_batch_stride, int64_t dv_row_stride, int64_t dv_head_stride,
    float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
    const float* alibi_slopes, int64_t alibi_batch_stride, float dropout_p, uint64_t seed, uint64_t offset,
    int32_t deterministic, void* workspace, int64_t workspace_bytes, void* stream) {
  static constexpr const char* kFunction = kBwd;
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FlashBwdParams p{};
    FlashAttnStatus s = check_common(kFunction, p, q, k, v, dtype, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q,
                                     seqlen_k, nheads, nheads_k, headdim, softmax_scale, window_left,
                                     window_right, softcap, alibi_slopes, alibi_batch_stride, dropout_p);
    if (s != FLASHATTN_STATUS_OK) return s;
    FA_CHECK(deterministic == 0 || deterministic == 1, "deterministic (%d) must be 0 or 1", deterministic);
    FA_CHECK(workspace_bytes >= 0, "workspace_bytes (%lld) must be >= 0", (long long)workspace_bytes);
    if (batch == 0 || (seqlen_q == 0 && seqlen_k == 0)) return FLASHATTN_STATUS_OK;  // nothing to compute

    const FlashBwdWorkspaceLayout layout =
        flash_bwd_workspace_layout(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim);
    FA_CHECK(workspace_bytes >= layout.total,
             "workspace_bytes (%lld) must be >= FlashAttn_flash_bwd_workspace_size (%lld)",
             (long long)workspace_bytes, (long long)layout.total);
    FA_CHECK(layout.total == 0 || workspace != nullptr, "workspace must not be NULL (%lld bytes needed)",
             (long long)layout.total);
    FA_CHECK(is_aligned(workspace, 256), "workspace must be 256-byte aligned");

    const bool has_q = seqlen_q > 0 || cu_seqlens_q != nullptr;
    const bool has_k = seqlen_k > 0 || cu_seqlens_k != nullptr;
    if (has_q) {
      s = check_tensor(kFunction, "q", q, q_batch_stride, q_row_stride, q_head_stride);
      if (s == FLASHATTN_STATUS_OK) s = check_tensor(kFunction, "out", out, out_batch_stride, out_row_stride, out_head_stride);
      if (s == FLASHATTN_STATUS_OK) s = check_tensor(kFunction, "dout", dout, dout_batch_stride, dout_row_stride, dout_head_stride);
      if (s == FLASHATTN_STATUS_OK) s = check_tensor(kFunction, "dq", dq, dq_batch_stride, dq_row_stride, dq_head_stride);
      if (s != FLASHATTN_STATUS_OK) return s;
      FA_CHECK(softmax_lse != nullptr, "softmax_lse must not be NULL");
    }
    if (has_k) {
      s = check_tensor(kFunction, "k", k, k_batch_stride, k_row_stride, k_head_stride);
      if (s == FLASHATTN_STATUS_OK) s = check_tensor(kFunction, "v", v, v_batch_stride, v_row_stride, v_head_stride);
      if (s == FLASHATTN_STATUS_OK) s = check_tensor(kFunction, "dk", dk, dk_batch_stride, dk_row_stride, dk_head_stride);
      if (s == FLASHATTN_STATUS_OK) s = check_tensor(kFunction, "dv", dv, dv_batch_stride, dv_row_stride, dv_head_stride);
      if (s != FLASHATTN_STATUS_OK) return s;
    }

    // out and softmax_lse are only read in the backward
    set_tensors(p, q, k, v, const_cast<void*>(out), const_cast<float*>(softmax_lse), q_batch_stride, q_row_stride,
                q_head_stride, k_batch_stride, k_row_stride, k_head_stride, v_batch_stride, v_row_stride,
                v_head_stride, out_batch_stride, out_row_stride, out_head_stride, seed, offset);
    p.dropout_mask = nullptr;
    p.dout = dout;
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.dout_batch_stride = dout_batch_stride;
    p.dout_row_stride = dout_row_stride;
    p.dout_head_stride = dout_head_stride;
    p.dq_batch_stride = dq_batch_stride;
    p.dq_row_stride = dq_row_stride;
    p.dq_head_stride = dq_head_stride;
    p.dk_batch_stride = dk_batch_stride;
    p.dk_row_stride = dk_row_stride;
    p.dk_head_stride = dk_head_stride;
    p.dv_batch_stride = dv_batch_stride;
    p.dv_row_stride = dv_row_stride;
    p.dv_head_stride = dv_head_stride;
    p.deterministic = deterministic != 0;
    char* ws = static_cast<char*>(workspace);
    p.dq_accum = reinterpret_cast<float*>(ws + layout.dq_accum);
    p.dsum = reinterpret_cast<float*>(ws + layout.dsum);
    p.dk_accum = layout.dk_accum >= 0 ? reinterpret_cast<float*>(ws + layout.dk_accum) : nullptr;
    p.dv_accum = layout.dv_accum >= 0 ? reinterpret_cast<float*>(ws + layout.dv_accum) : nullptr;
    return run_flash_bwd(p, stream, kFunction);
  });
}
