// FlashAttnDType helpers shared by host code (validation) and CUDA code (dispatch).
#pragma once

#include <cstdint>

#include "flashattn.h"

namespace flashattn {

inline bool is_float_dtype(FlashAttnDType t) {
  return t == FLASHATTN_DTYPE_FLOAT32 || t == FLASHATTN_DTYPE_FLOAT16 || t == FLASHATTN_DTYPE_BFLOAT16;
}

inline int64_t dtype_size(FlashAttnDType t) {
  switch (t) {
    case FLASHATTN_DTYPE_FLOAT32: return 4;
    case FLASHATTN_DTYPE_FLOAT16: return 2;
    case FLASHATTN_DTYPE_BFLOAT16: return 2;
    case FLASHATTN_DTYPE_INT32: return 4;
    case FLASHATTN_DTYPE_INT64: return 8;
  }
  return 0;
}

inline const char* dtype_name(FlashAttnDType t) {
  switch (t) {
    case FLASHATTN_DTYPE_FLOAT32: return "float32";
    case FLASHATTN_DTYPE_FLOAT16: return "float16";
    case FLASHATTN_DTYPE_BFLOAT16: return "bfloat16";
    case FLASHATTN_DTYPE_INT32: return "int32";
    case FLASHATTN_DTYPE_INT64: return "int64";
  }
  return "unknown";
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace flashattn
