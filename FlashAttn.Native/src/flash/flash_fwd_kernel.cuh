// FlashAttention-2 forward kernel:
//   q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D), softmax_lse (B, H, Sq) float32.
// One CTA of 4 or 8 warps owns kBlockM = 64 or 128 query rows of one (batch, head); each warp
// owns 16 rows (one m16 tile), so the row statistics of the online softmax never leave a quad of lanes.
// K and V tiles of kBlockN keys stream through shared memory with cp.async, one buffer each:
// V(n)'s copy overlaps S = Q K(n)^T and the softmax, K(n+1)'s copy overlaps O += P V(n).
// P stays in registers as the A operand of P V.
#pragma once

#include <cmath>

#include "flash/flash_common.cuh"
#include "flash/mma.cuh"
#include "flash/philox.cuh"

namespace flashattn {
namespace flash {

template <int kHeadDim_, typename T_>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  // Warps of 16 query rows each. For head dims 64..128, 4 warps (64 rows) beat 8 (128 rows) on
  // the H100: fewer registers per thread (168 vs 195 at d128) let 3 independent CTAs share an SM,
  // whose phases (copies, mma, softmax) interleave (d128 fwd 223 vs 171 TFLOP/s, d64 167 vs 121,
  // B=4 H=16 S=4096). Larger head dims keep 8 warps (one CTA per SM either way); d32 was not
  // measured with 4.
  static constexpr int kWarps = (kHeadDim >= 64 && kHeadDim <= 128) ? 4 : 8;
  static constexpr int kBlockM = 16 * kWarps;
  // Large head dims halve the key block: the O accumulator (kHeadDim / 2 floats per lane) already
  // takes most of the register file.
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kThreads = kWarps * 32;
  // Rows padded by 16 bytes: the 8 rows an ldmatrix reads then fall in 8 distinct bank groups.
  static constexpr int kLds = kHeadDim + 8;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kLds * int(sizeof(T));
};

// kFull: softcap, ALiBi or dropout may be on. Without them (the common case) the score path is a
// multiply and a mask test on boundary blocks; keeping the tanh / Philox code out of that variant
// keeps its loop small enough for the instruction cache.
template <typename Tr, bool kFull>
__global__ void __launch_bounds__(Tr::kThreads) flash_fwd_kernel(const FlashFwdParams p) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, LDS = Tr::kLds;
  constexpr int NT = BN / 8;  // n8 tiles of S per warp
  constexpr int DT = D / 8;   // n8 tiles of O per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LDS;
  T* sV = sK + BN * LDS;

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const SeqInfo seq(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.sq) return;
  const int hk = h / int(p.nheads / p.nheads_k);
  const int hdim = int(p.headdim);

  const T* q = static_cast<const T*>(p.q) + seq.q_offset(b, h, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  const T* k = static_cast<const T*>(p.k) + seq.k_offset(b, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const T* v = static_cast<const T*>(p.v) + seq.k_offset(b, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  T* out = static_cast<T*>(p.out) + seq.q_offset(b, h, p.out_batch_stride, p.out_row_stride, p.out_head_stride);

  const ScoreMod mod(p, seq, b, h);
  // Keys any row of this block can see; blocks outside [n_lo, n_hi) are skipped entirely.
  int n_lo = 0, n_hi = seq.sk;
  if (mod.right >= 0) n_hi = min(n_hi, m0 + BM - 1 + mod.diag + mod.right + 1);
  if (mod.left >= 0) n_lo = max(n_lo, m0 + mod.diag - mod.left);
  const int nb_lo = n_lo / BN;
  const int nb_hi = n_hi > n_lo ? (n_hi + BN - 1) / BN : nb_lo;

  const bool dropout = kFull && p.dropout_p > 0.f;
  const Dropout drop(p.seed, p.offset, int64_t(b) * p.nheads + h, dropout_threshold(p.dropout_p));

  float acc_o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[i][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums; quad-reduced at the end

  if (nb_lo < nb_hi) {
    load_tile<BM, D, LDS, Tr::kThreads>(sQ, q + int64_t(m0) * p.q_row_stride, p.q_row_stride, seq.sq - m0, hdim);
    const int n0 = nb_lo * BN;
    load_tile<BN, D, LDS, Tr::kThreads>(sK, k + int64_t(n0) * p.k_row_stride, p.k_row_stride, seq.sk - n0, hdim);
    cp_async_commit();
  }
  for (int nb = nb_lo; nb < nb_hi; ++nb) {
    const int n0 = nb * BN;
    cp_async_wait<0>();  // K(nb) (and Q) have landed
    __syncthreads();     // ... for every thread's copies; and every warp is done with V(nb - 1)
    load_tile<BN, D, LDS, Tr::kThreads>(sV, v + int64_t(n0) * p.v_row_stride, p.v_row_stride, seq.sk - n0, hdim);
    cp_async_commit();
    // Blocks strictly inside the visible region need no per-element mask (the common case).
    const bool interior = n0 + BN <= seq.sk && (mod.right < 0 || n0 + BN - 1 <= m0 + mod.diag + mod.right) &&
                          (mod.left < 0 || n0 >= m0 + BM - 1 + mod.diag - mod.left);
    const bool plain = interior && mod.softcap == 0.f && mod.slope == 0.f;
    const float scale_log2 = p.softmax_scale * kLog2e;

    // S = Q K^T for this warp's 16 rows x BN keys.
    float acc_s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4];
      ldsm_x4(a, sQ + (warp * 16 + lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bf[4];
        ldsm_x4(bf, sK + (np * 16 + lane % 8 + (lane / 16) * 8) * LDS + ks * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(acc_s[2 * np], a, bf[0], bf[1]);
        mma_16816<T>(acc_s[2 * np + 1], a, bf[2], bf[3]);
      }
    }

    // Scores -> log2 units, masked; online softmax per row (rows g and g + 8 of the warp tile).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = m0 + warp * 16 + g + r * 8;
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int j = n0 + nt * 8 + 2 * t + c;
          float x;
          if (!kFull || plain) {
            x = acc_s[nt][2 * r + c] * scale_log2;
            if (!kFull && !interior && !mod.visible(i, j)) x = -INFINITY;
          } else {
            float th;
            x = mod.apply(acc_s[nt][2 * r + c], i, j, &th) * kLog2e;
          }
          acc_s[nt][2 * r + c] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(row_max[r], mx);
      // A row with nothing visible yet keeps max -inf; subtracting 0 then keeps exp2 at 0, not NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = fast_exp2(row_max[r] - m_use);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int j0 = n0 + nt * 8 + 2 * t;
        float p0 = fast_exp2(acc_s[nt][2 * r] - m_use);
        float p1 = fast_exp2(acc_s[nt][2 * r + 1] - m_use);
        sum += p0 + p1;  // the normaliser uses the undropped probabilities
        if (dropout) {
          bool k0, k1;
          drop.keep2(i, j0, k0, k1);
          if (p.dropout_mask != nullptr && i < seq.sq) {
            uint8_t* mrow = p.dropout_mask + ((int64_t(b) * p.nheads + h) * seq.sq + i) * seq.sk;
            if (j0 < seq.sk) mrow[j0] = k0;
            if (j0 + 1 < seq.sk) mrow[j0 + 1] = k1;
          }
          p0 = k0 ? p0 : 0.f;
          p1 = k1 ? p1 : 0.f;
        }
        acc_s[nt][2 * r] = p0;
        acc_s[nt][2 * r + 1] = p1;
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        acc_o[dt][2 * r] *= alpha;
        acc_o[dt][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V(nb) has landed for every thread's copies; every warp is done with K(nb)
    if (nb + 1 < nb_hi) {
      const int n1 = n0 + BN;
      load_tile<BN, D, LDS, Tr::kThreads>(sK, k + int64_t(n1) * p.k_row_stride, p.k_row_stride, seq.sk - n1, hdim);
      cp_async_commit();
    }

    // O += P V: P's C fragments, two n8 tiles at a time, are the A fragment of a k16 step.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(acc_s[2 * kk][0], acc_s[2 * kk][1]);
      a[1] = pack2<T>(acc_s[2 * kk][2], acc_s[2 * kk][3]);
      a[2] = pack2<T>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
      a[3] = pack2<T>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bf[4];
        ldsm_x4_trans(bf, sV + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + dp * 16 + (lane / 16) * 8);
        mma_16816<T>(acc_o[2 * dp], a, bf[0], bf[1]);
        mma_16816<T>(acc_o[2 * dp + 1], a, bf[2], bf[3]);
      }
    }
  }

  // out = O / l (times 1 / (1 - p) for dropout); LSE = m + log(l). A row that saw no key gets
  // out = 0 and LSE = +inf (flash-attn's convention: exp(s - LSE) = 0 in the backward).
  const float rp_dropout = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const bool empty = l == 0.f || row_max[r] == -INFINITY;
    const float inv = empty ? 0.f : rp_dropout / l;
    const int i = m0 + warp * 16 + g + r * 8;
    if (i < seq.sq) {
      T* orow = out + int64_t(i) * p.out_row_stride;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t;
        if (col < hdim) {
          *reinterpret_cast<uint32_t*>(orow + col) = pack2<T>(acc_o[dt][2 * r] * inv, acc_o[dt][2 * r + 1] * inv);
        }
      }
      if (t == 0) {
        const float lse = empty ? INFINITY : row_max[r] * kLn2 + logf(l);
        float* lse_ptr = seq.varlen ? p.softmax_lse + int64_t(h) * p.cu_seqlens_q[p.batch] + seq.q_row0 + i
                                    : p.softmax_lse + (int64_t(b) * p.nheads + h) * p.seqlen_q + i;
        *lse_ptr = lse;
      }
    }
  }
}

}  // namespace flash
}  // namespace flashattn
