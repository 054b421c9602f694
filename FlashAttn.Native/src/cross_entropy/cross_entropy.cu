// Softmax cross-entropy over large vocabularies, memory-bound: the forward reads the logits once (each
// chunk of a row streamed with an online max / sum of exponentials in the log2 domain), a per-row kernel
// combines the chunks; the backward reads the logits once and writes the gradient once, in place when
// dlogits is logits.
// A warp per chunk of kCrossEntropyWarpChunk columns, kBatch 16-byte vectors per lane in flight, the max taken over
// a batch before its exponentials (one rescale per batch, not per vector). A block of 256 threads per chunk of up to
// 16384 columns was slower at every vocabulary measured (ops_bench on the H200, bf16, forward + backward, warp vs
// block, ms: 32000 0.764/1.051, 50257 1.215/1.835, 128256 0.762/1.093, 256000 1.499/2.071; the warp kernels at
// 1.01-1.05x the copy floor; ../norm/NOTES.md) and was removed.
// Rows need not be 16-byte aligned (vocab 50257): a chunk runs a scalar head up to the first aligned
// column, 16-byte vectors, then a scalar tail.
//
// Forward and backward in one pass (FlashAttn_cross_entropy_fwd_bwd, the training step's loss): a block per row
// copies the row into shared memory, takes the same online max / sum there, combines across its warps, then writes
// the gradient for the dloss the caller expects from shared memory: the logits read once and dlogits written once,
// 2 x 1.65 GB at GPT-2's B 16 x T 1024 x 50257 in bf16, where the two-kernel path moves 3 x 1.65 GB. The copy is
// cp.async, the whole row in flight at once. Two blocks of a 100 KB row fit an SM: one block's copy in flight while
// the other writes. The gradient goes out in one 16-byte store a vector (store_global_16): written as four 32-bit
// stores, as the compiler had chosen, the kernel was bound by L2 write traffic (1.92 ms against 0.87 ms now). The backward then only compares the real dloss with the expected one (cross_entropy_rescale_kernel: a
// warp per row, one comparison; a second pass over dlogits only where they differ).

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/cp_async.cuh"
#include "common/cuda_check.cuh"
#include "common/device.h"
#include "common/dtype.h"
#include "common/numeric.cuh"
#include "common/static_switch.h"
#include "cross_entropy/cross_entropy.h"

namespace flashattn {

namespace {

constexpr int kThreads = 256;

struct Online {
  float m;    // running max (log2 domain)
  float s;    // sum of 2^(v - m)
  float sum;  // sum of the scaled logits (natural units), for label smoothing
};

__device__ __forceinline__ Online combine(Online a, Online b) {
  if (a.m == -INFINITY) return {b.m, b.s, a.sum + b.sum};
  if (b.m == -INFINITY) return {a.m, a.s, a.sum + b.sum};
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * fast_exp2(a.m - m) + b.s * fast_exp2(b.m - m), a.sum + b.sum};
}

__device__ __forceinline__ Online warp_combine(Online o) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) {
    Online other{__shfl_xor_sync(0xffffffffu, o.m, m), __shfl_xor_sync(0xffffffffu, o.s, m),
                 __shfl_xor_sync(0xffffffffu, o.sum, m)};
    o = combine(o, other);
  }
  return o;
}

// ----------------------------------------------------------------------------
// warp kernels: a warp per (row, chunk of kCrossEntropyWarpChunk columns), 8 warps a block.

constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kBatch = 4;  // 16-byte vectors per lane loaded before any is used

// Columns [c0, c1) of chunk `chunk` of a row: a scalar head [c0, vb) up to the first 16-byte aligned column,
// nv kVec-wide vectors from vb, a scalar tail [tb, c1). Chunk boundaries sit at aligned columns, so only the
// first chunk has a head and only the last a tail. Without vector_ok everything is head.
struct WarpChunk {
  int64_t c0, vb, nv, tb, c1;
};

template <typename T, int kVec>
__device__ __forceinline__ WarpChunk warp_chunk(const T* row, int64_t vocab, int64_t chunk, int64_t chunks,
                                                bool vector_ok) {
  const int64_t a = vector_ok ? min(vocab, int64_t((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16 / sizeof(T))) : 0;
  const int64_t c0 = chunk == 0 ? 0 : min(vocab, a + chunk * kCrossEntropyWarpChunk);
  const int64_t c1 = chunk == chunks - 1 ? vocab : min(vocab, a + (chunk + 1) * kCrossEntropyWarpChunk);
  if (!vector_ok) return {c0, c1, 0, c1, c1};
  const int64_t vb = min(max(c0, a), c1);
  const int64_t nv = (c1 - vb) / kVec;
  return {c0, vb, nv, vb + nv * kVec, c1};
}

// Largest of x * sign(scale) over the vectors raw[0 .. nb): taken on the packed 16-bit values (one
// instruction per pair; a max is exact in any precision), NaNs skipped as by fmaxf.
template <typename T, int kVec, int kB>
__device__ __forceinline__ float batch_top(const Packed<T, kVec> (&raw)[kB], int nb, bool positive) {
  constexpr int kW = Packed<T, kVec>::kWords;
  if constexpr (std::is_same_v<T, float>) {
    float top = -INFINITY;
#pragma unroll
    for (int u = 0; u < kB; ++u) {
      if (u >= nb) break;
#pragma unroll
      for (int w = 0; w < kW; ++w) top = fmaxf(top, positive ? __uint_as_float(raw[u].w[w]) : -__uint_as_float(raw[u].w[w]));
    }
    return top;
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    const float inf = INFINITY;
    T2 m;
    if (positive) {
      m = T2{from_float<T>(-inf), from_float<T>(-inf)};
#pragma unroll
      for (int u = 0; u < kB; ++u) {
        if (u >= nb) break;
#pragma unroll
        for (int w = 0; w < kW; ++w) m = __hmax2(m, *reinterpret_cast<const T2*>(&raw[u].w[w]));
      }
      return fmaxf(to_float(m.x), to_float(m.y));
    }
    m = T2{from_float<T>(inf), from_float<T>(inf)};
#pragma unroll
    for (int u = 0; u < kB; ++u) {
      if (u >= nb) break;
#pragma unroll
      for (int w = 0; w < kW; ++w) m = __hmin2(m, *reinterpret_cast<const T2*>(&raw[u].w[w]));
    }
    return -fminf(to_float(m.x), to_float(m.y));
  }
}

// Rescales the running state to a new candidate maximum mb (log2 domain); returns the offset the
// exponentials take (0 while everything so far is -inf: every term is then 0).
__device__ __forceinline__ float raise_max(Online& o, float mb) {
  if (mb > o.m) {
    o.s = o.m == -INFINITY ? 0.f : o.s * fast_exp2(o.m - mb);
    o.m = mb;
  }
  return o.m == -INFINITY ? 0.f : o.m;
}

// Adds the vectors raw[0 .. nb) (kFull: nb == kB) to the running state: their maximum first, then one rescale
// of the sum and one exponential per logit. scale2 = logit_scale * log2(e), of either sign.
template <bool kSmooth, bool kFull, typename T, int kVec, int kB>
__device__ __forceinline__ void add_vectors(Online& o, const Packed<T, kVec> (&raw)[kB], int nb, float scale2) {
  const float off = raise_max(o, batch_top(raw, kFull ? kB : nb, scale2 >= 0.f) * fabsf(scale2));
#pragma unroll
  for (int u = 0; u < kB; ++u) {
    if (!kFull && u >= nb) break;
    float x[kVec];
    to_floats(raw[u], x);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      o.s += fast_exp2(fmaf(x[j], scale2, -off));
      if constexpr (kSmooth) o.sum += x[j];
    }
  }
}

template <bool kSmooth>
__device__ __forceinline__ void add_scalar(Online& o, float x, float scale2) {
  const float off = raise_max(o, x * scale2);
  o.s += fast_exp2(fmaf(x, scale2, -off));
  if constexpr (kSmooth) o.sum += x;
}

// Forward: one warp's chunk -> workspace (max, sum of exponentials, sum of logits) at (row, chunk).
template <typename T, bool kSmooth>
__global__ void __launch_bounds__(kThreads) cross_entropy_fwd_warp_kernel(const CrossEntropyParams p, int64_t chunks) {
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int64_t unit = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (unit >= p.rows * chunks) return;  // the whole warp
  const int64_t row = unit / chunks, chunk = unit - row * chunks;
  const T* rowp = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const WarpChunk r = warp_chunk<T, kVec>(rowp, p.vocab, chunk, chunks, true);
  const float scale2 = p.logit_scale * kLog2e;
  Online o{-INFINITY, 0.f, 0.f};
  for (int64_t c = r.c0 + lane; c < r.vb; c += 32) add_scalar<kSmooth>(o, to_float(rowp[c]), scale2);
  for (int64_t c = r.tb + lane; c < r.c1; c += 32) add_scalar<kSmooth>(o, to_float(rowp[c]), scale2);
  const T* vp = rowp + r.vb;
  for (int64_t i0 = lane; i0 < r.nv; i0 += 32 * kBatch) {
    Packed<T, kVec> raw[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (i0 + 32 * u < r.nv) raw[u] = load_packed_stream<T, kVec>(vp + (i0 + 32 * u) * kVec);
    // the lane's valid vectors are a prefix of the batch: all of it but at the end of the chunk
    const int nb = int(min(int64_t(kBatch), (r.nv - i0 + 31) / 32));
    if (nb == kBatch) add_vectors<kSmooth, true>(o, raw, nb, scale2);
    else add_vectors<kSmooth, false>(o, raw, nb, scale2);
  }
  o.sum *= p.logit_scale;
  o = warp_combine(o);
  if (lane == 0) {
    float* ws = p.workspace + unit * 3;
    ws[0] = o.m;
    ws[1] = o.s;
    ws[2] = o.sum;
  }
}

// dlogits of a row: g * (softmax(z) * (1 + 2 lse_square_scale lse) - smoothing / vocab - (1 - smoothing) [c == label])
// with g = dloss * logit_scale, NaN for a label outside the vocabulary (as its loss). operator() leaves out the
// label's term, which label_term() gives.
struct RowGrad {
  float scale2, lse2, gp, gs, gh;
  __device__ __forceinline__ RowGrad(const CrossEntropyParams& p, int64_t label, float lse, float dloss) {
    const float g = label < 0 || label >= p.vocab ? NAN : dloss * p.logit_scale;
    scale2 = p.logit_scale * kLog2e;
    lse2 = lse * kLog2e;
    gp = g * (1.f + 2.f * p.lse_square_scale * lse);
    gs = g * (p.label_smoothing / float(p.vocab));
    gh = g * (1.f - p.label_smoothing);
  }
  __device__ __forceinline__ float operator()(float x) const { return fmaf(fast_exp2(fmaf(x, scale2, -lse2)), gp, -gs); }
  __device__ __forceinline__ float label_term() const { return gh; }
};

// Where a row's label falls among the kVec-wide vectors starting at column vb (nv of them): its vector, or -1.
struct LabelVec {
  int64_t vec;
  int col;
  template <int kVec>
  __device__ __forceinline__ static LabelVec at(int64_t label, int64_t vb, int64_t nv) {
    const int64_t rel = label - vb;
    const int64_t vec = rel >= 0 && rel < nv * kVec ? rel / kVec : -1;
    return {vec, int(rel - vec * kVec)};
  }
};

// The gradient of vector i (raw logits) stored at dst.
template <typename T, int kVec>
__device__ __forceinline__ void store_grad_vector(T* dst, const Packed<T, kVec>& raw, int64_t i, const LabelVec& l,
                                                  const RowGrad& grad) {
  float x[kVec];
  to_floats(raw, x);
#pragma unroll
  for (int j = 0; j < kVec; ++j) x[j] = grad(x[j]);
  if (i == l.vec) {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j == l.col) x[j] -= grad.label_term();
  }
  // One 16-byte store: assigned as a Vec (or a uint4), NVVM wrote the fused kernel's gradient as four 32-bit stores,
  // 3.6x the row's bytes in L2 write sectors (ncu: 7.7 of 32 bytes used a sector, L2 91% busy, DRAM 35%).
  static_assert(sizeof(Vec<T, kVec>) == sizeof(uint4), "16-byte vectors");
  const Vec<T, kVec> v = from_floats<T, kVec>(x);
  store_global_16(dst, *reinterpret_cast<const uint4*>(&v));
}

// Zeros into columns [r.c0, r.c1) of drow, thread t of n: an ignored row's gradient.
template <typename T, int kVec>
__device__ __forceinline__ void store_zero_row(T* drow, const WarpChunk& r, int t, int n) {
  for (int64_t c = r.c0 + t; c < r.vb; c += n) drow[c] = from_float<T>(0.f);
  for (int64_t c = r.tb + t; c < r.c1; c += n) drow[c] = from_float<T>(0.f);
  const float zero[kVec] = {};
  for (int64_t i = t; i < r.nv; i += n) store_float<T, kVec>(drow + r.vb + i * kVec, zero);
}

// Backward: dlogits of one warp's chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_bwd_warp_kernel(const CrossEntropyParams p, int64_t chunks) {
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int64_t unit = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (unit >= p.rows * chunks) return;
  const int64_t row = unit / chunks, chunk = unit - row * chunks;
  const T* rowp = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  T* drow = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
  // vectors need the same misalignment in logits and dlogits (always true in place)
  const bool vector_ok = (reinterpret_cast<uintptr_t>(rowp) % 16) == (reinterpret_cast<uintptr_t>(drow) % 16);
  const WarpChunk r = warp_chunk<T, kVec>(rowp, p.vocab, chunk, chunks, vector_ok);
  const int64_t label = p.labels[row];
  if (p.dloss_applied != nullptr && chunk == 0 && lane == 0) p.dloss_applied[row] = p.dloss[row * p.dloss_stride];
  if (label == p.ignore_index) {
    store_zero_row<T, kVec>(drow, r, lane, 32);
    return;
  }
  const RowGrad grad(p, label, p.lse[row], p.dloss[row * p.dloss_stride]);
  auto scalar = [&](int64_t c) { drow[c] = from_float<T>(grad(to_float(rowp[c])) - (c == label ? grad.label_term() : 0.f)); };
  for (int64_t c = r.c0 + lane; c < r.vb; c += 32) scalar(c);
  for (int64_t c = r.tb + lane; c < r.c1; c += 32) scalar(c);
  const LabelVec l = LabelVec::at<kVec>(label, r.vb, r.nv);
  // kBatch vectors loaded before any is stored: in place, a store may alias a later load, so the compiler
  // keeps a load -> compute -> store loop serial; batching puts kBatch loads in flight.
  const T* vp = rowp + r.vb;
  T* dvp = drow + r.vb;
  for (int64_t i0 = lane; i0 < r.nv; i0 += 32 * kBatch) {
    Packed<T, kVec> raw[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (i0 + 32 * u < r.nv) raw[u] = load_packed_stream<T, kVec>(vp + (i0 + 32 * u) * kVec);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = i0 + 32 * u;
      if (i >= r.nv) break;
      store_grad_vector<T, kVec>(dvp + i * kVec, raw[u], i, l, grad);
    }
  }
}

// A row's loss and z_loss from its combined state t (written), and its lse (returned); label_logit() reads the
// label's (unscaled) logit, called only for a label in the vocabulary.
template <typename LabelLogit>
__device__ __forceinline__ float finish_row(const CrossEntropyParams& p, int64_t row, int64_t label, const Online& t,
                                            LabelLogit label_logit) {
  const float lse = (t.m + log2f(t.s)) * kLn2;
  float loss = 0.f, zl = 0.f;
  if (label != p.ignore_index) {
    if (label < 0 || label >= p.vocab) {
      loss = zl = NAN;  // never a finite loss for a label outside the vocabulary; the host hears of it
      record_device_error(p.error, FLASHATTN_DEVICE_CHECK_CROSS_ENTROPY_LABEL, row, label);
    } else {
      const float zlabel = label_logit() * p.logit_scale;
      zl = p.lse_square_scale * lse * lse;
      loss = lse - (1.f - p.label_smoothing) * zlabel + zl;
      if (p.label_smoothing > 0.f) loss -= p.label_smoothing * t.sum / float(p.vocab);
    }
  }
  p.loss[row] = loss;
  if (p.z_loss != nullptr) p.z_loss[row] = zl;
  return lse;
}

// One warp per row: combines the row's chunks, reads the label's logit, writes loss / z_loss / lse.
template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_combine_kernel(const CrossEntropyParams p, int64_t chunks) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const float* ws = p.workspace + row * chunks * 3;
  Online t{-INFINITY, 0.f, 0.f};
  for (int64_t c = lane; c < chunks; c += 32) t = combine(t, Online{ws[3 * c], ws[3 * c + 1], ws[3 * c + 2]});
  t = warp_combine(t);
  if (lane != 0) return;
  const T* rowp = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  const int64_t label = p.labels[row];
  p.lse[row] = finish_row(p, row, label, t, [&] { return to_float(rowp[label]); });
}

// ----------------------------------------------------------------------------
// forward + backward in one pass: a block of kFusedThreads per row, the row held in shared memory at its own
// 16-byte phase (scratch for the block's combine first).

constexpr int kFusedThreads = 512;
constexpr int kFusedWarps = kFusedThreads / 32;
constexpr int64_t kFusedScratch = 256;  // Online per warp, then the row's lse
static_assert(kFusedWarps * sizeof(Online) + sizeof(float) <= kFusedScratch, "scratch");

template <typename T>
int64_t fused_smem_bytes(int64_t vocab) {
  return kFusedScratch + (vocab * int64_t(sizeof(T)) + 16 + 15) / 16 * 16;
}

template <typename T, bool kSmooth>
__global__ void __launch_bounds__(kFusedThreads) cross_entropy_fwd_bwd_kernel(const CrossEntropyParams p) {
  constexpr int kVec = 16 / sizeof(T);
  extern __shared__ uint4 smem[];
  Online* partial = reinterpret_cast<Online*>(smem);
  float* row_lse = reinterpret_cast<float*>(partial + kFusedWarps);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x;
  const T* rowp = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  T* drow = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
  const bool vector_ok = (reinterpret_cast<uintptr_t>(rowp) % 16) == (reinterpret_cast<uintptr_t>(drow) % 16);
  const WarpChunk r = warp_chunk<T, kVec>(rowp, p.vocab, 0, 1, vector_ok);
  // column c at srow[c]: the row's 16-byte phase kept, so that its vectors are aligned in shared memory too
  T* srow = reinterpret_cast<T*>(reinterpret_cast<char*>(smem) + kFusedScratch) +
            (vector_ok ? reinterpret_cast<uintptr_t>(rowp) % 16 / sizeof(T) : 0);
  const int64_t label = p.labels[row];
  const float dloss = p.dloss[row * p.dloss_stride];
  if (tid == 0) p.dloss_applied[row] = dloss;
  if (label == p.ignore_index) {  // nothing to read
    store_zero_row<T, kVec>(drow, r, tid, kFusedThreads);
    if (tid == 0) {
      p.loss[row] = 0.f;
      if (p.z_loss != nullptr) p.z_loss[row] = 0.f;
    }
    return;
  }
  // logits -> shared memory: every 16-byte vector of the row in flight at once (cp.async holds no registers, so the
  // whole row is one round trip), the unaligned head and tail by plain loads; then the online max / sum over
  // shared memory
  for (int64_t c = r.c0 + tid; c < r.vb; c += kFusedThreads) srow[c] = rowp[c];
  for (int64_t c = r.tb + tid; c < r.c1; c += kFusedThreads) srow[c] = rowp[c];
  const T* vp = rowp + r.vb;
  T* svp = srow + r.vb;
  for (int64_t i = tid; i < r.nv; i += kFusedThreads) cp_async_16(svp + i * kVec, vp + i * kVec);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();  // the row in shared memory, every thread's copies
  const float scale2 = p.logit_scale * kLog2e;
  Online o{-INFINITY, 0.f, 0.f};
  for (int64_t c = r.c0 + tid; c < r.vb; c += kFusedThreads) add_scalar<kSmooth>(o, to_float(srow[c]), scale2);
  for (int64_t c = r.tb + tid; c < r.c1; c += kFusedThreads) add_scalar<kSmooth>(o, to_float(srow[c]), scale2);
  for (int64_t i0 = tid; i0 < r.nv; i0 += int64_t(kFusedThreads) * kBatch) {
    Packed<T, kVec> raw[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (i0 + kFusedThreads * u < r.nv) raw[u] = load_packed<T, kVec>(svp + (i0 + kFusedThreads * u) * kVec);
    const int nb = int(min(int64_t(kBatch), (r.nv - i0 + kFusedThreads - 1) / kFusedThreads));
    if (nb == kBatch) add_vectors<kSmooth, true>(o, raw, nb, scale2);
    else add_vectors<kSmooth, false>(o, raw, nb, scale2);
  }
  o.sum *= p.logit_scale;
  o = warp_combine(o);
  if (lane == 0) partial[warp] = o;
  __syncthreads();  // partial[]
  if (warp == 0) {
    Online t = lane < kFusedWarps ? partial[lane] : Online{-INFINITY, 0.f, 0.f};
    t = warp_combine(t);
    if (lane == 0) *row_lse = finish_row(p, row, label, t, [&] { return to_float(srow[label]); });
  }
  __syncthreads();
  // shared memory -> dlogits
  const RowGrad grad(p, label, *row_lse, dloss);
  auto scalar_out = [&](int64_t c) { drow[c] = from_float<T>(grad(to_float(srow[c])) - (c == label ? grad.label_term() : 0.f)); };
  for (int64_t c = r.c0 + tid; c < r.vb; c += kFusedThreads) scalar_out(c);
  for (int64_t c = r.tb + tid; c < r.c1; c += kFusedThreads) scalar_out(c);
  const LabelVec l = LabelVec::at<kVec>(label, r.vb, r.nv);
  T* dvp = drow + r.vb;
  for (int64_t i = tid; i < r.nv; i += kFusedThreads) {
    const uint4 v = *reinterpret_cast<const uint4*>(svp + i * kVec);
    Packed<T, kVec> raw;
    raw.w[0] = v.x, raw.w[1] = v.y, raw.w[2] = v.z, raw.w[3] = v.w;
    store_grad_vector<T, kVec>(dvp + i * kVec, raw, i, l, grad);
  }
}

// A warp per row: dlogits *= dloss / dloss_applied where they differ (the backward of the fused pass), then
// dloss_applied = dloss. Where they are equal, one comparison.
template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_rescale_kernel(const CrossEntropyParams p) {
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const float d = p.dloss[row * p.dloss_stride], a = p.dloss_applied[row];
  if (d == a || p.labels[row] == p.ignore_index) return;  // an ignored row's gradient is 0 for every dloss
  const float ratio = d / a;
  T* drow = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
  const WarpChunk r = warp_chunk<T, kVec>(drow, p.vocab, 0, 1, true);
  for (int64_t c = r.c0 + lane; c < r.vb; c += 32) drow[c] = from_float<T>(to_float(drow[c]) * ratio);
  for (int64_t c = r.tb + lane; c < r.c1; c += 32) drow[c] = from_float<T>(to_float(drow[c]) * ratio);
  T* vp = drow + r.vb;
  for (int64_t i0 = lane; i0 < r.nv; i0 += 32 * kBatch) {
    Packed<T, kVec> raw[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (i0 + 32 * u < r.nv) raw[u] = load_packed_stream<T, kVec>(vp + (i0 + 32 * u) * kVec);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = i0 + 32 * u;
      if (i >= r.nv) break;
      float x[kVec];
      to_floats(raw[u], x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] *= ratio;
      *reinterpret_cast<Vec<T, kVec>*>(vp + i * kVec) = from_floats<T, kVec>(x);
    }
  }
  __syncwarp();  // every lane has read dloss_applied[row]
  if (lane == 0) p.dloss_applied[row] = d;
}

// ----------------------------------------------------------------------------
// launchers

}  // namespace

FlashAttnStatus run_cross_entropy_fwd(const CrossEntropyParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t chunks = cross_entropy_chunks(p.vocab, kCrossEntropyWarpChunk);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    const int64_t blocks = (p.rows * chunks + kWarpsPerBlock - 1) / kWarpsPerBlock;
    BOOL_SWITCH(p.label_smoothing > 0.f, kSmooth, [&] {
      cross_entropy_fwd_warp_kernel<T, kSmooth><<<unsigned(blocks), kThreads, 0, stream>>>(p, chunks);
    });
    FlashAttnStatus s = check_launch(function, "cross_entropy_fwd_warp_kernel");
    if (s != FLASHATTN_STATUS_OK) return s;
    const int64_t row_blocks = (p.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    cross_entropy_combine_kernel<T><<<unsigned(row_blocks), kThreads, 0, stream>>>(p, chunks);
    return check_launch(function, "cross_entropy_combine_kernel");
  });
}

FlashAttnStatus run_cross_entropy_bwd(const CrossEntropyParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t chunks = cross_entropy_chunks(p.vocab, kCrossEntropyWarpChunk);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    const int64_t blocks = (p.rows * chunks + kWarpsPerBlock - 1) / kWarpsPerBlock;
    cross_entropy_bwd_warp_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(p, chunks);
    return check_launch(function, "cross_entropy_bwd_warp_kernel");
  });
}

namespace {

template <typename T, bool kSmooth>
FlashAttnStatus launch_fwd_bwd(const CrossEntropyParams& p, const DeviceInfo& d, int64_t smem, cudaStream_t stream,
                               const char* function) {
  auto kernel = cross_entropy_fwd_bwd_kernel<T, kSmooth>;
  const FlashAttnStatus s = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), d.device, size_t(smem),
                                               "cross_entropy_fwd_bwd_kernel", function);
  if (s != FLASHATTN_STATUS_OK) return s;
  kernel<<<unsigned(p.rows), kFusedThreads, size_t(smem), stream>>>(p);
  return check_launch(function, "cross_entropy_fwd_bwd_kernel");
}

// Whether the fused forward + backward runs as one kernel: unless FLASHATTN_CE_FUSED=0 (read once per process), which
// runs the forward's and the backward's kernels instead (the same results; one more read of the logits). On the H200 at
// GPT-2's 16384 x 50257 bf16 (ops_bench): the one kernel 0.870 ms (1.13x the floor of its two passes), the two 1.206 ms
// (1.04x the floor of their three). Before its gradient was one 16-byte store a vector, the one kernel took 1.92 ms
// and the two were the default (benchmarks/RESULTS.md).
bool fused_kernel_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FLASHATTN_CE_FUSED");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

}  // namespace

FlashAttnStatus run_cross_entropy_fwd_bwd(const CrossEntropyParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  DeviceInfo d{};
  FlashAttnStatus s = current_device_info(&d, function);
  if (s != FLASHATTN_STATUS_OK) return s;
  return FLOAT_SWITCH(p.dtype, T, [&] {
    const int64_t smem = fused_smem_bytes<T>(p.vocab);
    if (2 * smem > d.smem_optin || !fused_kernel_enabled()) {
      // a row of which two blocks do not fit a multiprocessor (one block would load, reduce and write its row with
      // nothing of another under it; the one kernel was measured with two), or the fused kernel turned off: the
      // forward's kernels (lse after their workspace), then the backward's
      CrossEntropyParams q = p;
      q.lse = p.workspace + cross_entropy_fwd_workspace_bytes(p.rows, p.vocab) / int64_t(sizeof(float));
      FlashAttnStatus st = run_cross_entropy_fwd(q, stream, function);
      if (st != FLASHATTN_STATUS_OK) return st;
      return run_cross_entropy_bwd(q, stream, function);
    }
    return BOOL_SWITCH(p.label_smoothing > 0.f, kSmooth, [&] { return launch_fwd_bwd<T, kSmooth>(p, d, smem, stream, function); });
  });
}

FlashAttnStatus run_cross_entropy_bwd_rescale(const CrossEntropyParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  return FLOAT_SWITCH(p.dtype, T, [&] {
    const int64_t blocks = (p.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    cross_entropy_rescale_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(p);
    return check_launch(function, "cross_entropy_rescale_kernel");
  });
}

}  // namespace flashattn
