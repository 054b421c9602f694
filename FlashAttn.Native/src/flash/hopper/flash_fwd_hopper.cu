// run_fwd: which cases take the Hopper forward, their TMA tensor maps, and runtime dtype / head dim
// -> the compiled instantiation. Host code only (the kernels are in instantiations/).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "flash/hopper/dispatch.h"
#include "flash/hopper/flash_fwd_hopper.h"
#include "flash/hopper/kernel_traits.h"
#include "flash/hopper/tensor_map.h"

namespace flashattn {
namespace flash {
namespace hopper {

namespace {

bool covers(const FlashFwdParams& p) {
  return (p.headdim == 64 || p.headdim == 128) && p.cu_seqlens_q == nullptr && p.dropout_p == 0.f &&
         p.alibi_slopes == nullptr && p.softcap == 0.f && p.window_left < 0 && p.window_right <= 0 &&
         p.seqlen_k > 0 && p.softmax_scale > 0.f && std::isfinite(p.softmax_scale);
}

template <typename T>
FlashAttnStatus by_headdim(const FlashFwdParams& p, const FwdTensorMaps& maps, bool overlap, cudaStream_t stream,
                           const char* function) {
  return p.headdim == 64 ? run_mha_fwd_hopper<T, 64>(p, maps, overlap, stream, function)
                         : run_mha_fwd_hopper<T, 128>(p, maps, overlap, stream, function);
}

}  // namespace

FlashAttnStatus run_fwd(const FlashFwdParams& p, cudaStream_t stream, const char* function, bool* ran) {
  *ran = false;
  if (!covers(p) || env_off("FLASHATTN_HOPPER")) return FLASHATTN_STATUS_OK;
  int capability = 0;
  FlashAttnStatus s = current_capability(&capability, function);
  if (s != FLASHATTN_STATUS_OK || capability != 90) return s;
  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return FLASHATTN_STATUS_OK;
  // Q, K and V tiles have the same box (FwdTraits: 64 head-dim columns, 128 rows) at both head dims.
  using Tr = FwdTraits<64, __half>;
  FwdTensorMaps maps;
  const bool encoded =
      encode_bshd(fn, &maps.q, p.dtype, p.q, p.headdim, p.seqlen_q, p.nheads, p.batch, p.q_row_stride,
                  p.q_head_stride, p.q_batch_stride, Tr::kBoxCols, Tr::kBoxRows) &&
      encode_bshd(fn, &maps.k, p.dtype, p.k, p.headdim, p.seqlen_k, p.nheads_k, p.batch, p.k_row_stride,
                  p.k_head_stride, p.k_batch_stride, Tr::kBoxCols, Tr::kBoxRows) &&
      encode_bshd(fn, &maps.v, p.dtype, p.v, p.headdim, p.seqlen_k, p.nheads_k, p.batch, p.v_row_stride,
                  p.v_head_stride, p.v_batch_stride, Tr::kBoxCols, Tr::kBoxRows);
  if (!encoded) return FLASHATTN_STATUS_OK;
  *ran = true;
  const bool overlap = !env_off("FLASHATTN_HOPPER_OVERLAP");
  return p.dtype == FLASHATTN_DTYPE_BFLOAT16 ? by_headdim<__nv_bfloat16>(p, maps, overlap, stream, function)
                                              : by_headdim<__half>(p, maps, overlap, stream, function);
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
