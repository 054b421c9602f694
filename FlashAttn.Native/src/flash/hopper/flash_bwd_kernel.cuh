// FlashAttention backward for Hopper (sm_90a), FlashAttention-3's design on raw PTX:
//   dout, q (B, Sq, H, D), k, v (B, Sk, Hk, D), softmax_lse (B, H, Sq), dsum (B * Sq, H)
//   -> dq_accum (B * Sq, H, D) float32 (+= dS K), dk, dv (B, Sk, Hk, D) (or float32 per query head
//   into dk_accum / dv_accum with GQA), for D = 64 or 128, causal or not.
// dsum = rowsum(dout * out) comes from the sm_80 path's flash_bwd_dot_do_o_kernel before, and
// dq_accum goes through its flash_bwd_convert_dq_kernel after (run_bwd in flash_bwd_hopper.cu).
// One CTA owns 128 keys of one (batch, head) and three warpgroups:
//  - warpgroup 0, the producer: one thread loads the K and V tiles once, then the Q and dO tiles of
//    kBlockM queries (64 at d128, 128 at d64) into a two-stage ring; the lanes of a second warp
//    stage the same queries' LSE (in log2 units) and dsum beside them. Each stage has a "full"
//    mbarrier (the TMA's bytes and the 32 lanes' arrivals) and an "empty" one (all 8 consumer warps
//    are done with it). Rows past the sequence ends arrive as zeros; their LSE is +inf, so P = 0
//    there, and a key row of zeros adds nothing to dQ (the only product that reads past-the-end
//    keys): no mask but the causal one.
//  - warpgroups 1 and 2, the consumers, 64 keys each, with the keys' dK and dV in registers across
//    all query blocks. Per query block:
//      S^T = K Q^T, dP^T = V dO^T       wgmma SS, m64 (keys) x n kBlockM (queries), K-major both
//      P^T = exp2(S^T scale_log2 - LSE_log2), causal mask;  dS^T = P^T (dP^T - dsum)
//      dV += P^T dO, dK += dS^T Q        wgmma RS: P^T and dS^T packed in registers are the A
//                                        operand as they are (the forward's P trick); dO and Q are
//                                        the MN-major B operand (as V in the forward)
//      dS^T -> shared memory (keys x queries in chunks of 64 queries, 128-byte swizzle); once both
//      warpgroups' halves are written (a named barrier), a 64 x 64 part of
//      dQ = dS K                         wgmma SS with both operands MN-major (imm-trans-a/b = 1),
//        over all 128 keys: warpgroup w takes head-dim columns [64 w, 64 w + 64) at d128 and
//        queries [64 w, 64 w + 64) of the block at d64, so each dQ element is added once per CTA,
//        with 16-byte float atomics into dq_accum.
// Query blocks go in order; causal starts at the first block with a query that sees a key of the
// CTA (bottom-right aligned: query i sees keys j <= i + Sk - Sq) and masks the blocks on the
// diagonal. CTAs of the first key blocks (the most queries under causal) start first.
// Variants (BwdVariant): kAtomic adds dQ as above; kDqTma stages each warpgroup's dQ part in
// shared memory and one thread adds it with a TMA reduce-add (two boxes of 32 columns), so the L2
// sees 8 KB bulk reductions instead of 16-byte atomics; kDqFirst (with kDqTma) issues dQ before dV
// and dK (FlashAttention-3's order), so that dQ is staged and its reduce-add issued while the tensor
// cores run dV and dK, the stage released after them; kPersistent (with kDqTma) runs a grid of at
// most one CTA per SM, each looping over work tiles (key block, head, batch; persistent_bwd_tile),
// the producer loading the next tile's K and V as soon as the consumers are done with the last one's.
// kDropout regenerates the forward's decisions (the sm_80 kernels' Philox stream, flash/dropout.cuh)
// for the elements of S^T while S^T and dP^T run, then, as the sm_80 backward, with Z the mask:
// dS^T = P^T (dP^T Z / (1 - p) - dsum) and dV += (P^T Z / (1 - p)) dO.
#pragma once

#include <climits>
#include <cmath>

#include "flash/dropout.cuh"
#include "flash/flash_bwd_kernel.cuh"  // atomic_add4 (no kernel of it is instantiated here)
#include "flash/flash_common.cuh"
#include "flash/hopper/kernel_traits.h"
#include "flash/hopper/sm90.cuh"
#include "flash/mma.cuh"

namespace flashattn {
namespace flash {
namespace hopper {

// Key block, head and batch of work tile `t` of a persistent CTA (`grid` CTAs, `total` tiles):
// units of persistent_unit (kernel_traits.h), the heavy end of a (batch, head) its first key block
// (it sees the most queries). Units go in order, so a round adds into the dQ rows of few heads.
__device__ __forceinline__ void persistent_bwd_tile(int t, int grid, int total, int n_blocks, int nheads, int* n_block,
                                                    int* h, int* b) {
  int rank, light, hb;
  persistent_unit(t, grid, total, n_blocks, &rank, &light, &hb);
  *n_block = light ? n_blocks - 1 - rank : rank;
  *b = hb / nheads;
  *h = hb - *b * nheads;
}

template <typename Tr, bool kDqTma, bool kPersistent, bool kDqFirst, bool kDropout>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_hopper_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                            const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do,
                            const __grid_constant__ CUtensorMap tm_dq, const BwdKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(kDqTma || !(kPersistent || kDqFirst), "the persistent and dQ-first kernels reduce dQ through the TMA");
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, kStages = Tr::kStages;
  constexpr int kKvChunkBytes = Tr::kKvChunkBytes, kQChunkBytes = Tr::kQChunkBytes, kQTileBytes = Tr::kQTileBytes;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  unsigned char* const gbase = smem_raw + (base - smem_u32(smem_raw));  // the same bytes, generic address
  const uint32_t sK = base + Tr::kOffK, sV = base + Tr::kOffV, sQ = base + Tr::kOffQ, sDo = base + Tr::kOffDo;
  const uint32_t sDs = base + Tr::kOffDs;
  float* const sLse = reinterpret_cast<float*>(gbase + Tr::kOffLse);    // [stage][BM], LSE * log2(e)
  float* const sDsum = reinterpret_cast<float*>(gbase + Tr::kOffDsum);  // [stage][BM]
  const uint32_t bar_kv = base + Tr::kOffBar;
  auto full = [&](int s) { return bar_kv + 8u * (1 + s); };
  auto empty = [&](int s) { return bar_kv + 8u * (1 + kStages + s); };
  const uint32_t kv_empty = bar_kv + 8u * (1 + 2 * kStages);  // every consumer warp is done with K and V

  // Work tiles of this CTA: tile_begin, + tile_step, ... below tile_end (the grid's one tile unless
  // persistent).
  const int tile_begin = kPersistent ? int(blockIdx.x) : 0;
  const int tile_end = kPersistent ? p.total_tiles : 1;
  const int tile_step = kPersistent ? int(gridDim.x) : 1;
  auto tile_coords = [&](int tile, int* n_block, int* h, int* b) {
    if constexpr (kPersistent) {
      persistent_bwd_tile(tile, tile_step, p.total_tiles, p.n_blocks, p.nheads, n_block, h, b);
    } else {
      *n_block = int(blockIdx.x), *h = int(blockIdx.y), *b = int(blockIdx.z);
    }
  };
  const int diag = p.seqlen_k - p.seqlen_q;
  // Query blocks [m_lo, m_lo + n_iters) hold a query that sees some key of the block at n0 (causal:
  // i >= n0 - diag). Each role computes them after its setmaxnreg: a value live across it would have
  // to fit the producer's 24 registers, and ptxas spilled n_iters there.
  auto m_lo_of = [&](int n0) { return p.causal ? max(0, n0 - diag) / BM : 0; };
  auto n_iters_of = [&](int m_lo) { return max(0, (p.seqlen_q + BM - 1) / BM - m_lo); };

  if (threadIdx.x == 0) {
    mbar_init(bar_kv, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), Tr::kFullArrivals);
      mbar_init(empty(s), 128 * Tr::kConsumerWarpgroups);  // one arrive per consumer thread
    }
    mbar_init(kv_empty, 4 * Tr::kConsumerWarpgroups);
    fence_mbar_init();
  }
  __syncthreads();

  // Every role counts the query blocks (it_all) and the tiles with at least one (kv_tiles) over the
  // CTA's tiles: the ring's stage and phase, and the K/V barriers' phases, continue from one tile to
  // the next.
  int it_all = 0, kv_tiles = 0;
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<Tr::kProducerRegs>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // Past the last query block; the producers walk the query blocks by m0 (registers are scarce here).
    const int m_end = (p.seqlen_q + BM - 1) / BM * BM;
    if (warp == 0 && lane == 0) {
      tma_prefetch(&tm_q);
      tma_prefetch(&tm_k);
      tma_prefetch(&tm_v);
      tma_prefetch(&tm_do);
      for (int tile = tile_begin; tile < tile_end; tile += tile_step) {
        int n_block, h, b;
        tile_coords(tile, &n_block, &h, &b);
        const int n0 = n_block * BN, m_begin = m_lo_of(n0) * BM;
        if (m_begin >= m_end) continue;
        for (int m0 = m_begin; m0 < m_end; m0 += BM, ++it_all) {
          const int s = it_all % kStages;
          // The consumers released the stage's last block.
          mbar_wait(empty(s), ((it_all / kStages) & 1) ^ 1);
          mbar_arrive_expect_tx(full(s), 2 * kQTileBytes);
#pragma unroll
          for (int c = 0; c < Tr::kChunks; ++c) {
            tma_load_4d(sQ + s * kQTileBytes + c * kQChunkBytes, &tm_q, full(s), c * Tr::kBoxCols, m0, h, b);
            tma_load_4d(sDo + s * kQTileBytes + c * kQChunkBytes, &tm_do, full(s), c * Tr::kBoxCols, m0, h, b);
          }
          // K and V after the tile's first Q and dO: a ring stage frees up before the last tile's
          // end, so under a persistent grid the first block's Q and dO load while the consumers
          // finish the last tile, and only K and V wait for it.
          if (m0 == m_begin) {
            // The consumers are done with the last tile's K and V.
            mbar_wait(kv_empty, (kv_tiles & 1) ^ 1);
            ++kv_tiles;
            const int hk = h / p.heads_per_khead;
            mbar_arrive_expect_tx(bar_kv, 2 * Tr::kKvTileBytes);
#pragma unroll
            for (int c = 0; c < Tr::kChunks; ++c) {
              tma_load_4d(sK + c * kKvChunkBytes, &tm_k, bar_kv, c * Tr::kBoxCols, n0, hk, b);
              tma_load_4d(sV + c * kKvChunkBytes, &tm_v, bar_kv, c * Tr::kBoxCols, n0, hk, b);
            }
          }
        }
      }
    } else if (warp == 1) {
      // LSE (natural log, (B, H, Sq)) and dsum ((B * Sq, H): a head's rows are nheads apart) are not
      // TMA-able tiles; this warp copies them, kBlockM / 32 queries a lane.
      for (int tile = tile_begin; tile < tile_end; tile += tile_step) {
        int n_block, h, b;
        tile_coords(tile, &n_block, &h, &b);
        // From the tile's first query block on; rows: queries left from the block's first.
        const int m_begin = m_lo_of(n_block * BN) * BM;
        const float* lse = p.softmax_lse + (int64_t(b) * p.nheads + h) * p.seqlen_q + m_begin;
        const float* dsum = p.dsum + (int64_t(b) * p.seqlen_q + m_begin) * p.nheads + h;
        for (int rows = p.seqlen_q - m_begin; rows > 0; rows -= BM, lse += BM, dsum += BM * p.nheads, ++it_all) {
          const int s = it_all % kStages;
          mbar_wait(empty(s), ((it_all / kStages) & 1) ^ 1);
#pragma unroll 1  // the producer's 24 registers hold one row's loads at a time
          for (int r = lane; r < BM; r += 32) {
            // Rows past the end: LSE +inf makes P = 0, hence dS = 0 too.
            sLse[s * BM + r] = r < rows ? lse[r] * kLog2e : INFINITY;
            sDsum[s * BM + r] = r < rows ? dsum[r * p.nheads] : 0.f;
          }
          mbar_arrive(full(s));  // release: the stores above are visible to whoever sees the phase complete
        }
      }
    }
  } else {
    // ---- consumers ----
    setmaxnreg_inc<Tr::kConsumerRegs>();
    constexpr int NA = D / 2;   // dK, dV accumulators per thread: key row 16 warp + g + 8 ((i / 2) % 2),
                                // head-dim column 8 (i / 4) + 2 t + i % 2
    constexpr int NS = BM / 2;  // S^T, dP^T accumulators per thread, the same layout over the queries
    const int cw = warpgroup - 1;
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const float sl = p.scale_log2;

    // S^T and dP^T (64 keys x BM queries): element i is key row 16 warp + g + 8 ((i / 2) % 2) and
    // query column 8 (i / 4) + 2 t + i % 2; dq (64 queries x 64 columns) likewise.
    float s[NS], dp[NS], dq[32];
    uint32_t pp[NS / 2], pds[NS / 2];  // P^T, dS^T packed: register 4 kk + r is the A operand's a[r] of k16 step kk

    // A of S^T and dP^T: this warpgroup's 64 rows of the K (V) tile, K-major: k16 step ks is 32 bytes
    // into 64-column chunk ks / 4 (16 KB apart).
    const uint64_t desc_k = sw128_desc(sK + cw * 64 * 128, 16, 1024);
    const uint64_t desc_v = sw128_desc(sV + cw * 64 * 128, 16, 1024);
    // dQ's operands, MN-major, over all 128 keys: k16 steps (16 keys) are 16 rows (2 KB) apart in
    // both. A: dS^T's query chunk (0, or cw at d64); B: K's head-dim chunk (cw at d128, or 0).
    const uint32_t ds_chunk = Tr::kDqByColumns ? 0u : uint32_t(cw * Tr::kDsChunkBytes);
    const uint64_t desc_dq_b = sw128_desc(sK + (Tr::kDqByColumns ? cw * kKvChunkBytes : 0), kKvChunkBytes, 1024);
    const int dq_row0 = Tr::kDqByColumns ? 0 : cw * 64, dq_col0 = Tr::kDqByColumns ? cw * 64 : 0;
    // kDqTma: this warpgroup's dQ staging (Tr::kDqStageBytes), and the thread that adds it to dq_accum.
    const uint32_t sDq = base + Tr::kOffDq + cw * Tr::kDqStageBytes;
    unsigned char* const dq_stage = gbase + Tr::kOffDq + cw * Tr::kDqStageBytes;
    const bool dq_issuer = tid == 0;

    for (int tile = tile_begin; tile < tile_end; tile += tile_step) {
      int n_block, h, b;
      tile_coords(tile, &n_block, &h, &b);
      const int n0 = n_block * BN, m_lo = m_lo_of(n0), n_iters = n_iters_of(m_lo);
      const int key0 = n0 + cw * 64;  // this warpgroup's first key
      float dk[NA], dv[NA];
#pragma unroll
      for (int i = 0; i < NA; ++i) dk[i] = dv[i] = 0.f;

      if (n_iters > 0) mbar_wait(bar_kv, kv_tiles & 1);
      for (int it = 0; it < n_iters; ++it, ++it_all) {
        const int m0 = (m_lo + it) * BM, st = it_all % kStages;
        mbar_wait(full(st), (it_all / kStages) & 1);

        // S^T = K Q^T and dP^T = V dO^T, two groups: the exponentials run while dP^T does.
        {
          const uint64_t desc_q = sw128_desc(sQ + st * kQTileBytes, 16, 1024);
          const uint64_t desc_do = sw128_desc(sDo + st * kQTileBytes, 16, 1024);
          reg_fence(s);
          reg_fence(dp);
          wgmma_fence();
#pragma unroll
          for (int ks = 0; ks < D / 16; ++ks)
            Wgmma<T, BM>::ss(s, desc_k + (((ks / 4) * kKvChunkBytes + (ks % 4) * 32) >> 4),
                             desc_q + (((ks / 4) * kQChunkBytes + (ks % 4) * 32) >> 4), ks > 0 ? 1u : 0u);
          wgmma_commit();
#pragma unroll
          for (int ks = 0; ks < D / 16; ++ks)
            Wgmma<T, BM>::ss(dp, desc_v + (((ks / 4) * kKvChunkBytes + (ks % 4) * 32) >> 4),
                             desc_do + (((ks / 4) * kQChunkBytes + (ks % 4) * 32) >> 4), ks > 0 ? 1u : 0u);
          wgmma_commit();
        }
        // kDropout: the decisions of this block's elements of S^T (rows keys key0 + 16 warp + g, + 8;
        // columns queries m0 + 2 t + ...; Dropout::keep_bits), two words at d64, one at d128, made while
        // S^T and dP^T run (ptxas places them under dP^T, with the exponentials). Other places spilled
        // more at both head dims (hopper/NOTES.md, "Dropout").
        uint32_t keep[kDropout ? NS / 32 : 1];
        if constexpr (kDropout) {
          const Dropout drop(p.seed, p.offset, b * p.nheads + h, p.dropout_threshold);
          drop.keep_bits<NS, true>(key0 + 16 * warp + g, m0 + 2 * t, keep);
        }
        wgmma_wait<1>();
        reg_fence(s);

        // P^T = exp2(S^T scale_log2 - LSE log2(e)), recomputed as the forward's probabilities; the
        // causal mask where some key of the warpgroup follows the block's first query + diag.
        const float* lse = sLse + st * BM;
        const float* dsum = sDsum + st * BM;
        if (p.causal && key0 + 63 > m0 + diag) {
          const int lim = m0 + 2 * t + diag - (key0 + 16 * warp + g);  // hidden: key - query > diag
#pragma unroll
          for (int i = 0; i < NS; ++i)
            if (8 * ((i / 2) % 2) - 8 * (i / 4) - i % 2 > lim) s[i] = -INFINITY;
        }
#pragma unroll
        for (int j = 0; j < NS / 4; ++j) {
          const float2 l = *reinterpret_cast<const float2*>(lse + 8 * j + 2 * t);
#pragma unroll
          for (int e = 0; e < 4; ++e) s[4 * j + e] = fast_exp2(fmaf(s[4 * j + e], sl, -(e % 2 ? l.y : l.x)));
        }
        wgmma_wait<0>();
        reg_fence(dp);
#pragma unroll
        for (int j = 0; j < NS / 4; ++j) {
          const float2 d2 = *reinterpret_cast<const float2*>(dsum + 8 * j + 2 * t);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = 4 * j + e;
            if constexpr (kDropout) {
              // The sm_80 backward's expressions: dP Z / (1 - p) in dS, P Z / (1 - p) for dV.
              const float rp = 1.f / (1.f - p.dropout_p);
              const bool kept = (keep[i / 32] >> (i % 32)) & 1u;
              dp[i] = s[i] * ((kept ? dp[i] * rp : 0.f) - (e % 2 ? d2.y : d2.x));
              s[i] = kept ? s[i] * rp : 0.f;
            } else {
              dp[i] = s[i] * (dp[i] - (e % 2 ? d2.y : d2.x));
            }
          }
        }
#pragma unroll
        for (int q = 0; q < NS / 2; ++q) {
          pp[q] = pack2<T>(s[2 * q], s[2 * q + 1]);
          pds[q] = pack2<T>(dp[2 * q], dp[2 * q + 1]);
        }

        // dS^T to shared memory, as dQ's A operand reads it: query chunk c / 64 (kDsChunkBytes apart),
        // key row r (128 bytes), query column c at 16-byte unit (c / 8) % 8 ^ (r % 8) of the row. A
        // thread's pair q is row 16 warp + g + 8 (q % 2), columns 8 (q / 2) + 2 t, + 1, and r % 8 = g.
        {
          unsigned char* ds = gbase + Tr::kOffDs + (it_all % 2) * Tr::kDsBytes;
#pragma unroll
          for (int q = 0; q < NS / 2; ++q) {
            const int r = cw * 64 + 16 * warp + g + 8 * (q % 2);
            *reinterpret_cast<uint32_t*>(ds + (q / 16) * Tr::kDsChunkBytes + r * 128 + ((((q / 2) % 8) ^ g) * 16) +
                                         4 * t) = pds[q];
          }
          fence_proxy_async_smem();  // the stores above, before the wgmma (async proxy) reads them
        }

        // dV += P^T dO, dK += dS^T Q: A from registers, B MN-major (64-column chunks kQChunkBytes apart,
        // k16 step = 16 query rows = 2 KB).
        auto issue_dkv = [&] {
          const uint64_t desc_do = sw128_desc(sDo + st * kQTileBytes, kQChunkBytes, 1024);
          const uint64_t desc_q = sw128_desc(sQ + st * kQTileBytes, kQChunkBytes, 1024);
          reg_fence(pp);
          reg_fence(pds);
          reg_fence(dv);
          reg_fence(dk);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < BM / 16; ++kk)
            Wgmma<T, D>::rs(dv, pp[4 * kk], pp[4 * kk + 1], pp[4 * kk + 2], pp[4 * kk + 3],
                            desc_do + ((kk * 16 * 128) >> 4));
#pragma unroll
          for (int kk = 0; kk < BM / 16; ++kk)
            Wgmma<T, D>::rs(dk, pds[4 * kk], pds[4 * kk + 1], pds[4 * kk + 2], pds[4 * kk + 3],
                            desc_q + ((kk * 16 * 128) >> 4));
          wgmma_commit();
        };
        // dQ part = dS K once both warpgroups' dS^T rows are written (named barrier 0 is __syncthreads).
        // kDqTma: the last block's reduce-add has read this warpgroup's dQ staging; the barrier tells
        // the warpgroup's other threads before they write it again.
        auto issue_dq = [&] {
          if (kDqTma && dq_issuer) bulk_wait_read<0>();
          named_bar_sync(1, 128 * Tr::kConsumerWarpgroups);
          const uint64_t desc_a = sw128_desc(sDs + (it_all % 2) * Tr::kDsBytes + ds_chunk, Tr::kDsChunkBytes, 1024);
          reg_fence(dq);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk)
            WgmmaTT<T>::ss(dq, desc_a + ((kk * 2048) >> 4), desc_dq_b + ((kk * 2048) >> 4), kk > 0 ? 1u : 0u);
          wgmma_commit();
        };
        // Once dV and dK are complete, Q, dO, LSE and dsum of the stage are read: release it. Every
        // consumer thread arrives, so that each one's LSE and dsum reads are ordered before the producer's
        // next stores to the stage by the arrive's own release (racecheck does not count a __syncwarp
        // followed by lane 0's arrive as ordering the other lanes' reads).
        auto release_stage = [&] {
          reg_fence(dv);
          reg_fence(dk);
          reg_fence(pp);
          reg_fence(pds);
          mbar_arrive(empty(st));
        };
        if constexpr (kDqFirst) {
          // dQ first: its output below runs while dV and dK do (groups complete in order).
          issue_dq();
          issue_dkv();
          wgmma_wait<1>();
        } else {
          issue_dkv();
          issue_dq();
          wgmma_wait<1>();
          release_stage();
          wgmma_wait<0>();
        }
        reg_fence(dq);

        if constexpr (kDqTma) {
          // dQ part to the staging as the TMA box reads it (kDqBoxCols = 32 floats, 128 bytes a row, the
          // 128-byte swizzle): pair q (row 16 warp + g + 8 (q % 2), column 8 (q / 2) + 2 t) is in box
          // q / 8, 16-byte unit 2 ((q / 2) % 4) + t / 2 of the row, XOR the row's g; one float2 a pair.
          // Each half-warp's stores then cover the 32 banks once.
#pragma unroll
          for (int q = 0; q < 16; ++q) {
            const int r = 16 * warp + g + 8 * (q % 2);
            *reinterpret_cast<float2*>(dq_stage + (q / 8) * Tr::kDqBoxBytes + r * 128 +
                                       (((2 * ((q / 2) % 4) + t / 2) ^ g) * 16) + 8 * (t % 2)) =
                make_float2(dq[2 * q], dq[2 * q + 1]);
          }
          fence_proxy_async_smem();  // the stores above, before the TMA (async proxy) reads them
          named_bar_sync(2 + cw, 128);
          if (dq_issuer) {
#pragma unroll
            for (int c = 0; c < 64 / Tr::kDqBoxCols; ++c)
              tma_reduce_add_4d(&tm_dq, sDq + c * Tr::kDqBoxBytes, dq_col0 + c * Tr::kDqBoxCols, m0 + dq_row0, h, b);
            bulk_commit();
          }
        } else {
          // Lanes t and t ^ 1 swap half their pairs so that each adds four consecutive columns of one
          // row (as the sm_80 kernel): even t row g (columns 2t..2t+3), odd t row g + 8 (2t-2..2t+1).
          const int rh = t & 1, row = m0 + dq_row0 + 16 * warp + g + 8 * rh;
          float* dst = p.dq_accum + ((int64_t(b) * p.seqlen_q + row) * p.nheads + h) * D + dq_col0 + 4 * (t / 2);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float* c = dq + 4 * j;
            const float o0 = __shfl_xor_sync(0xffffffffu, rh ? c[0] : c[2], 1);
            const float o1 = __shfl_xor_sync(0xffffffffu, rh ? c[1] : c[3], 1);
            const float4 v = rh ? make_float4(o0, o1, c[2], c[3]) : make_float4(c[0], c[1], o0, o1);
            if (row < p.seqlen_q) atomic_add4(dst + 8 * j, v);
          }
        }
        if constexpr (kDqFirst) {
          wgmma_wait<0>();
          release_stage();
        }
      }
      if (n_iters > 0) {
        // The tile's last products (dQ reads K, dP^T V) are complete: the producer may load the next
        // tile's K and V (persistent) while this one's dK and dV are stored.
        ++kv_tiles;
        if (lane == 0) mbar_arrive(kv_empty);
      }

      // dK (times the softmax scale) and dV of this warpgroup's keys; a tile whose keys no query sees
      // writes zeros. GQA: float32 per query head, summed over the group by flash_bwd_convert_dkv_kernel
      // (which applies the scale).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int j = key0 + 16 * warp + g + 8 * r;
        if (j >= p.seqlen_k) continue;
        if (p.dk_accum != nullptr) {
          const int64_t off = ((int64_t(b) * p.seqlen_k + j) * p.nheads + h) * D + 2 * t;
#pragma unroll
          for (int c = 0; c < D / 8; ++c) {
            *reinterpret_cast<float2*>(p.dk_accum + off + 8 * c) =
                make_float2(dk[4 * c + 2 * r], dk[4 * c + 2 * r + 1]);
            *reinterpret_cast<float2*>(p.dv_accum + off + 8 * c) =
                make_float2(dv[4 * c + 2 * r], dv[4 * c + 2 * r + 1]);
          }
        } else {
          T* dkr = static_cast<T*>(p.dk) + int64_t(b) * p.dk_batch_stride + int64_t(h) * p.dk_head_stride +
                   int64_t(j) * p.dk_row_stride + 2 * t;
          T* dvr = static_cast<T*>(p.dv) + int64_t(b) * p.dv_batch_stride + int64_t(h) * p.dv_head_stride +
                   int64_t(j) * p.dv_row_stride + 2 * t;
#pragma unroll
          for (int c = 0; c < D / 8; ++c) {
            *reinterpret_cast<uint32_t*>(dkr + 8 * c) =
                pack2<T>(dk[4 * c + 2 * r] * p.scale, dk[4 * c + 2 * r + 1] * p.scale);
            *reinterpret_cast<uint32_t*>(dvr + 8 * c) = pack2<T>(dv[4 * c + 2 * r], dv[4 * c + 2 * r + 1]);
          }
        }
      }
    }
    // The reduce-adds complete before the CTA (and its shared memory, their source) is gone.
    if (kDqTma && dq_issuer) bulk_wait<0>();
  }
#endif
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
