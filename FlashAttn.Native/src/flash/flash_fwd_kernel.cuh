// FlashAttention-2 forward kernel:
//   q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D), softmax_lse (B, H, Sq) float32.
// One CTA owns kBlockM query rows of one (batch, head). Each warp owns kMTiles m16 tiles of
// contiguous rows (warp w: rows [16 kMTiles w, 16 kMTiles (w + 1))), so the row statistics of the
// online softmax never leave a quad of lanes, and every K or V fragment the warp reads from shared
// memory with ldmatrix feeds kMTiles mmas: with one tile, a warp issues one ldmatrix.x4 (512 bytes)
// per two mmas and shared-memory bandwidth (128 bytes per clock per SM), not the tensor cores,
// bounds the kernel.
// K and V tiles of kBlockN keys stream through shared memory with cp.async, one buffer each:
// V(n)'s copy overlaps S = Q K(n)^T and the softmax, K(n+1)'s copy overlaps O += P V(n).
// (flash-attn issues K(n+1) right after S, before the softmax. Here it waits for the barrier
// before P V, which also keeps ptxas from moving P V's loads and mmas up into the softmax: with
// two tiles that spills.)
// P stays in registers as the A operand of P V.
#pragma once

#include <climits>
#include <cmath>

#include "flash/flash_common.cuh"
#include "flash/mma.cuh"
#include "flash/dropout.cuh"

namespace flashattn {
namespace flash {

template <int kHeadDim_, typename T_>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  // Up to d160, 4 warps of two m16 tiles (128 rows), flash-attn's choice for these head dims on
  // the A100 and H100: each K or V fragment read from shared memory feeds two mmas, and the
  // accumulators of two tiles (kHeadDim + kBlockN floats per lane) still fit in 255 registers,
  // so two CTAs share an SM. Above d160 two tiles would spill: 8 warps of one tile each, one CTA
  // per SM. H100, bf16, B*S = 16384, hidden 2048 (benchmarks/RESULTS.md): 231-321 TFLOP/s against
  // PyTorch's FA2 at 240-344 (0.91-1.05x; 0.92x at d64 without causal); a one-tile, 4-warp kernel
  // reached 215-222 at d128 without causal.
  static constexpr int kMTiles = kHeadDim <= 160 ? 2 : 1;
  static constexpr int kWarps = kHeadDim <= 160 ? 4 : 8;
  static constexpr int kBlockM = 16 * kMTiles * kWarps;
  static constexpr int kThreads = kWarps * 32;
  // Two tiles are sized for two CTAs per SM (2 x 128 threads x 255 registers fill the register
  // file); the launch bound holds ptxas to that.
  static constexpr int kMinBlocksPerSm = kMTiles == 2 ? 2 : 1;
  // Keys per block; above d128 the O accumulator takes most of the register file, so 32. The kFull
  // variant (tanh and Philox temporaries) also takes 32 from d96 up, as flash-attn does with
  // dropout: with 64 it spills at d96 and d128 (nvcc 11.8). 128 keys at d64 (flash-attn's choice
  // without dropout) spills 24-68 bytes with nvcc 11.8; not measured on a GPU.
  static constexpr int block_n(bool full) { return kHeadDim <= 64 || (kHeadDim <= 128 && !full) ? 64 : 32; }
  // Rows padded by 16 bytes: the 8 rows an ldmatrix reads then fall in 8 distinct bank groups.
  static constexpr int kLds = kHeadDim + 8;
  static constexpr int smem_bytes(bool full) { return (kBlockM + 2 * block_n(full)) * kLds * int(sizeof(T)); }
};

// kFull: softcap, ALiBi or dropout may be on. Without them (the common case) the score path is a
// multiply and a mask test on boundary blocks; keeping the tanh / Philox code out of that variant
// keeps its loop small enough for the instruction cache.
template <typename Tr, bool kFull>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocksPerSm) flash_fwd_kernel(const FlashFwdParams p) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::block_n(kFull), LDS = Tr::kLds;
  constexpr int MT = Tr::kMTiles;  // m16 tiles per warp
  constexpr int NT = BN / 8;       // n8 tiles of S per m16 tile
  static_assert(4 * NT <= 32, "the dropout decisions of an m16 tile fit one 32-bit word");
  constexpr int DT = D / 8;        // n8 tiles of O per m16 tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LDS;
  T* sV = sK + BN * LDS;

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const SeqInfo seq(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.sq) return;
  const int hk = h / (int(p.nheads) / int(p.nheads_k));
  const int hdim = int(p.headdim);
  // This warp's first row in the block; the lane holds rows w0 + 16 mt + g and w0 + 16 mt + g + 8.
  const int w0 = warp * 16 * MT;

  const T* q = static_cast<const T*>(p.q) + seq.q_offset(b, h, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  const T* k = static_cast<const T*>(p.k) + seq.k_offset(b, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const T* v = static_cast<const T*>(p.v) + seq.k_offset(b, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);

  const ScoreMod mod(p, seq, b, h);
  // Keys any row of this block can see; blocks outside [n_lo, n_hi) are skipped entirely.
  int n_lo = 0, n_hi = seq.sk;
  if (mod.right >= 0) n_hi = min(n_hi, m0 + BM - 1 + mod.diag + mod.right + 1);
  if (mod.left >= 0) n_lo = max(n_lo, m0 + mod.diag - mod.left);
  const int nb_lo = n_lo / BN;
  const int nb_hi = n_hi > n_lo ? (n_hi + BN - 1) / BN : nb_lo;

  const bool dropout = kFull && p.dropout_p > 0.f;
  const Dropout drop(p.seed, p.offset, int64_t(b) * p.nheads + h, dropout_threshold16(p.dropout_p));
  // Dropout decisions of the lane's elements (mt, nt, e) of m16 tile mt in the block of keys from n0: bit 4 nt + e
  // (query w0 + 16 mt + g + 8 (e / 2), key n0 + 8 nt + 2t + e % 2), of row half r alone when r >= 0. One Philox call
  // per eight elements (Dropout::keep8), each call's twice when taken a row half at a time.
  constexpr bool kDropoutBits = D <= 128;
  auto dropout_bits = [&](int n0, int mt, int r) {
    uint32_t bits = 0;
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      bool k8[2][2][2];
      drop.keep8(m0 + w0 + mt * 16 + g, n0 + np * 16 + 2 * t, k8);
#pragma unroll
      for (int di = 0; di < 2; ++di)
#pragma unroll
        for (int dj = 0; dj < 2; ++dj)
#pragma unroll
          for (int c = 0; c < 2; ++c)
            if (r < 0 || r == di) bits |= uint32_t(k8[di][dj][c]) << (4 * (2 * np + dj) + 2 * di + c);
    }
    return bits;
  };

  float acc_o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][i][e] = 0.f;
  float row_max[MT][2];  // log2 units
  float row_sum[MT][2];  // this lane's partial sums; quad-reduced at the end
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[mt][r] = -INFINITY;
      row_sum[mt][r] = 0.f;
    }

  if (nb_lo < nb_hi) {
    copy_tile<BM, D, LDS, Tr::kThreads>(sQ, q + int64_t(m0) * p.q_row_stride, p.q_row_stride, seq.sq - m0, hdim);
    const int n0 = nb_lo * BN;
    copy_tile<BN, D, LDS, Tr::kThreads>(sK, k + int64_t(n0) * p.k_row_stride, p.k_row_stride, seq.sk - n0, hdim);
    cp_async_commit();
  }
  for (int nb = nb_lo; nb < nb_hi; ++nb) {
    const int n0 = nb * BN;
    cp_async_wait<0>();  // K(nb) (and Q) have landed
    __syncthreads();     // ... for every thread's copies; and every warp is done with V(nb - 1)
    copy_tile<BN, D, LDS, Tr::kThreads>(sV, v + int64_t(n0) * p.v_row_stride, p.v_row_stride, seq.sk - n0, hdim);
    cp_async_commit();

    // Dropout decisions up to d128: all of the lane's in this block, made here, where S's accumulators are not yet live
    // (above, O's accumulators leave no room for them: made one row half at a time in the softmax below).
    uint32_t keep[kDropoutBits ? MT : 1];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      if constexpr (kDropoutBits) keep[mt] = dropout ? dropout_bits(n0, mt, -1) : 0u;

    // S = Q K^T for this warp's 16 MT rows x BN keys; each K fragment serves all MT tiles.
    float acc_s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldsm_x4(a[mt], sQ + (w0 + mt * 16 + lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bf[4];
        ldsm_x4(bf, sK + (np * 16 + lane % 8 + (lane / 16) * 8) * LDS + ks * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(acc_s[mt][2 * np], a[mt], bf[0], bf[1]);
          mma_16816<T>(acc_s[mt][2 * np + 1], a[mt], bf[2], bf[3]);
        }
      }
    }

    // Blocks strictly inside the visible region need no per-element mask (the common case).
    const bool interior = n0 + BN <= seq.sk && (mod.right < 0 || n0 + BN - 1 <= m0 + mod.diag + mod.right) &&
                          (mod.left < 0 || n0 >= m0 + BM - 1 + mod.diag - mod.left);
    const bool plain = interior && mod.softcap == 0.f && mod.slope == 0.f;
    const float scale_log2 = p.softmax_scale * kLog2e;

    // Scores -> log2 units: scale * s, or the whole ScoreMod pipeline (natural units) * log2(e). The
    // test outside the loops: inside, the kFull kernel branched per element, which splits the
    // unrolled loop into blocks ptxas schedules one at a time.
    if (!kFull || plain) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] *= scale_log2;
    } else {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float th;
            const int i = m0 + w0 + mt * 16 + (e / 2) * 8 + g, j = n0 + nt * 8 + 2 * t + e % 2;
            acc_s[mt][nt][e] = mod.apply(acc_s[mt][nt][e], i, j, &th) * kLog2e;
          }
    }
    if (!kFull && !interior) {
      // ScoreMod::visible, element (mt, nt, e) being query i = i0 + 16 mt + 8 (e / 2) and key
      // j = j0 + 8 nt + e % 2: three bounds per block compared with constants, where per-row
      // bounds would be hoisted out of the loop and hold registers the accumulators need.
      const int i0 = m0 + w0 + g, j0 = n0 + 2 * t;
      const int j_end = seq.sk - j0;                                                  // j < sk
      const int d_hi = mod.right < 0 ? INT_MAX : mod.diag + mod.right - (j0 - i0);  // j - i <= diag + right
      const int d_lo = mod.left < 0 ? INT_MIN : mod.diag - mod.left - (j0 - i0);    // j - i >= diag - left
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int dj = nt * 8 + e % 2, dji = dj - mt * 16 - (e / 2) * 8;
            if (dj >= j_end || dji > d_hi || dji < d_lo) acc_s[mt][nt][e] = -INFINITY;
          }
    }

    // Online softmax per row (rows g and g + 8 of each m16 tile). Each row's probabilities are
    // packed to T as soon as they are computed: in half the registers of their float scores.
    uint32_t pk[MT][NT][2];  // P(row g + 8 r, keys 2t, 2t + 1 of n8 tile nt) of tile mt
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = m0 + w0 + mt * 16 + g + r * 8;
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * r], acc_s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[mt][r], mx);
        // A row with nothing visible yet keeps max -inf; subtracting 0 then keeps exp2 at 0, not NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = fast_exp2(row_max[mt][r] - m_use);
        uint32_t kept = 0;
        if (dropout) {
          if constexpr (kDropoutBits) kept = keep[mt];
          else kept = dropout_bits(n0, mt, r);
        }
        row_max[mt][r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int j0 = n0 + nt * 8 + 2 * t;
          float p0 = fast_exp2(acc_s[mt][nt][2 * r] - m_use);
          float p1 = fast_exp2(acc_s[mt][nt][2 * r + 1] - m_use);
          sum += p0 + p1;  // the normaliser uses the undropped probabilities
          if (dropout) {
            const bool k0 = (kept >> (4 * nt + 2 * r)) & 1u, k1 = (kept >> (4 * nt + 2 * r + 1)) & 1u;
            if (p.dropout_mask != nullptr && i < seq.sq) {
              // 1 only where the key is visible (a masked score is -inf by now; interior blocks have none), so the
              // mask does not depend on the tiling (the managed side zero-fills what skipped blocks never reach) and
              // the CPU reference path writes the same bytes
              uint8_t* mrow = p.dropout_mask + ((int64_t(b) * p.nheads + h) * seq.sq + i) * seq.sk;
              if (j0 < seq.sk) mrow[j0] = k0 && acc_s[mt][nt][2 * r] != -INFINITY;
              if (j0 + 1 < seq.sk) mrow[j0 + 1] = k1 && acc_s[mt][nt][2 * r + 1] != -INFINITY;
            }
            p0 = k0 ? p0 : 0.f;
            p1 = k1 ? p1 : 0.f;
          }
          pk[mt][nt][r] = pack2<T>(p0, p1);
        }
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          acc_o[mt][dt][2 * r] *= alpha;
          acc_o[mt][dt][2 * r + 1] *= alpha;
        }
      }

    cp_async_wait<0>();
    __syncthreads();  // V(nb) has landed for every thread's copies; every warp is done with K(nb)
    if (nb + 1 < nb_hi) {
      const int n1 = n0 + BN;
      copy_tile<BN, D, LDS, Tr::kThreads>(sK, k + int64_t(n1) * p.k_row_stride, p.k_row_stride, seq.sk - n1, hdim);
      cp_async_commit();
    }

    // O += P V: P's C fragments, two n8 tiles at a time, are the A fragment of a k16 step; each
    // V fragment serves all MT tiles.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pk[mt][2 * kk][0];
        a[mt][1] = pk[mt][2 * kk][1];
        a[mt][2] = pk[mt][2 * kk + 1][0];
        a[mt][3] = pk[mt][2 * kk + 1][1];
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bf[4];
        ldsm_x4_trans(bf, sV + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + dp * 16 + (lane / 16) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(acc_o[mt][2 * dp], a[mt], bf[0], bf[1]);
          mma_16816<T>(acc_o[mt][2 * dp + 1], a[mt], bf[2], bf[3]);
        }
      }
    }
  }

  // out = O / l (times 1 / (1 - p) for dropout); LSE = m + log(l). A row that saw no key gets
  // out = 0 and LSE = +inf (flash-attn's convention: exp(s - LSE) = 0 in the backward).
  const float rp_dropout = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  T* out = static_cast<T*>(p.out) + seq.q_offset(b, h, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const bool empty = l == 0.f || row_max[mt][r] == -INFINITY;
      const float inv = empty ? 0.f : rp_dropout / l;
      const int i = m0 + w0 + mt * 16 + g + r * 8;
      if (i < seq.sq) {
        T* orow = out + int64_t(i) * p.out_row_stride;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          const int col = dt * 8 + 2 * t;
          if (col < hdim) {
            *reinterpret_cast<uint32_t*>(orow + col) =
                pack2<T>(acc_o[mt][dt][2 * r] * inv, acc_o[mt][dt][2 * r + 1] * inv);
          }
        }
        if (t == 0) {
          const float lse = empty ? INFINITY : row_max[mt][r] * kLn2 + logf(l);
          float* lse_ptr = seq.varlen ? p.softmax_lse + int64_t(h) * p.cu_seqlens_q[p.batch] + seq.q_row0 + i
                                      : p.softmax_lse + (int64_t(b) * p.nheads + h) * p.seqlen_q + i;
          *lse_ptr = lse;
        }
      }
    }
}

}  // namespace flash
}  // namespace flashattn
