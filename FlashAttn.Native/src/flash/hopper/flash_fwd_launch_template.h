// Launch of the Hopper forward kernel for one (dtype, head dim) instantiation; the instantiations
// live in hopper/instantiations/flash_fwd_hopper_hdim*_*.cu, one per file so that nvcc compiles
// them in parallel. Compiled for sm_90a only.
#pragma once

#include "common/cuda_check.cuh"
#include "flash/flash_common.cuh"
#include "flash/hopper/flash_fwd_kernel.cuh"

namespace flashattn {
namespace flash {
namespace hopper {

template <typename T, int kHeadDim>
FlashAttnStatus launch_mha_fwd_hopper(const FlashFwdParams& p, const FwdTensorMaps& maps, bool overlap,
                                      cudaStream_t stream, const char* function) {
  using Tr = FwdTraits<kHeadDim, T>;
  FwdKernelParams kp;
  kp.out = p.out;
  kp.softmax_lse = p.softmax_lse;
  kp.out_batch_stride = p.out_batch_stride;
  kp.out_row_stride = p.out_row_stride;
  kp.out_head_stride = p.out_head_stride;
  kp.seqlen_q = int(p.seqlen_q);
  kp.seqlen_k = int(p.seqlen_k);
  kp.nheads = int(p.nheads);
  kp.heads_per_khead = int(p.nheads / p.nheads_k);
  kp.scale_log2 = p.softmax_scale * kLog2e;
  kp.causal = p.window_right == 0 ? 1 : 0;
  auto kernel = overlap ? flash_fwd_hopper_kernel<Tr, true> : flash_fwd_hopper_kernel<Tr, false>;
  FlashAttnStatus s =
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes), function,
                 "cudaFuncSetAttribute(flash_fwd_hopper_kernel, MaxDynamicSharedMemorySize)");
  if (s != FLASHATTN_STATUS_OK) return s;
  const dim3 grid(unsigned((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM), unsigned(p.nheads), unsigned(p.batch));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(maps.q, maps.k, maps.v, kp);
  return check_launch(function, "flash_fwd_hopper_kernel");
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
