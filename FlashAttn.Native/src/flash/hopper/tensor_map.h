// TMA tensor maps, on the host: cuTensorMapEncodeTiled taken from the driver through the runtime
// (the library does not link libcuda), and the 4-D map of a (B, rows, heads, D) tensor that the
// Hopper kernels load their tiles through (and the backward adds dQ through). Shared by
// flash_fwd_hopper.cu, flash_bwd_hopper.cu and tests/hopper_probe.cu.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flashattn.h"

namespace flashattn {
namespace flash {
namespace hopper {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// nullptr when the driver lacks it (looked up once per process).
inline EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    // The unversioned query is deprecated from CUDA 13; the function's ABI is CUDA 12.0's.
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// (B, rows, heads, D) elements of `type` (elem_bytes each) with element strides -> a 4-D map (D,
// rows, heads, B) read or written in boxes of box_cols x box_rows x 1 x 1, 128-byte swizzle (box_cols
// x elem_bytes at most 128), rows past the end read as zeros and not written. False when the driver
// refuses it (the ABI's 16-byte alignment of base and strides is what TMA needs; a zero stride, say,
// may still be refused).
inline bool encode_4d(EncodeTiled fn, CUtensorMap* map, CUtensorMapDataType type, int elem_bytes, const void* ptr,
                      int64_t headdim, int64_t rows, int64_t heads, int64_t batch, int64_t row_stride,
                      int64_t head_stride, int64_t batch_stride, int box_cols, int box_rows) {
  const cuuint64_t dims[4] = {cuuint64_t(headdim), cuuint64_t(rows), cuuint64_t(heads), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(row_stride) * elem_bytes, cuuint64_t(head_stride) * elem_bytes,
                                 cuuint64_t(batch_stride) * elem_bytes};  // bytes, dims 1..3
  const cuuint32_t box[4] = {cuuint32_t(box_cols), cuuint32_t(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  return fn(map, type, 4, const_cast<void*>(ptr), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The map of a 16-bit (B, rows, heads, D) tensor of the ABI (q, k, v, dout).
inline bool encode_bshd(EncodeTiled fn, CUtensorMap* map, FlashAttnDType dtype, const void* ptr, int64_t headdim,
                        int64_t rows, int64_t heads, int64_t batch, int64_t row_stride, int64_t head_stride,
                        int64_t batch_stride, int box_cols, int box_rows) {
  const CUtensorMapDataType type =
      dtype == FLASHATTN_DTYPE_BFLOAT16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode_4d(fn, map, type, 2, ptr, headdim, rows, heads, batch, row_stride, head_stride, batch_stride,
                   box_cols, box_rows);
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
