// Launch checks for CUDA code: record, never exit (llm.c's cudaCheck exits; a library must not).
#pragma once

#include <cuda_runtime.h>

#include "common/error.h"

namespace flashattn {

// After a launch: turns a launch or earlier asynchronous error into a status naming the kernel.
inline FlashAttnStatus check_launch(const char* function, const char* kernel) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return FLASHATTN_STATUS_OK;
  return fail(FLASHATTN_STATUS_CUDA_ERROR, function, "CUDA error in kernel %s: %s (%s)", kernel,
              cudaGetErrorString(e), cudaGetErrorName(e));
}

// Wraps a CUDA runtime call made on the host side.
inline FlashAttnStatus check_cuda(cudaError_t e, const char* function, const char* what) {
  if (e == cudaSuccess) return FLASHATTN_STATUS_OK;
  cudaGetLastError();  // clear the non-sticky error so the next call starts clean
  return fail(FLASHATTN_STATUS_CUDA_ERROR, function, "%s failed: %s (%s)", what, cudaGetErrorString(e),
              cudaGetErrorName(e));
}

}  // namespace flashattn
