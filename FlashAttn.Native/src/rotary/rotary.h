// Rotary embedding: the params struct filled once at the ABI (rotary_api.cpp) and the launcher
// (rotary.cu, or cuda_stub.cpp in the CPU-only flavour). All strides are in elements.
#pragma once

#include <cstdint>

#include "flashattn.h"

namespace flashattn {

struct RotaryParams {
  void* out;                  // (B, S, H, D) or (total, H, D) with cu_seqlens
  const void* x;              // same shape as out; may be out itself (in place)
  FlashAttnDType dtype;       // of x and out
  const void* cos;            // (seqlen_ro, rotary_dim / 2)
  const void* sin;            // (seqlen_ro, rotary_dim / 2)
  FlashAttnDType cs_dtype;    // dtype, or float32
  const int32_t* cu_seqlens;  // (B + 1,) or nullptr
  const int32_t* seqlen_offsets;  // (B,) or nullptr: then seqlen_offset for all
  int64_t seqlen_offset;
  int64_t batch, seqlen, nheads, headdim, rotary_dim, seqlen_ro, cs_row_stride;
  int64_t x_batch_stride, x_seq_stride, x_head_stride;
  int64_t out_batch_stride, out_seq_stride, out_head_stride;
  bool interleaved;
  bool conjugate;  // rotate by -theta: the backward
  bool inplace;    // out == x: the pass-through part is not copied
};

FlashAttnStatus run_rotary(const RotaryParams& params, void* stream, const char* function);

}  // namespace flashattn
