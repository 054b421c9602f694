/*
 * flashattn.h — the C ABI of FlashAttn.Native (libflashattn.so).
 *
 * This header is the single source of truth for the managed bindings: build/BindingsGen reads it
 * and writes FlashAttn.Managed/Native/NativeMethods.<Area>.g.cs (run build/gen-bindings.sh after
 * any change here; tests/FlashAttn.Tests fails while the two differ).
 *
 * ABI rules
 *  - Flat extern "C" functions named FlashAttn_<area>_<verb>; plain C types only: fixed-width
 *    integers, float, double, pointers, and the enums below (passed as 32-bit ints).
 *  - Tensors cross as raw pointers + sizes + strides. All strides are in elements, not bytes.
 *    The last dimension of every tensor must be contiguous (stride 1).
 *  - Every function that can fail returns a FlashAttnStatus; on failure the thread-local message
 *    read by FlashAttn_last_error() names the function and the argument. Nothing throws across
 *    the ABI, nothing exits the process, nothing allocates device memory: outputs and workspaces
 *    come from the caller.
 *  - Kernels run on the CUDA stream passed as `stream` (NULL is the legacy default stream, the one
 *    TorchSharp uses). A CUDA error after a launch is recorded with the kernel's name.
 *  - A library built without CUDA keeps every entry point: validation runs as usual, then the
 *    CUDA work returns FLASHATTN_ERR_NO_CUDA ("built without CUDA support").
 *
 * Grammar that build/BindingsGen accepts (it fails loudly on anything else):
 *   "// area: <Name>" starts a group of functions (one generated file per area);
 *   "// ..." lines right above a declaration become its XML doc comment;
 *   "FLASHATTN_API <type> <name>(<params>);" possibly over several lines;
 *   "typedef enum <Name> { <NAME> = <int>, ... } <Name>;" and "#define FLASHATTN_ABI_VERSION <int>".
 */
#ifndef FLASHATTN_H
#define FLASHATTN_H

#include <stdint.h>

#ifdef __cplusplus
#define FLASHATTN_EXTERN_C extern "C"
#else
#define FLASHATTN_EXTERN_C
#endif
#define FLASHATTN_API FLASHATTN_EXTERN_C __attribute__((visibility("default")))

/* Bumped on every change of a signature or of an enum's values; the managed side refuses a
 * library whose FlashAttn_core_abi_version() differs from the one it was generated from. */
#define FLASHATTN_ABI_VERSION 1

typedef enum FlashAttnStatus {
  FLASHATTN_STATUS_OK = 0,
  FLASHATTN_STATUS_INVALID_ARGUMENT = 1,
  FLASHATTN_STATUS_NOT_SUPPORTED = 2,
  FLASHATTN_STATUS_NO_CUDA = 3,
  FLASHATTN_STATUS_CUDA_ERROR = 4,
  FLASHATTN_STATUS_INTERNAL = 5
} FlashAttnStatus;

typedef enum FlashAttnDType {
  FLASHATTN_DTYPE_FLOAT32 = 0,
  FLASHATTN_DTYPE_FLOAT16 = 1,
  FLASHATTN_DTYPE_BFLOAT16 = 2,
  FLASHATTN_DTYPE_INT32 = 3,
  FLASHATTN_DTYPE_INT64 = 4
} FlashAttnDType;

// area: Core

// The ABI version this library was built with (FLASHATTN_ABI_VERSION).
FLASHATTN_API int32_t FlashAttn_core_abi_version(void);

// The message of the last failed call on this thread ("" when none); valid until the next call.
FLASHATTN_API const char* FlashAttn_core_last_error(void);

// Forgets the last error of this thread.
FLASHATTN_API void FlashAttn_core_clear_error(void);

// 1 when the library was built with CUDA kernels, 0 for the CPU-only flavour.
FLASHATTN_API int32_t FlashAttn_core_has_cuda(void);

// One line describing the build: flavour, CUDA version and the GPU architectures compiled.
FLASHATTN_API const char* FlashAttn_core_build_info(void);

// Compute capability of CUDA device `device` (major * 10 + minor, 90 for the H100) in *capability.
FLASHATTN_API FlashAttnStatus FlashAttn_core_device_capability(int32_t device, int32_t* capability);

// area: Rotary

// Rotary position embedding (RoPE), forward or backward (conjugate = 1 rotates by -theta).
// For token t of sequence b at position p = t + offset(b), with theta from cos/sin row p:
//   non-interleaved (GPT-NeoX): pairs (x[i], x[i + rotary_dim/2]) for i < rotary_dim/2;
//   interleaved (GPT-J): pairs (x[2i], x[2i + 1]);
//   (a, b) -> (a cos - b sin, a sin + b cos); x[rotary_dim:] is copied unchanged (skipped when out == x).
// x, out: (batch, seqlen, nheads, headdim), or with cu_seqlens (total_seqlen, nheads, headdim) where
//   cu_seqlens is (batch + 1,) int32 on the device, seqlen is the longest sequence and the batch
//   strides are ignored. out may alias x exactly (in place).
// cos, sin: (seqlen_ro, rotary_dim / 2) with row stride cs_row_stride, dtype x's or float32.
// seqlen_offsets: NULL to use seqlen_offset for every sequence, else (batch,) int32 on the device.
// Positions outside [0, seqlen_ro) rotate by 0 (cos 1, sin 0), as flash-attn's kernel does; the
// managed side checks that an int offset fits, the kernel never reads outside cos/sin.
FLASHATTN_API FlashAttnStatus FlashAttn_rotary_apply(
    void* out, const void* x, FlashAttnDType dtype,
    const void* cos, const void* sin, FlashAttnDType cs_dtype,
    const int32_t* cu_seqlens, const int32_t* seqlen_offsets, int64_t seqlen_offset,
    int64_t batch, int64_t seqlen, int64_t nheads, int64_t headdim, int64_t rotary_dim,
    int64_t seqlen_ro, int64_t cs_row_stride,
    int64_t x_batch_stride, int64_t x_seq_stride, int64_t x_head_stride,
    int64_t out_batch_stride, int64_t out_seq_stride, int64_t out_head_stride,
    int32_t interleaved, int32_t conjugate, void* stream);

#endif /* FLASHATTN_H */
