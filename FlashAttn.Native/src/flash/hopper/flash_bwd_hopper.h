// The Hopper (sm_90a) backward, FlashAttention-3's design (TMA, wgmma, warp specialization), for the
// cases it covers; run_flash_bwd (flash_run.cu) tries it first and otherwise runs the sm_80 kernels.
// Built only when FLASHATTN_CUDA_ARCHS holds 90a (FLASHATTN_HOPPER=1 in flash_run.cu).
#pragma once

#include <cuda_runtime.h>

#include "flash/flash.h"

namespace flashattn {
namespace flash {
namespace hopper {

// Runs the backward on the Hopper kernel when all of these hold, and sets *ran:
//  - the case: head dim 64 or 128, padded batches (no cu_seqlens), no ALiBi, softcap or window
//    other than causal, not deterministic, seqlen_q and seqlen_k > 0, softmax_scale finite and > 0;
//    GQA/MQA too (each query head's dK and dV go through the float32 workspace); dropout unless
//    FLASHATTN_HOPPER_DROPOUT=0 (read once per process);
//  - the device: compute capability 9.0;
//  - the environment: neither FLASHATTN_HOPPER nor FLASHATTN_HOPPER_BWD (the backward alone) is "0"
//    (both read once, at the first backward);
//  - the driver encodes the TMA tensor maps of q, k, v and dout.
// *ran = false with FLASHATTN_STATUS_OK: the caller runs the sm_80 kernels.
FlashAttnStatus run_bwd(const FlashBwdParams& p, cudaStream_t stream, const char* function, bool* ran);

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
