// Device queries: the Core area of the ABI, and what the launchers ask of a GPU. Defined in device.cu (CUDA flavour)
// or cuda_stub.cpp (CPU flavour: device_capability and build_info only).
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashattn.h"

namespace flashattn {

// What the launchers size their grids and shared memory by, read once per device and cached: a
// cudaDeviceGetAttribute per launch is a driver call on every training step.
struct DeviceInfo {
  int device;      // the ordinal
  int capability;  // major * 10 + minor
  int sms;         // multiprocessors
  int smem_optin;  // bytes of shared memory a block may opt into
};

// The info of `device`.
FlashAttnStatus device_info(int32_t device, DeviceInfo* info, const char* function);

// The info of the current device (cudaGetDevice: the one the launch goes to).
FlashAttnStatus current_device_info(DeviceInfo* info, const char* function);

// Lets `kernel` launch on `device` (the current one) with `bytes` of dynamic shared memory. The kernel's limit (48 KB
// less its static shared memory until raised) is read at its first call and raised (cudaFuncSetAttribute, a driver
// call) at the first launch that needs more than the limit already set, not at every launch; it is only ever raised, so
// every earlier launch still fits. `name` names the kernel in an error.
FlashAttnStatus allow_dynamic_smem(const void* kernel, int device, size_t bytes, const char* name,
                                   const char* function);

// Blocks of `kernel` resident at once on one multiprocessor of `device` (the current one) with `threads` a block and
// `smem` bytes of dynamic shared memory (allowed first, see allow_dynamic_smem): asked of the driver once per kernel,
// device and launch shape.
FlashAttnStatus blocks_per_sm(const void* kernel, int device, int threads, size_t smem, int* blocks,
                              const char* function);

// Compute capability of `device` as major * 10 + minor.
FlashAttnStatus device_capability(int32_t device, int32_t* capability, const char* function);

// "cuda <version>, sm_80 sm_90a" or the CPU-only flavour's description.
const char* build_info();

}  // namespace flashattn
