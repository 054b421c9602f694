// The fused dense GEMMs on cuBLASLt (CUDA flavour only; no kernels of our own).
//
// Row-major (TorchSharp) to column-major (cuBLASLt): a row-major (r, c) matrix with leading
// dimension ld is the column-major (c, r) matrix with the same ld. So the row-major
//   out (m, n) = op(a) (m, k) @ op(b) (k, n)
// is the column-major
//   out^T (n, m) = op(b)^T (n, k) @ op(a)^T (k, m)
// which cuBLASLt runs as D = op(A) op(B) with A := b (transa = trans_b), B := a (transb = trans_a),
// D := out, (M, N, K) := (n, m, k). Bias-type epilogues add/reduce along D's rows: the row-major
// bias of length n. BGRADB reduces cuBLASLt's B (= a) over k: a bias gradient of length m.
//
// State: one cublasLtHandle_t per device (created on first use under a mutex, never destroyed:
// the process may be tearing down CUDA when static destructors run) and a cache of the heuristic's
// algorithm per (device, shape, leading dimensions, transposes, dtype, epilogue, pointer
// alignments, workspace size) under a shared_mutex. Descriptors are cheap host objects made per call.
#include <cublasLt.h>

#include <array>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

#include "common/cuda_check.cuh"
#include "common/dtype.h"
#include "dense/dense.h"

namespace flashattn {

namespace {

constexpr int kMaxDevices = 64;

FlashAttnStatus lt_fail(cublasStatus_t s, const char* function, const char* call, FlashAttnDenseEpilogue e) {
  return fail(FLASHATTN_STATUS_CUDA_ERROR, function, "%s failed for epilogue %s: %s (%s)", call,
              dense_epilogue_name(e), cublasLtGetStatusString(s), cublasLtGetStatusName(s));
}

// Makes `device` current for the scope, restoring the previous device afterwards.
class DeviceScope {
 public:
  DeviceScope() = default;
  FlashAttnStatus enter(int device, const char* function) {
    FlashAttnStatus s = check_cuda(cudaGetDevice(&previous_), function, "cudaGetDevice");
    if (s != FLASHATTN_STATUS_OK) return s;
    if (previous_ == device) return FLASHATTN_STATUS_OK;
    s = check_cuda(cudaSetDevice(device), function, "cudaSetDevice");
    if (s == FLASHATTN_STATUS_OK) switched_ = true;
    return s;
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  bool switched_ = false;
};

std::mutex g_handle_mutex;
std::array<cublasLtHandle_t, kMaxDevices> g_handles{};

FlashAttnStatus handle_for(int device, cublasLtHandle_t* handle, const char* function, FlashAttnDenseEpilogue e) {
  if (device >= kMaxDevices) {
    return fail(FLASHATTN_STATUS_NOT_SUPPORTED, function, "device (%d) must be < %d", device, kMaxDevices);
  }
  std::lock_guard<std::mutex> lock(g_handle_mutex);
  if (g_handles[device] == nullptr) {
    cublasLtHandle_t h = nullptr;
    cublasStatus_t s = cublasLtCreate(&h);  // the current device is `device` (DeviceScope)
    if (s != CUBLAS_STATUS_SUCCESS) return lt_fail(s, function, "cublasLtCreate", e);
    g_handles[device] = h;
  }
  *handle = g_handles[device];
  return FLASHATTN_STATUS_OK;
}

struct AlgoKey {
  int64_t m, n, k, lda, ldb, ldo, ldaux, workspace_bytes;
  int32_t device, dtype, epilogue, candidates;
  uint8_t trans_a, trans_b, has_bias;
  uint16_t align_a, align_b, align_out, align_bias, align_aux;

  bool operator==(const AlgoKey& o) const {
    return m == o.m && n == o.n && k == o.k && lda == o.lda && ldb == o.ldb && ldo == o.ldo && ldaux == o.ldaux &&
           workspace_bytes == o.workspace_bytes && device == o.device && dtype == o.dtype && epilogue == o.epilogue &&
           candidates == o.candidates &&
           trans_a == o.trans_a && trans_b == o.trans_b && has_bias == o.has_bias && align_a == o.align_a &&
           align_b == o.align_b && align_out == o.align_out && align_bias == o.align_bias && align_aux == o.align_aux;
  }
};

struct AlgoKeyHash {
  size_t operator()(const AlgoKey& key) const {
    const int64_t parts[] = {key.m, key.n, key.k, key.lda, key.ldb, key.ldo, key.ldaux, key.workspace_bytes,
                             key.device, key.dtype, key.epilogue, key.candidates,
                             (int64_t(key.trans_a) << 16) | (int64_t(key.trans_b) << 8) | key.has_bias,
                             (int64_t(key.align_a) << 48) | (int64_t(key.align_b) << 32) |
                                 (int64_t(key.align_out) << 16) | key.align_bias,
                             key.align_aux};
    size_t h = 1469598103934665603ull;
    for (int64_t v : parts) {
      h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
    return h;
  }
};

std::shared_mutex g_algo_mutex;
std::unordered_map<AlgoKey, cublasLtMatmulAlgo_t, AlgoKeyHash> g_algos;

// The largest power of two (at most 256, cuBLASLt's default assumption) dividing the address.
uint16_t alignment(const void* p) {
  if (p == nullptr) return 256;
  uintptr_t v = reinterpret_cast<uintptr_t>(p);
  uint16_t a = 1;
  while (a < 256 && v % (2u * a) == 0) a = uint16_t(a * 2);
  return a;
}

cublasLtEpilogue_t lt_epilogue(FlashAttnDenseEpilogue e, bool bias) {
  switch (e) {
    case FLASHATTN_DENSE_EPILOGUE_NONE: return CUBLASLT_EPILOGUE_DEFAULT;
    case FLASHATTN_DENSE_EPILOGUE_BIAS: return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    case FLASHATTN_DENSE_EPILOGUE_GELU_BIAS: return bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    case FLASHATTN_DENSE_EPILOGUE_GELU_AUX_BIAS: return bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    case FLASHATTN_DENSE_EPILOGUE_RELU_BIAS: return bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    case FLASHATTN_DENSE_EPILOGUE_RELU_AUX_BIAS: return bias ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_AUX;
    case FLASHATTN_DENSE_EPILOGUE_DGELU_BGRAD: return bias ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
    case FLASHATTN_DENSE_EPILOGUE_DRELU_BGRAD: return bias ? CUBLASLT_EPILOGUE_DRELU_BGRAD : CUBLASLT_EPILOGUE_DRELU;
    case FLASHATTN_DENSE_EPILOGUE_BGRADB: return bias ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_DEFAULT;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

// Owns the per-call descriptors.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Times the heuristic's candidates on the call's own data (a warm-up, then 3 runs each; the
// outputs are overwritten by the real call afterwards, the inputs are never written) and keeps the
// fastest in *best; candidates that fail to run are skipped.
FlashAttnStatus fastest(cublasLtHandle_t handle, const Descriptors& desc, const DenseParams& p,
                        const cublasLtMatmulHeuristicResult_t* results, int found, cudaStream_t stream,
                        const char* function, cublasLtMatmulAlgo_t* best) {
  cudaEvent_t start = nullptr, stop = nullptr;
  FlashAttnStatus st = check_cuda(cudaEventCreate(&start), function, "cudaEventCreate");
  if (st == FLASHATTN_STATUS_OK) st = check_cuda(cudaEventCreate(&stop), function, "cudaEventCreate");
  const float alpha = 1.0f, beta = 0.0f;
  float best_ms = 0.f;
  bool have = false;
  auto run = [&](const cublasLtMatmulAlgo_t& algo) {
    return cublasLtMatmul(handle, desc.op, &alpha, p.b, desc.a, p.a, desc.b, &beta, p.out, desc.d, p.out, desc.d, &algo,
                          p.workspace, size_t(p.workspace_bytes), stream);
  };
  for (int i = 0; i < found && st == FLASHATTN_STATUS_OK; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > size_t(p.workspace_bytes)) continue;
    if (run(results[i].algo) != CUBLAS_STATUS_SUCCESS) continue;
    st = check_cuda(cudaEventRecord(start, stream), function, "cudaEventRecord");
    bool ok = true;
    for (int r = 0; r < 3 && ok && st == FLASHATTN_STATUS_OK; ++r) ok = run(results[i].algo) == CUBLAS_STATUS_SUCCESS;
    if (st == FLASHATTN_STATUS_OK) st = check_cuda(cudaEventRecord(stop, stream), function, "cudaEventRecord");
    if (st == FLASHATTN_STATUS_OK) st = check_cuda(cudaEventSynchronize(stop), function, "cudaEventSynchronize");
    float ms = 0.f;
    if (st == FLASHATTN_STATUS_OK) st = check_cuda(cudaEventElapsedTime(&ms, start, stop), function, "cudaEventElapsedTime");
    if (st == FLASHATTN_STATUS_OK && ok && (!have || ms < best_ms)) {
      best_ms = ms;
      *best = results[i].algo;
      have = true;
    }
  }
  if (start) cudaEventDestroy(start);
  if (stop) cudaEventDestroy(stop);
  return st;
}

}  // namespace

FlashAttnStatus run_dense_gemm(const DenseParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const FlashAttnDenseEpilogue e = p.epilogue;
  DeviceScope scope;
  FlashAttnStatus st = scope.enter(p.device, function);
  if (st != FLASHATTN_STATUS_OK) return st;
  cublasLtHandle_t handle = nullptr;
  st = handle_for(p.device, &handle, function, e);
  if (st != FLASHATTN_STATUS_OK) return st;

  const cudaDataType_t type = p.dtype == FLASHATTN_DTYPE_BFLOAT16 ? CUDA_R_16BF : CUDA_R_16F;
  const bool has_bias = p.bias != nullptr;
  const cublasLtEpilogue_t epi = lt_epilogue(e, has_bias);
  // cuBLASLt's view (see the top of the file): A := b, B := a, D := out, (M, N, K) := (n, m, k).
  const cublasOperation_t transa = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t transb = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const uint64_t M = uint64_t(p.n), N = uint64_t(p.m), K = uint64_t(p.k);

#define FA_LT(call)                                                  \
  do {                                                               \
    cublasStatus_t s_ = (call);                                      \
    if (s_ != CUBLAS_STATUS_SUCCESS) return lt_fail(s_, function, #call, e); \
  } while (0)

  Descriptors desc;
  FA_LT(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  FA_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof(transa)));
  FA_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof(transb)));
  FA_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (has_bias && epi != CUBLASLT_EPILOGUE_DEFAULT) {
    FA_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof(p.bias)));
  }
  if (dense_epilogue_has_aux(e)) {
    FA_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p.aux, sizeof(p.aux)));
    FA_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &p.ldaux, sizeof(p.ldaux)));
  }
  // Stored shapes in column-major terms: A = b is (k, n) col-major -> rows/cols swap with trans_b.
  const uint64_t a_rows = transa == CUBLAS_OP_N ? M : K, a_cols = transa == CUBLAS_OP_N ? K : M;
  const uint64_t b_rows = transb == CUBLAS_OP_N ? K : N, b_cols = transb == CUBLAS_OP_N ? N : K;
  FA_LT(cublasLtMatrixLayoutCreate(&desc.a, type, a_rows, a_cols, p.ldb));
  FA_LT(cublasLtMatrixLayoutCreate(&desc.b, type, b_rows, b_cols, p.lda));
  FA_LT(cublasLtMatrixLayoutCreate(&desc.d, type, M, N, p.ldo));

  AlgoKey key{};
  key.m = p.m; key.n = p.n; key.k = p.k;
  key.lda = p.lda; key.ldb = p.ldb; key.ldo = p.ldo; key.ldaux = dense_epilogue_has_aux(e) ? p.ldaux : 0;
  key.workspace_bytes = p.workspace_bytes;
  key.device = p.device; key.dtype = int32_t(p.dtype); key.epilogue = int32_t(epi);
  key.candidates = dense_algo_candidates();
  key.trans_a = p.trans_a; key.trans_b = p.trans_b; key.has_bias = has_bias;
  key.align_a = alignment(p.a); key.align_b = alignment(p.b); key.align_out = alignment(p.out);
  key.align_bias = alignment(p.bias); key.align_aux = alignment(p.aux);

  cublasLtMatmulAlgo_t algo;
  bool cached = false;
  {
    std::shared_lock<std::shared_mutex> lock(g_algo_mutex);
    auto it = g_algos.find(key);
    if (it != g_algos.end()) {
      algo = it->second;
      cached = true;
    }
  }
  if (!cached) {
    FA_LT(cublasLtMatmulPreferenceCreate(&desc.pref));
    const uint64_t ws = uint64_t(p.workspace_bytes);
    FA_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    // cuBLASLt's A is our b, its B our a; C is D (beta = 0).
    const uint32_t align_a = key.align_b, align_b = key.align_a, align_d = key.align_out;
    FA_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    FA_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    FA_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
    FA_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
    std::vector<cublasLtMatmulHeuristicResult_t> results(size_t(key.candidates));
    std::memset(results.data(), 0, results.size() * sizeof(results[0]));
    int found = 0;
    FA_LT(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref, key.candidates,
                                         results.data(), &found));
    if (found == 0) {
      return fail(FLASHATTN_STATUS_NOT_SUPPORTED, function,
                  "cublasLtMatmulAlgoGetHeuristic found no algorithm for epilogue %s (m %lld, n %lld, k %lld, %s)",
                  dense_epilogue_name(e), (long long)p.m, (long long)p.n, (long long)p.k, dtype_name(p.dtype));
    }
    algo = results[0].algo;
    if (found > 1) {
      st = fastest(handle, desc, p, results.data(), found, stream, function, &algo);
      if (st != FLASHATTN_STATUS_OK) return st;
    }
    std::unique_lock<std::shared_mutex> lock(g_algo_mutex);
    g_algos.emplace(key, algo);
  }

  const float alpha = 1.0f, beta = 0.0f;
  FA_LT(cublasLtMatmul(handle, desc.op, &alpha, p.b, desc.a, p.a, desc.b, &beta, p.out, desc.d, p.out, desc.d, &algo,
                       p.workspace, size_t(p.workspace_bytes), stream));
#undef FA_LT
  return check_launch(function, "cublasLtMatmul");
}

}  // namespace flashattn
