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
#define FLASHATTN_ABI_VERSION 2

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

// area: Flash

// Bytes of device workspace FlashAttn_flash_fwd needs for these sizes (0 when none).
FLASHATTN_API int64_t FlashAttn_flash_fwd_workspace_size(
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t nheads_k, int64_t headdim);

// Exact attention, FlashAttention-2 forward: out = softmax(scale * q k^T + bias, masked) v, never
// materialising the (seqlen_q, seqlen_k) matrix.
// q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim); out like q.
//   With cu_seqlens_q/cu_seqlens_k ((batch + 1,) int32, device): q is (total_q, nheads, headdim),
//   k/v (total_k, nheads_k, headdim), seqlen_q/seqlen_k are the longest sequences, batch strides ignored.
// nheads must be a multiple of nheads_k (MQA/GQA: query head h reads key/value head h / (nheads / nheads_k)).
// headdim: a multiple of 8, at most 256 (the managed side pads other sizes).
// softmax_lse (float32, written): (batch, nheads, seqlen_q), or (nheads, total_q) with cu_seqlens.
// causal: aligned bottom-right (query i sees keys j <= i + seqlen_k - seqlen_q), as flash-attn >= 2.1;
//   window_left/window_right >= 0 limit keys to [i + sk - sq - left, i + sk - sq + right] (-1: unlimited);
//   causal is window_right = 0. softcap > 0 applies softcap * tanh(s / softcap) to the scaled scores.
// alibi_slopes: NULL or float32 (batch, nheads) with alibi_batch_stride (0: one row shared by all
//   sequences); adds -slope * |i + sk - sq - j| to the scaled scores.
// dropout_p in [0, 1): Philox-4x32-10 keyed by (seed, offset) decides each kept element; kept
//   probabilities are scaled by 1 / (1 - dropout_p). dropout_mask: NULL, or uint8 (batch, nheads,
//   seqlen_q, seqlen_k) contiguous, written with 1 where kept (tests only; not with cu_seqlens).
FLASHATTN_API FlashAttnStatus FlashAttn_flash_fwd(
    const void* q, const void* k, const void* v, void* out, float* softmax_lse, FlashAttnDType dtype,
    const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t nheads_k, int64_t headdim,
    int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride,
    int64_t k_batch_stride, int64_t k_row_stride, int64_t k_head_stride,
    int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride,
    int64_t out_batch_stride, int64_t out_row_stride, int64_t out_head_stride,
    float softmax_scale, int32_t causal, int32_t window_left, int32_t window_right, float softcap,
    const float* alibi_slopes, int64_t alibi_batch_stride,
    float dropout_p, uint64_t seed, uint64_t offset, uint8_t* dropout_mask,
    void* workspace, int64_t workspace_bytes, void* stream);

// Bytes of device workspace FlashAttn_flash_bwd needs for these sizes (float32 dq accumulator,
// row sums of dout * out, and per-query-head dk/dv accumulators when nheads != nheads_k).
FLASHATTN_API int64_t FlashAttn_flash_bwd_workspace_size(
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t nheads_k, int64_t headdim,
    int32_t varlen);

// FlashAttention-2 backward: dq, dk, dv from dout, recomputing the probabilities from q, k and
// softmax_lse. Same shapes, layouts and options as the forward (dropout regenerates the same mask
// from seed/offset); dq like q, dk/dv like k/v (reduced over the query heads of a GQA group).
// deterministic = 1 accumulates dq in a fixed order (slower).
// workspace: at least FlashAttn_flash_bwd_workspace_size bytes, 256-byte aligned; contents ignored.
FLASHATTN_API FlashAttnStatus FlashAttn_flash_bwd(
    const void* dout, const void* q, const void* k, const void* v, const void* out,
    const float* softmax_lse, void* dq, void* dk, void* dv, FlashAttnDType dtype,
    const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t nheads_k, int64_t headdim,
    int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride,
    int64_t k_batch_stride, int64_t k_row_stride, int64_t k_head_stride,
    int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride,
    int64_t out_batch_stride, int64_t out_row_stride, int64_t out_head_stride,
    int64_t dout_batch_stride, int64_t dout_row_stride, int64_t dout_head_stride,
    int64_t dq_batch_stride, int64_t dq_row_stride, int64_t dq_head_stride,
    int64_t dk_batch_stride, int64_t dk_row_stride, int64_t dk_head_stride,
    int64_t dv_batch_stride, int64_t dv_row_stride, int64_t dv_head_stride,
    float softmax_scale, int32_t causal, int32_t window_left, int32_t window_right, float softcap,
    const float* alibi_slopes, int64_t alibi_batch_stride,
    float dropout_p, uint64_t seed, uint64_t offset, int32_t deterministic,
    void* workspace, int64_t workspace_bytes, void* stream);

#endif /* FLASHATTN_H */
