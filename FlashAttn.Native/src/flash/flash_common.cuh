// What the forward and backward kernels share: where a (batch, head) lives in memory (padded or
// varlen), and the score pipeline scale -> softcap -> ALiBi -> masks, written once so the backward
// recomputes bit-for-bit the probabilities of the forward.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/numeric.cuh"
#include "flash/flash.h"

namespace flashattn {
namespace flash {

// Row offsets and lengths of sequence b: with cu_seqlens the rows are global (total, H, D) rows and
// the batch stride is ignored; otherwise rows start at b * batch_stride.
struct SeqInfo {
  int sq, sk;              // this sequence's lengths
  int64_t q_row0, k_row0;  // first row in the packed (varlen) layout, or b * seqlen (workspace rows)
  bool varlen;
  __device__ __forceinline__ SeqInfo(const FlashFwdParams& p, int b) {
    varlen = p.cu_seqlens_q != nullptr;
    if (varlen) {
      q_row0 = p.cu_seqlens_q[b];
      sq = p.cu_seqlens_q[b + 1] - int(q_row0);
      k_row0 = p.cu_seqlens_k[b];
      sk = p.cu_seqlens_k[b + 1] - int(k_row0);
    } else {
      q_row0 = int64_t(b) * p.seqlen_q;
      k_row0 = int64_t(b) * p.seqlen_k;
      sq = int(p.seqlen_q);
      sk = int(p.seqlen_k);
    }
  }
  // Element offset of (row 0 of this sequence, head h) in a tensor with these strides.
  __device__ __forceinline__ int64_t q_offset(int b, int h, int64_t bs, int64_t rs, int64_t hs) const {
    return (varlen ? q_row0 * rs : int64_t(b) * bs) + int64_t(h) * hs;
  }
  __device__ __forceinline__ int64_t k_offset(int b, int h, int64_t bs, int64_t rs, int64_t hs) const {
    return (varlen ? k_row0 * rs : int64_t(b) * bs) + int64_t(h) * hs;
  }
};

// The score pipeline of one (batch, head): raw dot product s -> scale * s -> softcap -> + ALiBi
// -> -inf where masked. Query i sees key j iff j < sk and, with diag = sk - sq (bottom-right
// alignment), i + diag - left <= j <= i + diag + right (a negative bound is unlimited).
struct ScoreMod {
  float scale;           // softmax_scale, or softmax_scale / softcap when softcap is on
  float softcap;         // 0: off
  float slope;           // ALiBi slope, 0: off
  int sk, diag, left, right;
  __device__ __forceinline__ ScoreMod(const FlashFwdParams& p, const SeqInfo& s, int b, int h) {
    softcap = p.softcap;
    scale = softcap > 0.f ? p.softmax_scale / softcap : p.softmax_scale;
    slope = p.alibi_slopes != nullptr ? p.alibi_slopes[int64_t(b) * p.alibi_batch_stride + h] : 0.f;
    sk = s.sk;
    diag = s.sk - s.sq;
    left = p.window_left;
    right = p.window_right;
  }
  __device__ __forceinline__ bool visible(int i, int j) const {
    return j < sk && (right < 0 || j <= i + diag + right) && (left < 0 || j >= i + diag - left);
  }
  // Returns the modified score (natural units) or -inf; *tanh_out receives tanh(scale * s / softcap)
  // (0 without softcap) for the softcap chain rule of the backward.
  __device__ __forceinline__ float apply(float s, int i, int j, float* tanh_out) const {
    float x = s * scale;
    float th = 0.f;
    if (softcap > 0.f) {
      th = tanhf(x);
      x = softcap * th;
    }
    *tanh_out = th;
    if (slope != 0.f) x -= slope * fabsf(float(i + diag - j));
    return visible(i, j) ? x : -INFINITY;
  }
};

}  // namespace flash
}  // namespace flashattn
