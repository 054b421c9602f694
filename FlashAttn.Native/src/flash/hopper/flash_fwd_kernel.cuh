// FlashAttention forward for Hopper (sm_90a), FlashAttention-3's design on raw PTX:
//   q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D), softmax_lse (B, H, Sq) float32,
// the same outputs as the sm_80 kernel (flash_fwd_kernel.cuh), for D = 64 or 128, causal or not.
// One CTA owns 128 (or, at d64, 192) query rows of one (batch, head) and three (four) warpgroups:
//  - warpgroup 0, the producer: one thread issues TMA loads of the Q tile once and of K and V
//    tiles of 128 keys into a two-stage ring, each buffer guarded by a "full" mbarrier (the TMA's
//    bytes landed) and an "empty" one (all 8 consumer warps are done reading it). Rows past the
//    sequence end arrive as zeros (the TMA's out-of-bounds fill), so partial tiles need only the
//    score mask. The warpgroup gives most of its registers to the consumers (setmaxnreg).
//  - warpgroups 1 and 2 (and 3), the consumers, 64 query rows each: S = Q K^T by wgmma with both operands
//    in shared memory, the online softmax in registers (exp2, the scale folded into log2 units),
//    P packed to 16 bits in registers as wgmma's A operand of O += P V, V read from shared memory
//    as the transposed (MN-major) B operand. Each warpgroup overlaps its own products with its
//    softmax (FlashAttention-3's intra-warpgroup pipelining): S of key block n is issued, then
//    O += P V of block n - 1 behind it, and the softmax of block n runs while that second product
//    does. With kPingpong the warpgroups also take turns issuing their products (named barriers,
//    round robin), so that one's softmax runs under the others' products (FlashAttention-3's
//    inter-warpgroup ping-pong); without it they run unsynchronised and overlap only by chance.
// Key tiles go from the last to the first: the only ones that need the mask (the partial tile at
// the end, the causal diagonal) come first; causal skips the tiles entirely above the diagonal.
// With kPersistent the grid has at most one CTA per SM, each looping over work tiles (query block,
// head, batch), the ring of K and V buffers and the warpgroups' turns continuing across them.
// With kDropout, P is dropped after the row maxima and sums (the LSE is the undropped softmax's)
// by the sm_80 kernels' Philox stream (flash/dropout.cuh: the same elements for a seed and offset),
// and the output scaled by 1 / (1 - p); the decisions of a key block are made while its S runs.
#pragma once

#include <climits>
#include <cmath>

#include "flash/dropout.cuh"
#include "flash/flash_common.cuh"
#include "flash/hopper/kernel_traits.h"
#include "flash/hopper/sm90.cuh"
#include "flash/mma.cuh"

namespace flashattn {
namespace flash {
namespace hopper {

// Query block, head and batch of work tile `t` of a persistent CTA (`grid` CTAs, `total` tiles):
// units of persistent_unit (kernel_traits.h), the heavy end of a (batch, head) its last query
// block (the last rows see the most keys).
// snake: persistent_snake's order instead (FwdTraits::kSnake; the rank counted from the heavy end).
__device__ __forceinline__ void persistent_tile(int t, int grid, int total, int m_blocks, int nheads, bool snake,
                                                int* m_block, int* h, int* b) {
  int rank, light = 0, hb;
  if (snake)
    persistent_snake(t, grid, total, total / m_blocks, &rank, &hb);
  else
    persistent_unit(t, grid, total, m_blocks, &rank, &light, &hb);
  *m_block = light ? rank : m_blocks - 1 - rank;
  *b = hb / nheads;
  *h = hb - *b * nheads;
}

// Tr::kDynamic: the index of a CTA's next tile from its launch's counter word (kernel_traits.h, fwd_tile_slots): the
// count under this launch's epoch. A word still under an older epoch (a launch on another stream overtook the one
// that was to put it in place) is given this epoch and count 0 by compare-and-swap against the value last seen, then
// counted: the CTAs that find it stale stop adding until it is in place, so that each round of swaps has a winner.
// A word reset under a running launch hands indices out again from 0: tiles computed twice, none skipped (a CTA ends
// only on an index past the last, and every index below it was handed out before). A launch's fetches number its
// tiles (each CTA's later tiles and one index past the last), so the fetch given the count total - 1 is its last: it
// puts the word back to count 0 under the same epoch, for a CUDA graph's next replay of this launch.
__device__ __forceinline__ uint32_t fwd_tile_index(unsigned long long* word, uint32_t epoch) {
  const unsigned long long fresh = static_cast<unsigned long long>(epoch) << 32;
  for (;;) {
    const unsigned long long old = atomicAdd(word, 1ull);
    if (uint32_t(old >> 32) == epoch) return uint32_t(old);
    unsigned long long seen = old + 1ull;
    while (uint32_t(seen >> 32) != epoch) {
      const unsigned long long was = atomicCAS(word, seen, fresh);
      if (was == seen) break;
      seen = was;
    }
  }
}

// Tr::kDynamic's order: tile t -> block rank from the heavy end and hb = batch * nheads + head. The (batch, head)s go
// in groups of `group` (every one when 0; the last group smaller), each group's tiles heaviest first (rank r of each
// of its heads before rank r + 1), so that the counter hands out the heavy tiles of a group before its light ones.
__device__ __forceinline__ void dynamic_tile(int t, int m_blocks, int heads, int group, int* rank, int* hb) {
  const int g = group > 0 && group < heads ? group : heads;
  const int gi = t / (g * m_blocks), r = t - gi * g * m_blocks;
  const int gh = min(g, heads - gi * g);
  *rank = r / gh;
  *hb = gi * g + (r - *rank * gh);
}

// kPersistent: a grid of at most one CTA per SM, each looping over tiles blockIdx.x, + gridDim.x, ...
// (persistent_tile): the producer loads the next tile's Q and first K and V blocks while the
// consumers finish the last one and store its output. Otherwise one tile per CTA, the heaviest
// causal blocks (the last rows see the most keys) launched first.
// kTileOverlap (persistent only, two Q buffers: Tr::kQStages == 2): no bubble between a CTA's tiles.
// The producer loads the next tile's Q into the other buffer a whole tile ahead (after its K and V
// loads of this tile), and a consumer warpgroup issues the next tile's first S = Q K^T in the same
// turn as this tile's last O += P V, behind it: it waits for the P V alone (wait_group 1), writes
// the output and LSE while the S runs, and waits for the S (wait_group 0) before the next
// iteration, so every wgmma group is still waited for in the iteration that issued it. The next
// tile then starts at its first softmax.
// kDropout: the dropout of the file comment (with kTileOverlap, a tile's first decisions are made at
// its start, its first S already complete).
template <typename Tr, bool kPingpong, bool kPersistent, bool kTileOverlap = false, bool kDropout = false>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_fwd_hopper_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                            const __grid_constant__ CUtensorMap tm_v, const FwdKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(!kTileOverlap || (kPersistent && kPingpong && Tr::kQStages == 2),
                "the tile overlap is a persistent ping-pong kernel's, with two Q buffers");
  static_assert(!Tr::kExpTurn || (kPingpong && !kTileOverlap), "turns around the exponentials: ping-pong, one tile");
  static_assert(!Tr::kSerial || (Tr::kExpTurn && !kDropout),
                "the serial loop: turns around the exponentials, no dropout");
  static_assert(!Tr::kDynamic || (kPersistent && !kTileOverlap && !Tr::kSnake), "dynamic tiles: persistent, one tile");
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, kStages = Tr::kStages;
  constexpr int kQStages = Tr::kQStages;
  constexpr int kChunkBytes = Tr::kChunkBytes, kTileBytes = Tr::kTileBytes, kQChunkBytes = Tr::kQChunkBytes;
  constexpr int kQTileBytes = Tr::kQTileBytes;
  constexpr int kWarpgroups = Tr::kConsumerWarpgroups;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base + Tr::kOffQ, sK = base + Tr::kOffK, sV = base + Tr::kOffV;
  const uint32_t bars = base + Tr::kOffBar;
  auto q_full = [&](int i) { return bars + 8u * i; };
  auto k_full = [&](int s) { return bars + 8u * (kQStages + s); };
  auto k_empty = [&](int s) { return bars + 8u * (kQStages + kStages + s); };
  auto v_full = [&](int s) { return bars + 8u * (kQStages + 2 * kStages + s); };
  auto v_empty = [&](int s) { return bars + 8u * (kQStages + 3 * kStages + s); };
  // Every consumer warp is done with Q buffer i's tile.
  auto q_empty = [&](int i) { return bars + 8u * (kQStages + 4 * kStages + i); };
  // Tr::kDynamic: tile index slot i written by the producer (full), read by every consumer warp (empty).
  auto tile_full = [&](int i) { return bars + 8u * (2 * kQStages + 4 * kStages + i); };
  auto tile_empty = [&](int i) { return bars + 8u * (2 * kQStages + 4 * kStages + 2 + i); };
  volatile int* const tile_slot = reinterpret_cast<int*>(smem_raw + (base - smem_u32(smem_raw)) + Tr::kOffTiles);

  // Work tiles of this CTA: tile_begin, + tile_step, ... below tile_end.
  const int tile_begin = kPersistent ? int(blockIdx.x) : 0;
  const int tile_end = kPersistent ? p.total_tiles : 1;
  const int tile_step = kPersistent ? int(gridDim.x) : 1;
  auto tile_coords = [&](int tile, int* m_block, int* h, int* b) {
    if constexpr (Tr::kDynamic) {
      int rank, hb;
      dynamic_tile(tile, p.m_blocks, p.total_tiles / p.m_blocks, p.group_heads, &rank, &hb);
      *m_block = p.m_blocks - 1 - rank;
      *b = hb / p.nheads;
      *h = hb - *b * p.nheads;
    } else if constexpr (kPersistent) {
      persistent_tile(tile, tile_step, p.total_tiles, p.m_blocks, p.nheads, Tr::kSnake, m_block, h, b);
    } else {
      *m_block = int(gridDim.x) - 1 - int(blockIdx.x), *h = blockIdx.y, *b = blockIdx.z;
    }
  };
  const int diag = p.seqlen_k - p.seqlen_q;
  // Key blocks of a query block: keys [0, n_end) are visible to some row of it (row i sees j <= i +
  // diag when causal).
  auto key_blocks = [&](int m0) {
    int n_end = p.seqlen_k;
    if (p.causal) n_end = min(n_end, min(m0 + BM, p.seqlen_q) + diag);
    return n_end > 0 ? (n_end + BN - 1) / BN : 0;
  };

  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < kQStages; ++i) {
      mbar_init(q_full(i), 1);
      mbar_init(q_empty(i), 4 * kWarpgroups);
    }
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(k_full(s), 1);  // the producer's arrive.expect_tx
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), 4 * kWarpgroups);  // one arrive per consumer warp
      mbar_init(v_empty(s), 4 * kWarpgroups);
    }
    if constexpr (Tr::kDynamic) {
      for (int i = 0; i < 2; ++i) {
        mbar_init(tile_full(i), 1);
        mbar_init(tile_empty(i), 4 * kWarpgroups);
      }
    }
    fence_mbar_init();
  }
  __syncthreads();

  // Both sides count the key blocks (kv) and the tiles with at least one (q_loads) over the CTA's
  // tiles: the ring's stage and phase, and Q's buffer and phase, continue from one tile to the next.
  const int warpgroup = threadIdx.x / 128;
  constexpr uint32_t kTurnBarrier = 1;  // named barriers 1 .. kWarpgroups (0 is __syncthreads')
  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      tma_prefetch(&tm_q);
      tma_prefetch(&tm_k);
      tma_prefetch(&tm_v);
      int kv = 0, q_loads = 0;
      // Tr::kDynamic: the tiles handed to the consumers (slot handed % 2), and the index taken for the tile after the
      // one being loaded (fetched a tile ahead, so that the atomic's round trip runs under the loads).
      int handed = 0, fetched = 0;
      unsigned long long* const word = Tr::kDynamic ? p.tile_slots + p.epoch % kFwdTileSlots : nullptr;
      auto hand = [&](int tile) {
        const int slot = handed % 2;
        mbar_wait(tile_empty(slot), ((handed / 2) & 1) ^ 1);
        tile_slot[slot] = tile;
        mbar_arrive(tile_full(slot));  // release: the consumers' wait on it sees the index
        ++handed;
      };
      auto fetch = [&] {
        const uint32_t i = fwd_tile_index(word, p.epoch);
        if (i == uint32_t(p.total_tiles) - 1u) atomicExch(word, static_cast<unsigned long long>(p.epoch) << 32);
        return int(min(gridDim.x + i, uint32_t(INT_MAX)));
      };
      auto first_tile = [&] {
        if constexpr (Tr::kDynamic) {
          // The next launch's word, in place before it starts (the same stream runs it after this one).
          if (blockIdx.x == 0)
            atomicExch(p.tile_slots + (p.epoch + 1u) % kFwdTileSlots,
                       static_cast<unsigned long long>(p.epoch + 1u) << 32);
          hand(int(blockIdx.x));
          if (int(blockIdx.x) < tile_end) fetched = fetch();
          return int(blockIdx.x);
        } else {
          return tile_begin;
        }
      };
      auto next_tile = [&](int tile) {
        if constexpr (Tr::kDynamic) {
          const int next = fetched;
          hand(next);
          if (next < tile_end) fetched = fetch();
          return next;
        } else {
          return tile + tile_step;
        }
      };
      for (int tile = first_tile(); tile < tile_end; tile = next_tile(tile)) {
        int m_block, h, b;
        tile_coords(tile, &m_block, &h, &b);
        const int m0 = m_block * BM, n_tiles = key_blocks(m0);
        if (n_tiles == 0) continue;
        const int hk = h / p.heads_per_khead;
        const int qb = q_loads % kQStages;
        // The consumers are done with the Q this buffer held (with two buffers: the tile before last's).
        mbar_wait(q_empty(qb), ((q_loads / kQStages) & 1) ^ 1);
        ++q_loads;
        mbar_arrive_expect_tx(q_full(qb), Tr::kQTileBytes);
#pragma unroll
        for (int c = 0; c < Tr::kChunks; ++c)
          tma_load_4d(sQ + qb * kQTileBytes + c * kQChunkBytes, &tm_q, q_full(qb), c * Tr::kBoxCols, m0, h, b);
        for (int it = 0; it < n_tiles; ++it, ++kv) {
          const int n0 = (n_tiles - 1 - it) * BN;
          const int s = kv % kStages;
          const uint32_t phase = (kv / kStages) & 1;
          // The consumers released this buffer's previous tile.
          mbar_wait(k_empty(s), phase ^ 1);
          mbar_arrive_expect_tx(k_full(s), kTileBytes);
#pragma unroll
          for (int c = 0; c < Tr::kChunks; ++c)
            tma_load_4d(sK + s * kTileBytes + c * kChunkBytes, &tm_k, k_full(s), c * Tr::kBoxCols, n0, hk, b);
          mbar_wait(v_empty(s), phase ^ 1);
          mbar_arrive_expect_tx(v_full(s), kTileBytes);
#pragma unroll
          for (int c = 0; c < Tr::kChunks; ++c)
            tma_load_4d(sV + s * kTileBytes + c * kChunkBytes, &tm_v, v_full(s), c * Tr::kBoxCols, n0, hk, b);
        }
      }
    }
  } else {
    // ---- consumers ----
    setmaxnreg_inc<Tr::kConsumerRegs>();
    constexpr int NS = BN / 2;  // S accumulators per thread: row g (i / 2 even) and g + 8, 8 (i / 4) + 2 t + i % 2
    constexpr int NO = D / 2;   // O accumulators per thread, same layout over the head dim
    const int cw = warpgroup - 1;
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const float sl = p.scale_log2;

    float o[NO];
    float row_max[2], row_sum[2];  // raw scores (scale > 0 keeps the order); this thread's partial sums
    float s[NS];
    uint32_t pk[NS / 2];  // P as wgmma's A operand: pair (2 q, 2 q + 1) of s is register q
    float alpha[2];       // rescale of O and the row sums by the last softmax's new maxima

    // Ping-pong (kPingpong): the consumer warpgroups take turns issuing their products, round robin,
    // on named barriers (warpgroup cw waits on kTurnBarrier + cw and passes the turn by arriving on
    // the next one's; 256 = the waiting and the passing warpgroups' threads), so the tensor cores run
    // the others' S and P V while one computes its softmax, rather than softmaxes coinciding when
    // the warpgroups drift into step.
    auto take_turn = [&] {
      if constexpr (kPingpong) named_bar_sync(kTurnBarrier + cw, 256);
    };
    auto pass_turn = [&] {
      if constexpr (kPingpong) named_bar_arrive(kTurnBarrier + (cw + 1) % kWarpgroups, 256);
    };
    // Tr::kExpTurn (cuDNN's order): the turns go around each softmax's exponentials instead of around the products,
    // so that no two warpgroups' exponentials share the multi-function unit of a sub-partition (each holds one warp
    // of every consumer warpgroup), and the products are issued as soon as their operands are ready. One turn per
    // softmax, n_tiles a tile in every warpgroup: the turns stay paired.
    auto take_exp_turn = [&] {
      if constexpr (Tr::kExpTurn) take_turn();
    };
    auto pass_exp_turn = [&] {
      if constexpr (Tr::kExpTurn) pass_turn();
    };
    auto take_product_turn = [&] {
      if constexpr (!Tr::kExpTurn) take_turn();
    };
    auto pass_product_turn = [&] {
      if constexpr (!Tr::kExpTurn) pass_turn();
    };
    // Warpgroup 0 has the first turn: its arrive here and its first take_turn complete barrier 1.
    // Each warpgroup then takes and passes one turn per S it issues (a P V issued alone, a tile's
    // last without the next tile's first S behind it, takes none), or with Tr::kExpTurn one per
    // softmax, the same count in every warpgroup, so the turns stay paired across tiles; the last
    // warpgroup's last pass is left pending on barrier 1 when the CTA ends, as in FlashAttention-3.
    if (kPingpong && cw == 0) named_bar_arrive(kTurnBarrier, 256);
    auto release = [&](uint32_t bar) {
      if (lane == 0) mbar_arrive(bar);  // one arrive per warp, after its wait_group
    };
    // This warpgroup's 64 rows of Q buffer 0; buffer qb is qb * kQTileBytes further.
    const uint64_t desc_q = sw128_desc(sQ + cw * 64 * 128, 16, 1024);

    // Key blocks are numbered over the CTA's tiles (kvi): ring stage kvi % kStages, phase
    // (kvi / kStages) & 1; Q buffer qb of the tile.
    auto wait_k = [&](int kvi) { mbar_wait(k_full(kvi % kStages), (kvi / kStages) & 1); };
    // S = Q K^T for key block kvi (64 x 128 per warpgroup), issued and committed, not waited for.
    // A = this warpgroup's 64 rows of Q, B = the K tile, both K-major; k16 step ks is 32 bytes
    // into 64-column chunk ks / 4 (Q chunks kQChunkBytes apart, K chunks kChunkBytes).
    auto qk = [&](int kvi, int qb) {
      const uint64_t desc_k = sw128_desc(sK + (kvi % kStages) * kTileBytes, 16, 1024);
      const uint64_t desc_qb = desc_q + uint64_t((qb * kQTileBytes) >> 4);
      reg_fence(s);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const uint32_t off_q = ((ks / 4) * kQChunkBytes + (ks % 4) * 32) >> 4;
        const uint32_t off_k = ((ks / 4) * kChunkBytes + (ks % 4) * 32) >> 4;
        Wgmma<T, BN>::ss(s, desc_qb + off_q, desc_k + off_k, ks > 0 ? 1u : 0u);
      }
      wgmma_commit();
    };
    // O += P V for key block kvi (64 x D per warpgroup), issued and committed; B = the V tile,
    // MN-major: 64-column head-dim chunks kChunkBytes apart (LBO), 8-key groups 1 KB apart (SBO).
    auto pv = [&](int kvi) {
      const int stage = kvi % kStages;
      mbar_wait(v_full(stage), (kvi / kStages) & 1);
      const uint64_t desc_v = sw128_desc(sV + stage * kTileBytes, kChunkBytes, 1024);
      reg_fence(pk);
      reg_fence(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        Wgmma<T, D>::rs(o, pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3],
                        desc_v + ((kk * 16 * 128) >> 4));
      wgmma_commit();
    };
    auto release_v = [&](int kvi) { release(v_empty(kvi % kStages)); };
    auto pack_p = [&] {
#pragma unroll
      for (int q = 0; q < NS / 2; ++q) pk[q] = pack2<T>(s[2 * q], s[2 * q + 1]);
    };
    auto rescale_o = [&] {
#pragma unroll
      for (int i = 0; i < NO; ++i) o[i] *= alpha[(i / 2) % 2];
    };

    int kv = 0, q_loads = 0;
    // kTileOverlap: this tile's first S was issued behind the last tile's last P V and is complete in s.
    bool s_ready = false;
    // The first S overwrites s (scale_d = 0), but the wgmma's operands read it: zeroed once, s then
    // always holds defined values.
#pragma unroll
    for (int i = 0; i < NS; ++i) s[i] = 0.f;
    // Tr::kDynamic: each tile's index from the producer's slot (taken tiles % 2), one arrive per warp once read.
    int taken = 0;
    auto take = [&] {
      const int slot = taken % 2;
      mbar_wait(tile_full(slot), (taken / 2) & 1);
      const int tile = tile_slot[slot];
      __syncwarp();
      if (lane == 0) mbar_arrive(tile_empty(slot));
      ++taken;
      return tile;
    };
    auto first_tile = [&] {
      if constexpr (Tr::kDynamic) return take();
      else return tile_begin;
    };
    auto next_tile = [&](int tile) {
      if constexpr (Tr::kDynamic) return take();
      else return tile + tile_step;
    };
    for (int tile = first_tile(); tile < tile_end; tile = next_tile(tile)) {
      int m0, bh;  // bh: the dropout stream's (batch, head), b * nheads + h
      {
        int m_block, h, b;  // h and b again for the epilogue: not held in registers through the loop
        tile_coords(tile, &m_block, &h, &b);
        m0 = m_block * BM;
        bh = b * p.nheads + h;
      }
      const int n_tiles = key_blocks(m0);
      const int qb = q_loads % kQStages;
      const int wg_row0 = m0 + cw * 64;          // this warpgroup's first query row
      const int row0 = wg_row0 + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
#pragma unroll
      for (int i = 0; i < NO; ++i) o[i] = 0.f;
      row_max[0] = row_max[1] = -INFINITY;
      row_sum[0] = row_sum[1] = 0.f;
      alpha[0] = alpha[1] = 1.f;

      // After S of block it completed: its K buffer, and after the tile's last S, Q's.
      auto release_k = [&](int it) {
        release(k_empty((kv + it) % kStages));
        if (it == n_tiles - 1) release(q_empty(qb));
      };
      // s (raw scores of key block it) -> exp2(s * sl - new max * sl) in place; row_max, row_sum and
      // alpha updated (O itself is rescaled by the caller, when no wgmma is writing it).
      auto softmax = [&](int it) {
        const int n0 = (n_tiles - 1 - it) * BN;
        // Mask only where some element of this warpgroup's 64 x 128 block can be hidden: keys past
        // the end, and with causal keys j > i + diag.
        const bool partial = n0 + BN > p.seqlen_k || (p.causal && n0 + BN - 1 > wg_row0 + diag);
        if (partial) {
          const int k_end = p.seqlen_k - (n0 + 2 * t);                       // key j < seqlen_k
          const int d_hi = p.causal ? row0 + diag - (n0 + 2 * t) : INT_MAX;  // j - i <= diag
#pragma unroll
          for (int i = 0; i < NS; ++i) {
            const int dj = 8 * (i / 4) + i % 2, di = 8 * ((i / 2) % 2);
            if (dj >= k_end || dj - di > d_hi) s[i] = -INFINITY;
          }
        }
        // Per row (g and g + 8 of the warp's 16); a row's four threads are a quad. The new maximum (and alpha),
        // returned times sl (0 for a row with nothing visible yet: subtracting 0 then keeps exp2 at 0, not NaN).
        auto new_max = [&](int r) {
          float mx = -INFINITY;
#pragma unroll
          for (int j = 0; j < NS / 4; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(row_max[r], mx);
          const float m_scaled = m_new == -INFINITY ? 0.f : m_new * sl;
          alpha[r] = fast_exp2(row_max[r] * sl - m_scaled);
          row_max[r] = m_new;
          return m_scaled;
        };
        auto exponentials = [&](int r, float m_scaled) {
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < NS / 4; ++j) {
            const float x0 = fmaf(s[4 * j + 2 * r], sl, -m_scaled), x1 = fmaf(s[4 * j + 2 * r + 1], sl, -m_scaled);
            const float p0 = fast_exp2(x0), p1 = fast_exp2(x1);
            s[4 * j + 2 * r] = p0;
            s[4 * j + 2 * r + 1] = p1;
            sum += p0 + p1;
          }
          row_sum[r] = row_sum[r] * alpha[r] + sum;
        };
        if constexpr (Tr::kExpTurn) {
          // Both rows' maxima, then the exponentials in this warpgroup's turn (take_exp_turn).
          float m_scaled[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) m_scaled[r] = new_max(r);
          take_exp_turn();
#pragma unroll
          for (int r = 0; r < 2; ++r) exponentials(r, m_scaled[r]);
          pass_exp_turn();
        } else {
#pragma unroll
          for (int r = 0; r < 2; ++r) exponentials(r, new_max(r));
        }
      };

      // out = O / l (times 1 / (1 - p) with dropout); LSE = max * scale + log(l). A row that saw no key
      // gets out = 0 and LSE = +inf (flash-attn's convention, as the sm_80 kernel). Touches o, never s
      // (kTileOverlap: the next tile's first S may be in flight).
      auto store_out = [&] {
        int m_block, h, b;
        tile_coords(tile, &m_block, &h, &b);
        T* out = static_cast<T*>(p.out) + int64_t(b) * p.out_batch_stride + int64_t(h) * p.out_head_stride;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float l = row_sum[r];
          l += __shfl_xor_sync(0xffffffffu, l, 1);
          l += __shfl_xor_sync(0xffffffffu, l, 2);
          const bool empty = l == 0.f || row_max[r] == -INFINITY;
          float inv;
          if constexpr (kDropout) inv = empty ? 0.f : (1.f / (1.f - p.dropout_p)) / l;
          else inv = empty ? 0.f : 1.f / l;
          const int row = row0 + 8 * r;
          if (row < p.seqlen_q) {
            T* orow = out + int64_t(row) * p.out_row_stride;
#pragma unroll
            for (int j = 0; j < D / 8; ++j)
              *reinterpret_cast<uint32_t*>(orow + 8 * j + 2 * t) =
                  pack2<T>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
            if (t == 0) {
              p.softmax_lse[(int64_t(b) * p.nheads + h) * p.seqlen_q + row] =
                  empty ? INFINITY : row_max[r] * sl * kLn2 + logf(l);
            }
          }
        }
      };
      // kDropout: the decisions of key block it's elements of s (Dropout::keep_bits: rows are queries row0,
      // row0 + 8, columns keys n0 + 2 t + ...), made after its S is issued, in registers no product writes;
      // applied to the probabilities after the softmax has summed them. With kTileOverlap a tile's first
      // S was issued in the tile before, and its decisions are made here, under none of this warpgroup's
      // products: made there, behind the S beside the last P V's registers, they would spill at d128.
      uint32_t keep[kDropout ? NS / 32 : 1];
      auto dropout_bits = [&](int it) {
        if constexpr (kDropout) {
          const Dropout drop(p.seed, p.offset, bh, p.dropout_threshold);
          drop.keep_bits<NS, false>(row0, (n_tiles - 1 - it) * BN + 2 * t, keep);
        }
      };
      auto drop_p = [&] {
        if constexpr (kDropout) {
#pragma unroll
          for (int i = 0; i < NS; ++i) s[i] = (keep[i / 32] >> (i % 32)) & 1u ? s[i] : 0.f;
        }
      };

      if (Tr::kSerial && n_tiles > 0) {
        // Tr::kSerial: S, its softmax, then P V, each product waited for right after it is issued; the tensor cores
        // run the other warpgroup's products under this one's softmax (the turns around the exponentials).
        mbar_wait(q_full(qb), (q_loads / kQStages) & 1);
        for (int it = 0; it < n_tiles; ++it) {
          wait_k(kv + it);
          qk(kv + it, qb);
          wgmma_wait<0>();
          reg_fence(s);
          release_k(it);
          softmax(it);
          rescale_o();  // by this block's maxima: no product is writing O
          pack_p();
          pv(kv + it);
          wgmma_wait<0>();
          reg_fence(o);
          reg_fence(pk);
          release_v(kv + it);
        }
        ++q_loads;
        kv += n_tiles;
      } else if (n_tiles > 0) {
        // S of block it is issued with O += P V of block it - 1 behind it, and the softmax of block
        // it runs while that second product does.
        if (!s_ready) {
          mbar_wait(q_full(qb), (q_loads / kQStages) & 1);
          wait_k(kv);
          take_product_turn();
          qk(kv, qb);
          pass_product_turn();
          dropout_bits(0);
          wgmma_wait<0>();
          reg_fence(s);
        } else {
          dropout_bits(0);  // its S, issued in the tile before, is complete
        }
        release_k(0);
        softmax(0);
        drop_p();
        pack_p();
        for (int it = 1; it < n_tiles; ++it) {
          wait_k(kv + it);
          take_product_turn();
          qk(kv + it, qb);
          rescale_o();  // by block it - 1's maxima, before its P V joins O
          pv(kv + it - 1);
          pass_product_turn();
          dropout_bits(it);
          wgmma_wait<1>();  // S of block it (groups complete in order); P V may still run
          reg_fence(s);
          release_k(it);
          softmax(it);  // touches s, never o or pk, which the P V in flight uses
          drop_p();
          wgmma_wait<0>();
          reg_fence(o);
          reg_fence(pk);
          release_v(kv + it - 1);
          pack_p();
        }
        ++q_loads;
        kv += n_tiles;
        // The next tile's first S goes behind this tile's last P V, in one turn, when the next tile
        // has keys (its Q is in the other buffer, loaded during this tile); else the P V is alone.
        int next_blocks = 0;
        if constexpr (kTileOverlap) {
          if (tile + tile_step < tile_end) {
            int m_block, h, b;
            tile_coords(tile + tile_step, &m_block, &h, &b);
            next_blocks = key_blocks(m_block * BM);
          }
        }
        // The next tile's S is issued and waited for within this branch: in flight across a merge of
        // paths, its accumulators would take the compiler's copies, and ptxas would serialise every
        // wgmma (C7515).
        s_ready = next_blocks > 0;
        if (s_ready) {
          const int next_qb = q_loads % kQStages;
          mbar_wait(q_full(next_qb), (q_loads / kQStages) & 1);
          wait_k(kv);
          take_product_turn();
          rescale_o();
          pv(kv - 1);
          qk(kv, next_qb);
          pass_product_turn();
          wgmma_wait<1>();  // the P V; the next tile's S may still run, under the epilogue
          reg_fence(o);
          reg_fence(pk);
          release_v(kv - 1);
          store_out();
          wgmma_wait<0>();
          reg_fence(s);
          continue;
        }
        rescale_o();
        pv(kv - 1);  // takes no turn (above)
        wgmma_wait<0>();
        reg_fence(o);
        reg_fence(pk);
        release_v(kv - 1);
      }

      store_out();
    }
  }
#endif
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
