// ops_bench: the memory-bound kernels (norms, cross-entropy, rotary) timed against a device copy of the same
// bytes, measured in the same process: the floor each kernel is held to (issue: within 1.3x of it).
//   ops_bench                 every op at every size under every kernel variant, one TSV line each
//   ops_bench <op> [size]     one op (norm_fwd, norm_fwdbwd, rms_fwd, rms_fwdbwd, ce, rotary) under every variant
//   ops_bench --here <op> [size]   in this process only, under the variant of the environment (for profilers:
//                             FLASHATTN_NORM_VARIANT=rows16 ncu --clock-control none -k regex:norm
//                             --launch-count 3 ops_bench --here norm_fwd 8192)
// The launchers read FLASHATTN_NORM_VARIANT once per process, so each variant runs in a
// child process of its own; "auto" is the launchers' table.
// Times are medians of event-timed runs, each run cycling over several input sets whose total exceeds the L2
// (so repeated runs are not served from the cache); the copy moves the op's minimum bytes (each input read once,
// each output written once) with cudaMemcpyAsync, reads plus writes counted. Inputs are random, never zeros.
// Correctness lives in the Cuda tests; this only checks that every call succeeds.
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

constexpr int kReps = 30;
constexpr size_t kMinCycleBytes = size_t(256) << 20;  // several times the H200's 50 MB L2

__global__ void fill_normal_bf16(__nv_bfloat16* p, size_t n, uint64_t seed, float scale) {
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
  fill_normal_bf16<<<1024, 256>>>(p, n, seed, scale);
  CK(cudaGetLastError());
  return p;
}

void free_all() {
  CK(cudaDeviceSynchronize());
  for (void* p : g_allocs) CK(cudaFree(p));
  g_allocs.clear();
}

// Median time in ms of run(set) per call, cycling over `sets` input sets.
double time_median(int sets, const std::function<void(int)>& run) {
  for (int s = 0; s < sets; ++s) run(s);  // warm-up
  CK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < kReps; ++r) {
    CK(cudaEventRecord(a));
    for (int s = 0; s < sets; ++s) run(s);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / sets);
  }
  CK(cudaGetLastError());
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// The floor: a device-to-device copy moving `bytes` in all (bytes / 2 read, bytes / 2 written).
double copy_floor_ms(size_t bytes) {
  const size_t half = bytes / 2;
  const int sets = int(std::max<size_t>(2, kMinCycleBytes / std::max<size_t>(bytes, 1) + 1));
  std::vector<char*> src(sets), dst(sets);
  for (int s = 0; s < sets; ++s) src[s] = reinterpret_cast<char*>(random_bf16(half / 2, 77 + s)), dst[s] = alloc<char>(half);
  const double ms = time_median(sets, [&](int s) { CK(cudaMemcpyAsync(dst[s], src[s], half, cudaMemcpyDeviceToDevice)); });
  free_all();
  return ms;
}

// The variant this process runs: the environment variable of the op's family, "auto" when unset.
const char* variant_of(const char* family_env) {
  const char* v = family_env != nullptr ? std::getenv(family_env) : nullptr;
  return family_env == nullptr ? "-" : v != nullptr ? v : "auto";
}

void report(const char* op, const char* family_env, int64_t size, int64_t rows, size_t bytes, double ms) {
  const double floor = copy_floor_ms(bytes);
  std::printf("%s\t%lld\t%s\t%lld\t%.4f\t%.4f\t%.2f\t%.0f\t%.0f\n", op, (long long)size, variant_of(family_env),
              (long long)rows, ms, floor, ms / floor, bytes / ms / 1e6, bytes / floor / 1e6);
  std::fflush(stdout);
}

int sets_for(size_t bytes_per_set) { return int(std::max<size_t>(2, kMinCycleBytes / bytes_per_set + 1)); }

// dropout_add_layer_norm, prenorm, p = 0.1 (as the managed benchmark): x0 and residual in (bf16), z and the new
// residual out; fp32 weight/bias; the mask is regenerated in the backward, never stored.
// fwd+bwd adds dz, dresidual_out and x read, dx0 and dresidual written: 9 row tensors in all.
void bench_norm(int64_t hidden, bool rms, bool backward) {
  const int64_t rows = 16384;
  const size_t n = size_t(rows) * hidden;
  const size_t tensors = rms ? (backward ? 5 : 2) : (backward ? 9 : 4);
  const int sets = sets_for(tensors * n * 2);
  struct Set {
    __nv_bfloat16 *x0, *res, *z, *rout, *dz, *drout, *dx0, *dres;
    float *mean, *rstd;
  };
  std::vector<Set> s(sets);
  float* w = alloc<float>(hidden);
  float* b = alloc<float>(hidden);
  float* dw = alloc<float>(hidden);
  float* db = alloc<float>(hidden);
  fill_f32<<<64, 256>>>(w, hidden, 1.f);
  fill_f32<<<64, 256>>>(b, hidden, 0.1f);
  const int64_t ws_bytes = FlashAttn_norm_bwd_workspace_size(rows, hidden, rms ? 0 : 1, 0, 0);
  void* ws = alloc<char>(size_t(ws_bytes));
  for (int i = 0; i < sets; ++i) {
    s[i].x0 = random_bf16(n, 10 * i + 1);
    s[i].res = rms ? nullptr : random_bf16(n, 10 * i + 2);
    s[i].z = alloc<__nv_bfloat16>(n);
    s[i].rout = rms ? nullptr : alloc<__nv_bfloat16>(n);
    s[i].mean = rms ? nullptr : alloc<float>(rows);
    s[i].rstd = alloc<float>(rows);
    if (backward) {
      s[i].dz = random_bf16(n, 10 * i + 3);
      s[i].drout = rms ? nullptr : random_bf16(n, 10 * i + 4);
      s[i].dx0 = alloc<__nv_bfloat16>(n);
      s[i].dres = rms ? nullptr : alloc<__nv_bfloat16>(n);
    }
  }
  const float p = rms ? 0.f : 0.1f;
  const auto B = FLASHATTN_DTYPE_BFLOAT16, F = FLASHATTN_DTYPE_FLOAT32;
  const double ms = time_median(sets, [&](int i) {
    const Set& t = s[i];
    FA(FlashAttn_norm_fwd(t.x0, nullptr, t.res, B, B, w, rms ? nullptr : b, nullptr, nullptr, F, nullptr, t.z, nullptr,
                          t.rout, B, t.mean, t.rstd, nullptr, nullptr, rows, hidden, hidden, 0, hidden, hidden, hidden,
                          1e-5f, p, 1234, 0, rms ? 1 : 0, 0, nullptr));
    if (backward)
      FA(FlashAttn_norm_bwd(t.dz, nullptr, t.drout, rms ? t.x0 : t.rout, B, w, nullptr, F, t.mean, t.rstd, nullptr,
                            t.dx0, nullptr, t.dres, B, dw, rms ? nullptr : db, nullptr, nullptr, B, rows, hidden, hidden,
                            hidden, hidden, hidden, hidden, p, 1234, 0, rms ? 1 : 0, 0, ws, ws_bytes, nullptr));
  });
  free_all();
  const char* op = rms ? (backward ? "rms_fwdbwd" : "rms_fwd") : (backward ? "norm_fwdbwd" : "norm_fwd");
  report(op, "FLASHATTN_NORM_VARIANT", hidden, rows, tensors * n * 2, ms);
}

// cross-entropy forward + backward in place (inplace_backward): logits read twice, written once.
void bench_ce(int64_t vocab) {
  const int64_t rows = vocab > 100000 ? 4096 : 16384;
  const size_t n = size_t(rows) * vocab;
  const int sets = sets_for(3 * n * 2);
  struct Set {
    __nv_bfloat16* logits;
    int64_t* labels;
    float *loss, *lse, *dloss;
  };
  std::vector<Set> s(sets);
  const int64_t ws_bytes = FlashAttn_cross_entropy_fwd_workspace_size(rows, vocab);
  void* ws = alloc<char>(size_t(ws_bytes));
  for (int i = 0; i < sets; ++i) {
    s[i].logits = random_bf16(n, 100 + i, 2.f);
    s[i].labels = alloc<int64_t>(rows);
    fill_labels<<<64, 256>>>(s[i].labels, rows, vocab);
    s[i].loss = alloc<float>(rows);
    s[i].lse = alloc<float>(rows);
    s[i].dloss = alloc<float>(rows);
    fill_f32<<<64, 256>>>(s[i].dloss, rows, 1.f / rows);
  }
  const auto B = FLASHATTN_DTYPE_BFLOAT16;
  const double ms = time_median(sets, [&](int i) {
    const Set& t = s[i];
    FA(FlashAttn_cross_entropy_fwd(t.logits, B, t.labels, t.loss, nullptr, t.lse, rows, vocab, vocab, 0.f, 1.f, 0.f,
                                   -100, ws, ws_bytes, nullptr));
    FA(FlashAttn_cross_entropy_bwd(t.dloss, 1, t.logits, t.labels, t.lse, t.logits, B, rows, vocab, vocab, vocab, 0.f,
                                   1.f, 0.f, -100, nullptr));
  });
  free_all();
  report("ce_fwdbwd", nullptr, vocab, rows, 3 * n * 2, ms);
}

// rotary on q (B 8, S 2048, H heads, D 128), out of place: x read, out written, cos/sin (S, 64) each read once.
void bench_rotary(int64_t heads) {
  const int64_t batch = 8, seqlen = 2048, d = 128, rd = 128;
  const size_t n = size_t(batch) * seqlen * heads * d, cs = size_t(seqlen) * rd / 2;
  const size_t bytes = 2 * n * 2 + 2 * cs * 2;
  const int sets = sets_for(bytes);
  std::vector<__nv_bfloat16*> x(sets), out(sets);
  for (int i = 0; i < sets; ++i) x[i] = random_bf16(n, 300 + i), out[i] = alloc<__nv_bfloat16>(n);
  __nv_bfloat16* cos = random_bf16(cs, 5);
  __nv_bfloat16* sin = random_bf16(cs, 6);
  const auto B = FLASHATTN_DTYPE_BFLOAT16;
  const double ms = time_median(sets, [&](int i) {
    const int64_t sh = d, ss = heads * d, sb = seqlen * ss;  // contiguous (B, S, H, D)
    FA(FlashAttn_rotary_apply(out[i], x[i], B, cos, sin, B, nullptr, nullptr, 0, batch, seqlen, heads, d, rd, seqlen,
                              rd / 2, sb, ss, sh, sb, ss, sh, 0, 0, nullptr));
  });
  free_all();
  report("rotary", nullptr, heads, batch * seqlen, bytes, ms);
}

}  // namespace

// Runs the cases of `only` (all when empty) at `size` (all when 0) in this process.
void run_here(const std::string& only, int64_t size) {
  auto want = [&](const char* op, int64_t s) { return (only.empty() || only == op) && (size == 0 || size == s); };
  for (int64_t h : {768, 2048, 4096, 8192, 16384}) {
    if (want("norm_fwd", h)) bench_norm(h, false, false);
    if (want("norm_fwdbwd", h)) bench_norm(h, false, true);
    if (want("rms_fwd", h)) bench_norm(h, true, false);
    if (want("rms_fwdbwd", h)) bench_norm(h, true, true);
  }
  for (int64_t v : {32000, 50257, 128256, 256000})
    if (want("ce", v)) bench_ce(v);
  for (int64_t h : {16, 64})
    if (want("rotary", h)) bench_rotary(h);
}

// Each variant in a child process (the launchers read the variant once per process); the lines come back
// sorted by op, size and variant.
int run_variants(const char* self, const std::string& only, int64_t size) {
  struct Family {
    const char* env;
    std::vector<std::string> ops;
    std::vector<std::string> variants;
  };
  const std::vector<Family> families = {
      {"FLASHATTN_NORM_VARIANT", {"norm_fwd", "norm_fwdbwd", "rms_fwd", "rms_fwdbwd"}, {"auto", "block", "rows16", "rows32", "rows16l2", "rows32l2", "rows64l2"}},
      {nullptr, {"ce", "rotary"}, {"-"}},
  };
  // (op and size, its lines), in the order the first child of each op met them: ascending sizes
  std::vector<std::pair<std::string, std::vector<std::string>>> lines;
  int rc = 0;
  for (const Family& f : families) {
    for (const std::string& op : f.ops) {
      if (!only.empty() && only != op) continue;
      for (const std::string& v : f.variants) {
        std::string cmd = (f.env != nullptr ? std::string(f.env) + "=" + v + " " : std::string()) + "'" + self +
                          "' --here " + op + (size != 0 ? " " + std::to_string(size) : std::string());
        FILE* child = popen(cmd.c_str(), "r");
        if (child == nullptr) return 4;
        char buf[512];
        while (std::fgets(buf, sizeof(buf), child) != nullptr) {
          if (buf[0] == '#' || std::strncmp(buf, "op\t", 3) == 0) continue;
          const std::string line(buf);
          const size_t t1 = line.find('\t'), t2 = line.find('\t', t1 + 1);
          const std::string key = line.substr(0, t2);  // op and size
          auto it = std::find_if(lines.begin(), lines.end(), [&](const auto& l) { return l.first == key; });
          if (it == lines.end()) it = lines.insert(lines.end(), {key, {}});
          it->second.push_back(line);
        }
        const int status = pclose(child);
        if (status != 0) {
          std::fprintf(stderr, "%s: exit status %d\n", cmd.c_str(), status);
          rc = 5;
        }
      }
    }
  }
  for (const auto& k : lines)
    for (const std::string& l : k.second) std::fputs(l.c_str(), stdout);
  return rc;
}

int main(int argc, char** argv) {
  const bool here = argc > 1 && std::strcmp(argv[1], "--here") == 0;
  const int a = here ? 2 : 1;
  const std::string only = argc > a ? argv[a] : "";
  const int64_t size = argc > a + 1 ? std::atoll(argv[a + 1]) : 0;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# ops_bench on %s (%d SMs, L2 %d MB); ms = median per call; floor = cudaMemcpyAsync of the same bytes\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  std::printf("op\tsize\tvariant\trows\tms\tfloor_ms\tratio\tGB/s\tcopy_GB/s\n");
  std::fflush(stdout);
  if (here) {
    run_here(only, size);
    return 0;
  }
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return 4;
  self[n] = 0;
  return run_variants(self, only, size);
}
