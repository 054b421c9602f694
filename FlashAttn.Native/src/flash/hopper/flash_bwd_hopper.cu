// run_bwd: which cases take the Hopper backward, their TMA tensor maps, and runtime dtype / head dim
// -> the compiled instantiation. Host code only (the kernels are in instantiations/).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/device.h"
#include "flash/hopper/dispatch.h"
#include "flash/hopper/flash_bwd_hopper.h"
#include "flash/hopper/kernel_traits.h"
#include "flash/hopper/tensor_map.h"

namespace flashattn {
namespace flash {
namespace hopper {

namespace {

bool covers(const FlashBwdParams& p) {
  return (p.headdim == 64 || p.headdim == 128) && p.cu_seqlens_q == nullptr &&
         (p.dropout_p == 0.f || dropout_enabled()) &&
         p.alibi_slopes == nullptr && p.softcap == 0.f && p.window_left < 0 && p.window_right <= 0 &&
         !p.deterministic && p.seqlen_q > 0 && p.seqlen_k > 0 && p.softmax_scale > 0.f &&
         std::isfinite(p.softmax_scale) && (p.nheads == p.nheads_k || p.dk_accum != nullptr);
}

// From these query and key lengths on, the d128 causal backward takes dqfirst (bwd_variant's comment).
constexpr int64_t kLongCausal128 = 8192;

// The kernel variant: FLASHATTN_HOPPER_BWD_VARIANT (read once per process; the bench and
// build/hopper-check.sh run each setting in a process of its own) forces one: "atomic" (dQ by float
// atomics), "dqtma" (dQ through shared memory and a TMA reduce-add), "dqfirst" (dqtma with dQ's
// product before dV's and dK's), "persistent" (dqfirst on a persistent grid): each adds one change to
// the one before, so that the bench measures each change alone. Otherwise persistent, the fastest at
// the bench's shapes on the H200 (benchmarks/RESULTS.md), except d128 causal from S 8192: dqfirst (medians of
// 3 and 10 processes: 539 / 529 TFLOP/s at 8192, 551 / 536 at 16384, where either kernel runs in two modes, process
// by process; without the mask 538 / 534, alike). Dropout: persistent always, whatever is forced (the only variant
// compiled with dropout).
BwdVariant bwd_variant(const FlashBwdParams& p) {
  if (p.dropout_p > 0.f) return BwdVariant::kPersistent;
  static const int forced = [] {
    const char* v = std::getenv("FLASHATTN_HOPPER_BWD_VARIANT");
    if (v != nullptr && std::strcmp(v, "dqtma") == 0) return int(BwdVariant::kDqTma);
    if (v != nullptr && std::strcmp(v, "dqfirst") == 0) return int(BwdVariant::kDqFirst);
    if (v != nullptr && std::strcmp(v, "atomic") == 0) return int(BwdVariant::kAtomic);
    if (v != nullptr && std::strcmp(v, "persistent") == 0) return int(BwdVariant::kPersistent);
    return -1;
  }();
  if (forced >= 0) return BwdVariant(forced);
  const bool causal = p.window_right == 0;
  const bool long_causal128 = p.headdim == 128 && causal && std::min(p.seqlen_q, p.seqlen_k) >= kLongCausal128;
  return long_causal128 ? BwdVariant::kDqFirst : BwdVariant::kPersistent;
}

template <typename T>
FlashAttnStatus by_headdim(const FlashBwdParams& p, const BwdTensorMaps& maps, BwdVariant variant, int sms,
                           cudaStream_t stream, const char* function) {
  return p.headdim == 64 ? run_mha_bwd_hopper<T, 64>(p, maps, variant, sms, stream, function)
                         : run_mha_bwd_hopper<T, 128>(p, maps, variant, sms, stream, function);
}

}  // namespace

FlashAttnStatus run_bwd(const FlashBwdParams& p, cudaStream_t stream, const char* function, bool* ran) {
  *ran = false;
  static const bool enabled = !env_off("FLASHATTN_HOPPER") && !env_off("FLASHATTN_HOPPER_BWD");
  if (!enabled || !covers(p)) return FLASHATTN_STATUS_OK;
  DeviceInfo dev{};
  FlashAttnStatus s = current_device_info(&dev, function);
  if (s != FLASHATTN_STATUS_OK || dev.capability != 90) return s;  // sm_90a code runs on 9.0 alone
  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return FLASHATTN_STATUS_OK;
  // Boxes of 64 head-dim columns (BwdTraits) by kBlockM rows of Q and dO (it depends on the head dim
  // alone) and kBlockN rows of K and V.
  using Tr64 = BwdTraits<64, __half>;
  using Tr128 = BwdTraits<128, __half>;
  const int box_m = p.headdim == 64 ? Tr64::kBlockM : Tr128::kBlockM;
  static_assert(Tr64::kBoxCols == Tr128::kBoxCols && Tr64::kBlockN == Tr128::kBlockN, "one K/V box");
  const BwdVariant variant = bwd_variant(p);
  BwdTensorMaps maps{};
  bool encoded =
      encode_bshd(fn, &maps.q, p.dtype, p.q, p.headdim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride,
                  p.q_head_stride, p.q_batch_stride, Tr64::kBoxCols, box_m) &&
      encode_bshd(fn, &maps.dout, p.dtype, p.dout, p.headdim, p.seqlen_q, p.nheads, p.batch, p.dout_row_stride,
                  p.dout_head_stride, p.dout_batch_stride, Tr64::kBoxCols, box_m) &&
      encode_bshd(fn, &maps.k, p.dtype, p.k, p.headdim, p.seqlen_k, p.nheads_k, p.batch, p.k_row_stride,
                  p.k_head_stride, p.k_batch_stride, Tr64::kBoxCols, Tr64::kBlockN) &&
      encode_bshd(fn, &maps.v, p.dtype, p.v, p.headdim, p.seqlen_k, p.nheads_k, p.batch, p.v_row_stride,
                  p.v_head_stride, p.v_batch_stride, Tr64::kBoxCols, Tr64::kBlockN);
  // dq_accum (B * Sq, H, D) float32, for the variants that add dQ through the TMA: boxes of
  // kDqBoxCols columns by 64 queries.
  static_assert(Tr64::kDqBoxCols == Tr128::kDqBoxCols, "one dQ box");
  if (encoded && variant != BwdVariant::kAtomic)
    encoded = encode_4d(fn, &maps.dq_accum, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, p.dq_accum, p.headdim, p.seqlen_q,
                        p.nheads, p.batch, p.nheads * p.headdim, p.headdim, p.seqlen_q * p.nheads * p.headdim,
                        Tr64::kDqBoxCols, 64);
  if (!encoded) return FLASHATTN_STATUS_OK;
  *ran = true;
  s = run_flash_bwd_preprocess(p, stream, function);
  if (s == FLASHATTN_STATUS_OK)
    s = p.dtype == FLASHATTN_DTYPE_BFLOAT16 ? by_headdim<__nv_bfloat16>(p, maps, variant, dev.sms, stream, function)
                                             : by_headdim<__half>(p, maps, variant, dev.sms, stream, function);
  return s == FLASHATTN_STATUS_OK ? run_flash_bwd_postprocess(p, stream, function) : s;
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
