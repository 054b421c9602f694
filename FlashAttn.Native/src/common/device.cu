// Device queries for the Core area (CUDA flavour).
#include <cstdio>

#include "common/cuda_check.cuh"
#include "common/device.h"

namespace flashattn {

FlashAttnStatus device_capability(int32_t device, int32_t* capability, const char* function) {
  int major = 0, minor = 0;
  FlashAttnStatus s = check_cuda(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), function,
      "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  if (s != FLASHATTN_STATUS_OK) return s;
  s = check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), function,
                 "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  if (s != FLASHATTN_STATUS_OK) return s;
  *capability = major * 10 + minor;
  return FLASHATTN_STATUS_OK;
}

const char* build_info() {
  static char info[160];
  if (!info[0]) {
    std::snprintf(info, sizeof(info), "FlashAttn.Native cuda %d.%d, archs %s", CUDART_VERSION / 1000,
                  (CUDART_VERSION % 1000) / 10, FLASHATTN_CUDA_ARCHS_STRING);
  }
  return info;
}

}  // namespace flashattn
