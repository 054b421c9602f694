// Fused dense (cuBLASLt GEMM + epilogue): the params struct filled once at the ABI (dense_api.cpp)
// and the runner (dense.cu, or cuda_stub.cpp in the CPU-only flavour). Row-major view, as in
// flashattn.h; dense.cu maps it onto cuBLASLt's column-major one.
#pragma once

#include <cstdint>

#include "flashattn.h"

namespace flashattn {

// The recommended cuBLASLt workspace: 32 MiB (Hopper's kernels with the largest split use it).
constexpr int64_t kDenseWorkspaceBytes = int64_t(32) << 20;

struct DenseParams {
  const void* a;  // op(a): (m, k); a (m, k) row-major, or (k, m) when trans_a
  const void* b;  // op(b): (k, n); b (k, n) row-major, or (n, k) when trans_b (a linear's weight)
  void* out;      // (m, n) row-major
  FlashAttnDType dtype;  // float16 or bfloat16
  int64_t m, n, k;
  bool trans_a, trans_b;
  int64_t lda, ldb, ldo;
  FlashAttnDenseEpilogue epilogue;
  void* bias;     // (n,) for BIAS/GELU/RELU/D*_BGRAD, (m,) for BGRADB; nullptr: no bias part
  void* aux;      // the pre-activation (m, n) (gelu) or bit mask (relu); nullptr unless the epilogue has one
  int64_t ldaux;  // elements (gelu) or bits (relu)
  int32_t device;
  void* workspace;
  int64_t workspace_bytes;
};

// Epilogues that read or write aux.
inline bool dense_epilogue_has_aux(FlashAttnDenseEpilogue e) {
  return e == FLASHATTN_DENSE_EPILOGUE_GELU_AUX_BIAS || e == FLASHATTN_DENSE_EPILOGUE_RELU_AUX_BIAS ||
         e == FLASHATTN_DENSE_EPILOGUE_DGELU_BGRAD || e == FLASHATTN_DENSE_EPILOGUE_DRELU_BGRAD;
}

inline bool dense_epilogue_is_relu(FlashAttnDenseEpilogue e) {
  return e == FLASHATTN_DENSE_EPILOGUE_RELU_BIAS || e == FLASHATTN_DENSE_EPILOGUE_RELU_AUX_BIAS ||
         e == FLASHATTN_DENSE_EPILOGUE_DRELU_BGRAD;
}

inline const char* dense_epilogue_name(FlashAttnDenseEpilogue e) {
  switch (e) {
    case FLASHATTN_DENSE_EPILOGUE_NONE: return "NONE";
    case FLASHATTN_DENSE_EPILOGUE_BIAS: return "BIAS";
    case FLASHATTN_DENSE_EPILOGUE_GELU_BIAS: return "GELU_BIAS";
    case FLASHATTN_DENSE_EPILOGUE_GELU_AUX_BIAS: return "GELU_AUX_BIAS";
    case FLASHATTN_DENSE_EPILOGUE_RELU_BIAS: return "RELU_BIAS";
    case FLASHATTN_DENSE_EPILOGUE_RELU_AUX_BIAS: return "RELU_AUX_BIAS";
    case FLASHATTN_DENSE_EPILOGUE_DGELU_BGRAD: return "DGELU_BGRAD";
    case FLASHATTN_DENSE_EPILOGUE_DRELU_BGRAD: return "DRELU_BGRAD";
    case FLASHATTN_DENSE_EPILOGUE_BGRADB: return "BGRADB";
  }
  return "unknown";
}

// The FlashAttn_dense_set_algo_candidates setting (1: the heuristic's first algorithm).
int32_t dense_algo_candidates();

FlashAttnStatus run_dense_gemm(const DenseParams& params, void* stream, const char* function);

}  // namespace flashattn
