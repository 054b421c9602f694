// Rotary position embedding (RoPE), forward and backward (rotation by -theta), in one pass:
//   x (B, S, H, D) -> out (B, S, H, D); cos, sin (seqlen_ro, R/2); R = rotary_dim <= D.
// Memory-bound: each element of x is read once and written once; cos/sin rows are shared by the
// H heads of a token and stay in L1/L2.

#include <algorithm>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/dtype.h"
#include "common/numeric.cuh"
#include "common/static_switch.h"
#include "rotary/rotary.h"

namespace flashattn {

namespace {

constexpr int kThreads = 256;

// ----------------------------------------------------------------------------
// CUDA kernels

// One block covers `tokens_per_block` tokens of one sequence; its threads walk the
// (token, head, chunk) items of those tokens. A chunk is kVec rotary pairs, or kVec pass-through
// elements of x[R:]. Non-interleaved pairs are (i, i + R/2); interleaved pairs are (2i, 2i + 1).
template <typename T, typename CS, bool kInterleaved, int kVec>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p, int tokens_per_block,
                                                          int token_blocks) {
  const int b = blockIdx.x / token_blocks;
  const int64_t t0 = int64_t(blockIdx.x - b * token_blocks) * tokens_per_block;
  int64_t seq_start = 0, seqlen = p.seqlen;
  if (p.cu_seqlens != nullptr) {
    seq_start = p.cu_seqlens[b];
    seqlen = p.cu_seqlens[b + 1] - seq_start;
  }
  if (t0 >= seqlen) return;
  const int64_t offset = p.seqlen_offsets != nullptr ? p.seqlen_offsets[b] : p.seqlen_offset;
  const int half = int(p.rotary_dim / 2);
  const int rot_chunks = half / kVec;
  const int pass_chunks = p.inplace ? 0 : int(p.headdim - p.rotary_dim) / kVec;
  const int chunks = rot_chunks + pass_chunks;
  const int items_per_token = int(p.nheads) * chunks;
  const int ntok = int(min(int64_t(tokens_per_block), seqlen - t0));
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const CS* cos = static_cast<const CS*>(p.cos);
  const CS* sin = static_cast<const CS*>(p.sin);

  for (int i = threadIdx.x; i < ntok * items_per_token; i += kThreads) {
    const int tok = i / items_per_token;
    const int rem = i - tok * items_per_token;
    const int h = rem / chunks;
    const int c = rem - h * chunks;
    const int64_t t = t0 + tok;
    const T* xr;
    T* outr;
    if (p.cu_seqlens != nullptr) {
      xr = x + (seq_start + t) * p.x_seq_stride + h * p.x_head_stride;
      outr = out + (seq_start + t) * p.out_seq_stride + h * p.out_head_stride;
    } else {
      xr = x + b * p.x_batch_stride + t * p.x_seq_stride + h * p.x_head_stride;
      outr = out + b * p.out_batch_stride + t * p.out_seq_stride + h * p.out_head_stride;
    }
    if (c >= rot_chunks) {  // x[R:] passes through
      const int e = int(p.rotary_dim) + (c - rot_chunks) * kVec;
      float v[kVec];
      load_float<T, kVec>(xr + e, v);
      store_float<T, kVec>(outr + e, v);
      continue;
    }
    // Positions outside the cos/sin table rotate by 0 (cos 1, sin 0), as flash-attn's kernel does.
    const int64_t pos = t + offset;
    float cs[kVec], sn[kVec];
    if (pos >= 0 && pos < p.seqlen_ro) {
      load_float<CS, kVec>(cos + pos * p.cs_row_stride + c * kVec, cs);
      load_float<CS, kVec>(sin + pos * p.cs_row_stride + c * kVec, sn);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) { cs[j] = 1.f; sn[j] = 0.f; }
    }
    if (p.conjugate) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) sn[j] = -sn[j];
    }
    if constexpr (!kInterleaved) {
      float a[kVec], bb[kVec], o1[kVec], o2[kVec];
      load_float<T, kVec>(xr + c * kVec, a);
      load_float<T, kVec>(xr + half + c * kVec, bb);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        o1[j] = a[j] * cs[j] - bb[j] * sn[j];
        o2[j] = a[j] * sn[j] + bb[j] * cs[j];
      }
      store_float<T, kVec>(outr + c * kVec, o1);
      store_float<T, kVec>(outr + half + c * kVec, o2);
    } else {
      // 2 * kVec contiguous elements hold kVec (even, odd) pairs; loaded as two kVec vectors.
      float v[2 * kVec];
      float(&lo)[kVec] = *reinterpret_cast<float(*)[kVec]>(v);
      float(&hi)[kVec] = *reinterpret_cast<float(*)[kVec]>(v + kVec);
      load_float<T, kVec>(xr + 2 * c * kVec, lo);
      load_float<T, kVec>(xr + 2 * c * kVec + kVec, hi);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float a = v[2 * j], bb = v[2 * j + 1];
        v[2 * j] = a * cs[j] - bb * sn[j];
        v[2 * j + 1] = a * sn[j] + bb * cs[j];
      }
      store_float<T, kVec>(outr + 2 * c * kVec, lo);
      store_float<T, kVec>(outr + 2 * c * kVec + kVec, hi);
    }
  }
}

// ----------------------------------------------------------------------------
// kernel launcher

// The widest vector (16 bytes of x) that every pointer, stride and size allows; 1 otherwise.
int vector_width(const RotaryParams& p) {
  const int vec = int(16 / dtype_size(p.dtype));
  const int64_t half = p.rotary_dim / 2;
  const bool sizes_ok = (p.interleaved ? p.rotary_dim % (2 * vec) == 0 : half % vec == 0) &&
                        (p.headdim - p.rotary_dim) % vec == 0;
  const bool strides_ok = p.x_seq_stride % vec == 0 && p.x_head_stride % vec == 0 &&
                          p.x_batch_stride % vec == 0 && p.out_seq_stride % vec == 0 &&
                          p.out_head_stride % vec == 0 && p.out_batch_stride % vec == 0 &&
                          p.cs_row_stride % vec == 0;
  const int64_t cs_bytes = vec * dtype_size(p.cs_dtype);
  const bool ptrs_ok = is_aligned(p.x, 16) && is_aligned(p.out, 16) && is_aligned(p.cos, cs_bytes) &&
                       is_aligned(p.sin, cs_bytes);
  return sizes_ok && strides_ok && ptrs_ok ? vec : 1;
}

template <typename T, typename CS, bool kInterleaved, int kVec>
FlashAttnStatus launch(const RotaryParams& p, cudaStream_t stream, const char* function) {
  const int chunks = int(p.rotary_dim / 2 / kVec + (p.inplace ? 0 : (p.headdim - p.rotary_dim) / kVec));
  const int items_per_token = int(p.nheads) * chunks;
  // About 4 items per thread: enough independent loads in flight without starving small inputs.
  const int tokens_per_block = std::max(1, 4 * kThreads / items_per_token);
  const int64_t token_blocks = (p.seqlen + tokens_per_block - 1) / tokens_per_block;
  const int64_t blocks = token_blocks * p.batch;
  if (blocks > 0x7fffffff) {
    return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function, "too many tokens for one launch (%lld blocks)",
                (long long)blocks);
  }
  rotary_kernel<T, CS, kInterleaved, kVec>
      <<<unsigned(blocks), kThreads, 0, stream>>>(p, tokens_per_block, int(token_blocks));
  return check_launch(function, "rotary_kernel");
}

}  // namespace

FlashAttnStatus run_rotary(const RotaryParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int vec = vector_width(p);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    return BOOL_SWITCH(p.cs_dtype == FLASHATTN_DTYPE_FLOAT32 && p.dtype != FLASHATTN_DTYPE_FLOAT32, kCsFloat, [&] {
      using CS = std::conditional_t<kCsFloat, float, T>;
      return BOOL_SWITCH(p.interleaved, kInterleaved, [&] {
        constexpr int kWide = 16 / sizeof(T);
        return vec == 1 ? launch<T, CS, kInterleaved, 1>(p, stream, function)
                        : launch<T, CS, kInterleaved, kWide>(p, stream, function);
      });
    });
  });
}

}  // namespace flashattn
