// Launch of the forward kernel for one (dtype, head dim) instantiation; the instantiations live in
// instantiations/flash_fwd_hdim*_*.cu, one per file so that nvcc compiles them in parallel.
#pragma once

#include "common/cuda_check.cuh"
#include "common/device.h"
#include "flash/flash_fwd_kernel.cuh"

namespace flashattn {
namespace flash {

template <typename T, int kHeadDim>
FlashAttnStatus run_mha_fwd(const FlashFwdParams& p, cudaStream_t stream, const char* function);

template <typename Tr>
FlashAttnStatus launch_fwd_with(const FlashFwdParams& p, cudaStream_t stream, const char* function) {
  const dim3 grid(unsigned((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM), unsigned(p.nheads), unsigned(p.batch));
  const bool full = p.softcap > 0.f || p.alibi_slopes != nullptr || p.dropout_p > 0.f;
  auto kernel = full ? flash_fwd_kernel<Tr, true> : flash_fwd_kernel<Tr, false>;
  const int smem_bytes = Tr::smem_bytes(full);
  int device = 0;
  FlashAttnStatus s = check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  if (s == FLASHATTN_STATUS_OK)
    s = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), device, size_t(smem_bytes), "flash_fwd_kernel",
                           function);
  if (s != FLASHATTN_STATUS_OK) return s;
  kernel<<<grid, Tr::kThreads, smem_bytes, stream>>>(p);
  return check_launch(function, "flash_fwd_kernel");
}

template <typename T, int kHeadDim>
FlashAttnStatus launch_mha_fwd(const FlashFwdParams& p, cudaStream_t stream, const char* function) {
  return launch_fwd_with<FwdTraits<kHeadDim, T>>(p, stream, function);
}

}  // namespace flash
}  // namespace flashattn
