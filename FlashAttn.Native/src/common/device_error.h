// The device-error record behind FlashAttn_core_device_error / FlashAttn_core_device_check (flashattn.h):
// kernels that find invalid input on the device record it here, the host reads it without synchronising.
#pragma once

#include <cstdint>

#include "flashattn.h"

namespace flashattn {

struct DeviceErrorRecord {
  int64_t check;  // FlashAttnDeviceCheck, 0 when nothing is recorded; written last, it announces the rest
  int64_t index;
  int64_t value;
};

// The record's address for kernels, allocated on the first call (CUDA flavour; the CPU flavour answers NO_CUDA).
FlashAttnStatus device_error_record(DeviceErrorRecord** record, const char* function);

// Reads the record (all zero before its allocation, and in the CPU flavour); clear resets it.
void read_device_error(bool clear, int32_t* check, int64_t* index, int64_t* value);

// Records `check` when one of the n bytes of ok is 0 (FlashAttn_core_device_check).
FlashAttnStatus run_device_check(const uint8_t* ok, int64_t n, int32_t check, void* stream, const char* function);

#ifdef __CUDACC__
// Called by the thread that found the error. Plain stores, no atomics: atomics on host memory are not atomic over
// PCIe on every platform, and racing errors are all real (any one of them may be kept).
__device__ __forceinline__ void record_device_error(DeviceErrorRecord* record, int64_t check, int64_t index, int64_t value) {
  volatile DeviceErrorRecord* r = record;
  if (r->check != 0) return;  // the first error stays until the host clears it
  r->index = index;
  r->value = value;
  __threadfence_system();  // index and value reach host memory before the check that announces them
  r->check = check;
}
#endif

}  // namespace flashattn
