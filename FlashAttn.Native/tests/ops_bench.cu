// ops_bench: the memory-bound kernels (norms, cross-entropy, rotary, bias gradient) timed against a device copy of the
// same bytes, measured in the same process: the floor each kernel is held to (issue: within 1.3x of it).
//   ops_bench                 every op at every size under every kernel variant, one TSV line each
//   ops_bench <op> [size]     one op (norm_fwd, norm_fwdbwd, rms_fwd, rms_fwdbwd, norm_step_fwdbwd, ce, rotary,
//                             bias_grad) under every variant
//   ops_bench --here <op> [size]   in this process only, under the variant of the environment (for profilers:
//                             FLASHATTN_NORM_VARIANT=rows16 ncu --clock-control none -k regex:norm
//                             --launch-count 3 ops_bench --here norm_fwd 8192)
//   ops_bench --variants      the norm variants' names (norm/norm_variants.h), one a line
// The launchers read FLASHATTN_NORM_VARIANT once per process, so each variant lives in a child process of its own
// (--serve: it runs the cases its parent sends on stdin); "auto" is the launchers' table. The parent interleaves the
// variants: for each (op, size), kRounds rounds, each asking every variant for kSamples samples in turn (each round
// starting at the next variant), so that a drift of the device (clocks, temperature) falls on every variant alike.
// Each sample is one call timed alone by events after a flush of the L2 (a read of 4x its size, which also writes
// back the previous call's outputs): every input comes from DRAM, even where the working set would fit in the L2
// (768 x 16384 bf16 is 25 MB a tensor). The floor is sampled under the same rule, interleaved with the op's samples:
// cudaMemcpyAsync of the op's minimum bytes (each input read once, each output written once; half read, half
// written), each copy after a flush. A forward + backward is two samples, each after its flush (the backward's x,
// the forward's output, would otherwise come from the L2), and so is its floor (a copy of the forward's bytes and
// one of the backward's); the backward alone gets its own line (norm_bwd, rms_bwd). Lines give the median and the
// minimum of all samples; ratio is median over median floor. Inputs are random, never zeros. Correctness lives in the
// Cuda tests; this only checks that every call succeeds.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "norm/norm_variants.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "flashattn.h"
#include "test_common.h"


#define FA(x)                                                                                  \
  do {                                                                                         \
    FlashAttnStatus s_ = (x);                                                                  \
    if (s_ != FLASHATTN_STATUS_OK) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, FlashAttn_core_last_error()); \
      std::exit(3);                                                                            \
    }                                                                                          \
  } while (0)

namespace {

constexpr int kRounds = 5;   // rounds over the variants of one (op, size)
constexpr int kSamples = 8;  // samples a variant gives per round
constexpr int kHereSamples = 20;

__global__ void fill_random_bf16(__nv_bfloat16* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    // sum of four uniforms, centred: close enough to normal for timing
    float s = 0.f;
    for (int k = 0; k < 4; ++k) s += float((z >> (16 * k)) & 0xffff) / 65536.f;
    p[i] = __float2bfloat16((s - 2.f) * 1.7f * scale);
  }
}

__global__ void fill_f32(float* p, size_t n, float v) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) p[i] = v;
}

__global__ void fill_labels(int64_t* p, size_t n, int64_t vocab) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = int64_t((i * 2654435761ULL) % uint64_t(vocab));
}

// Reads n 16-byte words, so that the L2 holds these (clean) lines and nothing of the timed call before; the
// impossible store keeps the loads.
__global__ void flush_l2(const uint4* p, size_t n, uint4* sink) {
  uint32_t x = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x9E3779B9u) sink[0] = make_uint4(x, x, x, x);
}

std::vector<void*> g_allocs;

template <typename T>
T* alloc(size_t n) {
  void* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(n * sizeof(T), 16)));
  g_allocs.push_back(p);
  return static_cast<T*>(p);
}

__nv_bfloat16* random_bf16(size_t n, uint64_t seed, float scale = 1.f) {
  auto* p = alloc<__nv_bfloat16>(n);
  fill_random_bf16<<<1024, 256>>>(p, n, seed, scale);
  CK(cudaGetLastError());
  return p;
}

// The residual stream in float32 (residual_in_fp32, as GPT-2 trains): bf16 randoms widened.
__global__ void widen_bf16(const __nv_bfloat16* src, float* dst, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = __bfloat162float(src[i]);
}

float* random_f32(size_t n, uint64_t seed) {
  const __nv_bfloat16* h = random_bf16(n, seed);
  auto* p = alloc<float>(n);
  widen_bf16<<<1024, 256>>>(h, p, n);
  CK(cudaGetLastError());
  return p;
}

void free_all() {
  CK(cudaDeviceSynchronize());
  for (void* p : g_allocs) CK(cudaFree(p));
  g_allocs.clear();
}

// The flush buffer (4x the L2), allocated once per process.
struct Flusher {
  uint4* buf = nullptr;
  uint4* sink = nullptr;
  size_t words = 0;
  void operator()() {
    if (buf == nullptr) {
      int dev = 0, l2 = 0;
      CK(cudaGetDevice(&dev));
      CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
      words = std::max<size_t>(size_t(4) * size_t(l2), size_t(64) << 20) / sizeof(uint4);
      CK(cudaMalloc(&buf, words * sizeof(uint4)));
      CK(cudaMemset(buf, 1, words * sizeof(uint4)));
      CK(cudaMalloc(&sink, sizeof(uint4)));
    }
    flush_l2<<<1024, 512>>>(buf, words, sink);
    CK(cudaGetLastError());
  }
} g_flush;

// One sample: ms of run() after a flush of the L2, timed by events around the call alone.
double time_cold(const std::function<void()>& run) {
  static cudaEvent_t a = nullptr, b = nullptr;
  if (a == nullptr) {
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
  }
  g_flush();
  CK(cudaEventRecord(a));
  run();
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

// Copies of the op's bytes (half read, half written), set up before its samples and timed beside them.
struct Copy {
  char *src = nullptr, *dst = nullptr;
  size_t half = 0;
  explicit Copy(size_t bytes) : half(bytes / 2) {
    src = reinterpret_cast<char*>(random_bf16(half / 2 + 1, 77));
    dst = alloc<char>(half);
  }
  void operator()() const { CK(cudaMemcpyAsync(dst, src, half, cudaMemcpyDeviceToDevice)); }
};

// Samples of one case in this process: each op line's times and its floor's, one entry a sample.
struct CaseSamples {
  std::string op;
  int64_t size = 0, rows = 0;
  size_t bytes = 0;
  std::vector<double> ms, floor_ms;
};
std::vector<CaseSamples> g_samples;

// Runs `parts` (the op's calls, each timed alone) and their copies `samples` times, interleaved, after a warm-up;
// a line per entry of `lines`: the parts it sums (bit i: part i).
struct Line {
  const char* op;
  unsigned parts;
};
void sample(const std::vector<std::function<void()>>& parts, const std::vector<size_t>& part_bytes,
            const std::vector<Line>& lines, int64_t size, int64_t rows, int samples) {
  std::vector<Copy> copies;
  for (size_t b : part_bytes) copies.emplace_back(b);
  for (const auto& r : parts) r();  // warm-up (and the launchers' one-time queries)
  for (const Copy& c : copies) c();
  CK(cudaDeviceSynchronize());
  for (const Line& l : lines) {
    CaseSamples c;
    c.op = l.op, c.size = size, c.rows = rows;
    for (size_t i = 0; i < parts.size(); ++i)
      if (l.parts >> i & 1) c.bytes += part_bytes[i];
    g_samples.push_back(c);
  }
  const size_t first = g_samples.size() - lines.size();
  for (int k = 0; k < samples; ++k) {
    std::vector<double> t(parts.size()), f(parts.size());
    for (size_t i = 0; i < parts.size(); ++i) {
      t[i] = time_cold(parts[i]);
      f[i] = time_cold(copies[i]);
    }
    for (size_t j = 0; j < lines.size(); ++j) {
      double ms = 0, fl = 0;
      for (size_t i = 0; i < parts.size(); ++i)
        if (lines[j].parts >> i & 1) ms += t[i], fl += f[i];
      g_samples[first + j].ms.push_back(ms);
      g_samples[first + j].floor_ms.push_back(fl);
    }
  }
  CK(cudaGetLastError());
  free_all();
}

// OPS_NORM_DROPOUT overrides the LayerNorm lines' p (0: the price of the dropout decisions, by difference).
float norm_dropout_p() {
  const char* v = std::getenv("OPS_NORM_DROPOUT");
  return v != nullptr ? std::strtof(v, nullptr) : 0.1f;
}

// dropout_add_layer_norm, prenorm, p = 0.1 (as the managed benchmark; OPS_NORM_DROPOUT): x0 and residual in (bf16),
// z and the new residual out; fp32 weight/bias; the mask is regenerated in the backward, never stored. The backward
// reads dz, dresidual_out and x (the forward's residual_out) and writes dx0 and dresidual: 4 + 5 row tensors in all
// (RMSNorm without dropout and residual: 2 + 3).
// step: the GPT-2 training step's LayerNorm instead (norm_step_*): the residual stream in float32 (residual, residual
// out, dresidual_out, x and dresidual: 4 bytes an element), bf16 weights, no dropout; 2 + 4 + 2 + 4 bytes an element
// forward, 2 + 4 + 4 + 2 + 4 backward.
void bench_norm(int64_t hidden, bool rms, bool backward, int samples, bool step = false) {
  const int64_t rows = 16384;
  const size_t n = size_t(rows) * hidden;
  const auto B = FLASHATTN_DTYPE_BFLOAT16, F = FLASHATTN_DTYPE_FLOAT32;
  const auto WT = step ? B : F, RT = step ? F : B;  // weights, the residual stream
  const size_t rsize = step ? 4 : 2;
  const size_t fwd_bytes = rms ? 2 * n * 2 : 2 * n * 2 + 2 * n * rsize;
  const size_t bwd_bytes = rms ? 3 * n * 2 : 2 * n * 2 + 3 * n * rsize;
  void* w = step ? static_cast<void*>(random_bf16(hidden, 5)) : static_cast<void*>(alloc<float>(hidden));
  void* b = step ? static_cast<void*>(random_bf16(hidden, 6)) : static_cast<void*>(alloc<float>(hidden));
  void* dw = alloc<float>(hidden);
  void* db = alloc<float>(hidden);
  if (!step) {
    fill_f32<<<64, 256>>>(static_cast<float*>(w), hidden, 1.f);
    fill_f32<<<64, 256>>>(static_cast<float*>(b), hidden, 0.1f);
  }
  const int64_t ws_bytes = FlashAttn_norm_bwd_workspace_size(rows, hidden, rms ? 0 : 1, 0, 0);
  void* ws = alloc<char>(size_t(ws_bytes));
  auto random_stream = [&](uint64_t seed) {
    return step ? static_cast<void*>(random_f32(n, seed)) : static_cast<void*>(random_bf16(n, seed));
  };
  auto stream_tensor = [&] { return step ? static_cast<void*>(alloc<float>(n)) : static_cast<void*>(alloc<__nv_bfloat16>(n)); };
  __nv_bfloat16* x0 = random_bf16(n, 1);
  void* res = rms ? nullptr : random_stream(2);
  __nv_bfloat16* z = alloc<__nv_bfloat16>(n);
  void* rout = rms ? nullptr : stream_tensor();
  float* mean = rms ? nullptr : alloc<float>(rows);
  float* rstd = alloc<float>(rows);
  __nv_bfloat16 *dz = nullptr, *dx0 = nullptr;
  void *drout = nullptr, *dres = nullptr;
  if (backward) {
    dz = random_bf16(n, 3);
    drout = rms ? nullptr : random_stream(4);
    dx0 = alloc<__nv_bfloat16>(n);
    dres = rms ? nullptr : stream_tensor();
  }
  const float p = rms || step ? 0.f : norm_dropout_p();
  std::vector<std::function<void()>> parts = {[&] {
    FA(FlashAttn_norm_fwd(x0, nullptr, res, B, RT, w, rms ? nullptr : b, nullptr, nullptr, WT, nullptr, z, nullptr,
                          rout, RT, mean, rstd, nullptr, nullptr, rows, hidden, hidden, 0, hidden, hidden, hidden, 1e-5f,
                          p, 1234, 0, rms ? 1 : 0, 0, nullptr));
  }};
  std::vector<size_t> bytes = {fwd_bytes};
  if (backward) {
    parts.push_back([&] {
      FA(FlashAttn_norm_bwd(dz, nullptr, drout, rms ? static_cast<void*>(x0) : rout, rms ? B : RT, w, nullptr, WT, mean,
                            rstd, nullptr, dx0, nullptr, dres, RT, dw, rms ? nullptr : db, nullptr, nullptr, B, rows,
                            hidden, hidden, hidden, hidden, hidden, hidden, p, 1234, 0, rms ? 1 : 0, 0, ws, ws_bytes,
                            nullptr));
    });
    bytes.push_back(bwd_bytes);
  }
  if (backward)
    sample(parts, bytes,
           {{step ? "norm_step_fwdbwd" : rms ? "rms_fwdbwd" : "norm_fwdbwd", 3u},
            {step ? "norm_step_bwd" : rms ? "rms_bwd" : "norm_bwd", 2u}},
           hidden, rows, samples);
  else
    sample(parts, bytes, {{rms ? "rms_fwd" : "norm_fwd", 1u}}, hidden, rows, samples);
}

// cross-entropy forward + backward in one pass, in place (the training step's loss: dloss_expected): logits read once,
// dlogits written once, then the backward's check of the real dloss (equal: ce_fused); the backward when it differs
// (ce_rescale: dlogits read and written again). At 128256 and 256000 a bf16 row exceeds shared memory: ce_fused is
// then the two-kernel path it falls back to (the logits read twice), about ce_fwdbwd's time.
void bench_ce_fused(int64_t vocab, int64_t rows, int samples) {
  const size_t n = size_t(rows) * vocab;
  const int64_t ws_bytes = FlashAttn_cross_entropy_fwd_bwd_workspace_size(rows, vocab);
  void* ws = alloc<char>(size_t(ws_bytes));
  __nv_bfloat16* logits = random_bf16(n, 100, 2.f);
  int64_t* labels = alloc<int64_t>(rows);
  fill_labels<<<64, 256>>>(labels, rows, vocab);
  float* loss = alloc<float>(rows);
  float* applied = alloc<float>(rows);
  float* expected = alloc<float>(1);
  float* other = alloc<float>(1);
  fill_f32<<<1, 32>>>(expected, 1, 1.f / rows);
  fill_f32<<<1, 32>>>(other, 1, 0.37f / rows);
  const auto B = FLASHATTN_DTYPE_BFLOAT16;
  // the logits are overwritten by their gradient: each sample runs on the previous one's (finite, random enough)
  sample({[&] {
            FA(FlashAttn_cross_entropy_fwd_bwd(logits, logits, B, labels, expected, 0, loss, nullptr, applied, rows,
                                               vocab, vocab, vocab, 0.f, 1.f, 0.f, -100, ws, ws_bytes, nullptr));
            FA(FlashAttn_cross_entropy_bwd_rescale(logits, B, labels, expected, 0, applied, rows, vocab, vocab, -100,
                                                   nullptr));
          },
          [&] {
            FA(FlashAttn_cross_entropy_bwd_rescale(logits, B, labels, other, 0, applied, rows, vocab, vocab, -100,
                                                   nullptr));
          }},
         {2 * n * 2, 2 * n * 2}, {{"ce_fused", 1u}, {"ce_rescale", 2u}}, vocab, rows, samples);
}

// cross-entropy forward + backward in place (inplace_backward): logits read twice, written once.
void bench_ce(int64_t vocab, int samples) {
  const int64_t rows = vocab > 100000 ? 4096 : 16384;
  const size_t n = size_t(rows) * vocab;
  const int64_t ws_bytes = FlashAttn_cross_entropy_fwd_workspace_size(rows, vocab);
  void* ws = alloc<char>(size_t(ws_bytes));
  __nv_bfloat16* logits = random_bf16(n, 100, 2.f);
  int64_t* labels = alloc<int64_t>(rows);
  fill_labels<<<64, 256>>>(labels, rows, vocab);
  float* loss = alloc<float>(rows);
  float* lse = alloc<float>(rows);
  float* dloss = alloc<float>(rows);
  fill_f32<<<64, 256>>>(dloss, rows, 1.f / rows);
  const auto B = FLASHATTN_DTYPE_BFLOAT16;
  sample({[&] {
           FA(FlashAttn_cross_entropy_fwd(logits, B, labels, loss, nullptr, lse, rows, vocab, vocab, 0.f, 1.f, 0.f,
                                          -100, ws, ws_bytes, nullptr));
           FA(FlashAttn_cross_entropy_bwd(dloss, 1, logits, labels, lse, logits, B, rows, vocab, vocab, vocab, 0.f,
                                          1.f, 0.f, -100, nullptr));
         }},
         {3 * n * 2}, {{"ce_fwdbwd", 1u}}, vocab, rows, samples);
  bench_ce_fused(vocab, rows, samples);
}

// rotary on q (B 8, S 2048, H heads, D 128), out of place: x read, out written, cos/sin (S, 64) each read once.
void bench_rotary(int64_t heads, int samples) {
  const int64_t batch = 8, seqlen = 2048, d = 128, rd = 128;
  const size_t n = size_t(batch) * seqlen * heads * d, cs = size_t(seqlen) * rd / 2;
  __nv_bfloat16* x = random_bf16(n, 300);
  __nv_bfloat16* out = alloc<__nv_bfloat16>(n);
  __nv_bfloat16* cos = random_bf16(cs, 5);
  __nv_bfloat16* sin = random_bf16(cs, 6);
  const auto B = FLASHATTN_DTYPE_BFLOAT16;
  const int64_t sh = d, ss = heads * d, sb = seqlen * ss;  // contiguous (B, S, H, D)
  sample({[&] {
           FA(FlashAttn_rotary_apply(out, x, B, cos, sin, B, nullptr, nullptr, 0, batch, seqlen, heads, d, rd, seqlen,
                                     rd / 2, sb, ss, sh, sb, ss, sh, 0, 0, nullptr));
         }},
         {2 * n * 2 + 2 * cs * 2}, {{"rotary", 1u}}, heads, batch * seqlen, samples);
}

// The bias gradient of a linear, dy (16384, N) bf16 -> db (N,), in the weight-gradient step it belongs to:
// dW (N, 768) = dy^T x with x (16384, 768) (GPT-2's qkv, out-projection and fc1 widths; fc2's x is 3072 wide). Lines:
//   bias_grad            ours alone (FlashAttn_dense_bias_grad): dy read, db written; floor: a copy of those bytes
//   bias_grad_lt         the GEMM with cuBLASLt's BGRADB epilogue (what FLASHATTN_BIAS_GRAD=cublaslt runs)
//   bias_grad_gemm       the same GEMM without epilogue
//   bias_grad_gemm_ours  the GEMM without epilogue and ours, each sampled alone (how Dense.Wgrad runs by default)
// BGRADB is not a kernel that can be called alone (it is the epilogue of a GEMM, and cuBLASLt picks another GEMM
// algorithm with it), so the fair comparison is bias_grad_lt against bias_grad_gemm_ours; bias_grad_lt minus
// bias_grad_gemm is what BGRADB costs. The GEMM lines' bytes (and floors) are their operands': the ratio there says how
// far from a copy a compute-bound GEMM is, nothing more.
void bench_bias_grad(int64_t n, int samples) {
  const int64_t rows = 16384, k = 768;
  __nv_bfloat16* dy = random_bf16(size_t(rows) * n, 400);
  __nv_bfloat16* x = random_bf16(size_t(rows) * k, 401);
  __nv_bfloat16* dw = alloc<__nv_bfloat16>(size_t(n) * k);
  __nv_bfloat16* db = alloc<__nv_bfloat16>(size_t(n));
  const int64_t ws_bytes = FlashAttn_dense_bias_grad_workspace_size(rows, n);
  void* ws = alloc<char>(size_t(ws_bytes));
  CK(cudaMemset(ws, 0, size_t(ws_bytes)));  // zero at the first call, as FlashAttn_dense_bias_grad asks; it stays so
  const int64_t lt_ws_bytes = FlashAttn_dense_workspace_size();
  void* lt_ws = alloc<char>(size_t(lt_ws_bytes));
  const auto B = FLASHATTN_DTYPE_BFLOAT16;
  auto gemm = [&](FlashAttnDenseEpilogue e) {
    // dW (n, k) = op(a) (n, rows) @ x (rows, k): a = dy (rows, n) read transposed
    FA(FlashAttn_dense_gemm(dy, x, dw, B, n, k, rows, 1, 0, n, k, k, e,
                            e == FLASHATTN_DENSE_EPILOGUE_BGRADB ? db : nullptr, nullptr, 0, 0, lt_ws, lt_ws_bytes,
                            nullptr));
  };
  const size_t dy_bytes = size_t(rows) * n * 2, gemm_bytes = dy_bytes + size_t(rows) * k * 2 + size_t(n) * k * 2;
  sample({[&] { FA(FlashAttn_dense_bias_grad(dy, db, B, rows, n, n, ws, ws_bytes, nullptr)); },
          [&] { gemm(FLASHATTN_DENSE_EPILOGUE_BGRADB); }, [&] { gemm(FLASHATTN_DENSE_EPILOGUE_NONE); }},
         {dy_bytes + size_t(n) * 2, gemm_bytes + size_t(n) * 2, gemm_bytes},
         {{"bias_grad", 1u}, {"bias_grad_lt", 2u}, {"bias_grad_gemm", 4u}, {"bias_grad_gemm_ours", 5u}}, n, rows,
         samples);
}

const std::vector<int64_t> kHidden = {768, 2048, 4096, 8192, 16384};
const std::vector<int64_t> kBiasGradWidths = {768, 2304, 3072, 4096};
const std::vector<int64_t> kVocab = {32000, 50257, 128256, 256000};
const std::vector<int64_t> kHeads = {16, 64};

// Runs one case (op at size) in this process, adding to g_samples.
void run_case(const std::string& op, int64_t size, int samples) {
  if (op == "norm_fwd") bench_norm(size, false, false, samples);
  else if (op == "norm_fwdbwd") bench_norm(size, false, true, samples);
  else if (op == "rms_fwd") bench_norm(size, true, false, samples);
  else if (op == "rms_fwdbwd") bench_norm(size, true, true, samples);
  else if (op == "norm_step_fwdbwd") bench_norm(size, false, true, samples, true);
  else if (op == "ce") bench_ce(size, samples);
  else if (op == "rotary") bench_rotary(size, samples);
  else if (op == "bias_grad") bench_bias_grad(size, samples);
  else {
    std::fprintf(stderr, "unknown op %s\n", op.c_str());
    std::exit(6);
  }
}

const std::vector<int64_t>& sizes_of(const std::string& op) {
  return op == "ce" ? kVocab : op == "rotary" ? kHeads : op == "bias_grad" ? kBiasGradWidths : kHidden;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 != 0 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

double minimum(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

void print_header() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# ops_bench on %s (%d SMs, L2 %d MB); every sample one call after an L2 flush; ms: median and min of "
              "%d samples; floor: cudaMemcpyAsync of the same bytes sampled alike; ratio: median / median floor\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, kRounds * kSamples);
  std::printf("op\tsize\tvariant\trows\tms\tms_min\tfloor_ms\tfloor_min\tratio\tratio_min\tGB/s\tcopy_GB/s\n");
  std::fflush(stdout);
}

void print_line(const CaseSamples& c, const std::string& variant) {
  const double ms = median(c.ms), fl = median(c.floor_ms);
  std::printf("%s\t%lld\t%s\t%lld\t%.4f\t%.4f\t%.4f\t%.4f\t%.3f\t%.3f\t%.0f\t%.0f\n", c.op.c_str(), (long long)c.size,
              variant.c_str(), (long long)c.rows, ms, minimum(c.ms), fl, minimum(c.floor_ms), ms / fl,
              minimum(c.ms) / minimum(c.floor_ms), c.bytes / ms / 1e6, c.bytes / fl / 1e6);
  std::fflush(stdout);
}

// --serve: reads "op size samples" lines; answers each with a line per op line of the case,
// "op size rows bytes ms,ms,... floor,floor,...", then "done".
int serve() {
  char buf[256];
  while (std::fgets(buf, sizeof(buf), stdin) != nullptr) {
    char op[64];
    long long size = 0;
    int samples = 0;
    if (std::sscanf(buf, "%63s %lld %d", op, &size, &samples) != 3) return 7;
    g_samples.clear();
    run_case(op, size, samples);
    for (const CaseSamples& c : g_samples) {
      std::printf("%s %lld %lld %zu ", c.op.c_str(), (long long)c.size, (long long)c.rows, c.bytes);
      for (size_t i = 0; i < c.ms.size(); ++i) std::printf("%s%.6f", i ? "," : "", c.ms[i]);
      std::printf(" ");
      for (size_t i = 0; i < c.floor_ms.size(); ++i) std::printf("%s%.6f", i ? "," : "", c.floor_ms[i]);
      std::printf("\n");
    }
    std::printf("done\n");
    std::fflush(stdout);
  }
  return 0;
}

// A child process serving one variant: FLASHATTN_NORM_VARIANT=variant (unset for "-").
struct Child {
  std::string variant;
  pid_t pid = -1;
  FILE* to = nullptr;
  FILE* from = nullptr;
};

Child spawn(const char* self, const char* env, const std::string& variant) {
  int down[2], up[2];
  if (pipe(down) != 0 || pipe(up) != 0) std::exit(4);
  Child c;
  c.variant = variant;
  c.pid = fork();
  if (c.pid < 0) std::exit(4);
  if (c.pid == 0) {
    dup2(down[0], 0);
    dup2(up[1], 1);
    close(down[0]), close(down[1]), close(up[0]), close(up[1]);
    if (env != nullptr) setenv(env, variant.c_str(), 1);
    execl(self, self, "--serve", static_cast<char*>(nullptr));
    std::_Exit(4);
  }
  close(down[0]), close(up[1]);
  // the children spawned later must not hold this child's pipe ends (its stdin would never reach EOF)
  fcntl(down[1], F_SETFD, FD_CLOEXEC);
  fcntl(up[0], F_SETFD, FD_CLOEXEC);
  c.to = fdopen(down[1], "w");
  c.from = fdopen(up[0], "r");
  return c;
}

std::vector<double> parse_list(const char* s) {
  std::vector<double> v;
  for (const char* q = s; *q != 0;) {
    char* end = nullptr;
    const double x = std::strtod(q, &end);
    if (end == q) break;
    v.push_back(x);
    q = *end == ',' ? end + 1 : end;
  }
  return v;
}

// Every case of `only` (all when empty) at `size` (all when 0), the variants of each family interleaved round by
// round; the lines come out by op, size and variant.
int run_variants(const char* self, const std::string& only, int64_t size) {
  struct Family {
    const char* env;
    std::vector<std::string> ops;
    std::vector<std::string> variants;
  };
  std::vector<std::string> norm_variants = {"auto"};
  for (const char* v : flashattn::kNormVariantNames) norm_variants.push_back(v);
  const std::vector<Family> families = {
      {"FLASHATTN_NORM_VARIANT",
       {"norm_fwd", "norm_fwdbwd", "rms_fwd", "rms_fwdbwd", "norm_step_fwdbwd"},
       norm_variants},
      {nullptr, {"ce", "rotary", "bias_grad"}, {"-"}},
  };
  int rc = 0;
  for (const Family& f : families) {
    std::vector<std::string> ops;
    for (const std::string& op : f.ops)
      if (only.empty() || only == op) ops.push_back(op);
    if (ops.empty()) continue;
    std::vector<Child> children;
    for (const std::string& v : f.variants) children.push_back(spawn(self, f.env, v));
    for (const std::string& op : ops) {
      for (int64_t s : sizes_of(op)) {
        if (size != 0 && size != s) continue;
        // per variant, its case lines (in the order the child gives them)
        std::vector<std::vector<CaseSamples>> got(children.size());
        for (int r = 0; r < kRounds; ++r) {
          for (size_t i = 0; i < children.size(); ++i) {
            const size_t ci = (i + size_t(r)) % children.size();  // each round starts at another variant
            Child& c = children[ci];
            std::fprintf(c.to, "%s %lld %d\n", op.c_str(), (long long)s, kSamples);
            std::fflush(c.to);
            char line[1 << 16];
            size_t k = 0;
            while (true) {
              if (std::fgets(line, sizeof(line), c.from) == nullptr) {
                std::fprintf(stderr, "%s %lld under %s: the child ended\n", op.c_str(), (long long)s,
                             c.variant.c_str());
                return 5;
              }
              if (std::strncmp(line, "done", 4) == 0) break;
              char name[64], ms[1 << 15], fl[1 << 15];
              long long sz = 0, rows = 0;
              size_t bytes = 0;
              if (std::sscanf(line, "%63s %lld %lld %zu %32767s %32767s", name, &sz, &rows, &bytes, ms, fl) != 6) {
                rc = 5;
                continue;
              }
              if (got[ci].size() <= k) {
                CaseSamples cs;
                cs.op = name, cs.size = sz, cs.rows = rows, cs.bytes = bytes;
                got[ci].push_back(cs);
              }
              const std::vector<double> a = parse_list(ms), b = parse_list(fl);
              got[ci][k].ms.insert(got[ci][k].ms.end(), a.begin(), a.end());
              got[ci][k].floor_ms.insert(got[ci][k].floor_ms.end(), b.begin(), b.end());
              ++k;
            }
          }
        }
        const size_t nlines = got.empty() ? 0 : got[0].size();
        for (size_t k = 0; k < nlines; ++k)
          for (size_t ci = 0; ci < children.size(); ++ci)
            if (k < got[ci].size()) print_line(got[ci][k], children[ci].variant);
      }
    }
    for (Child& c : children) {
      std::fclose(c.to);
      std::fclose(c.from);
      int status = 0;
      waitpid(c.pid, &status, 0);
      if (status != 0) {
        std::fprintf(stderr, "variant %s: exit status %d\n", c.variant.c_str(), status);
        rc = 5;
      }
    }
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--serve") == 0) return serve();
  if (argc > 1 && std::strcmp(argv[1], "--variants") == 0) {
    for (const char* v : flashattn::kNormVariantNames) std::printf("%s\n", v);
    return 0;
  }
  const bool here = argc > 1 && std::strcmp(argv[1], "--here") == 0;
  const int a = here ? 2 : 1;
  const std::string only = argc > a ? argv[a] : "";
  const int64_t size = argc > a + 1 ? std::atoll(argv[a + 1]) : 0;
  if (here) {
    print_header();
    const char* v = std::getenv("FLASHATTN_NORM_VARIANT");
    for (const std::string op : {"norm_fwd", "norm_fwdbwd", "rms_fwd", "rms_fwdbwd", "ce", "rotary", "bias_grad"}) {
      if (!only.empty() && only != op) continue;
      for (int64_t s : sizes_of(op)) {
        if (size != 0 && size != s) continue;
        g_samples.clear();
        run_case(op, s, kHereSamples);
        const bool norm = op != "ce" && op != "rotary" && op != "bias_grad";
        for (const CaseSamples& c : g_samples) print_line(c, !norm ? "-" : v != nullptr ? v : "auto");
      }
    }
    return 0;
  }
  print_header();  // the children exec this program anew, so this process's CUDA context is not theirs
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return 4;
  self[n] = 0;
  return run_variants(self, only, size);
}
