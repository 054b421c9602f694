// Device queries: the Core area of the ABI, and what the launchers ask of a GPU. Defined in device.cu (CUDA flavour)
// or cuda_stub.cpp (CPU flavour: device_capability and build_info only).
#pragma once

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

// Compute capability of `device` as major * 10 + minor.
FlashAttnStatus device_capability(int32_t device, int32_t* capability, const char* function);

// "cuda <version>, sm_80 sm_90a" or the CPU-only flavour's description.
const char* build_info();

}  // namespace flashattn
