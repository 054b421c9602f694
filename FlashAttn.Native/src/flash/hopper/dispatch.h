// What the Hopper forward and backward dispatches share, on the host: environment switches and the
// device's compute capability (sm_90a code runs on compute capability 9.0 alone).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/cuda_check.cuh"

namespace flashattn {
namespace flash {
namespace hopper {

// Whether environment variable `name` is "0".
inline bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// The current device and its compute capability (major * 10 + minor), the latter cached per device.
inline FlashAttnStatus current_capability(int* device_out, int* capability, const char* function) {
  static std::atomic<int> cache[64];  // 0: not asked yet
  int device = 0;
  FlashAttnStatus s = check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  *device_out = device;
  if (s != FLASHATTN_STATUS_OK) return s;
  *capability = device < 64 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (*capability != 0) return s;
  int major = 0, minor = 0;
  s = check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), function,
                 "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  if (s == FLASHATTN_STATUS_OK)
    s = check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), function,
                   "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  if (s != FLASHATTN_STATUS_OK) return s;
  *capability = major * 10 + minor;
  if (device < 64) cache[device].store(*capability, std::memory_order_relaxed);
  return s;
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
