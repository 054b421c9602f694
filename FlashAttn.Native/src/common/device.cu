// Device queries (CUDA flavour): the Core area, the launchers' cached per-device info and per-kernel attributes.
#include <atomic>
#include <cstdio>
#include <mutex>
#include <vector>

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

// What allow_dynamic_smem and blocks_per_sm have asked of the driver: a few dozen (kernel, device) pairs at most,
// scanned under one lock (uncontended: a launch takes it once).
struct SmemLimit {
  const void* kernel;
  int device;
  size_t bytes;  // the kernel's MaxDynamicSharedMemorySize on the device
};
struct Occupancy {
  const void* kernel;
  int device, threads;
  size_t smem;
  int blocks;
};
std::mutex g_kernels;
std::vector<SmemLimit> g_smem_limits;
std::vector<Occupancy> g_occupancy;

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

FlashAttnStatus allow_dynamic_smem(const void* kernel, int device, size_t bytes, const char* name,
                                   const char* function) {
  if (bytes == 0) return FLASHATTN_STATUS_OK;
  std::lock_guard<std::mutex> lock(g_kernels);
  SmemLimit* limit = nullptr;
  for (SmemLimit& l : g_smem_limits)
    if (l.kernel == kernel && l.device == device) limit = &l;
  if (limit != nullptr && limit->bytes >= bytes) return FLASHATTN_STATUS_OK;
  char what[160];
  if (limit == nullptr) {
    // The default limit is 48 KB less the kernel's static shared memory, not 48 KB: ask the kernel.
    cudaFuncAttributes attr{};
    std::snprintf(what, sizeof(what), "cudaFuncGetAttributes(%s)", name);
    FlashAttnStatus s = check_cuda(cudaFuncGetAttributes(&attr, kernel), function, what);
    if (s != FLASHATTN_STATUS_OK) return s;
    g_smem_limits.push_back({kernel, device, size_t(attr.maxDynamicSharedSizeBytes)});
    limit = &g_smem_limits.back();
  }
  if (limit->bytes < bytes) {
    std::snprintf(what, sizeof(what), "cudaFuncSetAttribute(%s, MaxDynamicSharedMemorySize = %zu)", name, bytes);
    FlashAttnStatus s =
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), function, what);
    if (s != FLASHATTN_STATUS_OK) return s;
    limit->bytes = bytes;
  }
  return FLASHATTN_STATUS_OK;
}

FlashAttnStatus blocks_per_sm(const void* kernel, int device, int threads, size_t smem, int* blocks,
                              const char* function) {
  std::lock_guard<std::mutex> lock(g_kernels);
  for (const Occupancy& o : g_occupancy) {
    if (o.kernel == kernel && o.device == device && o.threads == threads && o.smem == smem) {
      *blocks = o.blocks;
      return FLASHATTN_STATUS_OK;
    }
  }
  FlashAttnStatus s = check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, smem), function,
                                 "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (s == FLASHATTN_STATUS_OK) g_occupancy.push_back({kernel, device, threads, smem, *blocks});
  return s;
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
