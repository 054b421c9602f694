// Launch of the Hopper forward kernel for one (dtype, head dim) instantiation; the instantiations
// live in hopper/instantiations/flash_fwd_hopper_hdim*_*.cu, one per file so that nvcc compiles
// them in parallel. Compiled for sm_90a only.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cuda_check.cuh"
#include "common/device.h"
#include "flash/dropout.cuh"
#include "flash/flash_common.cuh"
#include "flash/hopper/flash_fwd_kernel.cuh"

namespace flashattn {
namespace flash {
namespace hopper {

// One kernel (traits Tr, ping-pong or not, persistent or not, its tiles overlapped or not, dropout or
// not) launched over its grid: (query block, head, batch), or one CTA per SM at most
// (flash_fwd_kernel.cuh: persistent_tile).
template <typename Tr, bool kPingpong, bool kPersistent, bool kTileOverlap = false, bool kDropout = false>
FlashAttnStatus launch_fwd_kernel(const FlashFwdParams& p, const FwdTensorMaps& maps, FwdKernelParams kp,
                                  int device, cudaStream_t stream, const char* function) {
  auto kernel = flash_fwd_hopper_kernel<Tr, kPingpong, kPersistent, kTileOverlap, kDropout>;
  const FlashAttnStatus s = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), device, size_t(Tr::kSmemBytes),
                                               "flash_fwd_hopper_kernel", function);
  if (s != FLASHATTN_STATUS_OK) return s;
  kp.m_blocks = int((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM);
  kp.total_tiles = kp.m_blocks * int(p.nheads) * int(p.batch);
  dim3 grid(unsigned(kp.m_blocks), unsigned(p.nheads), unsigned(p.batch));
  if constexpr (kPersistent) {
    DeviceInfo dev{};
    const FlashAttnStatus s = device_info(device, &dev, function);
    if (s != FLASHATTN_STATUS_OK) return s;
    // Every SM: a CTA runs whole units of causal work m_blocks + 1 whatever the grid (persistent_unit).
    grid = dim3(unsigned(std::min(dev.sms, kp.total_tiles)));
  }
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(maps.q, maps.k, maps.v, kp);
  return check_launch(function, "flash_fwd_hopper_kernel");
}

template <typename T, int kHeadDim>
FlashAttnStatus launch_mha_fwd_hopper(const FlashFwdParams& p, const FwdTensorMaps& maps, FwdVariant variant,
                                      int device, cudaStream_t stream, const char* function) {
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
  kp.dropout_p = p.dropout_p;
  kp.dropout_threshold = dropout_threshold16(p.dropout_p);
  kp.seed = p.seed;
  kp.offset = p.offset;
  kp.tile_slots = nullptr;
  kp.epoch = 0;
  kp.group_heads = 0;
  constexpr int kRows = fwd_block_m(kHeadDim, FwdVariant::kRows192);
  switch (variant) {
    case FwdVariant::kOverlap:
      return launch_fwd_kernel<FwdTraits<kHeadDim, T>, false, false>(p, maps, kp, device, stream, function);
    case FwdVariant::kRows192:
      return launch_fwd_kernel<FwdTraits<kHeadDim, T, kRows>, true, false>(p, maps, kp, device, stream, function);
    case FwdVariant::kPersistent:
      // Dropout has this variant and persistent2 alone (fwd_variant), the kernels with the decisions compiled in.
      if (p.dropout_p > 0.f)
        return launch_fwd_kernel<FwdTraits<kHeadDim, T>, true, true, false, true>(p, maps, kp, device, stream,
                                                                                    function);
      return launch_fwd_kernel<FwdTraits<kHeadDim, T>, true, true>(p, maps, kp, device, stream, function);
    case FwdVariant::kPersistentOverlap:
      return launch_fwd_kernel<FwdTraits<kHeadDim, T>, false, true>(p, maps, kp, device, stream, function);
    case FwdVariant::kPersistent192:
      return launch_fwd_kernel<FwdTraits<kHeadDim, T, kRows>, true, true>(p, maps, kp, device, stream, function);
    case FwdVariant::kPersistent2:
      if (p.dropout_p > 0.f)
        return launch_fwd_kernel<FwdTraits<kHeadDim, T, 128, 2>, true, true, true, true>(p, maps, kp, device, stream,
                                                                                           function);
      return launch_fwd_kernel<FwdTraits<kHeadDim, T, 128, 2>, true, true, true>(p, maps, kp, device, stream,
                                                                                   function);
    case FwdVariant::kPersistentExpTurn:
      return launch_fwd_kernel<FwdTraits<kHeadDim, T, 128, 1, true>, true, true>(p, maps, kp, device, stream,
                                                                               function);
    case FwdVariant::kPersistent192Snake:
      // d128 runs persistent's kernel (fwd_kernel_variant): no snake-order kernel is compiled for it.
      if constexpr (kHeadDim == 64)
        return launch_fwd_kernel<FwdTraits<64, T, 192, 1, false, true>, true, true>(p, maps, kp, device, stream,
                                                                                  function);
      else
        return launch_fwd_kernel<FwdTraits<kHeadDim, T>, true, true>(p, maps, kp, device, stream, function);
    case FwdVariant::kPersistentSerial:
      return launch_fwd_kernel<FwdTraits<kHeadDim, T, 128, 1, true, false, true>, true, true>(p, maps, kp, device,
                                                                                            stream, function);
    case FwdVariant::kPersistentDynamic:
    case FwdVariant::kPersistentSerialDynamic: {
      const FlashAttnStatus s = fwd_tile_slots(device, stream, &kp.tile_slots, &kp.epoch, &kp.group_heads, function);
      if (s != FLASHATTN_STATUS_OK) return s;
      if (variant == FwdVariant::kPersistentDynamic)
        return launch_fwd_kernel<FwdTraits<kHeadDim, T, 128, 1, true, false, false, true>, true, true>(
            p, maps, kp, device, stream, function);
      return launch_fwd_kernel<FwdTraits<kHeadDim, T, 128, 1, true, false, true, true>, true, true>(
          p, maps, kp, device, stream, function);
    }
    default:
      return launch_fwd_kernel<FwdTraits<kHeadDim, T>, true, false>(p, maps, kp, device, stream, function);
  }
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
