// Launch of the Hopper backward kernel for one (dtype, head dim) instantiation (hopper/
// instantiations/flash_bwd_hopper_hdim*_*.cu); run_bwd (flash_bwd_hopper.cu) runs the steps around
// it. Compiled for sm_90a only.
#pragma once

#include <algorithm>

#include "common/cuda_check.cuh"
#include "common/device.h"
#include "flash/hopper/flash_bwd_kernel.cuh"

namespace flashattn {
namespace flash {
namespace hopper {

// One kernel (traits Tr, dQ through the TMA or not, persistent or not, dQ's product first or not,
// dropout or not) over its grid: (key block, head, batch), or at most one CTA per SM
// (flash_bwd_kernel.cuh: persistent_bwd_tile).
template <typename Tr, bool kDqTma, bool kPersistent, bool kDqFirst, bool kDropout = false>
FlashAttnStatus launch_bwd_kernel(const BwdTensorMaps& maps, const BwdKernelParams& kp, int batch, int sms,
                                  cudaStream_t stream, const char* function) {
  auto kernel = flash_bwd_hopper_kernel<Tr, kDqTma, kPersistent, kDqFirst, kDropout>;
  constexpr int kSmem = kDqTma ? Tr::kSmemBytesDqTma : Tr::kSmemBytes;
  int device = 0;
  FlashAttnStatus s = check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  if (s == FLASHATTN_STATUS_OK)
    s = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), device, size_t(kSmem), "flash_bwd_hopper_kernel",
                           function);
  if (s != FLASHATTN_STATUS_OK) return s;
  dim3 grid(unsigned(kp.n_blocks), unsigned(kp.nheads), unsigned(batch));
  if constexpr (kPersistent) {
    // Every SM: a CTA runs whole units of causal work n_blocks + 1 whatever the grid (persistent_unit).
    grid = dim3(unsigned(std::min(sms, kp.total_tiles)));
  }
  kernel<<<grid, Tr::kThreads, kSmem, stream>>>(maps.q, maps.k, maps.v, maps.dout, maps.dq_accum, kp);
  return check_launch(function, "flash_bwd_hopper_kernel");
}

template <typename T, int kHeadDim>
FlashAttnStatus launch_mha_bwd_hopper(const FlashBwdParams& p, const BwdTensorMaps& maps, BwdVariant variant,
                                      int sms, cudaStream_t stream, const char* function) {
  using Tr = BwdTraits<kHeadDim, T>;
  BwdKernelParams kp;
  kp.softmax_lse = p.softmax_lse;
  kp.dsum = p.dsum;
  kp.dq_accum = p.dq_accum;
  kp.dk = p.dk;
  kp.dv = p.dv;
  // GQA: the kernel writes each query head's dK and dV to the float32 workspace; the postprocessing
  // sums the group's heads.
  kp.dk_accum = p.nheads != p.nheads_k ? p.dk_accum : nullptr;
  kp.dv_accum = p.nheads != p.nheads_k ? p.dv_accum : nullptr;
  kp.dk_batch_stride = p.dk_batch_stride;
  kp.dk_row_stride = p.dk_row_stride;
  kp.dk_head_stride = p.dk_head_stride;
  kp.dv_batch_stride = p.dv_batch_stride;
  kp.dv_row_stride = p.dv_row_stride;
  kp.dv_head_stride = p.dv_head_stride;
  kp.seqlen_q = int(p.seqlen_q);
  kp.seqlen_k = int(p.seqlen_k);
  kp.nheads = int(p.nheads);
  kp.heads_per_khead = int(p.nheads / p.nheads_k);
  kp.scale = p.softmax_scale;
  kp.scale_log2 = p.softmax_scale * kLog2e;
  kp.causal = p.window_right == 0 ? 1 : 0;
  kp.n_blocks = int((p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN);
  kp.total_tiles = kp.n_blocks * int(p.nheads) * int(p.batch);
  kp.dropout_p = p.dropout_p;
  kp.dropout_threshold = dropout_threshold16(p.dropout_p);
  kp.seed = p.seed;
  kp.offset = p.offset;
  const int batch = int(p.batch);
  switch (variant) {
    case BwdVariant::kDqTma:
      return launch_bwd_kernel<Tr, true, false, false>(maps, kp, batch, sms, stream, function);
    case BwdVariant::kDqFirst:
      return launch_bwd_kernel<Tr, true, false, true>(maps, kp, batch, sms, stream, function);
    case BwdVariant::kPersistent:
      // Dropout has this variant alone (bwd_variant), the one kernel with the decisions compiled in.
      if (p.dropout_p > 0.f) return launch_bwd_kernel<Tr, true, true, true, true>(maps, kp, batch, sms, stream, function);
      return launch_bwd_kernel<Tr, true, true, true>(maps, kp, batch, sms, stream, function);
    default:
      return launch_bwd_kernel<Tr, false, false, false>(maps, kp, batch, sms, stream, function);
  }
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
