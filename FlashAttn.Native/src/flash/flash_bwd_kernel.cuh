// FlashAttention-2 backward kernels:
//   dout, q, out (B, Sq, H, D), k, v (B, Sk, Hk, D), softmax_lse (B, H, Sq) -> dq, dk, dv.
// 1. flash_bwd_dot_do_o_kernel: dsum_i = sum_d dout_i * out_i (float32 workspace, (B*Sq, H)), a
//    group of lanes per row.
// 2. flash_bwd_kernel: one CTA per (key block, head, batch), 128 keys up to d128 (8 warps) and
//    64 beyond (4 warps). Warps work in pairs on 32 keys: each computes the transposed products
//    S^T = K Q^T and dP^T = V dO^T for its half of the block's queries, so that P^T and dS^T come
//    out in its registers as the A fragments of dV += P^T dO and dK += dS^T Q; it hands its half
//    to the partner through shared memory, takes the partner's, and accumulates dK and dV for its
//    half of the head dimension (no cross-warp reduction). dS^T in shared memory also serves
//    dQ += dS K, accumulated in float32 with atomics (several key blocks add into the same rows).
//    The CTA walks the query blocks (kBlockM rows; Q/dO double-buffered with cp.async where
//    shared memory allows; LSE and dsum prefetched a block ahead) with two barriers each (three
//    with one Q/dO stage).
//    Shared-memory traffic bounds it (ncu on the H100: ldmatrix is 80-85% of the L1 wavefronts,
//    which run at 65-75% of the peak rate, as in FA2's kernel): 32 keys per warp let each Q / dO
//    fragment feed two mmas, a quarter less ldmatrix traffic than 16 keys per warp, which held
//    dK and dV for all columns (d128 kernel, B=4 H=16 S=4096: 5.87 -> 5.25 ms, 4.86 with the
//    barrier layout of the query loop; FA2's kernel 4.44).
//    H100, bf16, B*S = 16384, hidden 2048, backward alone (benchmarks/RESULTS.md): 184-275 TFLOP/s
//    against PyTorch's FA2 at 170-304 (0.89-1.09x; 0.59-0.81x without warp pairs, boundary-only
//    masks and float4 dQ atomics).
// 3. flash_bwd_convert_dq_kernel / flash_bwd_convert_dkv_kernel: float32 accumulators -> dtype;
//    the latter also sums the query heads of a GQA group.
#pragma once

#include <climits>
#include <cmath>
#include <type_traits>

#include "common/numeric.cuh"
#include "flash/flash_common.cuh"
#include "flash/mma.cuh"
#include "flash/dropout.cuh"

namespace flashattn {
namespace flash {

template <int kHeadDim_, typename T_>
struct BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  // dK and dV accumulators live in registers (kHeadDim / 2 floats each per lane) up to d128;
  // beyond, they are read-modified-written in the float32 workspace once per query block.
  static constexpr bool kAccInRegs = kHeadDim <= 128;
  // Keys per CTA. The dQ atomics per flop fall as 1 / kBlockN: 128 keys where shared memory allows.
  static constexpr int kBlockN = kAccInRegs ? 128 : 64;
  // Warps in pairs: warp (wk, wq) takes keys [32 wk, 32 wk + 32) of the block with query half wq
  // for S^T and dP^T, and the same keys with head-dim half wq for dK and dV.
  static constexpr int kWarpsK = kBlockN / 32;
  static constexpr int kWarps = 2 * kWarpsK;
  static constexpr int kThreads = kWarps * 32;
  // Query rows per block: per two CTA barriers, one LSE/dsum prefetch and one dQ pass. FA2's sm80
  // backward uses 128 at d64 and 64 at d128, with 128 keys (its flash_bwd_launch_template.h).
  // A warp holds S^T and dP^T of 32 keys x kBlockM / 2 queries (kBlockM floats per lane) beside
  // dK and dV (kHeadDim floats): 192 at d64 and d128.
  static constexpr int kBlockM = kAccInRegs && kHeadDim <= 64 ? 128 : 64;
  static constexpr int kHalfM = kBlockM / 2;
  static constexpr int kHalfD = kHeadDim / 2;
  // dQ pass: one task of (16 * kDqRowTiles) query rows x kDqChunk head-dim columns per warp.
  // Shared-memory bytes per mma are 4096 (1/rows + 1/columns): a 32 x 32 task reads 256, a
  // 16 x 32 one 384.
  static constexpr int kDqPerWarp = kBlockM * kHeadDim / kWarps;
  static constexpr int kDqRowTiles = kDqPerWarp >= 1024 ? 2 : 1;
  static constexpr int kDqChunk = kDqPerWarp / (16 * kDqRowTiles);
  static constexpr int kLds = kHeadDim + 8;  // padded rows: conflict-free ldmatrix
  static constexpr int kLdsP = kBlockM + 8;
  // K, V, P^T, dS^T, LSE, dsum; then 1 or 2 stages of Q and dO tiles.
  static constexpr int kBytesFixed = 2 * kBlockN * kLds * int(sizeof(T)) + 2 * kBlockN * kLdsP * int(sizeof(T)) +
                                     2 * kBlockM * int(sizeof(float));
  static constexpr int kBytesPerStage = 2 * kBlockM * kLds * int(sizeof(T));
  static constexpr int smem_bytes(int stages) { return kBytesFixed + stages * kBytesPerStage; }
  static_assert(kHalfM % 16 == 0 && kHalfD % 16 == 0, "warp halves of whole k16 steps and ldmatrix column pairs");
  static_assert(kBlockM % (16 * kDqRowTiles) == 0 && kDqChunk % 16 == 0 && kHeadDim % kDqChunk == 0 &&
                    (kBlockM / (16 * kDqRowTiles)) * (kHeadDim / kDqChunk) == kWarps,
                "dQ tasks tile the (kBlockM x kHeadDim) block, one per warp");
  static_assert(kBlockM <= kThreads, "one thread stages each query row's LSE and dsum");
  static_assert(smem_bytes(1) <= 163 * 1024, "one stage fits an A100 block");
};

// A (16 x 8 MT) float tile as A fragments of k16 steps.
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

// acc (32 rows x 8 NDT columns) += A (32 x 16: the fragments of two m16 tiles) * sB (16 rows x
// 8 NDT columns, row-major with row stride kLds in shared memory).
template <typename Tr, int NDT>
__device__ __forceinline__ void mma_k16(float (&acc)[2][NDT][4], const uint32_t (&a0)[4], const uint32_t (&a1)[4],
                                        const typename Tr::T* sB, int lane) {
  using T = typename Tr::T;
#pragma unroll
  for (int dp = 0; dp < NDT / 2; ++dp) {
    uint32_t bf[4];
    ldsm_x4_trans(bf, sB + (lane % 8 + ((lane / 8) % 2) * 8) * Tr::kLds + dp * 16 + (lane / 16) * 8);
    mma_16816<T>(acc[0][2 * dp], a0, bf[0], bf[1]);
    mma_16816<T>(acc[0][2 * dp + 1], a0, bf[2], bf[3]);
    mma_16816<T>(acc[1][2 * dp], a1, bf[0], bf[1]);
    mma_16816<T>(acc[1][2 * dp + 1], a1, bf[2], bf[3]);
  }
}

// p[0..3] += v (p 16-byte aligned): one vector atomic on sm_90 (a quarter of the L2 atomic
// operations of scalar ones), four otherwise.
__device__ __forceinline__ void atomic_add4(float* p, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && __CUDACC_VER_MAJOR__ >= 12
  atomicAdd(reinterpret_cast<float4*>(p), v);
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
}

// kLanes lanes per (query row, head), 8 columns (one 16-byte load of dout and of out) each per pass:
// as many as the head dim fills (d64: 8, so a warp takes 4 rows and no lane idles), 256 threads a
// block. One warp per row left 24 of its lanes idle at d64 and ran at a quarter of the copy rate.
constexpr int kDotThreads = 256;
template <int kLanes>
__host__ __device__ constexpr int dot_rows_per_block() { return kDotThreads / kLanes; }

template <typename T, int kLanes>
__global__ void __launch_bounds__(kDotThreads) flash_bwd_dot_do_o_kernel(const FlashBwdParams p) {
  const int b = blockIdx.y, sub = threadIdx.x % kLanes;
  const SeqInfo seq(p, b);
  const int H = int(p.nheads);
  const int64_t idx = int64_t(blockIdx.x) * dot_rows_per_block<kLanes>() + threadIdx.x / kLanes;
  const int i = int(idx / H), h = int(idx % H);
  // No early return: the group's shuffles below need every lane of the warp.
  const bool live = i < seq.sq;
  float sum = 0.f;
  if (live) {
    const T* dout = static_cast<const T*>(p.dout) +
                    seq.q_offset(b, h, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride) +
                    int64_t(i) * p.dout_row_stride;
    const T* out = static_cast<const T*>(p.out) +
                   seq.q_offset(b, h, p.out_batch_stride, p.out_row_stride, p.out_head_stride) +
                   int64_t(i) * p.out_row_stride;
    for (int c = sub * 8; c < p.headdim; c += kLanes * 8) {
      float x[8], y[8];
      load_float<T, 8>(dout + c, x);
      load_float<T, 8>(out + c, y);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += x[e] * y[e];
    }
  }
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (live && sub == 0) p.dsum[(seq.q_row0 + i) * H + h] = sum;
}

// kFull: softcap, ALiBi or dropout may be on (see flash_fwd_kernel). stages: Q/dO buffers, 2 where
// Tr::smem_bytes(2) fits the device (the next query block's copy then overlaps this one's math).
// One CTA per SM (shared memory allows no more): said in the launch bound, else ptxas 11.8 caps
// some variants at 128-168 registers and spills (d160-d256).
template <typename Tr, bool kFull>
__global__ void __launch_bounds__(Tr::kThreads, 1) flash_bwd_kernel(const FlashBwdParams p, int stages) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, HM = Tr::kHalfM, HD = Tr::kHalfD;
  constexpr int LDS = Tr::kLds, LDP = Tr::kLdsP;
  constexpr int NT = HM / 8;  // n8 tiles of S^T (queries) per m16 tile of keys
  static_assert(4 * NT <= 32, "the dropout decisions of an m16 tile fit one 32-bit word");
  constexpr int KQ = HM / 16; // k16 steps over a query half
  constexpr int DN = HD / 8;  // n8 tiles of the warp's dK / dV columns
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LDS;
  T* sP = sV + BN * LDS;  // P^T and dS^T: rows = keys, columns = the block's queries
  T* sdS = sP + BN * LDP;
  float* sLse = reinterpret_cast<float*>(sdS + BN * LDP);
  float* sDsum = sLse + BM;
  T* sQ0 = reinterpret_cast<T*>(sDsum + BM);  // stage s: sQ0 + s * 2 * BM * LDS, its dO right after

  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wk = warp / 2, wq = warp % 2;
  const int kw0 = 32 * wk;   // the warp's first key in the block
  const int q0 = HM * wq;    // its first query (S^T, dP^T) in the block; the partner's is HM - q0
  const int dc0 = HD * wq;   // its first dK / dV column
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
  const Dropout drop(p.seed, p.offset, int64_t(b) * p.nheads + h, dropout_threshold16(p.dropout_p));
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
      T* sQs = sQ0 + (stages == 2 ? (mb & 1) : 0) * 2 * BM * LDS;
      copy_tile<BM, D, LDS, Tr::kThreads>(sQs, q + int64_t(m0) * p.q_row_stride, p.q_row_stride, seq.sq - m0, hdim);
      copy_tile<BM, D, LDS, Tr::kThreads>(sQs + BM * LDS, dout + int64_t(m0) * p.dout_row_stride,
                                          p.dout_row_stride, seq.sq - m0, hdim);
    };
    copy_tile<BN, D, LDS, Tr::kThreads>(sK, k + int64_t(n0) * p.k_row_stride, p.k_row_stride, seq.sk - n0, hdim);
    copy_tile<BN, D, LDS, Tr::kThreads>(sV, v + int64_t(n0) * p.v_row_stride, p.v_row_stride, seq.sk - n0, hdim);
    if (mb_lo < mb_hi) {
      load_q_do(mb_lo);
      fetch_stats(mb_lo);
      stage_stats(mb_lo);
    }
    cp_async_commit();

    // dK, dV of keys kw0 + 16 mt + (g, g + 8), columns dc0 + 8 n + (2t, 2t + 1).
    constexpr int DNR = Tr::kAccInRegs ? DN : 1;
    float acc_dk[2][DNR][4], acc_dv[2][DNR][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < DNR; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[mt][i][e] = acc_dv[mt][i][e] = 0.f;

    // Two CTA barriers per query block (a third before the next Q/dO copy with one stage, see
    // below). A publishes its Q/dO tiles, LSE and dsum, and marks every warp done with the
    // previous block (its Q/dO stage, sP, sdS). B publishes P^T and dS^T and marks the LSE/dsum
    // reads done. dV/dK and the dQ pass then run back to back without a barrier between: warps
    // drift apart there, and one warp's atomics overlap another's mmas.
    // (A pair barrier before dV/dK and the CTA barrier before the dQ pass instead: 5.25 against
    // 4.86 ms for the d128 kernel, 2.82 against 2.75 at d64, B=4 H=16 S=4096, H100.)
    for (int mb = mb_lo; mb < mb_hi; ++mb) {
      const int m0 = mb * BM;
      T* sQ = sQ0 + (stages == 2 ? (mb & 1) : 0) * 2 * BM * LDS;
      T* sdO = sQ + BM * LDS;
      if (mb + 1 < mb_hi) fetch_stats(mb + 1);
      cp_async_wait<0>();  // this block's Q/dO (and K/V)
      __syncthreads();     // A
      if (stages == 2 && mb + 1 < mb_hi) {
        load_q_do(mb + 1);  // into the stage the previous block read: overlaps this block's math
        cp_async_commit();
      }

      // Dropout decisions of the lane's elements, bit 4 nt + e of keep[mt] for element (mt, nt, e) (key
      // kw0 + 16 mt + g + 8 (e / 2), query q0 + 8 nt + 2t + e % 2): the forward's, one Philox call per quad
      // (Dropout::keep4), made before S^T and dP^T hold their registers. Above d128 (dK and dV in the workspace) the
      // kFull kernel has no registers to spare: one call per element there (Dropout::keep1), as before.
      constexpr bool kDropoutBits = Tr::kAccInRegs;
      uint32_t keep[2] = {0u, 0u};
      if (kDropoutBits && dropout) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int qp = 0; qp < KQ; ++qp)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              bool k4[2][2];
              drop.keep4(m0 + q0 + qp * 16 + 2 * t + c, n0 + kw0 + mt * 16 + g, k4);
#pragma unroll
              for (int di = 0; di < 2; ++di)
#pragma unroll
                for (int dj = 0; dj < 2; ++dj) keep[mt] |= uint32_t(k4[di][dj]) << (4 * (2 * qp + di) + 2 * dj + c);
            }
      }
      auto kept = [&](int mt, int nt, int e) {
        if (!dropout) return true;
        if constexpr (kDropoutBits) return ((keep[mt] >> (4 * nt + e)) & 1u) != 0;
        return drop.keep1(m0 + q0 + 2 * t + nt * 8 + e % 2, n0 + kw0 + g + mt * 16 + (e / 2) * 8);
      };

      // S^T = K Q^T and dP^T = V dO^T for the warp's 32 keys x HM queries; each K / V fragment
      // serves NT mmas, each Q / dO fragment two.
      float acc_s[2][NT][4], acc_dp[2][NT][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mt][i][e] = acc_dp[mt][i][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t ak[2][4], av[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          ldsm_x4(ak[mt], sK + (kw0 + mt * 16 + lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
          ldsm_x4(av[mt], sV + (kw0 + mt * 16 + lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
        }
#pragma unroll
        for (int qp = 0; qp < KQ; ++qp) {
          uint32_t bq[4], bo[4];
          const int off = (q0 + qp * 16 + lane % 8 + (lane / 16) * 8) * LDS + ks * 16 + ((lane / 8) % 2) * 8;
          ldsm_x4(bq, sQ + off);
          ldsm_x4(bo, sdO + off);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_16816<T>(acc_s[mt][2 * qp], ak[mt], bq[0], bq[1]);
            mma_16816<T>(acc_s[mt][2 * qp + 1], ak[mt], bq[2], bq[3]);
            mma_16816<T>(acc_dp[mt][2 * qp], av[mt], bo[0], bo[1]);
            mma_16816<T>(acc_dp[mt][2 * qp + 1], av[mt], bo[2], bo[3]);
          }
        }
      }

      // Element (mt, nt, e) is key j0 + 16 mt + 8 (e / 2) and query i0 + 8 nt + e % 2 (column
      // q0 + 8 nt + 2t + e % 2 of sLse and sDsum).
      const int j0 = n0 + kw0 + g, i0 = m0 + q0 + 2 * t;
      // P = exp(score - LSE) recomputed exactly as the forward; then (with Z the dropout mask)
      // acc_s <- P Z / (1 - p) for dV, acc_dp <- dS = P (dP Z / (1 - p) - dsum) (1 - tanh^2 under softcap).
      if (!kFull || (kDropoutBits && mod.softcap == 0.f && mod.slope == 0.f)) {
        // Straight-line code: exp2 of every element, then the mask on boundary tiles alone. A
        // per-element `visible ? exp2 : 0` compiled to a branch around each exp2 and its LSE
        // load, which serialised them: without (and with float4 dQ atomics) the backward ran
        // 1.2-1.4x faster on an H100. Dropout alone takes this path too up to d128 (above,
        // the kFull kernel with both paths spilled 60 bytes at d224 against 8, nvcc 11.8).
        const float scale_log2 = scale * kLog2e;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float2 lse2 = *reinterpret_cast<const float2*>(sLse + q0 + nt * 8 + 2 * t);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              acc_s[mt][nt][e] = fast_exp2(acc_s[mt][nt][e] * scale_log2 - (e % 2 ? lse2.y : lse2.x));
        }
        const bool interior = n0 + kw0 + 32 <= seq.sk && m0 + q0 + HM <= seq.sq &&
                              (mod.right < 0 || n0 + kw0 + 31 <= m0 + q0 + mod.diag + mod.right) &&
                              (mod.left < 0 || n0 + kw0 >= m0 + q0 + HM - 1 + mod.diag - mod.left);
        if (!interior) {
          // ScoreMod::visible with three bounds per tile compared with constants (as in the forward).
          const int j_end = seq.sk - j0;                                                  // j < sk
          const int d_hi = mod.right < 0 ? INT_MAX : mod.diag + mod.right - (j0 - i0);  // j - i <= diag + right
          const int d_lo = mod.left < 0 ? INT_MIN : mod.diag - mod.left - (j0 - i0);    // j - i >= diag - left
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int dj = mt * 16 + (e / 2) * 8, dji = dj - nt * 8 - e % 2;
                if (dj >= j_end || dji > d_hi || dji < d_lo) acc_s[mt][nt][e] = 0.f;
              }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float2 dsum2 = *reinterpret_cast<const float2*>(sDsum + q0 + nt * 8 + 2 * t);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const bool k = kept(mt, nt, e);
              const float pr = acc_s[mt][nt][e];
              const float dpv = k ? acc_dp[mt][nt][e] * rp_dropout : 0.f;
              acc_dp[mt][nt][e] = pr * (dpv - (e % 2 ? dsum2.y : dsum2.x));
              acc_s[mt][nt][e] = k ? pr * rp_dropout : 0.f;
            }
        }
      } else {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = i0 + nt * 8 + e % 2, j = j0 + mt * 16 + (e / 2) * 8;
              float th = 0.f;
              const float x = mod.apply(acc_s[mt][nt][e], i, j, &th);
              const float pr = x == -INFINITY ? 0.f : fast_exp2(x * kLog2e - sLse[i - m0]);
              const bool k = kept(mt, nt, e);
              const float dpv = k ? acc_dp[mt][nt][e] * rp_dropout : 0.f;
              float ds = pr * (dpv - sDsum[i - m0]);
              if (mod.softcap > 0.f) ds *= 1.f - th * th;
              acc_s[mt][nt][e] = k ? pr * rp_dropout : 0.f;
              acc_dp[mt][nt][e] = ds;
            }
      }

      // P^T and dS^T of the warp's keys x its query half, as A fragments of k16 steps; both go to
      // shared memory for the partner warp (dS^T also for the dQ pass), rounded exactly as used here.
      uint32_t a_p[2][KQ][4], a_ds[2][KQ][4];
      auto store_a_frag = [&](T* dst, const uint32_t(&a)[4]) {  // dst: row g, column 2t of the tile
        *reinterpret_cast<uint32_t*>(dst) = a[0];
        *reinterpret_cast<uint32_t*>(dst + 8 * LDP) = a[1];
        *reinterpret_cast<uint32_t*>(dst + 8) = a[2];
        *reinterpret_cast<uint32_t*>(dst + 8 * LDP + 8) = a[3];
      };
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        to_a_frags<T, NT>(a_p[mt], acc_s[mt]);
        to_a_frags<T, NT>(a_ds[mt], acc_dp[mt]);
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) {
          const int off = (kw0 + mt * 16 + g) * LDP + q0 + kk * 16 + 2 * t;
          store_a_frag(sP + off, a_p[mt][kk]);
          store_a_frag(sdS + off, a_ds[mt][kk]);
        }
      }
      __syncthreads();  // B
      if (mb + 1 < mb_hi) stage_stats(mb + 1);

      // dV += P^T dO and dK += dS^T Q over the block's BM queries, for the warp's head-dim half:
      // its own query half from registers, the partner's from shared memory.
      // (dv, dk: columns c0 .. c0 + 8 NDT of the warp's half; `which` 0: dV alone, 1: dK alone, 2: both.)
      auto dkv_block = [&](auto& dv, auto& dk, int which, int c0) {
        constexpr int NDT = std::extent<std::remove_reference_t<decltype(dv)>, 1>::value;
        auto k16 = [&](const uint32_t(&p0)[4], const uint32_t(&p1)[4], const uint32_t(&s0)[4],
                       const uint32_t(&s1)[4], int row) {
          if (which != 1) mma_k16<Tr, NDT>(dv, p0, p1, sdO + row * LDS + dc0 + c0, lane);
          if (which != 0) mma_k16<Tr, NDT>(dk, s0, s1, sQ + row * LDS + dc0 + c0, lane);
        };
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) k16(a_p[0][kk], a_p[1][kk], a_ds[0][kk], a_ds[1][kk], q0 + kk * 16);
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) {
          const int qo = HM - q0 + kk * 16;
          uint32_t pp[2][4], pd[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            const int off = (kw0 + mt * 16 + lane % 16) * LDP + qo + (lane / 16) * 8;
            if (which != 1) ldsm_x4(pp[mt], sP + off);
            if (which != 0) ldsm_x4(pd[mt], sdS + off);
          }
          k16(pp[0], pp[1], pd[0], pd[1], qo);
        }
      };
      if constexpr (Tr::kAccInRegs) {
        dkv_block(acc_dv, acc_dk, 2, 0);
      } else {
        // Per-query-head float32 rows owned by this CTA alone: plain read-modify-write, dV then dK,
        // in column chunks of CH (a 64-column chunk holds 64 floats per lane).
        constexpr int CH = HD <= 96 || (HD / 2) % 16 != 0 ? HD : HD / 2;
#pragma unroll 1
        for (int which = 0; which < 2; ++which)
#pragma unroll 1
          for (int c0 = 0; c0 < HD; c0 += CH) {
            float tmp[2][CH / 8][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
              for (int i = 0; i < CH / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) tmp[mt][i][e] = 0.f;
            dkv_block(tmp, tmp, which, c0);
            float* acc = which == 0 ? p.dv_accum : p.dk_accum;
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const int j = j0 + mt * 16 + r * 8;
                if (j < seq.sk) {
                  float* row = acc + ((seq.k_row0 + j) * H + h) * D + dc0 + c0 + 2 * t;
#pragma unroll
                  for (int n = 0; n < CH / 8; ++n) {
                    float2 cur = *reinterpret_cast<float2*>(row + n * 8);
                    cur.x += tmp[mt][n][2 * r];
                    cur.y += tmp[mt][n][2 * r + 1];
                    *reinterpret_cast<float2*>(row + n * 8) = cur;
                  }
                }
              }
          }
      }
      if (stages == 1 && mb + 1 < mb_hi) {
        __syncthreads();  // every warp is done with the one Q/dO stage
        load_q_do(mb + 1);  // overlaps the dQ pass, which reads only sdS and sK
        cp_async_commit();
      }

      // dQ (BM x D) += dS (BM x BN) K (BN x D), one task of (16 * RT query rows, DQC columns) per
      // warp; the softmax scale is applied once, by flash_bwd_convert_dq_kernel.
      {
        constexpr int RT = Tr::kDqRowTiles, DQC = Tr::kDqChunk, kRowGroups = BM / (16 * RT);
        const int r0 = (warp % kRowGroups) * 16 * RT, d0 = (warp / kRowGroups) * DQC;
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
            ldsm_x4_trans(a[rt], sdS + (kk * 16 + lane % 8 + (lane / 16) * 8) * LDP + r0 + rt * 16 + ((lane / 8) % 2) * 8);
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
        // Lanes t and t ^ 1 swap half their C fragments so that each adds four consecutive
        // columns of one row: even t row g (columns 2t..2t+3), odd t row g + 8 (2t-2..2t+1).
        const int rh = t & 1, iq = m0 + r0 + g + rh * 8, col = d0 + 4 * (t / 2);
        float* row = dq_acc + int64_t(iq) * (H * D) + col;
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int dt = 0; dt < DQC / 8; ++dt) {
            const float* c = tmp[rt][dt];
            const float o0 = __shfl_xor_sync(0xffffffffu, rh ? c[0] : c[2], 1);
            const float o1 = __shfl_xor_sync(0xffffffffu, rh ? c[1] : c[3], 1);
            const float4 v = rh ? make_float4(o0, o1, c[2], c[3]) : make_float4(c[0], c[1], o0, o1);
            if (iq + rt * 16 < seq.sq && col + dt * 8 < hdim) atomic_add4(row + rt * 16 * H * D + dt * 8, v);
          }
      }
    }
    cp_async_wait<0>();  // (a key block with no visible query still issued its K/V copies)
    __syncthreads();     // the dQ passes are done with sK and sdS before the next key block

    if constexpr (Tr::kAccInRegs) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int j = n0 + kw0 + mt * 16 + g + r * 8;
          if (j >= seq.sk) continue;
          if (p.dk_accum != nullptr) {  // GQA: per query head, reduced by flash_bwd_convert_dkv_kernel
            float* dkr = p.dk_accum + ((seq.k_row0 + j) * H + h) * D + dc0 + 2 * t;
            float* dvr = p.dv_accum + ((seq.k_row0 + j) * H + h) * D + dc0 + 2 * t;
#pragma unroll
            for (int n = 0; n < DN; ++n) {
              *reinterpret_cast<float2*>(dkr + n * 8) = make_float2(acc_dk[mt][n][2 * r], acc_dk[mt][n][2 * r + 1]);
              *reinterpret_cast<float2*>(dvr + n * 8) = make_float2(acc_dv[mt][n][2 * r], acc_dv[mt][n][2 * r + 1]);
            }
          } else {
            T* dkr = static_cast<T*>(p.dk) + seq.k_offset(b, h, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride) +
                     int64_t(j) * p.dk_row_stride;
            T* dvr = static_cast<T*>(p.dv) + seq.k_offset(b, h, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride) +
                     int64_t(j) * p.dv_row_stride;
#pragma unroll
            for (int n = 0; n < DN; ++n) {
              const int col = dc0 + n * 8 + 2 * t;
              if (col < hdim) {
                *reinterpret_cast<uint32_t*>(dkr + col) =
                    pack2<T>(acc_dk[mt][n][2 * r] * scale, acc_dk[mt][n][2 * r + 1] * scale);
                *reinterpret_cast<uint32_t*>(dvr + col) = pack2<T>(acc_dv[mt][n][2 * r], acc_dv[mt][n][2 * r + 1]);
              }
            }
          }
        }
    }
  }
}

// dq = softmax_scale * dq_accum, (B*Sq, H, Dpad) float32 -> dq's layout and dtype.
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
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] *= p.softmax_scale;
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
