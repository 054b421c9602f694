// FlashAttention-2 backward kernels:
//   dout, q, out (B, Sq, H, D), k, v (B, Sk, Hk, D), softmax_lse (B, H, Sq) -> dq, dk, dv.
// 1. flash_bwd_dot_do_o_kernel: dsum_i = sum_d dout_i * out_i (float32 workspace, (B*Sq, H)).
// 2. flash_bwd_kernel: one CTA per (key block, head, batch), 128 keys up to d128 and 64 beyond;
//    each warp owns 16 keys, so the transposed products S^T = K Q^T and dP^T = V dO^T leave P^T
//    and dS^T in that warp's registers, where they are directly the A operands of dV += P^T dO and
//    dK += dS^T Q (no shared-memory round trip, no cross-warp reduction). dS^T also goes to shared
//    memory for dQ += dS K, which is accumulated in float32 with atomics (several key blocks add
//    into the same rows). The CTA walks the query blocks (kBlockM rows, double-buffered with
//    cp.async, their LSE and dsum prefetched a block ahead) with two barriers each, and takes the
//    register-heavy part in sub-blocks of kSubM rows.
//    2026-11-25: query blocks 128 (d <= 64) / 64 rows with 32 x 32 dQ tasks and 2 barriers per
//    block, replacing 64 / 32 rows, 16 x 32 tasks and 3 barriers; unmeasured until the next
//    device run (before: forward + backward 153-192 TFLOP/s on the H100, bf16, B*S = 16384,
//    hidden 2048, against FA2's backward alone at 232-307).
// 3. flash_bwd_convert_dq_kernel / flash_bwd_convert_dkv_kernel: float32 accumulators -> dtype;
//    the latter also sums the query heads of a GQA group.
#pragma once

#include <cmath>

#include "common/numeric.cuh"
#include "flash/flash_common.cuh"
#include "flash/mma.cuh"
#include "flash/philox.cuh"

namespace flashattn {
namespace flash {

template <int kHeadDim_, typename T_>
struct BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  // dK and dV accumulators live in registers (kHeadDim floats per lane) up to 128; beyond, they
  // are read-modified-written in the float32 workspace once per query block, and a larger query
  // block amortises that traffic.
  static constexpr bool kAccInRegs = kHeadDim <= 128;
  // Keys per CTA, 16 per warp. The dQ atomics per flop fall as 1 / kBlockN: 128 keys where
  // shared memory allows.
  static constexpr int kBlockN = kAccInRegs ? 128 : 64;
  static constexpr int kWarps = kBlockN / 16;
  // Query rows per stage: per two barriers, one LSE/dsum prefetch and one dQ pass. FA2's sm80
  // backward uses 128 at d64 and 64 at d128, with 128 keys (its flash_bwd_launch_template.h).
  static constexpr int kBlockM = kAccInRegs && kHeadDim <= 64 ? 128 : 64;
  // Query rows whose S^T and dP^T a warp holds at once (kSubM floats per lane beside the kHeadDim
  // floats of dK, dV): 64 spills at d96 and d128 (12-44 bytes at 255 registers, ptxas 11.8).
  static constexpr int kSubM = kAccInRegs && kHeadDim > 64 ? 32 : 64;
  // dQ pass: tasks of (16 * kDqRowTiles) query rows x kDqChunk head-dim columns, one per warp
  // where the shapes allow. Shared-memory bytes per mma are 4096 (1/rows + 1/columns): a 32 x 32
  // task reads 256, a 16 x 32 one 384.
  // (Without kAccInRegs: 16 x kDkvChunk, the column chunk of the float32 dK/dV read-modify-write.)
  static constexpr int kDkvChunk = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kDqPerWarp = kBlockM * kHeadDim / kWarps;
  static constexpr int kDqRowTiles = kAccInRegs && kDqPerWarp >= 1024 ? 2 : 1;
  static constexpr int kDqChunk = kAccInRegs ? kDqPerWarp / (16 * kDqRowTiles) : kDkvChunk;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLds = kHeadDim + 8;    // padded rows: conflict-free ldmatrix
  static constexpr int kLdsDs = kBlockM + 8;
  static constexpr int kBytesFixed = 2 * kBlockN * kLds * int(sizeof(T)) + kBlockN * kLdsDs * int(sizeof(T)) +
                                     2 * kBlockM * int(sizeof(float));
  static constexpr int kBytesPerStage = 2 * kBlockM * kLds * int(sizeof(T));  // Q and dO tiles
  // Two Q/dO stages (the next query block's copy overlaps this one's math) where that fits in
  // the 163 KB an A100 block can have; one otherwise.
  static constexpr int kStages = kBytesFixed + 2 * kBytesPerStage <= 160 * 1024 ? 2 : 1;
  static constexpr int kSmemBytes = kBytesFixed + kStages * kBytesPerStage;
  static_assert(kBlockM % kSubM == 0 && kSubM % 16 == 0, "query sub-blocks of whole k16 steps");
  static_assert(kBlockM % (16 * kDqRowTiles) == 0 && kDqChunk % 16 == 0 && kHeadDim % kDqChunk == 0,
                "dQ tasks tile the (kBlockM x kHeadDim) block");
  static_assert(kBlockM <= kThreads, "one thread stages each query row's LSE and dsum");
};

// acc (16 rows x 8 * NDT columns starting at column d0 of sB) += A (16 x kSubM, the warp's
// register fragments) * sB (kSubM rows x kHeadDim, row-major in shared memory).
template <typename Tr, int NDT>
__device__ __forceinline__ void mma_regA_smemB(float (&acc)[NDT][4], const uint32_t (&a)[Tr::kSubM / 16][4],
                                               const typename Tr::T* sB, int d0, int lane) {
  using T = typename Tr::T;
#pragma unroll
  for (int kk = 0; kk < Tr::kSubM / 16; ++kk) {
#pragma unroll
    for (int dp = 0; dp < NDT / 2; ++dp) {
      uint32_t bf[4];
      ldsm_x4_trans(bf, sB + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * Tr::kLds + d0 + dp * 16 + (lane / 16) * 8);
      mma_16816<T>(acc[2 * dp], a[kk], bf[0], bf[1]);
      mma_16816<T>(acc[2 * dp + 1], a[kk], bf[2], bf[3]);
    }
  }
}

// The warp's (16 x kSubM) float tile as A fragments of k16 steps.
template <typename T, int MT>
__device__ __forceinline__ void to_a_frags(uint32_t (&a)[MT / 2][4], const float (&c)[MT][4]) {
#pragma unroll
  for (int kk = 0; kk < MT / 2; ++kk) {
    a[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// p[0] += a, p[1] += b: one vector atomic on sm_90 (half the L2 atomic operations), two otherwise.
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && __CUDACC_VER_MAJOR__ >= 12
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

template <typename T>
__global__ void __launch_bounds__(128) flash_bwd_dot_do_o_kernel(const FlashBwdParams p) {
  const int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SeqInfo seq(p, b);
  const int H = int(p.nheads);
  const int64_t idx = int64_t(blockIdx.x) * 4 + warp;
  const int i = int(idx / H), h = int(idx % H);
  if (i >= seq.sq) return;
  const T* dout = static_cast<const T*>(p.dout) +
                  seq.q_offset(b, h, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride) +
                  int64_t(i) * p.dout_row_stride;
  const T* out = static_cast<const T*>(p.out) +
                 seq.q_offset(b, h, p.out_batch_stride, p.out_row_stride, p.out_head_stride) +
                 int64_t(i) * p.out_row_stride;
  float sum = 0.f;
  for (int c = lane * 8; c < p.headdim; c += 32 * 8) {
    float x[8], y[8];
    load_float<T, 8>(dout + c, x);
    load_float<T, 8>(out + c, y);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += x[e] * y[e];
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) p.dsum[(seq.q_row0 + i) * H + h] = sum;
}

// kFull: softcap, ALiBi or dropout may be on (see flash_fwd_kernel).
template <typename Tr, bool kFull>
__global__ void __launch_bounds__(Tr::kThreads) flash_bwd_kernel(const FlashBwdParams p) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, SM = Tr::kSubM;
  constexpr int LDS = Tr::kLds, LDSS = Tr::kLdsDs;
  constexpr int MT = SM / 8;  // n8 tiles of S^T (queries) per warp and sub-block
  constexpr int CH = Tr::kDkvChunk;
  constexpr int DTR = Tr::kAccInRegs ? D / 8 : 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LDS;
  T* sQ0 = sV + BN * LDS;                     // stage s: sQ0 + s * 2 * BM * LDS, its dO right after
  T* sdS = sQ0 + Tr::kStages * 2 * BM * LDS;
  float* sLse = reinterpret_cast<float*>(sdS + BN * LDSS);
  float* sDsum = sLse + BM;

  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const SeqInfo seq(p, b);
  const int H = int(p.nheads);
  const int hk = h / int(p.nheads / p.nheads_k);
  const int hdim = int(p.headdim);

  const T* q = static_cast<const T*>(p.q) + seq.q_offset(b, h, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  const T* k = static_cast<const T*>(p.k) + seq.k_offset(b, hk, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const T* v = static_cast<const T*>(p.v) + seq.k_offset(b, hk, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  const T* dout = static_cast<const T*>(p.dout) +
                  seq.q_offset(b, h, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
  const float* lse = seq.varlen ? p.softmax_lse + int64_t(h) * p.cu_seqlens_q[p.batch] + seq.q_row0
                                : p.softmax_lse + (int64_t(b) * H + h) * p.seqlen_q;
  const float* dsum = p.dsum + seq.q_row0 * H + h;                 // row stride H
  float* dq_acc = p.dq_accum + (seq.q_row0 * H + h) * D;           // row stride H * D

  const ScoreMod mod(p, seq, b, h);
  const bool dropout = kFull && p.dropout_p > 0.f;
  const Dropout drop(p.seed, p.offset, int64_t(b) * p.nheads + h, dropout_threshold(p.dropout_p));
  const float rp_dropout = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  const float scale = p.softmax_scale;

  // Thread r < BM stages query row m0 + r's LSE and dsum. They are read from global memory one
  // query block ahead, into registers, so their latency hides behind a block of math instead of
  // stalling every thread at the barrier that publishes them.
  float lse_next = 0.f, dsum_next = 0.f;
  auto fetch_stats = [&](int mb) {
    const int i = mb * BM + int(threadIdx.x);
    if (threadIdx.x < BM && i < seq.sq) {
      lse_next = lse[i];
      dsum_next = dsum[int64_t(i) * H];
    }
  };
  auto stage_stats = [&](int mb) {
    const int i = mb * BM + int(threadIdx.x);
    if (threadIdx.x < BM) {
      // Padding rows: LSE +inf makes P = 0 there, so they contribute nothing.
      sLse[threadIdx.x] = i < seq.sq ? lse_next * kLog2e : INFINITY;
      sDsum[threadIdx.x] = i < seq.sq ? dsum_next : 0.f;
    }
  };

  for (int nb = blockIdx.x; nb * BN < seq.sk; nb += gridDim.x) {
    const int n0 = nb * BN;
    // Queries that see any key of this block (the inverse of the forward's key range).
    int i_lo = 0, i_hi = seq.sq;
    if (mod.right >= 0) i_lo = max(i_lo, n0 - mod.diag - mod.right);
    if (mod.left >= 0) i_hi = min(i_hi, n0 + BN - 1 - mod.diag + mod.left + 1);
    const int mb_lo = i_lo / BM, mb_hi = i_hi > i_lo ? (i_hi + BM - 1) / BM : mb_lo;
    auto load_q_do = [&](int mb) {
      const int m0 = mb * BM;
      T* sQs = sQ0 + (Tr::kStages == 2 ? (mb & 1) : 0) * 2 * BM * LDS;
      load_tile<BM, D, LDS, Tr::kThreads>(sQs, q + int64_t(m0) * p.q_row_stride, p.q_row_stride, seq.sq - m0, hdim);
      load_tile<BM, D, LDS, Tr::kThreads>(sQs + BM * LDS, dout + int64_t(m0) * p.dout_row_stride,
                                          p.dout_row_stride, seq.sq - m0, hdim);
    };
    load_tile<BN, D, LDS, Tr::kThreads>(sK, k + int64_t(n0) * p.k_row_stride, p.k_row_stride, seq.sk - n0, hdim);
    load_tile<BN, D, LDS, Tr::kThreads>(sV, v + int64_t(n0) * p.v_row_stride, p.v_row_stride, seq.sk - n0, hdim);
    if (mb_lo < mb_hi) {
      load_q_do(mb_lo);
      fetch_stats(mb_lo);
      stage_stats(mb_lo);
    }
    cp_async_commit();

    float acc_dk[DTR][4], acc_dv[DTR][4];
#pragma unroll
    for (int i = 0; i < DTR; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

    // Two barriers per query block: A publishes its Q/dO tiles, LSE and dsum; B publishes dS^T.
    // The dQ pass after B needs no closing barrier: the next writers of what it reads (sdS in
    // the next block, sK in the next key block) first pass the next A, or the barrier after the
    // loop, which this warp reaches only when its dQ pass is done.
    for (int mb = mb_lo; mb < mb_hi; ++mb) {
      const int m0 = mb * BM;
      T* sQ = sQ0 + (Tr::kStages == 2 ? (mb & 1) : 0) * 2 * BM * LDS;
      T* sdO = sQ + BM * LDS;
      if (mb + 1 < mb_hi) fetch_stats(mb + 1);
      if constexpr (Tr::kStages == 2) {
        // The other stage was last read before the previous block's barrier B.
        if (mb + 1 < mb_hi) {
          load_q_do(mb + 1);
          cp_async_commit();
          cp_async_wait<1>();  // this block's Q/dO (and K/V) have landed; the next may be in flight
        } else {
          cp_async_wait<0>();
        }
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // A

      // Sub-blocks of SM queries bound the live S^T / dP^T registers; each ends in dK, dV.
#pragma unroll 1
      for (int qs = 0; qs < BM; qs += SM) {
        const int m0s = m0 + qs;
        // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x SM queries.
        float acc_s[MT][4], acc_dp[MT][4];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[i][e] = acc_dp[i][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          uint32_t ak[4], av[4];
          ldsm_x4(ak, sK + (warp * 16 + lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
          ldsm_x4(av, sV + (warp * 16 + lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
#pragma unroll
          for (int qp = 0; qp < SM / 16; ++qp) {
            uint32_t bq[4], bo[4];
            const int off = (qs + qp * 16 + lane % 8 + (lane / 16) * 8) * LDS + ks * 16 + ((lane / 8) % 2) * 8;
            ldsm_x4(bq, sQ + off);
            ldsm_x4(bo, sdO + off);
            mma_16816<T>(acc_s[2 * qp], ak, bq[0], bq[1]);
            mma_16816<T>(acc_s[2 * qp + 1], ak, bq[2], bq[3]);
            mma_16816<T>(acc_dp[2 * qp], av, bo[0], bo[1]);
            mma_16816<T>(acc_dp[2 * qp + 1], av, bo[2], bo[3]);
          }
        }

        // Pairs strictly inside the visible region skip the per-element mask.
        const bool interior = n0 + BN <= seq.sk && m0s + SM <= seq.sq &&
                              (mod.right < 0 || n0 + BN - 1 <= m0s + mod.diag + mod.right) &&
                              (mod.left < 0 || n0 >= m0s + SM - 1 + mod.diag - mod.left);
        const float scale_log2 = scale * kLog2e;
        // P = exp(score - LSE) recomputed exactly as the forward; then (with Z the dropout mask)
        // acc_s <- P Z / (1 - p) for dV, acc_dp <- dS = P (dP Z / (1 - p) - dsum) (1 - tanh^2 under softcap).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int j = n0 + warp * 16 + g + r * 8;
#pragma unroll
          for (int nt = 0; nt < MT; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int il = qs + nt * 8 + 2 * t + c, i = m0 + il;
              float th = 0.f, pr;
              if (!kFull) {
                pr = (interior || mod.visible(i, j)) ? fast_exp2(acc_s[nt][2 * r + c] * scale_log2 - sLse[il]) : 0.f;
              } else {
                const float x = mod.apply(acc_s[nt][2 * r + c], i, j, &th);
                pr = x == -INFINITY ? 0.f : fast_exp2(x * kLog2e - sLse[il]);
              }
              const bool keep = !dropout || drop.keep1(i, j);
              const float dpv = keep ? acc_dp[nt][2 * r + c] * rp_dropout : 0.f;
              float ds = pr * (dpv - sDsum[il]);
              if (kFull && mod.softcap > 0.f) ds *= 1.f - th * th;
              acc_s[nt][2 * r + c] = keep ? pr * rp_dropout : 0.f;
              acc_dp[nt][2 * r + c] = ds;
            }
        }

        uint32_t a_p[SM / 16][4], a_ds[SM / 16][4];
        to_a_frags<T, MT>(a_p, acc_s);
        to_a_frags<T, MT>(a_ds, acc_dp);
        // dS^T to shared memory (rows = keys) for dQ, already rounded exactly as the dK operand.
#pragma unroll
        for (int kk = 0; kk < SM / 16; ++kk) {
          T* row0 = sdS + (warp * 16 + g) * LDSS + qs + kk * 16 + 2 * t;
          *reinterpret_cast<uint32_t*>(row0) = a_ds[kk][0];
          *reinterpret_cast<uint32_t*>(row0 + 8 * LDSS) = a_ds[kk][1];
          *reinterpret_cast<uint32_t*>(row0 + 8) = a_ds[kk][2];
          *reinterpret_cast<uint32_t*>(row0 + 8 * LDSS + 8) = a_ds[kk][3];
        }

        if constexpr (Tr::kAccInRegs) {
          mma_regA_smemB<Tr, D / 8>(acc_dv, a_p, sdO + qs * LDS, 0, lane);
          mma_regA_smemB<Tr, D / 8>(acc_dk, a_ds, sQ + qs * LDS, 0, lane);
        } else {
          // Per-query-head float32 rows owned by this CTA alone: plain read-modify-write.
#pragma unroll 1
          for (int d0 = 0; d0 < D; d0 += CH) {
#pragma unroll
            for (int which = 0; which < 2; ++which) {
              float tmp[CH / 8][4];
#pragma unroll
              for (int i = 0; i < CH / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) tmp[i][e] = 0.f;
              mma_regA_smemB<Tr, CH / 8>(tmp, which == 0 ? a_p : a_ds, (which == 0 ? sdO : sQ) + qs * LDS, d0, lane);
              float* acc = which == 0 ? p.dv_accum : p.dk_accum;
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const int j = n0 + warp * 16 + g + r * 8;
                if (j < seq.sk) {
                  float* row = acc + ((seq.k_row0 + j) * H + h) * D + d0 + 2 * t;
#pragma unroll
                  for (int dt = 0; dt < CH / 8; ++dt) {
                    float2 cur = *reinterpret_cast<float2*>(row + dt * 8);
                    cur.x += tmp[dt][2 * r];
                    cur.y += tmp[dt][2 * r + 1];
                    *reinterpret_cast<float2*>(row + dt * 8) = cur;
                  }
                }
              }
            }
          }
        }
      }
      __syncthreads();  // B: sdS complete; every warp is done with this block's sQ, sdO, sLse, sDsum
      if (mb + 1 < mb_hi) {
        stage_stats(mb + 1);
        if constexpr (Tr::kStages == 1) {
          load_q_do(mb + 1);  // overlaps the dQ pass, which reads only sdS and sK
          cp_async_commit();
        }
      }

      // dQ (BM x D) += dS (BM x BN) K (BN x D) * scale: tasks of (16 * RT query rows, DQC columns).
      constexpr int RT = Tr::kDqRowTiles, DQC = Tr::kDqChunk, kRowGroups = BM / (16 * RT);
#pragma unroll 1
      for (int task = warp; task < kRowGroups * (D / DQC); task += Tr::kWarps) {
        const int r0 = (task % kRowGroups) * 16 * RT, d0 = (task / kRowGroups) * DQC;
        float tmp[RT][DQC / 8][4];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int i = 0; i < DQC / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) tmp[rt][i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[RT][4];
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
            ldsm_x4_trans(a[rt], sdS + (kk * 16 + lane % 8 + (lane / 16) * 8) * LDSS + r0 + rt * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
          for (int dp = 0; dp < DQC / 16; ++dp) {
            uint32_t bf[4];
            ldsm_x4_trans(bf, sK + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + d0 + dp * 16 + (lane / 16) * 8);
#pragma unroll
            for (int rt = 0; rt < RT; ++rt) {
              mma_16816<T>(tmp[rt][2 * dp], a[rt], bf[0], bf[1]);
              mma_16816<T>(tmp[rt][2 * dp + 1], a[rt], bf[2], bf[3]);
            }
          }
        }
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int i = m0 + r0 + rt * 16 + g + r * 8;
            if (i < seq.sq) {
              float* row = dq_acc + int64_t(i) * H * D + d0 + 2 * t;
#pragma unroll
              for (int dt = 0; dt < DQC / 8; ++dt) {
                if (d0 + dt * 8 + 2 * t < hdim)
                  atomic_add2(row + dt * 8, tmp[rt][dt][2 * r] * scale, tmp[rt][dt][2 * r + 1] * scale);
              }
            }
          }
      }
      // Not needed for correctness (see above), but without it ptxas 11.8 fits the kFull variants
      // beyond d128 into 168 registers on sm_90 and spills.
      if constexpr (!Tr::kAccInRegs) __syncthreads();
    }
    cp_async_wait<0>();  // (a key block with no visible query still issued its K/V copies)
    __syncthreads();     // the dQ passes are done with sK and sdS before the next key block

    if constexpr (Tr::kAccInRegs) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int j = n0 + warp * 16 + g + r * 8;
        if (j >= seq.sk) continue;
        if (p.dk_accum != nullptr) {  // GQA: per query head, reduced by flash_bwd_convert_dkv_kernel
          float* dkr = p.dk_accum + ((seq.k_row0 + j) * H + h) * D + 2 * t;
          float* dvr = p.dv_accum + ((seq.k_row0 + j) * H + h) * D + 2 * t;
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            *reinterpret_cast<float2*>(dkr + dt * 8) = make_float2(acc_dk[dt][2 * r], acc_dk[dt][2 * r + 1]);
            *reinterpret_cast<float2*>(dvr + dt * 8) = make_float2(acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]);
          }
        } else {
          T* dkr = static_cast<T*>(p.dk) + seq.k_offset(b, h, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride) +
                   int64_t(j) * p.dk_row_stride;
          T* dvr = static_cast<T*>(p.dv) + seq.k_offset(b, h, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride) +
                   int64_t(j) * p.dv_row_stride;
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            const int col = dt * 8 + 2 * t;
            if (col < hdim) {
              *reinterpret_cast<uint32_t*>(dkr + col) = pack2<T>(acc_dk[dt][2 * r] * scale, acc_dk[dt][2 * r + 1] * scale);
              *reinterpret_cast<uint32_t*>(dvr + col) = pack2<T>(acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]);
            }
          }
        }
      }
    }
  }
}

// dq = dq_accum (already scaled), (B*Sq, H, Dpad) float32 -> dq's layout and dtype.
template <typename T>
__global__ void __launch_bounds__(128) flash_bwd_convert_dq_kernel(const FlashBwdParams p, int dpad) {
  const int b = blockIdx.y;
  const SeqInfo seq(p, b);
  const int H = int(p.nheads), chunks = int(p.headdim / 8);
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int c = int(idx % chunks);
  const int64_t rest = idx / chunks;
  const int h = int(rest % H), i = int(rest / H);
  if (i >= seq.sq) return;
  const float* src = p.dq_accum + ((seq.q_row0 + i) * H + h) * dpad + c * 8;
  T* dst = static_cast<T*>(p.dq) + seq.q_offset(b, h, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride) +
           int64_t(i) * p.dq_row_stride + c * 8;
  float x[8];
  load_float<float, 8>(src, x);  // 32-byte aligned: dpad and the workspace base are multiples of 8 floats
  store_float<T, 8>(dst, x);
}

// dk/dv = sum over the query heads of each KV head of the per-head accumulators (dk times scale).
template <typename T>
__global__ void __launch_bounds__(128) flash_bwd_convert_dkv_kernel(const FlashBwdParams p, int dpad) {
  const int b = blockIdx.y;
  const SeqInfo seq(p, b);
  const int H = int(p.nheads), Hk = int(p.nheads_k), G = H / Hk, chunks = int(p.headdim / 8);
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int c = int(idx % chunks);
  const int64_t rest = idx / chunks;
  const int hk = int(rest % Hk), j = int(rest / Hk);
  if (j >= seq.sk) return;
  float xk[8] = {}, xv[8] = {};
  for (int h = hk * G; h < hk * G + G; ++h) {
    const int64_t off = ((seq.k_row0 + j) * H + h) * dpad + c * 8;
    float yk[8], yv[8];
    load_float<float, 8>(p.dk_accum + off, yk);
    load_float<float, 8>(p.dv_accum + off, yv);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      xk[e] += yk[e];
      xv[e] += yv[e];
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) xk[e] *= p.softmax_scale;
  T* dk = static_cast<T*>(p.dk) + seq.k_offset(b, hk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride) +
          int64_t(j) * p.dk_row_stride + c * 8;
  T* dv = static_cast<T*>(p.dv) + seq.k_offset(b, hk, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride) +
          int64_t(j) * p.dv_row_stride + c * 8;
  store_float<T, 8>(dk, xk);
  store_float<T, 8>(dv, xv);
}

}  // namespace flash
}  // namespace flashattn
