// CPU-only flavour: the CUDA side of every op, answering "built without CUDA support".
// The ABI functions and their validation are the same files as in the CUDA flavour; only what
// would touch a GPU lands here. Each new op adds its run_* function below.
#include "common/device.h"
#include "common/device_error.h"
#include "common/error.h"
#include "flash/flash.h"
#include "cross_entropy/cross_entropy.h"
#include "dense/bias_grad.h"
#include "dense/dense.h"
#include "norm/norm.h"
#include "optim/optim.h"
#include "rotary/rotary.h"

namespace flashattn {

namespace {
FlashAttnStatus no_cuda(const char* function) {
  return fail(FLASHATTN_STATUS_NO_CUDA, function,
              "built without CUDA support (CPU-only flavour of libflashattn); use the TorchSharp "
              "reference path on CPU tensors, or build FlashAttn.Native with nvcc");
}
}  // namespace

FlashAttnStatus device_capability(int32_t, int32_t*, const char* function) { return no_cuda(function); }

const char* build_info() { return "FlashAttn.Native cpu-only (built without CUDA support)"; }

FlashAttnStatus device_error_record(DeviceErrorRecord**, const char* function) { return no_cuda(function); }
void read_device_error(bool, int32_t* check, int64_t* index, int64_t* value) { *check = 0, *index = 0, *value = 0; }
FlashAttnStatus run_device_check(const uint8_t*, int64_t, int32_t, void*, const char* function) { return no_cuda(function); }

FlashAttnStatus run_rotary(const RotaryParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_norm_fwd(const NormFwdParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_norm_bwd(const NormBwdParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_cross_entropy_fwd(const CrossEntropyParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_cross_entropy_bwd(const CrossEntropyParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_cross_entropy_fwd_bwd(const CrossEntropyParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_cross_entropy_bwd_rescale(const CrossEntropyParams&, void*, const char* function) { return no_cuda(function); }

FlashAttnStatus run_flash_fwd(const FlashFwdParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_flash_bwd(const FlashBwdParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus flash_bwd_supported(int32_t, int64_t, int32_t*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_dense_gemm(const DenseParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_bias_grad(const BiasGradParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_adamw_step(const AdamWParams&, void*, const char* function) { return no_cuda(function); }
FlashAttnStatus run_grad_accumulate(const GradAccumulateParams&, void*, const char* function) { return no_cuda(function); }

}  // namespace flashattn
