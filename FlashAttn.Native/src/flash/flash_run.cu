// run_flash_fwd / run_flash_bwd: runtime dtype and head dim -> the compiled instantiation
// (instantiations/*.cu define run_mha_fwd / run_mha_bwd for each pair). Both first offer the case
// to the Hopper kernels (hopper/, when the library is built for sm_90a).
// FLASHATTN_LOG_PATH=1 in the environment (read once per process) prints which kernel ran, one line per call on stderr.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash/flash.h"
#include "flash/flash_bwd_launch_template.h"
#include "flash/flash_fwd_launch_template.h"
#if FLASHATTN_HOPPER
#include "flash/hopper/flash_bwd_hopper.h"
#include "flash/hopper/flash_fwd_hopper.h"
#endif

namespace flashattn {

namespace {

// Calls f(std::integral_constant<int, D>{}) with D the compiled head dim that headdim rounds up to.
template <typename F>
auto with_headdim(int64_t headdim, F&& f) {
  switch (int(flash_round_headdim(headdim))) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 160: return f(std::integral_constant<int, 160>{});
    case 192: return f(std::integral_constant<int, 192>{});
    case 224: return f(std::integral_constant<int, 224>{});
    default: return f(std::integral_constant<int, 256>{});
  }
}

template <template <typename, int> class Fn, typename Params>
FlashAttnStatus dispatch(const Params& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  auto by_dim = [&](auto tag) -> FlashAttnStatus {
    using T = decltype(tag);
    return with_headdim(p.headdim, [&](auto d) { return Fn<T, decltype(d)::value>::run(p, stream, function); });
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

void log_path(const char* function, const char* path, const char* kernel = nullptr) {
  static const bool on = [] {  // read once: getenv scans the whole environment, at every call of every layer
    const char* v = std::getenv("FLASHATTN_LOG_PATH");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  if (on) std::fprintf(stderr, "%s: %s%s%s\n", function, path, kernel ? ", kernel " : "", kernel ? kernel : "");
}

}  // namespace

FlashAttnStatus run_flash_fwd(const FlashFwdParams& p, void* stream, const char* function) {
#if FLASHATTN_HOPPER
  bool ran = false;
  const char* kernel = nullptr;
  const FlashAttnStatus s = flash::hopper::run_fwd(p, static_cast<cudaStream_t>(stream), function, &ran, &kernel);
  if (s != FLASHATTN_STATUS_OK || ran) {
    if (ran) log_path(function, "hopper path (sm_90a: TMA, wgmma)", kernel);
    return s;
  }
#endif
  log_path(function, "sm80 path (mma.sync)");
  return dispatch<Fwd>(p, stream, function);
}

FlashAttnStatus run_flash_bwd(const FlashBwdParams& p, void* stream, const char* function) {
#if FLASHATTN_HOPPER
  bool ran = false;
  const FlashAttnStatus s = flash::hopper::run_bwd(p, static_cast<cudaStream_t>(stream), function, &ran);
  if (s != FLASHATTN_STATUS_OK || ran) {
    if (ran) log_path(function, "hopper path (sm_90a: TMA, wgmma)");
    return s;
  }
#endif
  log_path(function, "sm80 path (mma.sync)");
  return dispatch<Bwd>(p, stream, function);
}

FlashAttnStatus run_flash_bwd_preprocess(const FlashBwdParams& p, void* stream, const char* function) {
  const int dpad = int(flash_round_headdim(p.headdim));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.dtype == FLASHATTN_DTYPE_BFLOAT16 ? flash::bwd_preprocess<__nv_bfloat16>(p, dpad, s, function)
                                              : flash::bwd_preprocess<__half>(p, dpad, s, function);
}

FlashAttnStatus run_flash_bwd_postprocess(const FlashBwdParams& p, void* stream, const char* function) {
  const int dpad = int(flash_round_headdim(p.headdim));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.dtype == FLASHATTN_DTYPE_BFLOAT16 ? flash::bwd_postprocess<__nv_bfloat16>(p, dpad, s, function)
                                              : flash::bwd_postprocess<__half>(p, dpad, s, function);
}

FlashAttnStatus flash_bwd_supported(int32_t device, int64_t headdim, int32_t* supported, const char* function) {
  int smem_optin = 0;
  FlashAttnStatus s = check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                                 function, "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (s != FLASHATTN_STATUS_OK) return s;
  // one Q/dO stage, the least the kernel runs with (the same for both 2-byte types)
  const int need = with_headdim(headdim, [](auto d) { return flash::BwdTraits<decltype(d)::value, __half>::smem_bytes(1); });
  *supported = need <= smem_optin ? 1 : 0;
  return FLASHATTN_STATUS_OK;
}

}  // namespace flashattn
