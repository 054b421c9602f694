// run_fwd: which cases take the Hopper forward, their TMA tensor maps, and runtime dtype / head dim
// -> the compiled instantiation. Host code (the kernels are in instantiations/) and the dynamic tiles' counters.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/cuda_check.cuh"
#include "common/device.h"
#include "flash/hopper/dispatch.h"
#include "flash/hopper/flash_fwd_hopper.h"
#include "flash/hopper/kernel_traits.h"
#include "flash/hopper/tensor_map.h"

namespace flashattn {
namespace flash {
namespace hopper {

namespace {

// Dropout without the mask output (return_dropout_mask, for tests, stays on the sm_80 kernels, which
// write it), when dropout_enabled().
bool covers(const FlashFwdParams& p) {
  const bool dropout_ok = p.dropout_p == 0.f || (p.dropout_mask == nullptr && dropout_enabled());
  return (p.headdim == 64 || p.headdim == 128) && p.cu_seqlens_q == nullptr && dropout_ok &&
         p.alibi_slopes == nullptr && p.softcap == 0.f && p.window_left < 0 && p.window_right <= 0 &&
         p.seqlen_k > 0 && p.softmax_scale > 0.f && std::isfinite(p.softmax_scale);
}

// FLASHATTN_HOPPER_FWD_VARIANT's names, by FwdVariant.
constexpr int kFwdVariants = 12;
constexpr const char* kFwdVariantNames[kFwdVariants] = {
    "overlap",            "pingpong",           "rows192",             "persistent",        "persistent192",
    "persistent2",        "persistent_overlap", "persistent_expturn",  "persistent192_snake",
    "persistent_serial",  "persistent_dynamic", "persistent_serial_dynamic"};
static_assert(int(FwdVariant::kPersistentSerialDynamic) + 1 == kFwdVariants, "a name for every variant");

// From these query and key lengths on, the d64 causal forward takes 192-row tiles in the snake order (fwd_variant's
// comment).
constexpr int64_t kLongCausal64 = 8192;

// The kernel variant: FLASHATTN_HOPPER_FWD_VARIANT (read once per process; the bench and
// build/hopper-check.sh run each setting in a process of its own) forces one: "pingpong" (the
// warpgroups take turns), "overlap" (without the ping-pong), "rows192" (192-row tiles at d64),
// "persistent" (a persistent grid), "persistent192" (both), "persistent2" (the persistent grid with
// a CTA's tiles overlapped: hopper/NOTES.md, v6; not a default until measured), "persistent_overlap"
// (overlap on the persistent grid), "persistent_expturn" (persistent with the turns around the softmax's
// exponentials), "persistent192_snake" (persistent192 with the tiles in the snake order: kernel_traits.h
// persistent_snake), "persistent_serial" (persistent_expturn with each product waited for where it is issued, as
// cuDNN's loop: FwdTraits::kSerial; being measured), "persistent_dynamic" and "persistent_serial_dynamic"
// (persistent_expturn and persistent_serial with dynamic tiles: FwdTraits::kDynamic; being measured). Otherwise the
// fastest measured on the H200 (hopper/NOTES.md, "The four experiments measured" and "The snake order": bf16, GPT-2's
// B16 S1024 causal and 16k tokens at S 512-16384):
// - d64 without a causal mask: 192-row tiles on the persistent grid (497 / 567 TFLOP/s at S 2048 / 8192 against
//   persistent_expturn's 458 / 504);
// - d64 causal: persistent192_snake from S 8192 (518 / persistent192's 502 / persistent_expturn's 471 at 8192,
//   549 / 528 / 490 at 16384), persistent_expturn below (383 / persistent's 362 at 2048; GPT-2 0.090 ms queued
//   either way);
// - d128: persistent_expturn (643 / persistent_overlap's 630 at S 2048, 709 / 690 at 16384; causal 535 / 515 at
//   2048, 699 / overlap's 692 at 16384; alike at 512).
// Dropout: persistent, or persistent2 when forced, whatever else is forced (the variants compiled with
// dropout; 240 registers a consumer thread leave room for the decisions, persistent192's 160 do not).
FwdVariant fwd_variant(const FlashFwdParams& p) {
  static const int forced = [] {
    const char* v = std::getenv("FLASHATTN_HOPPER_FWD_VARIANT");
    if (v == nullptr) return -1;
    for (int i = 0; i < kFwdVariants; ++i)
      if (std::strcmp(v, kFwdVariantNames[i]) == 0) return i;
    return int(FwdVariant::kPingpong);
  }();
  if (p.dropout_p > 0.f)
    return forced == int(FwdVariant::kPersistent2) ? FwdVariant::kPersistent2 : FwdVariant::kPersistent;
  if (forced >= 0) return FwdVariant(forced);
  const bool causal = p.window_right == 0;
  const int64_t rows = std::min(p.seqlen_q, p.seqlen_k);
  if (p.headdim == 128) return FwdVariant::kPersistentExpTurn;
  if (!causal) return FwdVariant::kPersistent192;
  return rows >= kLongCausal64 ? FwdVariant::kPersistent192Snake : FwdVariant::kPersistentExpTurn;
}

template <typename T>
FlashAttnStatus by_headdim(const FlashFwdParams& p, const FwdTensorMaps& maps, FwdVariant variant, int device,
                           cudaStream_t stream, const char* function) {
  return p.headdim == 64 ? run_mha_fwd_hopper<T, 64>(p, maps, variant, device, stream, function)
                         : run_mha_fwd_hopper<T, 128>(p, maps, variant, device, stream, function);
}

}  // namespace

// Zero until a launch uses them: epoch 0, which fwd_tile_slots never gives, so every word starts stale.
__device__ unsigned long long g_fwd_tile_slots[kFwdTileSlots];

// Epoch 1's word, before the device's first dynamic launch (a kernel, not a copy: it can be captured in a graph).
__global__ void fwd_tile_slots_init(unsigned long long* word) { *word = 1ull << 32; }

FlashAttnStatus fwd_tile_slots(int device, cudaStream_t stream, unsigned long long** slots, uint32_t* epoch,
                               int* group_heads, const char* function) {
  constexpr int kDevices = 256;
  static std::atomic<unsigned long long*> address[kDevices] = {};
  static std::atomic<uint32_t> last_epoch[kDevices] = {};
  static const int group = [] {
    const char* v = std::getenv("FLASHATTN_HOPPER_TILE_GROUP");
    return v == nullptr ? 0 : std::max(0, std::atoi(v));
  }();
  if (device < 0 || device >= kDevices) return check_cuda(cudaErrorInvalidDevice, function, "fwd_tile_slots");
  unsigned long long* a = address[device].load(std::memory_order_acquire);
  if (a == nullptr) {
    void* symbol = nullptr;
    const FlashAttnStatus s = check_cuda(cudaGetSymbolAddress(&symbol, g_fwd_tile_slots), function,
                                         "cudaGetSymbolAddress(g_fwd_tile_slots)");
    if (s != FLASHATTN_STATUS_OK) return s;
    a = static_cast<unsigned long long*>(symbol);
    address[device].store(a, std::memory_order_release);
  }
  uint32_t e = ++last_epoch[device];
  if (e == 0) e = ++last_epoch[device];  // after 2^32 launches
  // Every later launch finds its word put in place by the launch before it (the kernel's first CTA writes the next
  // epoch's), so no launch starts on a stale word unless launches on several streams overtake each other.
  if (e == 1) {
    fwd_tile_slots_init<<<1, 1, 0, stream>>>(a + 1);
    const FlashAttnStatus s = check_launch(function, "fwd_tile_slots_init");
    if (s != FLASHATTN_STATUS_OK) return s;
  }
  *slots = a;
  *epoch = e;
  *group_heads = group;
  return FLASHATTN_STATUS_OK;
}

FlashAttnStatus run_fwd(const FlashFwdParams& p, cudaStream_t stream, const char* function, bool* ran,
                        const char** kernel) {
  *ran = false;
  static const bool enabled = !env_off("FLASHATTN_HOPPER");  // read once per process
  if (!covers(p) || !enabled) return FLASHATTN_STATUS_OK;
  DeviceInfo dev{};
  FlashAttnStatus s = current_device_info(&dev, function);
  if (s != FLASHATTN_STATUS_OK || dev.capability != 90) return s;  // sm_90a code runs on 9.0 alone
  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return FLASHATTN_STATUS_OK;
  // K and V tiles have the same box (FwdTraits: 64 head-dim columns, 128 rows) at both head dims;
  // Q's is as high as the variant's query block.
  using Tr = FwdTraits<64, __half>;
  const FwdVariant variant = fwd_kernel_variant(int(p.headdim), fwd_variant(p));
  FwdTensorMaps maps;
  const bool encoded =
      encode_bshd(fn, &maps.q, p.dtype, p.q, p.headdim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride,
                  p.q_head_stride, p.q_batch_stride, Tr::kBoxCols, fwd_block_m(int(p.headdim), variant)) &&
      encode_bshd(fn, &maps.k, p.dtype, p.k, p.headdim, p.seqlen_k, p.nheads_k, p.batch, p.k_row_stride,
                  p.k_head_stride, p.k_batch_stride, Tr::kBoxCols, Tr::kBoxRows) &&
      encode_bshd(fn, &maps.v, p.dtype, p.v, p.headdim, p.seqlen_k, p.nheads_k, p.batch, p.v_row_stride,
                  p.v_head_stride, p.v_batch_stride, Tr::kBoxCols, Tr::kBoxRows);
  if (!encoded) return FLASHATTN_STATUS_OK;
  *ran = true;
  *kernel = kFwdVariantNames[int(variant)];
  return p.dtype == FLASHATTN_DTYPE_BFLOAT16 ? by_headdim<__nv_bfloat16>(p, maps, variant, dev.device, stream, function)
                                              : by_headdim<__half>(p, maps, variant, dev.device, stream, function);
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
