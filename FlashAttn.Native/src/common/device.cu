// Device queries (CUDA flavour): the Core area and the launchers' cached per-device info.
#include <atomic>
#include <cstdio>
#include <mutex>

#include "common/cuda_check.cuh"
#include "common/device.h"
#include "common/error.h"

namespace flashattn {

namespace {

constexpr int kMaxDevices = 64;

DeviceInfo g_info[kMaxDevices];
std::atomic<bool> g_ready[kMaxDevices];
std::mutex g_fill;

FlashAttnStatus query(int device, DeviceInfo* info, const char* function) {
  struct Attribute {
    cudaDeviceAttr attr;
    const char* what;
    int* into;
  };
  int major = 0, minor = 0;
  info->device = device;
  const Attribute attributes[] = {
      {cudaDevAttrComputeCapabilityMajor, "cudaDeviceGetAttribute(ComputeCapabilityMajor)", &major},
      {cudaDevAttrComputeCapabilityMinor, "cudaDeviceGetAttribute(ComputeCapabilityMinor)", &minor},
      {cudaDevAttrMultiProcessorCount, "cudaDeviceGetAttribute(MultiProcessorCount)", &info->sms},
      {cudaDevAttrMaxSharedMemoryPerBlockOptin, "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)",
       &info->smem_optin},
  };
  for (const Attribute& a : attributes) {
    FlashAttnStatus s = check_cuda(cudaDeviceGetAttribute(a.into, a.attr, device), function, a.what);
    if (s != FLASHATTN_STATUS_OK) return s;
  }
  info->capability = major * 10 + minor;
  return FLASHATTN_STATUS_OK;
}

}  // namespace

FlashAttnStatus device_info(int32_t device, DeviceInfo* info, const char* function) {
  if (device < 0 || device >= kMaxDevices)
    return fail(FLASHATTN_STATUS_NOT_SUPPORTED, function, "device (%d) must be in [0, %d)", device, kMaxDevices);
  if (!g_ready[device].load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(g_fill);
    if (!g_ready[device].load(std::memory_order_relaxed)) {
      FlashAttnStatus s = query(device, &g_info[device], function);
      if (s != FLASHATTN_STATUS_OK) return s;
      g_ready[device].store(true, std::memory_order_release);
    }
  }
  *info = g_info[device];
  return FLASHATTN_STATUS_OK;
}

FlashAttnStatus current_device_info(DeviceInfo* info, const char* function) {
  int device = 0;
  FlashAttnStatus s = check_cuda(cudaGetDevice(&device), function, "cudaGetDevice");
  return s != FLASHATTN_STATUS_OK ? s : device_info(device, info, function);
}

FlashAttnStatus device_capability(int32_t device, int32_t* capability, const char* function) {
  DeviceInfo info;
  FlashAttnStatus s = device_info(device, &info, function);
  if (s == FLASHATTN_STATUS_OK) *capability = info.capability;
  return s;
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
