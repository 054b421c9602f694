// The device-error record (CUDA flavour): one record of pinned, mapped host memory for the process, and the
// device-side assertion kernel of FlashAttn_core_device_check.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>

#include "common/cuda_check.cuh"
#include "common/device_error.h"

namespace flashattn {

namespace {

std::mutex g_mutex;
std::atomic<DeviceErrorRecord*> g_host{nullptr};  // published after g_device is set
DeviceErrorRecord* g_device = nullptr;

__global__ void device_check_kernel(const uint8_t* ok, int64_t n, int32_t check, DeviceErrorRecord* record) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (ok[i] == 0) {
      record_device_error(record, check, i, 0);
      return;
    }
  }
}

}  // namespace

FlashAttnStatus device_error_record(DeviceErrorRecord** record, const char* function) {
  if (g_host.load(std::memory_order_acquire) == nullptr) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_host.load(std::memory_order_relaxed) == nullptr) {
      // Portable: mapped into every device's address space (at the host address, with unified addressing).
      void* host = nullptr;
      FlashAttnStatus s = check_cuda(cudaHostAlloc(&host, sizeof(DeviceErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable),
                                     function, "cudaHostAlloc (device-error record)");
      if (s != FLASHATTN_STATUS_OK) return s;
      std::memset(host, 0, sizeof(DeviceErrorRecord));
      void* device = nullptr;
      s = check_cuda(cudaHostGetDevicePointer(&device, host, 0), function, "cudaHostGetDevicePointer (device-error record)");
      if (s != FLASHATTN_STATUS_OK) {
        cudaFreeHost(host);
        return s;
      }
      g_device = static_cast<DeviceErrorRecord*>(device);
      g_host.store(static_cast<DeviceErrorRecord*>(host), std::memory_order_release);
    }
  }
  *record = g_device;
  return FLASHATTN_STATUS_OK;
}

void read_device_error(bool clear, int32_t* check, int64_t* index, int64_t* value) {
  *check = 0;
  *index = 0;
  *value = 0;
  volatile DeviceErrorRecord* r = g_host.load(std::memory_order_acquire);
  if (r == nullptr) return;
  const int64_t c = r->check;
  if (c == 0) return;
  std::atomic_thread_fence(std::memory_order_acquire);
  *index = r->index;
  *value = r->value;
  *check = int32_t(c);
  if (clear) r->check = 0;
}

FlashAttnStatus run_device_check(const uint8_t* ok, int64_t n, int32_t check, void* stream, const char* function) {
  DeviceErrorRecord* record = nullptr;
  FlashAttnStatus s = device_error_record(&record, function);
  if (s != FLASHATTN_STATUS_OK) return s;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 1024);
  device_check_kernel<<<unsigned(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(ok, n, check, record);
  return check_launch(function, "device_check_kernel");
}

}  // namespace flashattn
