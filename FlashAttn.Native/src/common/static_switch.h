// Runtime values to template parameters, in one place (flash-attention's static_switch.h idea).
//   BOOL_SWITCH(params.interleaved, kInterleaved, [&] { launch<kInterleaved>(...); });
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// FLOAT_SWITCH(dtype, T, [&] { ... }): T is float, __half or __nv_bfloat16 (CUDA code only).
#define FLOAT_SWITCH(DTYPE, TYPE_NAME, ...)                 \
  [&] {                                                     \
    if ((DTYPE) == FLASHATTN_DTYPE_BFLOAT16) {              \
      using TYPE_NAME = __nv_bfloat16;                      \
      return __VA_ARGS__();                                 \
    } else if ((DTYPE) == FLASHATTN_DTYPE_FLOAT16) {        \
      using TYPE_NAME = __half;                             \
      return __VA_ARGS__();                                 \
    } else {                                                \
      using TYPE_NAME = float;                              \
      return __VA_ARGS__();                                 \
    }                                                       \
  }()
