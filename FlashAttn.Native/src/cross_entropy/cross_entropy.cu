// Softmax cross-entropy over large vocabularies, memory-bound: the forward reads the logits once
// (each block streams a chunk of up to 16384 columns of one row with an online max / sum of
// exponentials, in the log2 domain), a per-row kernel combines the chunks; the backward reads the
// logits once and writes the gradient once, in place when dlogits is logits.
// Rows need not be 16-byte aligned (vocab 50257): each chunk runs a scalar head up to the first
// aligned column, 16-byte vectors, then a scalar tail.

#include <cmath>
#include <cstdint>

#include "common/cuda_check.cuh"
#include "common/dtype.h"
#include "common/numeric.cuh"
#include "common/static_switch.h"
#include "cross_entropy/cross_entropy.h"

namespace flashattn {

namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Online {
  float m;    // running max (log2 domain)
  float s;    // sum of 2^(v - m)
  float sum;  // sum of the scaled logits (natural units), for label smoothing
};

__device__ __forceinline__ Online combine(Online a, Online b) {
  if (a.m == -INFINITY) return {b.m, b.s, a.sum + b.sum};
  if (b.m == -INFINITY) return {a.m, a.s, a.sum + b.sum};
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * exp2f(a.m - m) + b.s * exp2f(b.m - m), a.sum + b.sum};
}

// Adds N logits (already scaled to the log2 domain in v2, natural in v) to the running state.
template <int N>
__device__ __forceinline__ void accumulate(Online& o, const float (&v2)[N], const float (&v)[N]) {
  float mx = v2[0];
#pragma unroll
  for (int j = 1; j < N; ++j) mx = fmaxf(mx, v2[j]);
  const float m = fmaxf(o.m, mx);
  float s = o.m == -INFINITY ? 0.f : o.s * exp2f(o.m - m);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    s += exp2f(v2[j] - m);
    o.sum += v[j];
  }
  o.m = m;
  o.s = s;
}

// The columns [c0, c1) of one row split into a scalar head [c0, vb) (until `ptr + c` is 16-byte
// aligned), nv kVec-wide vectors from vb, and a scalar tail [tb, c1).
struct ChunkSplit {
  int64_t vb, nv, tb;
};

template <typename T, int kVec>
__device__ __forceinline__ ChunkSplit split_chunk(const T* row, int64_t c0, int64_t c1, bool vector_ok) {
  int64_t head = c1 - c0;
  if (vector_ok) {
    const int mis = int((reinterpret_cast<uintptr_t>(row + c0) % 16) / sizeof(T));
    head = mis == 0 ? 0 : min(int64_t(kVec - mis), c1 - c0);
  }
  const int64_t vb = c0 + head;
  const int64_t nv = vector_ok ? (c1 - vb) / kVec : 0;
  return {vb, nv, vb + nv * kVec};
}

// f(col) on the head and tail, vector(col) on each kVec-wide vector.
template <typename T, int kVec, typename Scalar, typename Vector>
__device__ __forceinline__ void for_chunk(const T* row, int64_t c0, int64_t c1, bool vector_ok, Scalar&& scalar,
                                          Vector&& vector) {
  const ChunkSplit s = split_chunk<T, kVec>(row, c0, c1, vector_ok);
  for (int64_t c = c0 + threadIdx.x; c < s.vb; c += kThreads) scalar(c);
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < s.nv; i += kThreads) vector(s.vb + i * kVec);
  for (int64_t c = s.tb + threadIdx.x; c < c1; c += kThreads) scalar(c);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) cross_entropy_fwd_kernel(const CrossEntropyParams p, int64_t chunks, int64_t width) {
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x - row * chunks;
  const int64_t c0 = chunk * width, c1 = min(p.vocab, c0 + width);
  const T* rowp = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const float scale = p.logit_scale, scale2 = p.logit_scale * kLog2e;
  Online o{-INFINITY, 0.f, 0.f};
  for_chunk<T, kVec>(
      rowp, c0, c1, true,
      [&](int64_t c) {
        const float x = to_float(rowp[c]);
        const float v2[1] = {x * scale2}, v[1] = {x * scale};
        accumulate<1>(o, v2, v);
      },
      [&](int64_t c) {
        float x[kVec], v2[kVec], v[kVec];
        load_float<T, kVec>(rowp + c, x);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          v2[j] = x[j] * scale2;
          v[j] = x[j] * scale;
        }
        accumulate<kVec>(o, v2, v);
      });
  // block reduction: warps by shuffles, then the first warp over the warps' results
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    Online other{__shfl_xor_sync(0xffffffffu, o.m, m), __shfl_xor_sync(0xffffffffu, o.s, m),
                 __shfl_xor_sync(0xffffffffu, o.sum, m)};
    o = combine(o, other);
  }
  __shared__ Online red[kThreads / 32];
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = o;
  __syncthreads();
  if (threadIdx.x == 0) {
    Online t = red[0];
    for (int w = 1; w < kThreads / 32; ++w) t = combine(t, red[w]);
    float* ws = p.workspace + (row * chunks + chunk) * 3;
    ws[0] = t.m;
    ws[1] = t.s;
    ws[2] = t.sum;
  }
}

// One thread per row: combines the row's chunks, reads the label's logit, writes loss/z_loss/lse.
template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_combine_kernel(const CrossEntropyParams p, int64_t chunks) {
  const int64_t row = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= p.rows) return;
  const float* ws = p.workspace + row * chunks * 3;
  Online t{ws[0], ws[1], ws[2]};
  for (int64_t c = 1; c < chunks; ++c) t = combine(t, Online{ws[3 * c], ws[3 * c + 1], ws[3 * c + 2]});
  const float lse = (t.m + log2f(t.s)) * kLn2;
  p.lse[row] = lse;
  const int64_t label = p.labels[row];
  float loss = 0.f, zl = 0.f;
  if (label != p.ignore_index) {
    if (label < 0 || label >= p.vocab) {
      loss = zl = NAN;  // never a finite loss for a label outside the vocabulary; the host hears of it
      record_device_error(p.error, FLASHATTN_DEVICE_CHECK_CROSS_ENTROPY_LABEL, row, label);
    } else {
      const float zlabel = to_float(static_cast<const T*>(p.logits)[row * p.logits_row_stride + label]) * p.logit_scale;
      zl = p.lse_square_scale * lse * lse;
      loss = lse - (1.f - p.label_smoothing) * zlabel + zl;
      if (p.label_smoothing > 0.f) loss -= p.label_smoothing * t.sum / float(p.vocab);
    }
  }
  p.loss[row] = loss;
  if (p.z_loss != nullptr) p.z_loss[row] = zl;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) cross_entropy_bwd_kernel(const CrossEntropyParams p, int64_t chunks, int64_t width) {
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x - row * chunks;
  const int64_t c0 = chunk * width, c1 = min(p.vocab, c0 + width);
  const T* rowp = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  T* drow = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
  const int64_t label = p.labels[row];
  const bool ignored = label == p.ignore_index;
  const float lse = p.lse[row];
  const float scale2 = p.logit_scale * kLog2e, lse2 = lse * kLog2e;
  // a label outside the vocabulary (recorded by the forward): a NaN gradient for its row, as its loss
  const float g = ignored ? 0.f
                  : label < 0 || label >= p.vocab ? NAN
                                                  : p.dloss[row * p.dloss_stride] * p.logit_scale;
  const float pmul = 1.f + 2.f * p.lse_square_scale * lse;
  const float smooth = p.label_smoothing / float(p.vocab), hit = 1.f - p.label_smoothing;
  auto grad = [&](float x, int64_t c) {
    const float prob = exp2f(x * scale2 - lse2) * pmul;
    return g * (prob - smooth - (c == label ? hit : 0.f));
  };
  // vectors need the same misalignment in logits and dlogits (always true in place)
  const bool vector_ok = (reinterpret_cast<uintptr_t>(rowp) % 16) == (reinterpret_cast<uintptr_t>(drow) % 16);
  const ChunkSplit s = split_chunk<T, kVec>(rowp, c0, c1, vector_ok);
  auto scalar = [&](int64_t c) { drow[c] = from_float<T>(ignored ? 0.f : grad(to_float(rowp[c]), c)); };
  for (int64_t c = c0 + threadIdx.x; c < s.vb; c += kThreads) scalar(c);
  // kBatch vectors loaded before any is stored: in place, a store may alias a later load, so the
  // compiler keeps a load -> compute -> store loop serial; batching puts kBatch loads in flight.
  constexpr int kBatch = 4;
  for (int64_t i0 = threadIdx.x; i0 < s.nv; i0 += int64_t(kThreads) * kBatch) {
    float x[kBatch][kVec];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = i0 + int64_t(u) * kThreads;
      if (i < s.nv && !ignored) load_float<T, kVec>(rowp + s.vb + i * kVec, x[u]);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = i0 + int64_t(u) * kThreads;
      if (i >= s.nv) break;
      const int64_t c = s.vb + i * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[u][j] = ignored ? 0.f : grad(x[u][j], c + j);
      store_float<T, kVec>(drow + c, x[u]);
    }
  }
  for (int64_t c = s.tb + threadIdx.x; c < c1; c += kThreads) scalar(c);
}

}  // namespace

FlashAttnStatus run_cross_entropy_fwd(const CrossEntropyParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t chunks = cross_entropy_chunks(p.vocab);
  const int64_t blocks = p.rows * chunks, width = cross_entropy_chunk_width(p.vocab);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    constexpr int kVec = 16 / sizeof(T);
    cross_entropy_fwd_kernel<T, kVec><<<unsigned(blocks), kThreads, 0, stream>>>(p, chunks, width);
    FlashAttnStatus s = check_launch(function, "cross_entropy_fwd_kernel");
    if (s != FLASHATTN_STATUS_OK) return s;
    cross_entropy_combine_kernel<T><<<unsigned((p.rows + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, chunks);
    return check_launch(function, "cross_entropy_combine_kernel");
  });
}

FlashAttnStatus run_cross_entropy_bwd(const CrossEntropyParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t chunks = cross_entropy_chunks(p.vocab);
  const int64_t blocks = p.rows * chunks, width = cross_entropy_chunk_width(p.vocab);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    constexpr int kVec = 16 / sizeof(T);
    cross_entropy_bwd_kernel<T, kVec><<<unsigned(blocks), kThreads, 0, stream>>>(p, chunks, width);
    return check_launch(function, "cross_entropy_bwd_kernel");
  });
}

}  // namespace flashattn
