// FlashAttn_dense_*: validates every argument, fills DenseParams once, runs the cuBLASLt GEMM.
#include <atomic>
#include <cstdlib>

#include "common/dtype.h"
#include "common/error.h"
#include "dense/dense.h"

using namespace flashattn;

namespace {
int32_t clamp_candidates(long candidates) { return candidates < 1 ? 1 : candidates > 32 ? 32 : int32_t(candidates); }
// FLASHATTN_DENSE_ALGO_CANDIDATES=N sets the initial value (read once, at load): the timed choice for a whole run
// without code, e.g. a training step profiled both ways.
int32_t initial_candidates() {
  const char* v = std::getenv("FLASHATTN_DENSE_ALGO_CANDIDATES");
  return v == nullptr ? 1 : clamp_candidates(std::strtol(v, nullptr, 10));
}
std::atomic<int32_t> g_algo_candidates{initial_candidates()};
}

int32_t flashattn::dense_algo_candidates() { return g_algo_candidates.load(std::memory_order_relaxed); }

FLASHATTN_API int32_t FlashAttn_dense_set_algo_candidates(int32_t candidates) {
  return g_algo_candidates.exchange(clamp_candidates(candidates));
}

FLASHATTN_API int64_t FlashAttn_dense_workspace_size(void) { return kDenseWorkspaceBytes; }

FLASHATTN_API FlashAttnStatus FlashAttn_dense_gemm(
    const void* a, const void* b, void* out, FlashAttnDType dtype, int64_t m, int64_t n, int64_t k,
    int32_t trans_a, int32_t trans_b, int64_t lda, int64_t ldb, int64_t ldo, FlashAttnDenseEpilogue epilogue,
    void* bias, void* aux, int64_t ldaux, int32_t device, void* workspace, int64_t workspace_bytes, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_dense_gemm";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(dtype == FLASHATTN_DTYPE_FLOAT16 || dtype == FLASHATTN_DTYPE_BFLOAT16,
             "dtype (%s) must be float16 or bfloat16", dtype_name(dtype));
    FA_CHECK(int(epilogue) >= int(FLASHATTN_DENSE_EPILOGUE_NONE) && int(epilogue) <= int(FLASHATTN_DENSE_EPILOGUE_BGRADB),
             "epilogue (%d) is not a FlashAttnDenseEpilogue", int(epilogue));
    FA_CHECK(m >= 0, "m (%lld) must be >= 0", (long long)m);
    FA_CHECK(n >= 0, "n (%lld) must be >= 0", (long long)n);
    FA_CHECK(k >= 1, "k (%lld) must be >= 1 (an empty product is not a GEMM)", (long long)k);
    FA_CHECK(trans_a == 0 || trans_a == 1, "trans_a (%d) must be 0 or 1", trans_a);
    FA_CHECK(trans_b == 0 || trans_b == 1, "trans_b (%d) must be 0 or 1", trans_b);
    FA_CHECK(device >= 0, "device (%d) must be >= 0", device);
    FA_CHECK(workspace_bytes >= 0, "workspace_bytes (%lld) must be >= 0", (long long)workspace_bytes);
    FA_CHECK(workspace_bytes == 0 || workspace != nullptr, "workspace must not be NULL when workspace_bytes (%lld) > 0",
             (long long)workspace_bytes);
    if (m == 0 || n == 0) return FLASHATTN_STATUS_OK;  // nothing to compute (a bias gradient would be empty or zero-length)

    const int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
    FA_CHECK(a != nullptr, "a must not be NULL");
    FA_CHECK(b != nullptr, "b must not be NULL");
    FA_CHECK(out != nullptr, "out must not be NULL");
    FA_CHECK(lda >= a_cols, "lda (%lld) must be >= %lld (a's row length%s)", (long long)lda, (long long)a_cols,
             trans_a ? ", a is (k, m) with trans_a" : "");
    FA_CHECK(ldb >= b_cols, "ldb (%lld) must be >= %lld (b's row length%s)", (long long)ldb, (long long)b_cols,
             trans_b ? ", b is (n, k) with trans_b" : "");
    FA_CHECK(ldo >= n, "ldo (%lld) must be >= n (%lld)", (long long)ldo, (long long)n);
    const int64_t es = dtype_size(dtype);
    FA_CHECK(is_aligned(a, es) && is_aligned(b, es) && is_aligned(out, es), "a, b and out must be aligned to %s elements",
             dtype_name(dtype));

    const bool has_aux = dense_epilogue_has_aux(epilogue), relu = dense_epilogue_is_relu(epilogue);
    if (has_aux) {
      FA_CHECK(aux != nullptr, "aux must not be NULL with epilogue %s", dense_epilogue_name(epilogue));
      if (relu) {
        FA_CHECK(ldaux >= n && ldaux % 128 == 0,
                 "ldaux (%lld bits) must be a multiple of 128 and >= n (%lld) for the relu bit mask of %s",
                 (long long)ldaux, (long long)n, dense_epilogue_name(epilogue));
      } else {
        FA_CHECK(ldaux >= n && ldaux % 8 == 0, "ldaux (%lld) must be a multiple of 8 and >= n (%lld) for %s",
                 (long long)ldaux, (long long)n, dense_epilogue_name(epilogue));
        FA_CHECK(is_aligned(aux, 16), "aux must be 16-byte aligned for %s", dense_epilogue_name(epilogue));
      }
    } else {
      FA_CHECK(aux == nullptr, "aux must be NULL with epilogue %s (it has no auxiliary matrix)",
               dense_epilogue_name(epilogue));
    }
    if (epilogue == FLASHATTN_DENSE_EPILOGUE_NONE) {
      FA_CHECK(bias == nullptr, "bias must be NULL with epilogue NONE");
    }
    if (bias != nullptr) FA_CHECK(is_aligned(bias, es), "bias must be aligned to %s elements", dtype_name(dtype));

    DenseParams p{};
    p.a = a;
    p.b = b;
    p.out = out;
    p.dtype = dtype;
    p.m = m;
    p.n = n;
    p.k = k;
    p.trans_a = trans_a != 0;
    p.trans_b = trans_b != 0;
    p.lda = lda;
    p.ldb = ldb;
    p.ldo = ldo;
    p.epilogue = epilogue;
    p.bias = bias;
    p.aux = aux;
    p.ldaux = ldaux;
    p.device = device;
    p.workspace = workspace;
    p.workspace_bytes = workspace_bytes;
    return run_dense_gemm(p, stream, kFunction);
  });
}
