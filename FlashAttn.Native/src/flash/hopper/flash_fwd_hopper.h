// The Hopper (sm_90a) forward, FlashAttention-3's design (TMA, wgmma, warp specialization), for the
// cases it covers; run_flash_fwd (flash_run.cu) tries it first and otherwise runs the sm_80 kernels.
// Built only when FLASHATTN_CUDA_ARCHS holds 90a (FLASHATTN_HOPPER=1 in flash_run.cu).
#pragma once

#include <cuda_runtime.h>

#include "flash/flash.h"

namespace flashattn {
namespace flash {
namespace hopper {

// Runs the forward on the Hopper kernel when all of these hold, and sets *ran:
//  - the case: head dim 64 or 128, padded batches (no cu_seqlens), no ALiBi, softcap or window other
//    than causal, seqlen_k > 0, softmax_scale finite and > 0; dropout unless
//    FLASHATTN_HOPPER_DROPOUT=0 (read once per process), and without the mask output;
//  - the device: compute capability 9.0 (sm_90a code runs nowhere else);
//  - the environment: FLASHATTN_HOPPER is not "0" (read once per process;
//    FLASHATTN_HOPPER_FWD_VARIANT=overlap likewise picks the kernel without the warpgroups' ping-pong);
//  - the driver encodes the TMA tensor maps of q, k and v (16-byte aligned base and strides, which
//    the ABI already requires).
// *ran = false with FLASHATTN_STATUS_OK: the caller runs the sm_80 kernels. When it ran, *kernel names the kernel
// variant (FLASHATTN_HOPPER_FWD_VARIANT's names), a static string.
FlashAttnStatus run_fwd(const FlashFwdParams& p, cudaStream_t stream, const char* function, bool* ran,
                        const char** kernel);

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
