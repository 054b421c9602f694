// Launch sequence of the backward for one (dtype, head dim) instantiation (instantiations/
// flash_bwd_hdim*_*.cu): zero the float32 accumulators, dsum = rowsum(dout * out), the main
// kernel, then the conversions of the accumulators to the output dtype.
#pragma once

#include <cstdlib>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/device.h"
#include "flash/flash_bwd_kernel.cuh"

namespace flashattn {
namespace flash {

template <typename T, int kHeadDim>
FlashAttnStatus run_mha_bwd(const FlashBwdParams& p, cudaStream_t stream, const char* function);

inline unsigned blocks_for(int64_t items, int threads) { return unsigned((items + threads - 1) / threads); }

// FLASHATTN_BWD_MAX_STAGES=1 (read once per process) makes the backward run one Q/dO stage where two
// fit, so that a run on an H100 covers the A100's one-stage path (d64, d128, d192+).
inline int bwd_max_stages() {
  static const int stages = [] {
    const char* v = std::getenv("FLASHATTN_BWD_MAX_STAGES");
    return v != nullptr && std::atoi(v) == 1 ? 1 : 2;
  }();
  return stages;
}

// Before the main kernel (sm_80's or the Hopper one): zero the float32 accumulators, and
// dsum = rowsum(dout * out).
template <typename T>
FlashAttnStatus bwd_preprocess(const FlashBwdParams& p, int dpad, cudaStream_t stream, const char* function) {
  const int64_t B = p.batch, H = p.nheads;
  FlashAttnStatus s = check_cuda(
      cudaMemsetAsync(p.dq_accum, 0, size_t(B * p.seqlen_q * H * dpad) * sizeof(float), stream), function,
      "cudaMemsetAsync(dq_accum)");
  if (s != FLASHATTN_STATUS_OK) return s;
  if (p.dk_accum != nullptr) {
    const size_t bytes = size_t(B * p.seqlen_k * H * dpad) * sizeof(float);
    s = check_cuda(cudaMemsetAsync(p.dk_accum, 0, bytes, stream), function, "cudaMemsetAsync(dk_accum)");
    if (s == FLASHATTN_STATUS_OK)
      s = check_cuda(cudaMemsetAsync(p.dv_accum, 0, bytes, stream), function, "cudaMemsetAsync(dv_accum)");
    if (s != FLASHATTN_STATUS_OK) return s;
  }
  if (p.seqlen_q > 0) {
    auto launch = [&](auto lanes) {
      constexpr int kLanes = decltype(lanes)::value;
      flash_bwd_dot_do_o_kernel<T, kLanes>
          <<<dim3(blocks_for(p.seqlen_q * H, dot_rows_per_block<kLanes>()), unsigned(B)), kDotThreads, 0, stream>>>(p);
    };
    // lanes per row: the head dim's 8-column chunks, rounded up to a power of two, at most a warp
    if (p.headdim <= 32) launch(std::integral_constant<int, 4>{});
    else if (p.headdim <= 64) launch(std::integral_constant<int, 8>{});
    else if (p.headdim <= 128) launch(std::integral_constant<int, 16>{});
    else launch(std::integral_constant<int, 32>{});
    s = check_launch(function, "flash_bwd_dot_do_o_kernel");
  }
  return s;
}

// After the main kernel: the float32 accumulators -> dq (and dk, dv with GQA or above d128).
template <typename T>
FlashAttnStatus bwd_postprocess(const FlashBwdParams& p, int dpad, cudaStream_t stream, const char* function) {
  const int64_t B = p.batch, H = p.nheads, Hk = p.nheads_k;
  FlashAttnStatus s = FLASHATTN_STATUS_OK;
  if (p.seqlen_q > 0) {
    flash_bwd_convert_dq_kernel<T>
        <<<dim3(blocks_for(p.seqlen_q * H * (p.headdim / 8), 128), unsigned(B)), 128, 0, stream>>>(p, dpad);
    s = check_launch(function, "flash_bwd_convert_dq_kernel");
    if (s != FLASHATTN_STATUS_OK) return s;
  }
  if (p.dk_accum != nullptr && p.seqlen_k > 0) {
    flash_bwd_convert_dkv_kernel<T>
        <<<dim3(blocks_for(p.seqlen_k * Hk * (p.headdim / 8), 128), unsigned(B)), 128, 0, stream>>>(p, dpad);
    s = check_launch(function, "flash_bwd_convert_dkv_kernel");
  }
  return s;
}

template <typename T, int kHeadDim>
FlashAttnStatus launch_mha_bwd(const FlashBwdParams& p, cudaStream_t stream, const char* function) {
  using Tr = BwdTraits<kHeadDim, T>;
  const int64_t B = p.batch, H = p.nheads;
  FlashAttnStatus s = bwd_preprocess<T>(p, kHeadDim, stream, function);
  if (s != FLASHATTN_STATUS_OK) return s;
  if (p.seqlen_k > 0) {
    const bool full = p.softcap > 0.f || p.alibi_slopes != nullptr || p.dropout_p > 0.f;
    auto kernel = full ? flash_bwd_kernel<Tr, true> : flash_bwd_kernel<Tr, false>;
    // Two Q/dO stages where the device's blocks can have that much shared memory (the H100's
    // 227 KB at every head dim; the A100's 163 KB only at d32, d96 and d160).
    DeviceInfo dev;
    s = current_device_info(&dev, function);
    if (s != FLASHATTN_STATUS_OK) return s;
    const int device = dev.device, smem_optin = dev.smem_optin;
    if (Tr::smem_bytes(1) > smem_optin)
      return fail(FLASHATTN_STATUS_NOT_SUPPORTED, function,
                  "flash_bwd_kernel at head dim %d needs %d bytes of shared memory per block; device %d allows %d "
                  "(see FlashAttn_flash_bwd_supported)",
                  kHeadDim, Tr::smem_bytes(1), device, smem_optin);
    const int stages = Tr::smem_bytes(2) <= smem_optin && bwd_max_stages() >= 2 ? 2 : 1;
    const int smem_bytes = Tr::smem_bytes(stages);
    s = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), device, size_t(smem_bytes), "flash_bwd_kernel",
                           function);
    if (s != FLASHATTN_STATUS_OK) return s;
    // deterministic: one CTA per (head, batch) walks every key block in order, so the float32
    // additions into dq_accum happen in a fixed order (slower: less parallelism).
    const unsigned n_blocks = p.deterministic ? 1u : blocks_for(p.seqlen_k, Tr::kBlockN);
    kernel<<<dim3(n_blocks, unsigned(H), unsigned(B)), Tr::kThreads, smem_bytes, stream>>>(p, stages);
    s = check_launch(function, "flash_bwd_kernel");
    if (s != FLASHATTN_STATUS_OK) return s;
  }
  return bwd_postprocess<T>(p, kHeadDim, stream, function);
}

}  // namespace flash
}  // namespace flashattn
