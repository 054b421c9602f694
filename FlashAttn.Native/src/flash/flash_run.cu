// run_flash_fwd / run_flash_bwd: runtime dtype and head dim -> the compiled instantiation
// (instantiations/*.cu define run_mha_fwd / run_mha_bwd for each pair).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash/flash.h"
#include "flash/flash_bwd_launch_template.h"
#include "flash/flash_fwd_launch_template.h"

namespace flashattn {

namespace {

template <template <typename, int> class Fn, typename Params>
FlashAttnStatus dispatch(const Params& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int dpad = int(flash_round_headdim(p.headdim));
  auto by_dim = [&](auto tag) -> FlashAttnStatus {
    using T = decltype(tag);
    switch (dpad) {
      case 32: return Fn<T, 32>::run(p, stream, function);
      case 64: return Fn<T, 64>::run(p, stream, function);
      case 96: return Fn<T, 96>::run(p, stream, function);
      case 128: return Fn<T, 128>::run(p, stream, function);
      case 160: return Fn<T, 160>::run(p, stream, function);
      case 192: return Fn<T, 192>::run(p, stream, function);
      case 224: return Fn<T, 224>::run(p, stream, function);
      default: return Fn<T, 256>::run(p, stream, function);
    }
  };
  if (p.dtype == FLASHATTN_DTYPE_BFLOAT16) return by_dim(__nv_bfloat16{});
  return by_dim(__half{});
}

template <typename T, int D>
struct Fwd {
  static FlashAttnStatus run(const FlashFwdParams& p, cudaStream_t s, const char* f) {
    return flash::run_mha_fwd<T, D>(p, s, f);
  }
};
template <typename T, int D>
struct Bwd {
  static FlashAttnStatus run(const FlashBwdParams& p, cudaStream_t s, const char* f) {
    return flash::run_mha_bwd<T, D>(p, s, f);
  }
};

}  // namespace

FlashAttnStatus run_flash_fwd(const FlashFwdParams& p, void* stream, const char* function) {
  return dispatch<Fwd>(p, stream, function);
}

FlashAttnStatus run_flash_bwd(const FlashBwdParams& p, void* stream, const char* function) {
  return dispatch<Bwd>(p, stream, function);
}

FlashAttnStatus flash_bwd_supported(int32_t device, int64_t headdim, int32_t* supported, const char* function) {
  int smem_optin = 0;
  FlashAttnStatus s = check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                                 function, "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (s != FLASHATTN_STATUS_OK) return s;
  auto need = [](int dpad) -> int {  // one Q/dO stage, the least the kernel runs with (dtype-independent: 2-byte types)
    switch (dpad) {
      case 32: return flash::BwdTraits<32, __half>::smem_bytes(1);
      case 64: return flash::BwdTraits<64, __half>::smem_bytes(1);
      case 96: return flash::BwdTraits<96, __half>::smem_bytes(1);
      case 128: return flash::BwdTraits<128, __half>::smem_bytes(1);
      case 160: return flash::BwdTraits<160, __half>::smem_bytes(1);
      case 192: return flash::BwdTraits<192, __half>::smem_bytes(1);
      case 224: return flash::BwdTraits<224, __half>::smem_bytes(1);
      default: return flash::BwdTraits<256, __half>::smem_bytes(1);
    }
  };
  *supported = need(int(flash_round_headdim(headdim))) <= smem_optin ? 1 : 0;
  return FLASHATTN_STATUS_OK;
}

}  // namespace flashattn
