// Tile sizes, shared-memory layout and register split of the Hopper forward kernel, and the launch
// interface of its instantiations (hopper/instantiations/*.cu). Compiled for sm_90a only.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "flash/flash.h"

namespace flashattn {
namespace flash {
namespace hopper {

template <int kHeadDim_, typename T_, int kBlockM_ = 128, int kQStages_ = 1, bool kExpTurn_ = false,
          bool kSnake_ = false, bool kSerial_ = false, bool kDynamic_ = false>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the Hopper forward covers head dims 64 and 128");
  static_assert(sizeof(T) == 2, "16-bit inputs (wgmma's transposed B operand needs them)");
  // One CTA: kBlockM query rows (one consumer warpgroup of 64 rows, the wgmma M, each) of one
  // (batch, head), keys in blocks of 128. 128 x 128 is FlashAttention-3's tile for d128; for d64 it
  // takes 192 x 128 (three consumer warpgroups: more products per softmax, where the softmax is as
  // long as the products). d128 at 192 rows would need 160 accumulator registers a thread.
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = 128;
  static_assert(kBlockM == 128 || (kBlockM == 192 && kHeadDim == 64), "128 rows, or 192 at d64");
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);  // warpgroup 0 produces
  static constexpr int kStages = 2;                                  // K and V buffers each
  // Q buffers: two let the producer load the next tile's Q while the consumers still read this
  // one's (kTileOverlap, whose next tile's first S is issued before this tile's epilogue).
  static constexpr int kQStages = kQStages_;
  static_assert(kQStages == 1 || kQStages == 2, "one or two Q buffers");
  // kExpTurn: the ping-pong's turns around each softmax's exponentials rather than around the products (cuDNN's
  // order; flash_fwd_kernel.cuh, take_exp_turn).
  static constexpr bool kExpTurn = kExpTurn_;
  // kSnake: the persistent grid's tiles in the snake order (persistent_snake) instead of units (for long causal rows:
  // without a mask every order is balanced, and units keep a round's K and V in L2).
  static constexpr bool kSnake = kSnake_;
  // kSerial (with kExpTurn; cuDNN's loop, hopper/NOTES.md "A tile's start and end"): a warpgroup waits for each of its
  // products right after issuing it (S, softmax, P V, in that order, every key block alike, none peeled off at the
  // tile's start), and only the other warpgroups' products run under its softmax.
  static constexpr bool kSerial = kSerial_;
  // kDynamic (persistent grids; cuDNN's scheduler, hopper/NOTES.md "Dynamic tiles"): a CTA's first tile is its
  // blockIdx.x, every later one the next index of a global counter (fwd_tile_index), the tiles heaviest first; the
  // producer takes the indices and hands them to the consumers through a two-slot ring in shared memory.
  static constexpr bool kDynamic = kDynamic_;
  // The TMA boxes: 64 head-dim elements (one 128-byte swizzle row) by 128 rows for K and V, by
  // kBlockM rows for Q (a box has at most 256 rows); a tile is kChunks such boxes side by side
  // along the head dim.
  static constexpr int kBoxCols = 64;
  static constexpr int kBoxRows = 128;
  static constexpr int kQBoxRows = kBlockM;
  static_assert(kBlockN == kBoxRows, "K and V tiles are one box high");
  static constexpr int kChunks = kHeadDim / kBoxCols;
  static constexpr int kChunkBytes = kBoxRows * kBoxCols * int(sizeof(T));    // 16 KB, a multiple of 1024
  static constexpr int kTileBytes = kChunks * kChunkBytes;                     // one K or V tile
  static constexpr int kQChunkBytes = kQBoxRows * kBoxCols * int(sizeof(T));  // 16 or 24 KB
  static constexpr int kQTileBytes = kChunks * kQChunkBytes;
  // Shared memory, from a 1024-byte aligned base: Q[q stages], K[stages], V[stages], then the
  // mbarriers (Q full[q stages]; K full[stages], K empty[stages]; V full[stages], V empty[stages];
  // Q empty[q stages]; with kDynamic tile full[2], tile empty[2]), then kDynamic's two tile indices. d128 with two Q
  // buffers: 192 KB.
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kQStages * kQTileBytes;
  static constexpr int kOffV = kOffK + kStages * kTileBytes;
  static constexpr int kOffBar = kOffV + kStages * kTileBytes;
  static constexpr int kBarriers = 2 * kQStages + 4 * kStages + (kDynamic ? 4 : 0);
  static constexpr int kOffTiles = kOffBar + 8 * kBarriers;
  // + 1024: the dynamic shared memory base is only 16-byte aligned; the kernel rounds it up.
  static constexpr int kSmemBytes = kOffTiles + (kDynamic ? 8 : 0) + 1024;
  // Registers: the entry cap is 65536 / kThreads (168 for 384 threads, rounded down to 8; 128 for
  // 512); the producer warpgroup drops to kProducerRegs and the consumers rise to kConsumerRegs
  // (kProducerRegs * 128 + kConsumerRegs * 128 * warpgroups <= 65536): FlashAttention-3's splits
  // for two and three consumer warpgroups fed by TMA.
  static constexpr int kProducerRegs = kConsumerWarpgroups == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kConsumerWarpgroups == 2 ? 240 : 160;
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumerWarpgroups <= 65536, "register file");
};

// What the kernel reads besides the tensor maps (element strides, as FlashFwdParams).
struct FwdKernelParams {
  void* out;
  float* softmax_lse;  // (B, H, Sq)
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int seqlen_q, seqlen_k, nheads, heads_per_khead;
  float scale_log2;  // softmax_scale * log2(e) > 0
  int causal;        // bottom-right aligned: query i sees keys j <= i + seqlen_k - seqlen_q
  int m_blocks;      // query blocks of a (batch, head)
  int total_tiles;   // m_blocks * nheads * batch: the persistent kernel's work tiles
  // Dropout (the kDropout kernel alone): the sm_80 kernels' stream (flash/dropout.cuh).
  float dropout_p;
  uint32_t dropout_threshold;  // dropout_threshold16(dropout_p)
  uint64_t seed, offset;
  // kDynamic alone: the counters (fwd_tile_slots), this launch's epoch, and the heads a group of the tile order spans.
  unsigned long long* tile_slots;
  uint32_t epoch;
  int group_heads;
};

// Tensor maps of q, k, v viewed as 4-D (head dim, rows, heads, batch), box kBoxCols x kBoxRows.
struct FwdTensorMaps {
  CUtensorMap q, k, v;
};

// The forward's kernel variants (flash_fwd_kernel.cuh), picked by FLASHATTN_HOPPER_FWD_VARIANT
// (flash_fwd_hopper.cu): kOverlap, each consumer warpgroup overlapping its own softmax with its
// products; kPingpong, the consumer warpgroups also taking turns on the tensor cores; kRows192, the
// same as kPingpong with 192-row tiles (three consumer warpgroups taking turns) at d64, and exactly
// kPingpong at d128; kPersistent, kPingpong on a persistent grid (one CTA per SM looping over tiles);
// kPersistent192, kRows192 on a persistent grid; kPersistent2, kPersistent with the tiles of a CTA
// overlapped (two Q buffers; the next tile's first S issued with this tile's last P V and run under
// its epilogue); kPersistentOverlap, kOverlap on a persistent grid (no turns); kPersistentExpTurn,
// kPersistent with the turns around the softmax's exponentials rather than around the products
// (FwdTraits::kExpTurn); kPersistent192Snake, kPersistent192 with the tiles in the snake order (FwdTraits::kSnake);
// kPersistentSerial, kPersistentExpTurn with each product waited for where it is issued (FwdTraits::kSerial; being
// measured: hopper/NOTES.md, "A tile's start and end"); kPersistentDynamic and kPersistentSerialDynamic,
// kPersistentExpTurn and kPersistentSerial with dynamic tiles (FwdTraits::kDynamic; being measured: hopper/NOTES.md,
// "Dynamic tiles").
enum class FwdVariant : int {
  kOverlap = 0,
  kPingpong = 1,
  kRows192 = 2,
  kPersistent = 3,
  kPersistent192 = 4,
  kPersistent2 = 5,
  kPersistentOverlap = 6,
  kPersistentExpTurn = 7,
  kPersistent192Snake = 8,
  kPersistentSerial = 9,
  kPersistentDynamic = 10,
  kPersistentSerialDynamic = 11
};

// The variant whose kernel runs at a head dim: d128 has no 192-row tiles, so rows192 runs pingpong's kernel there,
// and persistent192 and persistent192_snake persistent's (the snake order on 128-row tiles lost at d128:
// hopper/NOTES.md, "The snake order"). run_fwd resolves a variant through it once; the launch and the path log
// then see the kernel that runs.
constexpr FwdVariant fwd_kernel_variant(int headdim, FwdVariant variant) {
  if (headdim == 64) return variant;
  if (variant == FwdVariant::kRows192) return FwdVariant::kPingpong;
  if (variant == FwdVariant::kPersistent192 || variant == FwdVariant::kPersistent192Snake)
    return FwdVariant::kPersistent;
  return variant;
}

// Query rows of a CTA (the Q tile's TMA box) for a head dim and variant.
constexpr int fwd_block_m(int headdim, FwdVariant variant) {
  return headdim == 64 && (variant == FwdVariant::kRows192 || variant == FwdVariant::kPersistent192 ||
                           variant == FwdVariant::kPersistent192Snake)
             ? 192
             : 128;
}

// kDynamic's tile counters: kFwdTileSlots 64-bit words of device memory (flash_fwd_hopper.cu), a launch's word its
// epoch mod kFwdTileSlots; each holds an epoch (high half) and a count (low half). fwd_tile_slots gives the device's
// words and a fresh epoch of the device (never 0, the words' epoch before any launch; the first launch's word written
// on the stream), and FLASHATTN_HOPPER_TILE_GROUP the heads a group of the tile order spans (0 or unset: every head).
constexpr int kFwdTileSlots = 64;
FlashAttnStatus fwd_tile_slots(int device, cudaStream_t stream, unsigned long long** slots, uint32_t* epoch,
                               int* group_heads, const char* function);

// Defined by hopper/instantiations/flash_fwd_hopper_hdim{D}_{dtype}.cu; device: the current device
// (the launch raises the kernel's shared-memory limit once per device).
template <typename T, int kHeadDim>
FlashAttnStatus run_mha_fwd_hopper(const FlashFwdParams& p, const FwdTensorMaps& maps, FwdVariant variant,
                                   int device, cudaStream_t stream, const char* function);

// ---- backward ----
// One CTA: 128 keys (kBlockN) of one (batch, head), walking the query blocks (kBlockM rows) that see
// them; two consumer warpgroups split the keys, 64 each (the wgmma M of S^T = K Q^T), and keep their
// rows of dK and dV in registers. FlashAttention-3's tiles: 64 x 128 at d128, 128 x 128 at d64
// (where dK and dV take half the registers, so S^T and dP^T can be twice as wide). dQ = dS K of a
// block is split between the warpgroups by 64-column chunks at d128 and by 64-query halves at d64:
// either way each dQ element is added once per key block.
template <int kHeadDim_, typename T_>
struct BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the Hopper backward covers head dims 64 and 128");
  static_assert(sizeof(T) == 2, "16-bit inputs (wgmma's transposed operands need them)");
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : 64;
  static constexpr int kBlockN = 128;
  static constexpr int kConsumerWarpgroups = kBlockN / 64;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);  // warpgroup 0 produces
  static constexpr int kStages = 2;                                  // Q, dO, LSE and dsum buffers
  // dQ split: by head-dim chunk (d128, kBlockM 64) or by query half (d64, kBlockM 128), 64 x 64 each.
  static constexpr bool kDqByColumns = kBlockM == 64;
  static_assert(kDqByColumns ? kHeadDim == 64 * kConsumerWarpgroups : kBlockM == 64 * kConsumerWarpgroups,
                "one 64 x 64 dQ part per consumer warpgroup");
  // TMA boxes of 64 head-dim elements (one 128-byte swizzle row) by 128 rows (K, V) or kBlockM
  // rows (Q, dO).
  static constexpr int kBoxCols = 64;
  static constexpr int kChunks = kHeadDim / kBoxCols;
  static constexpr int kKvChunkBytes = kBlockN * kBoxCols * int(sizeof(T));  // 16 KB
  static constexpr int kKvTileBytes = kChunks * kKvChunkBytes;
  static constexpr int kQChunkBytes = kBlockM * kBoxCols * int(sizeof(T));   // 8 or 16 KB
  static constexpr int kQTileBytes = kChunks * kQChunkBytes;
  // dS^T of the block, keys x queries, as chunks of 64 queries (128 bytes a key row, 128-byte
  // swizzle): the MN-major A operand of dQ = dS K. Two buffers: one warpgroup may write the next
  // block's while the other still reads this one's.
  static constexpr int kDsChunkBytes = kBlockN * 64 * int(sizeof(T));  // 16 KB
  static constexpr int kDsBytes = (kBlockM / 64) * kDsChunkBytes;
  // dQ staged for the TMA reduce-add (every BwdVariant but kAtomic): each consumer
  // warpgroup's 64 x 64 float32 part as two boxes of 32 columns (128 bytes, the 128-byte swizzle's
  // width) by 64 rows, 8 KB each.
  static constexpr int kDqBoxCols = 32;
  static constexpr int kDqBoxBytes = 64 * kDqBoxCols * 4;
  static constexpr int kDqStageBytes = (64 / kDqBoxCols) * kDqBoxBytes;  // one warpgroup's part
  // Shared memory from a 1024-byte aligned base: K, V, Q[stages], dO[stages], dS[2], LSE[stages]
  // and dsum[stages] (kBlockM floats each), the mbarriers (K/V full; full[stages], empty[stages];
  // K/V empty), then, for the variants that stage it, dQ (1024-byte aligned). 160 KB at both head
  // dims, 192 KB with the dQ staging.
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKvTileBytes;
  static constexpr int kOffQ = kOffV + kKvTileBytes;
  static constexpr int kOffDo = kOffQ + kStages * kQTileBytes;
  static constexpr int kOffDs = kOffDo + kStages * kQTileBytes;
  static constexpr int kOffLse = kOffDs + 2 * kDsBytes;
  static constexpr int kOffDsum = kOffLse + kStages * kBlockM * 4;
  static constexpr int kOffBar = kOffDsum + kStages * kBlockM * 4;
  static constexpr int kBarriers = 2 + 2 * kStages;
  static constexpr int kOffDq = (kOffBar + 8 * kBarriers + 1023) / 1024 * 1024;
  // + 1024: the base is rounded up.
  static constexpr int kSmemBytes = kOffBar + 8 * kBarriers + 1024;
  static constexpr int kSmemBytesDqTma = kOffDq + kConsumerWarpgroups * kDqStageBytes + 1024;
  // The full barrier of a stage completes on the TMA's bytes (one arrive.expect_tx) and on the 32
  // lanes of the warp that stages LSE and dsum.
  static constexpr int kFullArrivals = 1 + 32;
  // Registers as the forward: the producer drops to 24, the consumers rise to 240. A consumer thread
  // holds dK and dV (kHeadDim floats), S^T and dP^T (kBlockM / 2 floats each), then P^T and dS^T
  // packed (kBlockM / 4 each) and its dQ part (32): at most 192 floats at both head dims.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
};

// What the backward kernel reads besides the tensor maps (element strides, as FlashBwdParams).
struct BwdKernelParams {
  const float* softmax_lse;  // (B, H, Sq), natural log
  const float* dsum;         // (B * Sq, H): rowsum(dout * out), flash_bwd_dot_do_o_kernel's
  float* dq_accum;           // (B * Sq, H, D) float32, zeroed: dS K summed over the key blocks
  void* dk;                  // (B, Sk, H, D), written when there is no GQA (H == Hk)
  void* dv;
  float* dk_accum;           // with GQA: (B * Sk, H, D) float32 per query head instead; else nullptr
  float* dv_accum;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  int seqlen_q, seqlen_k, nheads, heads_per_khead;
  float scale;       // softmax_scale (dK = scale * dS^T Q)
  float scale_log2;  // softmax_scale * log2(e) > 0
  int causal;        // bottom-right aligned: query i sees keys j <= i + seqlen_k - seqlen_q
  int n_blocks;      // key blocks of a (batch, head)
  int total_tiles;   // n_blocks * nheads * batch: the persistent kernel's work tiles
  // Dropout (the kDropout kernel alone), as FwdKernelParams.
  float dropout_p;
  uint32_t dropout_threshold;
  uint64_t seed, offset;
};

// Tensor maps of q, dout (box 64 x kBlockM) and k, v (box 64 x kBlockN), 4-D as FwdTensorMaps; and,
// for the variants that reduce dQ through the TMA, of dq_accum (float32 (D, Sq, H, B), box
// kDqBoxCols x 64, 128-byte swizzle).
struct BwdTensorMaps {
  CUtensorMap q, k, v, dout, dq_accum;
};

// The backward's kernel variants (flash_bwd_kernel.cuh), picked by FLASHATTN_HOPPER_BWD_VARIANT
// (flash_bwd_hopper.cu): kAtomic, dQ added into dq_accum with per-thread float atomics; kDqTma,
// dQ staged in shared memory and added by one TMA reduce-add per warpgroup and block; kDqFirst,
// kDqTma with dQ's product issued before dV's and dK's; kPersistent, kDqFirst on a persistent grid
// (one CTA per SM looping over key blocks, causal's longest first).
enum class BwdVariant : int { kAtomic = 0, kDqTma = 1, kDqFirst = 2, kPersistent = 3 };

// ---- persistent grids (both directions) ----
// Work unit of tile t of a persistent CTA: `grid` CTAs, CTA c running t = c, c + grid, c + 2 grid...
// over `total` tiles, m blocks to a (batch, head). The (batch, head)s go by pairs, cut into units
// of two tiles: the pair's first head's block of rank i from the heavy end and its second head's
// block of rank i from the light end, whose causal work sums to m + 1 blocks (the last head of an
// odd count pairs with itself: ranks i from both of its ends). A CTA runs whole units, the two tiles
// one after the other (its t = c + 2 j grid and c + (2 j + 1) grid), so its work is its unit count
// times m + 1 whatever the grid; a last, partial round of 2 grid tiles gives whole units to as many
// CTAs as it can and one tile to each of the rest. Units go in order, so a round's CTAs read the K
// and V of a few (batch, head)s (L2-resident). Why units, not the pairs' tile order strided by the
// grid: a CTA sees that order's positions t, t + grid... mod 2 m only, at 2 m = 128 and grid = 132
// half of a cycle of 32, so 15-16 tiles were all heavy or all light (the busiest CTA 1.47x the mean:
// hopper/NOTES.md, "Persistent schedulers"; tests/persistent_schedule_sim.py).
// Out: *rank = i, *light (0: from the heavy end, 1: from the light end), *hb = batch * nheads + head.
__host__ __device__ __forceinline__ void persistent_unit(int t, int grid, int total, int m, int* rank, int* light, int* hb) {
  const int k = t / grid, c = t - k * grid;
  const int base = (k >> 1) * 2 * grid;                         // first tile of this round of two
  const int twos = max(min(total - base, 2 * grid) - grid, 0);  // its CTAs that run two tiles (a unit)
  const int s = c < twos ? base + 2 * c + (k & 1) : base + twos + c;  // the tile in unit order
  const int pair = s / (2 * m), r = s - pair * 2 * m;
  *rank = r >> 1;
  *light = r & 1;
  *hb = 2 * pair + ((pair + 1) * 2 * m > total ? 0 : r & 1);
}

// The snake order, for long causal rows (FwdTraits::kSnake): tile t of CTA c = t mod grid -> block rank from
// the heavy end and hb = batch * nheads + head, over `heads` (batch, head)s. Every tile sorted heaviest first (rank r
// of every head before rank r + 1), dealt round by round, the direction alternating (position c of even rounds,
// grid - 1 - c of odd ones), so that a CTA's heavy tile of one round meets a light one in the next: within 1% of a
// balanced grid at the peer's long causal rows, where whole units leave 3-5% (tests/persistent_schedule_sim.py,
// "snake"). A round spans every head, where a round of units spans a few: L2 misses that cost more than the balance
// buys at short rows and at d128 (hopper/NOTES.md, "The snake order").
__host__ __device__ __forceinline__ void persistent_snake(int t, int grid, int total, int heads, int* rank, int* hb) {
  const int k = t / grid, c = t - k * grid;
  int pos = k * grid + ((k & 1) ? grid - 1 - c : c);
  if (pos >= total) pos = k * grid + c;  // a partial odd round: its CTAs take positions from the round's start
  *rank = pos / heads;
  *hb = pos - *rank * heads;
}

// Defined by hopper/instantiations/flash_bwd_hopper_hdim{D}_{dtype}.cu: the kernel alone (run_bwd
// runs the preprocessing before it and the conversions after); sms: the device's multiprocessors
// (the persistent grid's size).
template <typename T, int kHeadDim>
FlashAttnStatus run_mha_bwd_hopper(const FlashBwdParams& p, const BwdTensorMaps& maps, BwdVariant variant,
                                   int sms, cudaStream_t stream, const char* function);

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
