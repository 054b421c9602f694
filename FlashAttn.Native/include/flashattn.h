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
 *    come from the caller. The one allocation of the library is the device-error record (a few
 *    bytes of pinned host memory, see FlashAttn_core_device_error). One workspace has a state:
 *    FlashAttn_dense_bias_grad's must be all zero at its first call, and every call leaves it so.
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

/* Bumped on every change of a signature, of an enum's values or of what a call asks of its arguments (a
 * workspace's contents, say); the managed side refuses a library whose FlashAttn_core_abi_version() differs
 * from the one it was generated from. */
#define FLASHATTN_ABI_VERSION 14

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

// What a device-side check found (FlashAttn_core_device_error). CROSS_ENTROPY_LABEL: a label outside
// [0, vocab) that is not ignore_index (index: its row, value: the label). Codes from CALLER up are
// those given to FlashAttn_core_device_check.
typedef enum FlashAttnDeviceCheck {
  FLASHATTN_DEVICE_CHECK_NONE = 0,
  FLASHATTN_DEVICE_CHECK_CROSS_ENTROPY_LABEL = 1,
  FLASHATTN_DEVICE_CHECK_CALLER = 256
} FlashAttnDeviceCheck;

// The device-error record. A kernel that finds invalid input on the device (a label outside the
// vocabulary) cannot return a status without the host waiting for it: it writes NaN where that
// input's results go and records the error in one small record of pinned, mapped host memory,
// which the host reads at any time without synchronising (an error is visible once the kernel has
// finished; synchronise first for a definitive answer). The record is the one allocation of the
// library: cudaHostAlloc (mapped, portable: one record serves every device) on the first launch
// of a checking kernel, kept until the library is unloaded; a buffer of the caller in device memory
// could not be read without a copy and a wait. The first error is kept until cleared (later ones
// are dropped; of errors recorded at the same moment, any one may be kept).
// Reads the record into *check (a FlashAttnDeviceCheck, NONE when nothing is recorded; always NONE
// without CUDA or before any checking kernel ran), *index and *value; clear = 1 resets it.
FLASHATTN_API FlashAttnStatus FlashAttn_core_device_error(int32_t clear, int32_t* check, int64_t* index, int64_t* value);

// Device-side assertion: records `check` (>= FLASHATTN_DEVICE_CHECK_CALLER, the caller's code) in
// the device-error record when an element of ok (n bytes: uint8 or bool, 0 = failed, on the device
// of the current CUDA context) is 0, with that element's index and value 0; runs on `stream`
// without synchronising.
FLASHATTN_API FlashAttnStatus FlashAttn_core_device_check(const uint8_t* ok, int64_t n, int32_t check, void* stream);

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
// window_left/window_right >= 0 limit the keys query i sees to [i + sk - sq - left, i + sk - sq + right]
//   (-1: unlimited), aligned bottom-right as flash-attn >= 2.1. Causal is window_right = 0 (query i sees keys
//   j <= i + seqlen_k - seqlen_q), the one way to ask for it. softcap > 0 applies softcap * tanh(s / softcap) to
//   the scaled scores.
// alibi_slopes: NULL or float32 (batch, nheads) with alibi_batch_stride (0: one row shared by all
//   sequences); adds -slope * |i + sk - sq - j| to the scaled scores.
// dropout_p in [0, 1): Philox-4x32-10 keyed by (seed, offset) decides each kept element; kept
//   probabilities are scaled by 1 / (1 - dropout_p). Element (b, h, i, j) takes 16-bit half j % 2
//   (low, high) of word 2 ((i / 8) % 2) + (j / 8) % 2 of philox(seed, {4 (j / 16) + (j % 8) / 2,
//   8 (i / 16) + i % 8, b * nheads + h + offset_lo, offset_hi}) and is kept when that half is below
//   floor((1 - dropout_p) * 2^16). dropout_mask: NULL, or uint8 (batch, nheads, seqlen_q, seqlen_k)
//   contiguous and zero-filled by the caller, written with 1 where query i sees key j and the element
//   is kept (tests only; not with cu_seqlens).
FLASHATTN_API FlashAttnStatus FlashAttn_flash_fwd(
    const void* q, const void* k, const void* v, void* out, float* softmax_lse, FlashAttnDType dtype,
    const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t nheads_k, int64_t headdim,
    int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride,
    int64_t k_batch_stride, int64_t k_row_stride, int64_t k_head_stride,
    int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride,
    int64_t out_batch_stride, int64_t out_row_stride, int64_t out_head_stride,
    float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
    const float* alibi_slopes, int64_t alibi_batch_stride,
    float dropout_p, uint64_t seed, uint64_t offset, uint8_t* dropout_mask,
    void* workspace, int64_t workspace_bytes, void* stream);

// Bytes of device workspace FlashAttn_flash_bwd needs for these sizes (float32 dq accumulator,
// row sums of dout * out, and per-query-head dk/dv accumulators when nheads != nheads_k).
FLASHATTN_API int64_t FlashAttn_flash_bwd_workspace_size(
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads, int64_t nheads_k, int64_t headdim,
    int32_t varlen);

// Whether FlashAttn_flash_bwd runs on CUDA device `device` at this head dim (*supported = 1 or 0): its
// kernel needs 103-151 KB of shared memory per block depending on the head dim, more than GPUs with
// 99 KB per block allow (sm_86, sm_89, sm_120). The managed side takes the reference path there when
// gradients are needed.
FLASHATTN_API FlashAttnStatus FlashAttn_flash_bwd_supported(int32_t device, int64_t headdim, int32_t* supported);

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
    float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
    const float* alibi_slopes, int64_t alibi_batch_stride,
    float dropout_p, uint64_t seed, uint64_t offset, int32_t deterministic,
    void* workspace, int64_t workspace_bytes, void* stream);

// area: Norm

// Bytes of device workspace FlashAttn_norm_bwd needs: float32 per-lane partial sums of dweight and
// dbias (one slot per gradient asked for: has_bias counts bias0, has_weight1/has_bias1 the second norm).
FLASHATTN_API int64_t FlashAttn_norm_bwd_workspace_size(
    int64_t rows, int64_t hidden, int32_t has_bias0, int32_t has_weight1, int32_t has_bias1);

// Fused dropout + residual add + LayerNorm or RMSNorm, forward (flash-attn's dropout_add_layer_norm,
// dropout_add_rms_norm and the parallel-residual variant). For each row r and column c:
//   x = dropout(x0 * rowscale[r]) + dropout(x1) + residual     (float32; missing terms are 0)
//   z0 = (x - mean) * rstd * w0 + b0, z1 = (x - mean) * rstd * w1 + b1   (mean 0 for RMSNorm; the
//   biases are optional for both norms)
//   with mean/rstd over the row, rstd = 1 / sqrt(var + epsilon) (var = mean(x^2) for RMSNorm),
//   w = weight + 1 when zero_centered_weight = 1.
// x0, x1 (NULL: none), z0, z1 (NULL: none): (rows, hidden) with row strides; dtype.
// residual (NULL: none): (rows, hidden), residual_dtype (dtype or float32).
// residual_out (NULL: not written): x, (rows, hidden) in residual_out_dtype (dtype or float32).
// weight0, weight1 (NULL: no second norm): (hidden,); bias0, bias1: (hidden,) or NULL; weight_dtype
//   (dtype or float32) for all four. rowscale: NULL or float32 (rows,), scales x0 only.
// mean (NULL for RMSNorm), rstd: float32 (rows,), written for the backward.
// hidden: 1 to 16384. dropout_p in [0, 1): element e = r * hidden + c of x0 (e + rows * hidden of
//   x1) is kept when 16-bit half e % 2 (low, high) of word (e / 2) % 4 of Philox-4x32-10(key seed,
//   counter (e / 8, offset)) < floor((1 - p) * 2^16); kept values are scaled by 1 / (1 - p). dropout_mask0/1: NULL or uint8 (rows, hidden)
//   contiguous, written with 1 where kept.
FLASHATTN_API FlashAttnStatus FlashAttn_norm_fwd(
    const void* x0, const void* x1, const void* residual, FlashAttnDType dtype, FlashAttnDType residual_dtype,
    const void* weight0, const void* bias0, const void* weight1, const void* bias1, FlashAttnDType weight_dtype,
    const float* rowscale, void* z0, void* z1, void* residual_out, FlashAttnDType residual_out_dtype,
    float* mean, float* rstd, uint8_t* dropout_mask0, uint8_t* dropout_mask1,
    int64_t rows, int64_t hidden, int64_t x0_row_stride, int64_t x1_row_stride, int64_t residual_row_stride,
    int64_t z_row_stride, int64_t residual_out_row_stride,
    float epsilon, float dropout_p, uint64_t seed, uint64_t offset,
    int32_t is_rms_norm, int32_t zero_centered_weight, void* stream);

// Backward of FlashAttn_norm_fwd, one pass over the rows plus a small deterministic reduction of
// the per-lane dweight/dbias partials. The dropout mask is regenerated from seed/offset.
// dz0, dz1 (NULL: none): (rows, hidden), dtype, sharing dz_row_stride.
// dresidual_out (NULL: none): gradient of residual_out, (rows, hidden) in x_dtype.
// x: the forward's residual_out (or x0 when nothing was added), (rows, hidden) in x_dtype (dtype or float32).
// weight0, weight1 (NULL: no second norm): (hidden,) in weight_dtype; mean (NULL for RMSNorm), rstd:
//   float32 (rows,) from the forward; rowscale: NULL or float32 (rows,).
// dx0 (dtype), dx1 (dtype, NULL when the forward had no x1), dresidual (NULL when it had no
//   residual; residual_dtype): (rows, hidden) sharing dx_row_stride, dresidual with its own.
// dweight0, dbias0 (NULL: no bias), dweight1, dbias1: (hidden,) in weight_dtype.
// workspace: at least FlashAttn_norm_bwd_workspace_size bytes, 16-byte aligned (32 for full-speed
//   16-bit kernels); contents ignored.
FLASHATTN_API FlashAttnStatus FlashAttn_norm_bwd(
    const void* dz0, const void* dz1, const void* dresidual_out, const void* x, FlashAttnDType x_dtype,
    const void* weight0, const void* weight1, FlashAttnDType weight_dtype,
    const float* mean, const float* rstd, const float* rowscale,
    void* dx0, void* dx1, void* dresidual, FlashAttnDType residual_dtype,
    void* dweight0, void* dbias0, void* dweight1, void* dbias1, FlashAttnDType dtype,
    int64_t rows, int64_t hidden, int64_t dz_row_stride, int64_t dresidual_out_row_stride,
    int64_t x_row_stride, int64_t dx_row_stride, int64_t dresidual_row_stride,
    float dropout_p, uint64_t seed, uint64_t offset, int32_t is_rms_norm, int32_t zero_centered_weight,
    void* workspace, int64_t workspace_bytes, void* stream);

// area: CrossEntropy

// Bytes of device workspace FlashAttn_cross_entropy_fwd needs (per-chunk max, sum, sum of logits).
FLASHATTN_API int64_t FlashAttn_cross_entropy_fwd_workspace_size(int64_t rows, int64_t vocab);

// Softmax cross-entropy per row, reading the logits once (the vocabulary is split in chunks of up
// to 16384 columns per block with an online max/sum, then combined per row).
// With z = logit_scale * logits[r, :] and lse = logsumexp(z):
//   loss[r] = lse - (1 - label_smoothing) * z[label] - label_smoothing * sum(z) / vocab
//             + lse_square_scale * lse^2,   z_loss[r] = lse_square_scale * lse^2;
//   rows with label == ignore_index get loss 0 and z_loss 0; a row whose label is outside [0, vocab)
//   gets NaN loss and z_loss and records FLASHATTN_DEVICE_CHECK_CROSS_ENTROPY_LABEL in the
//   device-error record (FlashAttn_core_device_error).
// logits: (rows, vocab) with row_stride, dtype; labels: int64 (rows,).
// loss, lse: float32 (rows,), written; z_loss: float32 (rows,) or NULL.
FLASHATTN_API FlashAttnStatus FlashAttn_cross_entropy_fwd(
    const void* logits, FlashAttnDType dtype, const int64_t* labels, float* loss, float* z_loss, float* lse,
    int64_t rows, int64_t vocab, int64_t row_stride,
    float label_smoothing, float logit_scale, float lse_square_scale, int64_t ignore_index,
    void* workspace, int64_t workspace_bytes, void* stream);

// Backward: dlogits[r, c] = dloss[r] * logit_scale * (softmax(z)[c] * (1 + 2 * lse_square_scale * lse)
//   - (1 - label_smoothing) * (c == label) - label_smoothing / vocab), 0 for ignored rows, NaN for rows
//   whose label is outside [0, vocab).
// dloss: float32, element r at dloss[r * dloss_stride] (stride 0: one value for every row).
// lse: the forward's. dlogits: (rows, vocab) with dlogits_row_stride, dtype; may be logits itself
//   (same strides) to overwrite the logits in place.
FLASHATTN_API FlashAttnStatus FlashAttn_cross_entropy_bwd(
    const float* dloss, int64_t dloss_stride, const void* logits, const int64_t* labels, const float* lse,
    void* dlogits, FlashAttnDType dtype, int64_t rows, int64_t vocab, int64_t logits_row_stride,
    int64_t dlogits_row_stride, float label_smoothing, float logit_scale, float lse_square_scale,
    int64_t ignore_index, void* stream);

// Bytes of device workspace FlashAttn_cross_entropy_fwd_bwd needs (the forward's, and lse for the rows too
// long for its one-pass kernel).
FLASHATTN_API int64_t FlashAttn_cross_entropy_fwd_bwd_workspace_size(int64_t rows, int64_t vocab);

// Forward and backward in one pass: FlashAttn_cross_entropy_fwd's loss and z_loss, and
// FlashAttn_cross_entropy_bwd's dlogits for the upstream gradient dloss the caller expects (e.g. a mean
// reduction's scale / n_valid, computed on the device), so that the logits are read once. dloss is read
// on the device: nothing waits for it. dloss_applied: float32 (rows,), written with the dloss each row's
// dlogits were computed for (FlashAttn_cross_entropy_bwd_rescale's reference). dlogits may be logits
// (same strides): the logits are then overwritten in the forward. A block holds a row in shared memory
// (a row must fit the device's shared memory: float16/bfloat16 up to 116k columns on sm_90, 83k on
// sm_80, float32 half as many); larger rows run the forward's kernels and then the backward's (the
// logits read twice). workspace: FlashAttn_cross_entropy_fwd_bwd_workspace_size(rows, vocab) bytes.
FLASHATTN_API FlashAttnStatus FlashAttn_cross_entropy_fwd_bwd(
    const void* logits, void* dlogits, FlashAttnDType dtype, const int64_t* labels, const float* dloss,
    int64_t dloss_stride, float* loss, float* z_loss, float* dloss_applied, int64_t rows,
    int64_t vocab, int64_t logits_row_stride, int64_t dlogits_row_stride, float label_smoothing,
    float logit_scale, float lse_square_scale, int64_t ignore_index, void* workspace, int64_t workspace_bytes,
    void* stream);

// The backward of FlashAttn_cross_entropy_fwd_bwd once the real upstream gradient dloss is known (on the
// device): each row whose dloss differs from dloss_applied (and whose label is not ignore_index) has its
// dlogits multiplied by dloss / dloss_applied in place, and dloss_applied set to dloss (a second backward
// through the same graph then scales from there). Rows whose dloss equals the expectation cost one
// comparison. The result differs from FlashAttn_cross_entropy_bwd's by one rounding of dlogits' dtype;
// a dloss_applied of 0 leaves nothing to scale (NaN gradients where dloss is not 0).
// dloss: float32, element r at dloss[r * dloss_stride] (stride 0: one value for every row).
FLASHATTN_API FlashAttnStatus FlashAttn_cross_entropy_bwd_rescale(
    void* dlogits, FlashAttnDType dtype, const int64_t* labels, const float* dloss, int64_t dloss_stride,
    float* dloss_applied, int64_t rows, int64_t vocab, int64_t dlogits_row_stride, int64_t ignore_index,
    void* stream);

// area: Dense

// What FlashAttn_dense_gemm does after the product P = op(a) @ op(b) (float32 accumulation), in
// row-major terms (out is (m, n)). "bias" is the bias vector, NULL to leave its part out (the
// epilogue without bias, or without the bias gradient).
//   NONE: out = P.   BIAS: out = P + bias[col], bias (n,).
//   GELU_BIAS: out = gelu(P + bias), gelu the tanh approximation (GPT-2's gelu_new).
//   GELU_AUX_BIAS: GELU_BIAS and aux = P + bias (the pre-activation, (m, n) with ldaux, out's dtype).
//   RELU_BIAS / RELU_AUX_BIAS: the same with max(0, .); the relu aux is cuBLASLt's bit mask of
//     P + bias > 0, one bit per element, rows ldaux bits apart (m * ldaux / 8 bytes); ldaux (in
//     bits) a multiple of 128.
//   DGELU_BGRAD: out = P * gelu'(aux) with aux the forward's pre-activation (m, n); bias (n,) is
//     written with the column sums of out (the gradient of the forward's bias).
//   DRELU_BGRAD: out = P * mask(aux) (the relu bit mask); bias (n,) written with out's column sums.
//   BGRADB: out = P; bias (m,) is written with the row sums of op(a), sum over k: with op(a) = dy^T
//     and b = x this is the weight gradient dW = dy^T x with the bias gradient sum(dy, 0) of a linear.
typedef enum FlashAttnDenseEpilogue {
  FLASHATTN_DENSE_EPILOGUE_NONE = 0,
  FLASHATTN_DENSE_EPILOGUE_BIAS = 1,
  FLASHATTN_DENSE_EPILOGUE_GELU_BIAS = 2,
  FLASHATTN_DENSE_EPILOGUE_GELU_AUX_BIAS = 3,
  FLASHATTN_DENSE_EPILOGUE_RELU_BIAS = 4,
  FLASHATTN_DENSE_EPILOGUE_RELU_AUX_BIAS = 5,
  FLASHATTN_DENSE_EPILOGUE_DGELU_BGRAD = 6,
  FLASHATTN_DENSE_EPILOGUE_DRELU_BGRAD = 7,
  FLASHATTN_DENSE_EPILOGUE_BGRADB = 8
} FlashAttnDenseEpilogue;

// Bytes of cuBLASLt workspace recommended for FlashAttn_dense_gemm (32 MiB: what Hopper's fastest
// kernels ask for). The caller allocates it once per device and passes it to every call.
FLASHATTN_API int64_t FlashAttn_dense_workspace_size(void);

// How FlashAttn_dense_gemm picks the cuBLASLt algorithm of a problem (shape, leading dimensions,
// transposes, dtype, epilogue, pointer alignments) it has not seen yet: candidates <= 1 takes the
// heuristic's first choice; candidates = N > 1 asks the heuristic for up to N and times each on the
// call's own data (a warm-up and 3 runs, then one stream synchronize), keeping the fastest. The choice
// is cached per problem and per setting. The setting starts at 1, or at FLASHATTN_DENSE_ALGO_CANDIDATES
// when the environment has it at load. Returns the previous setting.
FLASHATTN_API int32_t FlashAttn_dense_set_algo_candidates(int32_t candidates);

// out (m, n) = op(a) @ op(b), then `epilogue`, through cuBLASLt (float32 compute, one heuristic
// query per shape, cached). All matrices are row-major (TorchSharp's layout) with leading
// dimensions lda, ldb, ldo (elements between rows); op(a) is (m, k): a is (m, k), or (k, m) read
// transposed when trans_a = 1; op(b) is (k, n): b is (k, n), or (n, k) read transposed when
// trans_b = 1 (a linear's weight). cuBLASLt is column-major: a row-major (r, c) matrix with leading
// dimension ld is the column-major (c, r) one, so out^T = op(b)^T op(a)^T runs as cuBLASLt's
// D (n x m) = op_B'(b) op_A'(a) with cuBLASLt's A := b, B := a and the transposes carried over;
// the bias of (n,) is then per row of D (cuBLASLt's BIAS / DGELU_BGRAD) and BGRADB's (m,) per column.
// dtype: float16 or bfloat16 for a, b, out, bias and the gelu aux. device: the CUDA device of every
// pointer (made current for the call). workspace: FlashAttn_dense_workspace_size() bytes or fewer
// (fewer may select slower kernels), device memory of `device`, used in stream order on `stream`.
// One cuBLASLt handle per device, created on first use; safe to call from several threads.
FLASHATTN_API FlashAttnStatus FlashAttn_dense_gemm(
    const void* a, const void* b, void* out, FlashAttnDType dtype,
    int64_t m, int64_t n, int64_t k, int32_t trans_a, int32_t trans_b,
    int64_t lda, int64_t ldb, int64_t ldo,
    FlashAttnDenseEpilogue epilogue, void* bias, void* aux, int64_t ldaux,
    int32_t device, void* workspace, int64_t workspace_bytes, void* stream);

// Bytes of device workspace FlashAttn_dense_bias_grad needs for these sizes (an arrival counter per 64 columns and
// float32 partial column sums of the row splits; 0 when the rows are few enough for one split).
FLASHATTN_API int64_t FlashAttn_dense_bias_grad_workspace_size(int64_t rows, int64_t cols);

// A linear's bias gradient without a GEMM: db (cols,) = sum over rows of dy (rows, cols), rows row_stride elements
// apart (row_stride >= cols), float32 accumulation, db in dtype (float32, float16 or bfloat16, dy's). One launch: the
// last block to finish a column block adds the row splits' sums up, in a fixed order, so the result is the same bits
// on every run with the same sizes on the same GPU. rows 0 writes zeros. Runs on the current device.
// workspace: at least FlashAttn_dense_bias_grad_workspace_size(rows, cols) bytes, 4-byte aligned (NULL when that is
// 0), and ALL ZERO at the first call (cudaMemset it once, when allocated): the call counts arrivals in it. Every call
// leaves it all zero again, so one workspace, as large as the largest call's, serves every later call of any size;
// calls that share it must not overlap in time (keep them on one stream).
FLASHATTN_API FlashAttnStatus FlashAttn_dense_bias_grad(
    const void* dy, void* db, FlashAttnDType dtype, int64_t rows, int64_t cols, int64_t row_stride,
    void* workspace, int64_t workspace_bytes, void* stream);

// area: Optim

// What a tensor of a multi-tensor optimizer call holds besides its weight and gradient (bits of flags[i]).
//   MASTER: master[offset, offset + numel) is the float32 weight; the 16-bit param is its rounded copy.
//   GRAD_SUM: grad_sum[offset, offset + numel) holds the float32 sum of earlier micro-batches' gradients.
typedef enum FlashAttnOptimTensorFlag {
  FLASHATTN_OPTIM_TENSOR_MASTER = 1,
  FLASHATTN_OPTIM_TENSOR_GRAD_SUM = 2
} FlashAttnOptimTensorFlag;

// Bytes of device workspace FlashAttn_optim_adamw_step needs for `count` tensors (the clip coefficient, the skip
// flag and per-block partial sums of the gradient norm).
FLASHATTN_API int64_t FlashAttn_optim_adamw_workspace_size(int32_t count);

// One AdamW step (torch.optim.AdamW's decoupled weight decay) over `count` tensors in a few launches, with the
// global gradient norm, clipping and the non-finite skip decided on the device: nothing is read back by the host.
// Tensor i: params[i] and grads[i] (device pointers, dtypes[i]: float32, float16 or bfloat16, contiguous,
//   numels[i] elements); grads[i] may be NULL when flags[i] has GRAD_SUM (no gradient since the last
//   FlashAttn_optim_grad_accumulate). Its float32 state lies at offsets[i] (a multiple of 4) of the flat arrays
//   master (MASTER tensors only), exp_avg, exp_avg_sq and grad_sum (GRAD_SUM tensors only), each of state_numel
//   elements and 16-byte aligned; its step count is steps[step_indices[i]] (float32, device), its hyperparameters
//   group_hparams[groups[i]] = (lr, beta1, beta2, eps, weight_decay) (float64, device, (num_groups, 5)), so that a
//   schedule writes the learning rate on the device without a host round trip.
// The step, with g = (grads[i] + grad_sum) / *grad_scale (grad_scale: device float32 scalar, NULL for 1):
//   norm = sqrt(sum of g^2 over every tensor) is written to *grad_norm (device float32, NULL: not written);
//   when norm is not finite nothing else is written but *found_inf = 1 (device float32, NULL: not written);
//   otherwise *found_inf = 0, g *= min(1, max_norm / (norm + 1e-6)) when max_norm > 0 (torch's clip_grad_norm_),
//   steps[step_indices[i]] += 1 (t), and with w the float32 weight (the master, else the param):
//     w *= 1 - lr * weight_decay; m = beta1 m + (1 - beta1) g; v = beta2 v + (1 - beta2) g^2;
//     w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps); the param gets w (rounded to dtype).
// The bias corrections are computed in float64, the element update in float32. Tensors must not overlap, and
// two tensors must not share a step index. workspace: FlashAttn_optim_adamw_workspace_size(count) bytes,
// 16-byte aligned; contents ignored.
FLASHATTN_API FlashAttnStatus FlashAttn_optim_adamw_step(
    int32_t count, void** params, const void** grads, const int32_t* dtypes, const int64_t* numels,
    const int64_t* offsets, const int32_t* flags, const int32_t* step_indices, const int32_t* groups,
    float* master, float* exp_avg, float* exp_avg_sq, const float* grad_sum, int64_t state_numel,
    float* steps, int32_t num_steps, const double* group_hparams, int32_t num_groups,
    const float* grad_scale, float max_norm, float* grad_norm, float* found_inf,
    void* workspace, int64_t workspace_bytes, void* stream);

// Micro-batch accumulation in float32 over `count` tensors in one or a few launches: for tensor i,
// grad_sum[offsets[i] + j] = grads[i][j] (+ grad_sum[offsets[i] + j] when flags[i] has GRAD_SUM) for j < numels[i].
// grads[i]: device pointers, dtypes[i] float32, float16 or bfloat16, contiguous; grad_sum: float32, state_numel
// elements, 16-byte aligned; offsets[i] a multiple of 4. The caller then drops the gradients (no zero-fill): the
// next backward writes fresh ones, and FlashAttn_optim_adamw_step reads the last micro-batch's with the sum.
FLASHATTN_API FlashAttnStatus FlashAttn_optim_grad_accumulate(
    int32_t count, const void** grads, const int32_t* dtypes, const int64_t* numels, const int64_t* offsets,
    const int32_t* flags, float* grad_sum, int64_t state_numel, void* stream);

#endif /* FLASHATTN_H */
