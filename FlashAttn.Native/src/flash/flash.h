// FlashAttention-2 forward and backward: the params structs filled once at the ABI
// (flash_api.cpp) and the launchers (flash_run.cu, or cuda_stub.cpp in the CPU-only flavour).
//   q, out, dout, dq: (B, Sq, H, D)      or (total_q, H, D) with cu_seqlens_q
//   k, v, dk, dv:     (B, Sk, Hk, D)     or (total_k, Hk, D) with cu_seqlens_k
//   softmax_lse:      (B, H, Sq) float32 or (H, total_q)
// All strides are in elements; the last dimension is contiguous.
#pragma once

#include <cstdint>

#include "flashattn.h"

namespace flashattn {

struct FlashFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* softmax_lse;
  FlashAttnDType dtype;            // float16 or bfloat16, of q/k/v/out
  const int32_t* cu_seqlens_q;     // (B + 1,) or nullptr
  const int32_t* cu_seqlens_k;     // (B + 1,) or nullptr (set together with cu_seqlens_q)
  int64_t batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  float softmax_scale;
  int window_left, window_right;   // -1: unlimited; causal is window_right = 0
  float softcap;                   // 0: off
  const float* alibi_slopes;       // (B, H) with alibi_batch_stride, or nullptr
  int64_t alibi_batch_stride;
  float dropout_p;                 // 0: off
  uint64_t seed, offset;           // Philox key and counter offset
  uint8_t* dropout_mask;           // (B, H, Sq, Sk) or nullptr
};

struct FlashBwdParams : FlashFwdParams {
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  int64_t dout_batch_stride, dout_row_stride, dout_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  bool deterministic;
  // Workspace carved by flash_bwd_workspace_layout (offsets 256-byte aligned).
  float* dq_accum;   // (B * Sq, H, Dpad) float32: the dq partial sums
  float* dsum;       // (B * Sq, H) float32: D_i = sum_d dout_i * out_i
  float* dk_accum;   // (B * Sk, H, Dpad) float32, or nullptr (see below)
  float* dv_accum;   // same
};

// The head dimension the kernels are compiled for: the smallest of 32, 64, ..., 256 >= headdim.
inline int64_t flash_round_headdim(int64_t headdim) {
  return headdim <= 32 ? 32 : headdim <= 64 ? 64 : headdim <= 96 ? 96 : headdim <= 128 ? 128
       : headdim <= 160 ? 160 : headdim <= 192 ? 192 : headdim <= 224 ? 224 : 256;
}

// dk/dv go through a float32 per-query-head accumulator when a GQA group must be reduced, or
// when the head dimension is too large to keep both accumulators in registers (Dpad > 128).
inline bool flash_bwd_needs_dkv_accum(int64_t nheads, int64_t nheads_k, int64_t headdim) {
  return nheads != nheads_k || flash_round_headdim(headdim) > 128;
}

struct FlashBwdWorkspaceLayout {
  int64_t dq_accum, dsum, dk_accum, dv_accum;  // byte offsets; -1 when absent
  int64_t total;                                // bytes
};

inline int64_t flash_align256(int64_t x) { return (x + 255) / 256 * 256; }

// Varlen uses the same bound: total_q <= batch * max seqlen_q (and likewise for k).
inline FlashBwdWorkspaceLayout flash_bwd_workspace_layout(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                                          int64_t nheads, int64_t nheads_k, int64_t headdim) {
  FlashBwdWorkspaceLayout l{-1, -1, -1, -1, 0};
  const int64_t dpad = flash_round_headdim(headdim);
  int64_t off = 0;
  l.dq_accum = off;
  off += flash_align256(batch * seqlen_q * nheads * dpad * 4);
  l.dsum = off;
  off += flash_align256(batch * seqlen_q * nheads * 4);
  if (flash_bwd_needs_dkv_accum(nheads, nheads_k, headdim)) {
    const int64_t bytes = flash_align256(batch * seqlen_k * nheads * dpad * 4);
    l.dk_accum = off;
    off += bytes;
    l.dv_accum = off;
    off += bytes;
  }
  l.total = off;
  return l;
}

FlashAttnStatus run_flash_fwd(const FlashFwdParams& params, void* stream, const char* function);
FlashAttnStatus run_flash_bwd(const FlashBwdParams& params, void* stream, const char* function);
// The steps of every backward around its main kernel (flash_bwd_launch_template.h), for the Hopper
// backward: compiled with the sm_80 kernels, for every architecture of the build (a kernel template
// instantiated again in the sm_90a-only objects could be registered without sm_80 code).
FlashAttnStatus run_flash_bwd_preprocess(const FlashBwdParams& params, void* stream, const char* function);
FlashAttnStatus run_flash_bwd_postprocess(const FlashBwdParams& params, void* stream, const char* function);
// *supported = whether the backward kernel for this head dim fits the device's shared memory per block.
FlashAttnStatus flash_bwd_supported(int32_t device, int64_t headdim, int32_t* supported, const char* function);

}  // namespace flashattn
