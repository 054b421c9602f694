// Device queries behind the Core area of the ABI. Defined in device.cu (CUDA flavour) or
// cuda_stub.cpp (CPU flavour).
#pragma once

#include <cstdint>

#include "flashattn.h"

namespace flashattn {

// Compute capability of `device` as major * 10 + minor.
FlashAttnStatus device_capability(int32_t device, int32_t* capability, const char* function);

// "cuda <version>, sm_80 sm_90a" or the CPU-only flavour's description.
const char* build_info();

}  // namespace flashattn
