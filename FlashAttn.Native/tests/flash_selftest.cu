// flash_selftest: FlashAttn_flash_fwd / FlashAttn_flash_bwd against a float64 CPU reference.
//   flash_selftest [filter]   correctness cases (names containing filter, or each of its '&'-separated
//                             parts: "d64 &grid"), one line each, exit code 1 on any failure; each line
//                             names the forward and the backward path that ran, and a case the Hopper
//                             kernels cover fails if it ran elsewhere on an sm_90 device
//   flash_selftest --bench    fwd TFLOP/s of each Hopper kernel variant (FLASHATTN_HOPPER_FWD_VARIANT
//                             pingpong, overlap, rows192, persistent, persistent192, persistent2,
//                             persistent_overlap, persistent_expturn, persistent192_snake;
//                             at d128 rows192 is pingpong again, a measure of the noise, and persistent192
//                             and persistent192_snake are persistent) and
//                             on the sm_80 path (FLASHATTN_HOPPER=0), and bwd TFLOP/s of each Hopper
//                             backward variant (FLASHATTN_HOPPER_BWD_VARIANT atomic, dqtma, dqfirst,
//                             persistent)
//                             and sm_80's: B=4 H=16 S=4096 D=64/128 causal off/on, B=16 H=12 S=1024 D=64
//                             causal. The library reads those variables once per process, so each
//                             setting runs in a child process of its own (--bench-here: timed in this
//                             process, under the environment's setting, e.g. for a profiler; every bench
//                             reads the paths that ran from a child process's call: --path-of)
//   flash_selftest --bench-bwd   the forward and backward figures in this process, under its environment
//                             (with FLASHATTN_HOPPER=0: sm_80's backward)
//   flash_selftest --bench-peer  both directions, default variants, at the shapes of the PyTorch peer's
//                             attention part (S 512 / 2048 / 8192 / 16384, hidden 2048) and GPT-2's, in this process,
//                             then a second pass of d128 causal at S 8192 and its B/H neighbours
//   flash_selftest --bench-peer-fwd [D [causal [S]]]  the forward alone at those shapes, in this process, under
//                             its environment (an A/B of forward variants: one process each, alternated; one
//                             shape for ncu: device-run.sh attnncu)
//   flash_selftest --bench-peer-bwd [D [causal [S]]]  the same with the backward (an A/B of backward variants,
//                             FLASHATTN_HOPPER_BWD_VARIANT)
// Acceptance rule (flash-attn's): the kernel's max error against the float64 reference (on the same
// rounded inputs) must be <= 2x the error of a reference computed at the kernel's precision
// (probabilities, intermediate products and outputs rounded to bf16/fp16), plus 1e-4 + 1e-3 max|ref|.
// Dropout cases take their decisions from the stream's definition (flash/dropout.cuh, on the host); those
// that ask the forward for its mask (the sm_80 kernels write it) also check it against that definition.
// Dropout runs on the Hopper kernels (the forward when no mask is asked for) unless FLASHATTN_HOPPER_DROPOUT=0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

#include "flash/dropout.cuh"
#include "flashattn.h"
#include "test_common.h"


namespace {

// Small deterministic normal generator (xorshift64* + Box-Muller); <random> trips nvcc 11.8 with
// libstdc++ 12 on the compile-check host.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ULL + 1) {}
  double uniform() {
    s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
    return double((s * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
  }
  float normal() {
    const double u1 = std::max(uniform(), 1e-300), u2 = uniform();
    return float(std::sqrt(-2 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
};

using test::from_bits;
using test::to_bits;
double rnd(double x, bool bf16) { return from_bits(to_bits(float(x), bf16), bf16); }

struct Case {
  std::string name;
  bool bf16 = true;
  int B = 2, sq = 128, sk = 128, H = 2, Hk = 2, D = 64;
  bool causal = false;
  int wl = -1, wr = -1;
  float softcap = 0.f;
  bool alibi = false;
  bool varlen = false;
  float dropout = 0.f;
  bool dropout_mask = true;  // with dropout: the forward returns its mask (which keeps it on the sm_80 path)
  bool deterministic = false;
  int pad = 0;  // extra elements after each row of every tensor (strided layouts; must stay untouched)
  bool fwd_only = false;  // forward and its reference only (the large Hopper grid)
  // The checked forward on a stream of its own, launched while an earlier forward of the same inputs waits behind a
  // spinning kernel on another stream: it starts first, before the launch that was to prepare the Hopper dynamic
  // tiles' counter for it has run (flash_fwd_kernel.cuh, fwd_tile_index: a stale word); both outputs must match.
  bool overtaken = false;
};

// Holds a stream for `cycles` clock cycles (the overtaken cases).
__global__ void spin_kernel(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

// The path the library reports (FLASHATTN_LOG_PATH=1, one stderr line per call), read back by sending
// stderr to a temporary file around one call.
struct PathCapture {
  FILE* file = nullptr;
  int saved = -1;
  std::string kernel;  // the Hopper forward's kernel variant, after end()
  void begin() {
    std::fflush(stderr);
    file = std::tmpfile();
    saved = dup(2);
    if (file != nullptr && saved >= 0) dup2(fileno(file), 2);
  }
  std::string end() {
    std::fflush(stderr);
    std::string text;
    if (saved >= 0) {
      dup2(saved, 2);
      close(saved);
    }
    if (file != nullptr) {
      std::rewind(file);
      char buf[256];
      while (std::fgets(buf, sizeof buf, file)) text += buf;
      std::fclose(file);
    }
    // The Hopper forward's line also names its kernel variant: "..., kernel <name>".
    const size_t at = text.find(", kernel ");
    if (at != std::string::npos) kernel = text.substr(at + 9, text.find('\n', at) - at - 9);
    return text.find("hopper path") != std::string::npos ? "hopper"
           : text.find("sm80 path") != std::string::npos ? "sm80"
                                                          : "?";
  }
};

// Whether the Hopper kernels cover this case but for dropout: an sm_90 device, a library built for
// sm_90a, FLASHATTN_HOPPER not "0", and a case inside their scope (flash/hopper/flash_fwd_hopper.h).
bool hopper_scope(const Case& c) {
  static const bool device_and_build = [] {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    return prop.major == 9 && prop.minor == 0 && std::strstr(FlashAttn_core_build_info(), "90a") != nullptr;
  }();
  const char* env = std::getenv("FLASHATTN_HOPPER");
  const bool enabled = env == nullptr || std::strcmp(env, "0") != 0;
  return device_and_build && enabled && (c.D == 64 || c.D == 128) && !c.varlen && !c.alibi && c.softcap == 0.f &&
         c.wl < 0 && (c.causal || c.wr < 0) && c.sk > 0;
}
// Dropout on the Hopper kernels: unless FLASHATTN_HOPPER_DROPOUT=0.
bool hopper_dropout() {
  const char* env = std::getenv("FLASHATTN_HOPPER_DROPOUT");
  return env == nullptr || std::strcmp(env, "0") != 0;
}
// Whether the Hopper forward should take it: dropout unless FLASHATTN_HOPPER_DROPOUT=0, and without the mask
// output.
bool hopper_expected(const Case& c) {
  return hopper_scope(c) && (c.dropout == 0.f || (hopper_dropout() && !c.dropout_mask));
}
// Whether the Hopper backward should take it (flash/hopper/flash_bwd_hopper.h): the forward's scope,
// dropout unless FLASHATTN_HOPPER_DROPOUT=0 (mask or not: the backward regenerates the decisions),
// not deterministic, seqlen_q > 0, and FLASHATTN_HOPPER_BWD not "0".
bool hopper_bwd_expected(const Case& c) {
  const char* env = std::getenv("FLASHATTN_HOPPER_BWD");
  const bool enabled = env == nullptr || std::strcmp(env, "0") != 0;
  return enabled && hopper_scope(c) && (c.dropout == 0.f || hopper_dropout()) && !c.deterministic && c.sq > 0;
}

struct Err {
  double err = 0, ref_err = 0, maxabs = 0;
  void add(double kernel, double ref, double low) {
    err = std::max(err, std::fabs(kernel - ref));
    ref_err = std::max(ref_err, std::fabs(low - ref));
    maxabs = std::max(maxabs, std::fabs(ref));
  }
  bool ok() const { return err <= 2 * ref_err + 1e-4 + 1e-3 * maxabs; }
};

void parallel_for(int n, const std::function<void(int)>& fn) {
  const int threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  std::atomic<int> next{0};
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (int i = next++; i < n; i = next++) fn(i);
    });
  for (auto& th : pool) th.join();
}

bool run_case(const Case& c, bool verbose) {
  Rng gen(1234 + c.D * 7 + c.sq * 13 + c.sk);
  const int B = c.B, H = c.H, Hk = c.Hk, D = c.D;
  // Sequence lengths: padded (all equal) or varlen (3 sequences of different lengths).
  std::vector<int> lq(B, c.sq), lk(B, c.sk);
  if (c.varlen) {
    lq = {c.sq, std::max(1, c.sq / 2 + 3), 1};
    lk = {c.sk, std::max(1, c.sk / 3 + 5), std::max(1, c.sk - 7)};
  }
  std::vector<int> cuq(B + 1, 0), cuk(B + 1, 0);
  for (int b = 0; b < B; ++b) {
    cuq[b + 1] = cuq[b] + (c.varlen ? lq[b] : c.sq);
    cuk[b + 1] = cuk[b] + (c.varlen ? lk[b] : c.sk);
  }
  const int maxq = *std::max_element(lq.begin(), lq.end()), maxk = *std::max_element(lk.begin(), lk.end());
  const int64_t tq = cuq[B], tk = cuk[B];  // rows (padded: B * S)
  auto fill = [&](int64_t n, std::vector<uint16_t>& bits, std::vector<double>& val) {
    bits.resize(n);
    val.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      bits[i] = to_bits(gen.normal(), c.bf16);
      val[i] = from_bits(bits[i], c.bf16);
    }
  };
  std::vector<uint16_t> qb, kb, vb, dob;
  std::vector<double> q, k, v, dO;
  fill(tq * H * D, qb, q);
  fill(tk * Hk * D, kb, k);
  fill(tk * Hk * D, vb, v);
  fill(tq * H * D, dob, dO);
  std::vector<float> slopes(B * H);
  for (int i = 0; i < B * H; ++i) slopes[i] = 0.05f + 0.3f * float(i % 7) / 7.f;
  const float scale = 1.f / std::sqrt(float(D));
  const FlashAttnDType dt = c.bf16 ? FLASHATTN_DTYPE_BFLOAT16 : FLASHATTN_DTYPE_FLOAT16;

  // ---- device ----
  auto dalloc = [](size_t bytes) {
    void* p = nullptr;
    CK(cudaMalloc(&p, std::max<size_t>(bytes, 256)));
    return p;
  };
  // Device layouts: row stride H * D + pad (the pad elements are filled with 0xffff and must survive).
  const int64_t qrs = int64_t(H) * D + c.pad, krs = int64_t(Hk) * D + c.pad;
  const size_t qbytes = tq * qrs * 2, kbytes = tk * krs * 2;
  auto scatter = [&](const std::vector<uint16_t>& compact, int64_t rows, int heads, int64_t rs) {
    std::vector<uint16_t> out(size_t(rows * rs), 0xffff);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(&out[r * rs], &compact[r * heads * D], size_t(heads) * D * 2);
    return out;
  };
  bool pad_ok = true;
  auto gather = [&](const std::vector<uint16_t>& padded, int64_t rows, int heads, int64_t rs) {
    std::vector<uint16_t> out(size_t(rows) * heads * D);
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(&out[r * heads * D], &padded[r * rs], size_t(heads) * D * 2);
      for (int64_t e = int64_t(heads) * D; e < rs; ++e) pad_ok = pad_ok && padded[r * rs + e] == 0xffff;
    }
    return out;
  };
  void *dq_ = dalloc(qbytes), *dk_ = dalloc(kbytes), *dv_ = dalloc(kbytes), *dout_ = dalloc(qbytes),
       *dgq = dalloc(qbytes), *dgk = dalloc(kbytes), *dgv = dalloc(kbytes), *dgo = dalloc(qbytes);
  float* dlse = static_cast<float*>(dalloc(size_t(B) * H * maxq * 4));
  float* dslopes = static_cast<float*>(dalloc(slopes.size() * 4));
  int32_t *dcuq = nullptr, *dcuk = nullptr;
  uint8_t* dmask = nullptr;
  const size_t mask_bytes = size_t(B) * H * c.sq * c.sk;
  if (c.dropout > 0 && c.dropout_mask && !c.varlen) {
    dmask = static_cast<uint8_t*>(dalloc(mask_bytes));
    CK(cudaMemset(dmask, 0, mask_bytes));
  }
  if (c.varlen) {
    dcuq = static_cast<int32_t*>(dalloc((B + 1) * 4));
    dcuk = static_cast<int32_t*>(dalloc((B + 1) * 4));
    CK(cudaMemcpy(dcuq, cuq.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dcuk, cuk.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
  }
  CK(cudaMemcpy(dq_, scatter(qb, tq, H, qrs).data(), qbytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dk_, scatter(kb, tk, Hk, krs).data(), kbytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv_, scatter(vb, tk, Hk, krs).data(), kbytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dgo, scatter(dob, tq, H, qrs).data(), qbytes, cudaMemcpyHostToDevice));
  CK(cudaMemset(dgq, 0xff, qbytes));
  CK(cudaMemset(dgk, 0xff, kbytes));
  CK(cudaMemset(dgv, 0xff, kbytes));
  CK(cudaMemcpy(dslopes, slopes.data(), slopes.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(dout_, 0xff, qbytes));  // NaN pattern: unwritten outputs show up
  CK(cudaMemset(dlse, 0xff, size_t(B) * H * maxq * 4));
  const int64_t sq_arg = c.varlen ? maxq : c.sq, sk_arg = c.varlen ? maxk : c.sk;
  const int64_t qbs = int64_t(c.sq) * qrs, kbs = int64_t(c.sk) * krs;
  const uint64_t seed = 0x1234abcdULL + c.D, offset = 77;
  // c.overtaken: the first forward (held back on `held`) writes these; the checked one runs on `stream`.
  cudaStream_t held = nullptr, stream = nullptr;
  void* dout_held = nullptr;
  float* dlse_held = nullptr;
  if (c.overtaken) {
    CK(cudaStreamCreateWithFlags(&held, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    dout_held = dalloc(qbytes);
    dlse_held = static_cast<float*>(dalloc(size_t(B) * H * maxq * 4));
    CK(cudaMemset(dout_held, 0xff, qbytes));
    CK(cudaMemset(dlse_held, 0xff, size_t(B) * H * maxq * 4));
    spin_kernel<<<1, 1, 0, held>>>(20000000);  // about 10 ms
    CK(cudaGetLastError());
    const FlashAttnStatus sh = FlashAttn_flash_fwd(
        dq_, dk_, dv_, dout_held, dlse_held, dt, dcuq, dcuk, B, sq_arg, sk_arg, H, Hk, D, qbs, qrs, D, kbs, krs, D,
        kbs, krs, D, qbs, qrs, D, scale, c.wl, c.causal ? 0 : c.wr, c.softcap, c.alibi ? dslopes : nullptr,
        c.alibi ? H : 0, c.dropout, seed, offset, nullptr, nullptr, 0, held);
    if (sh != FLASHATTN_STATUS_OK) {
      std::printf("FAIL %s held fwd status %d: %s\n", c.name.c_str(), int(sh), FlashAttn_core_last_error());
      return false;
    }
  }
  PathCapture capture;
  capture.begin();
  FlashAttnStatus st = FlashAttn_flash_fwd(
      dq_, dk_, dv_, dout_, dlse, dt, dcuq, dcuk, B, sq_arg, sk_arg, H, Hk, D, qbs, qrs, D, kbs, krs, D, kbs,
      krs, D, qbs, qrs, D, scale, c.wl, c.causal ? 0 : c.wr, c.softcap, c.alibi ? dslopes : nullptr,
      c.alibi ? H : 0, c.dropout, seed, offset, dmask, nullptr, 0, stream);
  const std::string path = capture.end();
  if (st != FLASHATTN_STATUS_OK) {
    std::printf("FAIL %s fwd status %d: %s\n", c.name.c_str(), int(st), FlashAttn_core_last_error());
    return false;
  }
  bool overtaken_ok = true;  // both forwards' outputs and LSE alike, bit for bit
  if (c.overtaken) {
    CK(cudaDeviceSynchronize());
    std::vector<uint8_t> a(qbytes), b(qbytes), la(size_t(B) * H * maxq * 4), lb(la.size());
    CK(cudaMemcpy(a.data(), dout_, qbytes, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), dout_held, qbytes, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(la.data(), dlse, la.size(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(lb.data(), dlse_held, lb.size(), cudaMemcpyDeviceToHost));
    overtaken_ok = a == b && la == lb;
    CK(cudaStreamDestroy(held));
    CK(cudaStreamDestroy(stream));
    CK(cudaFree(dout_held));
    CK(cudaFree(dlse_held));
  }
  const bool path_ok = path == (hopper_expected(c) ? "hopper" : "sm80");
  const int64_t ws_bytes = FlashAttn_flash_bwd_workspace_size(B, sq_arg, sk_arg, H, Hk, D, c.varlen);
  void* ws = dalloc(ws_bytes);
  std::string bwd_path = "-";
  if (!c.fwd_only) {
    capture.begin();
    st = FlashAttn_flash_bwd(dgo, dq_, dk_, dv_, dout_, dlse, dgq, dgk, dgv, dt, dcuq, dcuk, B, sq_arg, sk_arg, H,
                             Hk, D, qbs, qrs, D, kbs, krs, D, kbs, krs, D, qbs, qrs, D, qbs, qrs, D, qbs, qrs, D, kbs,
                             krs, D, kbs, krs, D, scale, c.wl, c.causal ? 0 : c.wr, c.softcap, c.alibi ? dslopes : nullptr,
                             c.alibi ? H : 0, c.dropout, seed, offset, c.deterministic, ws, ws_bytes, nullptr);
    bwd_path = capture.end();
  }
  const bool bwd_path_ok = c.fwd_only || bwd_path == (hopper_bwd_expected(c) ? "hopper" : "sm80");
  if (!c.fwd_only && st != FLASHATTN_STATUS_OK) {
    std::printf("FAIL %s bwd status %d: %s\n", c.name.c_str(), int(st), FlashAttn_core_last_error());
    return false;
  }
  CK(cudaDeviceSynchronize());
  bool deterministic_ok = true;
  if (c.deterministic) {  // a second backward must reproduce dq, dk, dv bit for bit
    std::vector<uint8_t> first(qbytes + 2 * kbytes), second(qbytes + 2 * kbytes);
    auto snap = [&](std::vector<uint8_t>& to) {
      CK(cudaMemcpy(to.data(), dgq, qbytes, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(to.data() + qbytes, dgk, kbytes, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(to.data() + qbytes + kbytes, dgv, kbytes, cudaMemcpyDeviceToHost));
    };
    snap(first);
    st = FlashAttn_flash_bwd(dgo, dq_, dk_, dv_, dout_, dlse, dgq, dgk, dgv, dt, dcuq, dcuk, B, sq_arg, sk_arg, H,
                             Hk, D, qbs, qrs, D, kbs, krs, D, kbs, krs, D, qbs, qrs, D, qbs, qrs, D, qbs, qrs, D, kbs,
                             krs, D, kbs, krs, D, scale, c.wl, c.causal ? 0 : c.wr, c.softcap, c.alibi ? dslopes : nullptr,
                             c.alibi ? H : 0, c.dropout, seed, offset, 1, ws, ws_bytes, nullptr);
    CK(cudaDeviceSynchronize());
    snap(second);
    deterministic_ok = st == FLASHATTN_STATUS_OK && first == second;
  }
  std::vector<uint16_t> ob(tq * qrs), gqb(tq * qrs), gkb(tk * krs), gvb(tk * krs);
  std::vector<float> lse(size_t(B) * H * maxq);
  std::vector<uint8_t> mask(dmask ? mask_bytes : 0);
  CK(cudaMemcpy(ob.data(), dout_, qbytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gqb.data(), dgq, qbytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gkb.data(), dgk, kbytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gvb.data(), dgv, kbytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), dlse, lse.size() * 4, cudaMemcpyDeviceToHost));
  if (dmask) CK(cudaMemcpy(mask.data(), dmask, mask_bytes, cudaMemcpyDeviceToHost));
  ob = gather(ob, tq, H, qrs);
  gqb = gather(gqb, tq, H, qrs);
  gkb = gather(gkb, tk, Hk, krs);
  gvb = gather(gvb, tk, Hk, krs);
  for (void* p : {dq_, dk_, dv_, dout_, dgq, dgk, dgv, dgo, (void*)dlse, (void*)dslopes, ws}) CK(cudaFree(p));
  if (dcuq) {
    CK(cudaFree(dcuq));
    CK(cudaFree(dcuk));
  }
  if (dmask) CK(cudaFree(dmask));

  // ---- reference, per (b, h); exact (float64) and low precision (rounded like the kernel) ----
  std::vector<double> o_ref(tq * H * D), o_low(tq * H * D), dq_ref(tq * H * D), dq_low(tq * H * D);
  std::vector<double> dkh_ref(tk * H * D), dkh_low(tk * H * D), dvh_ref(tk * H * D), dvh_low(tk * H * D);
  std::vector<double> lse_ref(size_t(B) * H * maxq, 0);
  const double rp = c.dropout > 0 ? 1.0 / (1.0 - c.dropout) : 1.0;
  const bool bf = c.bf16;
  const uint32_t keep_threshold = flashattn::dropout_threshold16(c.dropout);
  std::atomic<int64_t> mask_mismatches{0};  // returned mask bytes != the stream's decision where visible, else 0
  // Few (batch, head)s (the long cases: one, at S 8192 and more): each one's rows are spread over the threads instead.
  const bool rows_parallel = B * H < 8;
  auto for_rows = [&](int n, const std::function<void(int)>& fn) {
    if (rows_parallel)
      parallel_for(n, fn);
    else
      for (int i = 0; i < n; ++i) fn(i);
  };
  parallel_for(B * H, [&](int bh) {
    const int b = bh / H, h = bh % H, hk = h / (H / Hk);
    const int sq = c.varlen ? lq[b] : c.sq, sk = c.varlen ? lk[b] : c.sk, diag = sk - sq;
    const int wr = c.causal ? 0 : c.wr, wl = c.wl;
    // Rows of q, dO (query i) and of k, v (key j) of this (batch, head), D contiguous elements each.
    auto Qrow = [&](int i) { return &q[((cuq[b] + int64_t(i)) * H + h) * D]; };
    auto DOrow = [&](int i) { return &dO[((cuq[b] + int64_t(i)) * H + h) * D]; };
    auto Krow = [&](int j) { return &k[((cuk[b] + int64_t(j)) * Hk + hk) * D]; };
    auto Vrow = [&](int j) { return &v[((cuk[b] + int64_t(j)) * Hk + hk) * D]; };
    std::vector<double> P(size_t(sq) * sk), Z(size_t(sq) * sk, 1.0), TH(size_t(sq) * sk, 0.0);
    const flashattn::flash::Dropout drop(seed, offset, bh, keep_threshold);  // positions inside the sequence (varlen too)
    for_rows(sq, [&](int i) {
      const double* qi = Qrow(i);
      double mx = -INFINITY;
      int64_t mismatches = 0;
      for (int j = 0; j < sk; ++j) {
        const double* kj = Krow(j);
        double s = 0;
        for (int d = 0; d < D; ++d) s += qi[d] * kj[d];
        double x = s * scale;
        if (c.softcap > 0) {
          TH[size_t(i) * sk + j] = std::tanh(x / c.softcap);
          x = c.softcap * TH[size_t(i) * sk + j];
        }
        if (c.alibi) x -= slopes[b * H + h] * std::fabs(double(i + diag - j));
        const bool vis = (wr < 0 || j <= i + diag + wr) && (wl < 0 || j >= i + diag - wl);
        P[size_t(i) * sk + j] = vis ? x : -INFINITY;
        mx = std::max(mx, P[size_t(i) * sk + j]);
        if (c.dropout > 0) {
          const bool keep = drop.keep1(i, j);
          Z[size_t(i) * sk + j] = keep ? 1.0 : 0.0;
          if (dmask) mismatches += mask[((size_t(b) * H + h) * c.sq + i) * c.sk + j] != uint8_t(keep && vis);
        }
      }
      mask_mismatches += mismatches;
      double l = 0;
      for (int j = 0; j < sk; ++j) {
        double& pv = P[size_t(i) * sk + j];
        pv = mx == -INFINITY ? 0.0 : std::exp(pv - mx);
        l += pv;
      }
      for (int j = 0; j < sk; ++j) P[size_t(i) * sk + j] = l > 0 ? P[size_t(i) * sk + j] / l : 0.0;
      const size_t lidx = c.varlen ? size_t(h) * tq + cuq[b] + i : (size_t(b) * H + h) * c.sq + i;
      lse_ref[lidx] = l > 0 ? mx + std::log(l) : INFINITY;
      // O row = sum_j p_j V_j, with p exact and rounded to the kernel's precision (rows of V read
      // contiguously: the 2048 x 2048 cases' reference runs on the GPU host's clock)
      std::vector<double> a(D, 0.0), al(D, 0.0);
      for (int j = 0; j < sk; ++j) {
        const double pd = P[size_t(i) * sk + j] * Z[size_t(i) * sk + j] * rp, pl = rnd(pd, bf);
        const double* vrow = Vrow(j);
        for (int d = 0; d < D; ++d) {
          a[d] += pd * vrow[d];
          al[d] += pl * vrow[d];
        }
      }
      for (int d = 0; d < D; ++d) {
        const size_t idx = ((cuq[b] + size_t(i)) * H + h) * D + d;
        o_ref[idx] = a[d];
        o_low[idx] = rnd(al[d], bf);
      }
    });
    if (c.fwd_only) return;
    // Backward: dS and dQ by query rows, then dK and dV by blocks of kKeys keys (each query row's dS read once per
    // block, not once per key: the column walk of a long case's 0.5 GB matrices).
    std::vector<double> dS(size_t(sq) * sk), dSl(size_t(sq) * sk);
    for_rows(sq, [&](int i) {
      const size_t orow = ((cuq[b] + size_t(i)) * H + h) * D;
      const double* doi = DOrow(i);
      double Dsum = 0, Dsl = 0;
      for (int d = 0; d < D; ++d) {
        Dsum += doi[d] * o_ref[orow + d];
        Dsl += doi[d] * o_low[orow + d];
      }
      std::vector<double> a(D, 0.0), al(D, 0.0);
      for (int j = 0; j < sk; ++j) {
        const double* vj = Vrow(j);
        double dp = 0;
        for (int d = 0; d < D; ++d) dp += doi[d] * vj[d];
        const size_t e = size_t(i) * sk + j;
        const double z = Z[e] * rp, pr = P[e], th = TH[e];
        const double cap = c.softcap > 0 ? 1 - th * th : 1.0;
        dS[e] = pr * (dp * z - Dsum) * cap;
        dSl[e] = rnd(rnd(pr, bf) * (rnd(dp, bf) * z - Dsl) * cap, bf);
        const double* kj = Krow(j);
        for (int d = 0; d < D; ++d) {
          a[d] += dS[e] * kj[d];
          al[d] += dSl[e] * kj[d];
        }
      }
      for (int d = 0; d < D; ++d) {
        dq_ref[orow + d] = a[d] * scale;
        dq_low[orow + d] = rnd(al[d] * scale, bf);
      }
    });
    constexpr int kKeys = 8;
    for_rows((sk + kKeys - 1) / kKeys, [&](int jb) {
      const int j0 = jb * kKeys, nj = std::min(kKeys, sk - j0);
      std::vector<double> ak(kKeys * D, 0.0), akl(kKeys * D, 0.0), av(kKeys * D, 0.0), avl(kKeys * D, 0.0);
      for (int i = 0; i < sq; ++i) {
        const double *qi = Qrow(i), *doi = DOrow(i);
        for (int jj = 0; jj < nj; ++jj) {
          const size_t e = size_t(i) * sk + j0 + jj;
          const double ds = dS[e], dsl = dSl[e], pd = P[e] * Z[e] * rp, pdl = rnd(pd, bf);
          double *k_acc = &ak[jj * D], *kl_acc = &akl[jj * D], *v_acc = &av[jj * D], *vl_acc = &avl[jj * D];
          for (int d = 0; d < D; ++d) {
            k_acc[d] += ds * qi[d];
            kl_acc[d] += dsl * qi[d];
            v_acc[d] += pd * doi[d];
            vl_acc[d] += pdl * doi[d];
          }
        }
      }
      for (int jj = 0; jj < nj; ++jj)
        for (int d = 0; d < D; ++d) {
          const size_t idx = ((cuk[b] + size_t(j0 + jj)) * H + h) * D + d;
          dkh_ref[idx] = ak[jj * D + d] * scale;
          dkh_low[idx] = akl[jj * D + d] * scale;
          dvh_ref[idx] = av[jj * D + d];
          dvh_low[idx] = avl[jj * D + d];
        }
    });
  });

  Err eo, eq, ek, ev;
  double lse_err = 0;
  bool lse_ok = true;
  for (size_t i = 0; i < o_ref.size(); ++i) {
    eo.add(from_bits(ob[i], bf), o_ref[i], o_low[i]);
    if (!c.fwd_only) eq.add(from_bits(gqb[i], bf), dq_ref[i], dq_low[i]);
  }
  const int G = H / Hk;
  for (int64_t r = 0; r < (c.fwd_only ? 0 : tk); ++r)
    for (int hk = 0; hk < Hk; ++hk)
      for (int d = 0; d < D; ++d) {
        double kr = 0, kl = 0, vr = 0, vl = 0;
        for (int h = hk * G; h < hk * G + G; ++h) {
          const size_t idx = (r * H + h) * D + d;
          kr += dkh_ref[idx], kl += dkh_low[idx], vr += dvh_ref[idx], vl += dvh_low[idx];
        }
        const size_t o = (r * Hk + hk) * D + d;
        ek.add(from_bits(gkb[o], bf), kr, rnd(kl, bf));
        ev.add(from_bits(gvb[o], bf), vr, rnd(vl, bf));
      }
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < (c.varlen ? lq[b] : c.sq); ++i) {
        const size_t lidx = c.varlen ? size_t(h) * tq + cuq[b] + i : (size_t(b) * H + h) * c.sq + i;
        const double kv = lse[lidx], rv = lse_ref[lidx];
        if (std::isnan(kv)) {
          lse_ok = false;  // never written (the poison) or computed as NaN
        } else if (std::isinf(rv) || std::isinf(kv)) {
          if (!(std::isinf(rv) && std::isinf(kv) && kv > 0)) lse_ok = false;
        } else {
          lse_err = std::max(lse_err, std::fabs(kv - rv));
        }
      }
  lse_ok = lse_ok && lse_err <= 1e-3;
  const bool mask_ok = mask_mismatches == 0;
  const bool ok = eo.ok() && eq.ok() && ek.ok() && ev.ok() && lse_ok && pad_ok && deterministic_ok && mask_ok &&
                  path_ok && bwd_path_ok && overtaken_ok;
  // Each error pair: the kernel's max error against float64, then the low-precision reference's; the
  // bound is 2x the second + 1e-4 + 1e-3 max|ref| (a failing output is marked with (!)).
  auto mark = [](const Err& e) { return e.ok() ? "" : "(!)"; };
  std::printf("%s %-46s [%s] bwd:%s out %.2e %.2e%s | lse %.1e%s | dq %.2e %.2e%s | dk %.2e %.2e%s | dv %.2e "
              "%.2e%s%s%s%s%s%s%s\n",
              ok ? "PASS" : "FAIL", c.name.c_str(), path.c_str(), bwd_path.c_str(), eo.err, eo.ref_err, mark(eo),
              lse_err, lse_ok ? "" : "(!)", eq.err, eq.ref_err, mark(eq), ek.err, ek.ref_err, mark(ek), ev.err,
              ev.ref_err, mark(ev), pad_ok ? "" : " | wrote into row padding",
              deterministic_ok ? "" : " | not deterministic",
              overtaken_ok ? "" : " | the overtaken forward's output differs from the held one's",
              mask_ok ? "" : " | dropout mask differs from the stream (flash/dropout.cuh)",
              path_ok ? "" : (hopper_expected(c) ? " | expected the hopper path" : " | expected the sm80 path"),
              bwd_path_ok           ? ""
              : hopper_bwd_expected(c) ? " | expected the hopper backward"
                                       : " | expected the sm80 backward");
  (void)verbose;
  std::fflush(stdout);
  return ok;
}

std::vector<Case> cases() {
  std::vector<Case> v;
  auto name = [](const Case& c, const char* extra) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s d%d sq%d sk%d h%d/%d%s%s", c.bf16 ? "bf16" : "fp16", c.D, c.sq, c.sk, c.H,
                  c.Hk, c.causal ? " causal" : "", extra);
    return std::string(buf);
  };
  const int dims[] = {32, 40, 64, 80, 96, 128, 256};
  const int lens[][2] = {{97, 97}, {128, 200}, {200, 128}, {1, 513}, {513, 1}};
  for (int d : dims)
    for (auto& l : lens)
      for (int causal = 0; causal < 2; ++causal) {
        Case c;
        c.D = d, c.sq = l[0], c.sk = l[1], c.causal = causal;
        c.name = name(c, "");
        v.push_back(c);
      }
  for (int d : {160, 192, 224}) {
    Case c;
    c.D = d, c.sq = 97, c.sk = 200;
    c.name = name(c, "");
    v.push_back(c);
    c.causal = true, c.name = name(c, "");
    v.push_back(c);
  }
  for (int d : {64, 128, 256})
    for (int causal = 0; causal < 2; ++causal) {
      Case c;
      c.D = d, c.sq = 513, c.sk = 513, c.causal = causal, c.H = 1, c.Hk = 1;
      c.name = name(c, "");
      v.push_back(c);
      c.bf16 = false, c.name = name(c, "");
      v.push_back(c);
    }
  for (int d : {64, 128}) {
    Case c;
    c.D = d, c.sq = 200, c.sk = 200;
    c.wl = 32, c.wr = 0, c.name = name(c, " window(32,0)");
    v.push_back(c);
    c.sq = 97, c.wl = 32, c.wr = 8, c.name = name(c, " window(32,8)");
    v.push_back(c);
    c = Case();
    c.D = d, c.sq = 200, c.sk = 200, c.softcap = 30.f, c.name = name(c, " softcap30");
    v.push_back(c);
    c.causal = true, c.name = name(c, " softcap30");
    v.push_back(c);
    c = Case();
    c.D = d, c.sq = 200, c.sk = 200, c.alibi = true, c.name = name(c, " alibi");
    v.push_back(c);
    c.causal = true, c.sq = 128, c.name = name(c, " alibi");
    v.push_back(c);
    c = Case();
    c.D = d, c.sq = 200, c.sk = 200, c.H = 6, c.Hk = 2, c.name = name(c, " gqa");
    v.push_back(c);
    c.causal = true, c.name = name(c, " gqa");
    v.push_back(c);
    c = Case();
    c.D = d, c.B = 3, c.sq = 200, c.sk = 513, c.varlen = true, c.name = name(c, " varlen3");
    v.push_back(c);
    c.causal = true, c.name = name(c, " varlen3");
    v.push_back(c);
    c.sq = 513, c.sk = 97, c.name = name(c, " varlen3");
    v.push_back(c);
    c = Case();
    c.D = d, c.sq = 200, c.sk = 200, c.dropout = 0.17f, c.name = name(c, " dropout0.17");
    v.push_back(c);
    c.causal = true, c.H = 6, c.Hk = 2, c.sk = 513, c.name = name(c, " dropout0.17 gqa");
    v.push_back(c);
    c = Case();
    c.D = d, c.sq = 200, c.sk = 513, c.deterministic = true, c.name = name(c, " deterministic");
    v.push_back(c);
  }
  for (int d : {40, 128}) {  // strided rows (row stride H * D + 24): strides are honoured, padding untouched
    Case c;
    c.D = d, c.sq = 200, c.sk = 97, c.H = 4, c.Hk = 2, c.pad = 24, c.name = name(c, " strided");
    v.push_back(c);
    c.B = 3, c.varlen = true, c.causal = true, c.sk = 200, c.name = name(c, " strided varlen3");
    v.push_back(c);
  }
  // The Hopper forward's grid (forward only: its float64 reference at 2048 x 2048 is the costly part):
  // both dtypes and head dims, causal or not, full and partial tiles, seqlen_q != seqlen_k both ways
  // (causal rows that see no key), GQA 8:2, batch 2.
  const int hopper_lens[][2] = {{1, 1},      {97, 97},    {128, 128}, {1025, 1025}, {2048, 2048}, {1, 2048},
                                {2048, 1},   {97, 1025},  {1025, 97}, {128, 2048},  {2048, 97}};
  for (int d : {64, 128})
    for (int bf16 = 1; bf16 >= 0; --bf16)
      for (int causal = 0; causal < 2; ++causal)
        for (auto& l : hopper_lens) {
          Case c;
          c.D = d, c.bf16 = bf16, c.causal = causal, c.sq = l[0], c.sk = l[1], c.H = 8, c.Hk = 2, c.fwd_only = true;
          c.name = name(c, " grid");
          v.push_back(c);
        }
  // The default kernels at long lengths, where the rules change with the length: the forward's persistent192_snake
  // (d64 causal from S 8192) and persistent_expturn (d128), forward only, and the backward's dqfirst (d128 causal from
  // S 8192, bwd_variant); partial last tiles, seqlen_q != seqlen_k.
  struct LongCase {
    int d, causal, sq, sk, H, Hk;
    bool bwd;
  };
  for (const LongCase& l : {LongCase{64, 1, 8200, 8200, 1, 1, false}, LongCase{128, 0, 4100, 4200, 2, 1, false},
                            LongCase{128, 1, 8192, 8250, 1, 1, true}, LongCase{128, 1, 16384, 16500, 1, 1, false}}) {
    Case c;
    c.B = 1, c.D = l.d, c.causal = l.causal, c.sq = l.sq, c.sk = l.sk, c.H = l.H, c.Hk = l.Hk, c.fwd_only = !l.bwd;
    c.name = name(c, " long");
    v.push_back(c);
  }
  // Two forwards of the same inputs on two streams, the second launched first (Case::overtaken): GQA, causal, several
  // tiles a CTA at both head dims.
  for (int d : {64, 128}) {
    Case c;
    c.B = 2, c.D = d, c.causal = true, c.sq = 1025, c.sk = 1100, c.H = 8, c.Hk = 2, c.fwd_only = true;
    c.overtaken = true;
    c.name = name(c, " overtaken");
    v.push_back(c);
  }
  // The persistent forwards' grid (forward only): several tiles a CTA with seqlen_q != seqlen_k both
  // ways, 4 x 12 heads, GQA 3:1, partial tiles at both ends. 700 x 500: 288 tiles of 128 rows (a
  // whole round of units of two on 132 CTAs, then a third tile on some: a Q buffer used twice); causal,
  // query block 0 sees no key (a tile without keys beside tiles with keys) and rows 128-199 of block 1
  // none either (fully masked rows in a tile with keys); 500 x 700: 192 tiles. Under persistent2 a tile's last P V and the next tile's first S share a turn exactly where
  // two tiles with keys follow each other on a CTA.
  for (auto& l : {std::pair<int, int>{700, 500}, std::pair<int, int>{500, 700}})
    for (int d : {64, 128})
      for (int causal = 0; causal < 2; ++causal) {
        Case c;
        c.D = d, c.causal = causal, c.B = 4, c.sq = l.first, c.sk = l.second, c.H = 12, c.Hk = 4, c.fwd_only = true;
        c.name = name(c, " pgrid");
        v.push_back(c);
      }
  // The Hopper backward's grid (forward and backward): a single tile first (bwd-probe: which of dV,
  // dK, dQ is off says which stage is, see flash/hopper/NOTES.md), then partial tiles, seqlen_q !=
  // seqlen_k both ways (causal rows that see no key, key blocks no query sees), several query blocks
  // per key block and several key blocks per query block; MHA and GQA 4:2 (the float32 dK/dV path);
  // 256 key-block tiles (130 x 2048, 8 heads, batch 2): more than an H200 has SMs, so that the
  // persistent backward's CTAs run several tiles each.
  struct BwdLen {
    int sq, sk, H, Hk;
    const char* tag;
  };
  const BwdLen bwd_lens[] = {{64, 64, 1, 1, " bwd-probe"}, {1, 1, 2, 2, " bgrid"},       {300, 300, 2, 2, " bgrid"},
                             {1025, 1025, 2, 2, " bgrid"}, {97, 1025, 4, 2, " bgrid"},    {1025, 97, 4, 2, " bgrid"},
                             {384, 200, 4, 2, " bgrid"},   {200, 640, 2, 2, " bgrid"},    {130, 2048, 8, 2, " bgrid"}};
  for (const BwdLen& l : bwd_lens)
    for (int d : {64, 128})
      for (int bf16 = 1; bf16 >= 0; --bf16)
        for (int causal = 0; causal < 2; ++causal) {
          Case c;
          c.D = d, c.bf16 = bf16, c.causal = causal, c.sq = l.sq, c.sk = l.sk, c.H = l.H, c.Hk = l.Hk;
          if (l.sq == 64) c.B = 1;
          c.name = name(c, l.tag);
          v.push_back(c);
        }
  // Dropout on the Hopper kernels (on sm_80's under FLASHATTN_HOPPER_DROPOUT=0): no mask asked
  // for, so that the forward takes them too, its decisions checked through the outputs against the
  // stream's; both dtypes and head dims, causal or not, partial tiles, seqlen_q != seqlen_k both ways
  // (causal rows that see no key), GQA; then GPT-2's rate on 5 x 21 heads (several tiles a CTA of the
  // persistent grids; under FLASHATTN_HOPPER_FWD_VARIANT=persistent2 a tile's first decisions are made
  // behind its S issued in the tile before). The masked cases above run the sm_80 forward and, without the switch, the Hopper
  // backward on its mask: both paths' decisions in one case.
  const int drop_lens[][4] = {{200, 200, 2, 2}, {97, 1025, 4, 2}, {1025, 300, 4, 2}};  // sq, sk, H, Hk
  for (auto& l : drop_lens)
    for (int d : {64, 128})
      for (int bf16 = 1; bf16 >= 0; --bf16)
        for (int causal = 0; causal < 2; ++causal) {
          Case c;
          c.D = d, c.bf16 = bf16, c.causal = causal, c.sq = l[0], c.sk = l[1], c.H = l[2], c.Hk = l[3];
          c.dropout = 0.17f, c.dropout_mask = false;
          c.name = name(c, " dropout0.17 hdrop");
          v.push_back(c);
        }
  for (int d : {64, 128})
    for (int causal = 0; causal < 2; ++causal) {
      Case c;
      c.D = d, c.causal = causal, c.B = 5, c.sq = 300, c.sk = 300, c.H = 21, c.Hk = 7;
      c.dropout = 0.1f, c.dropout_mask = false;
      c.name = name(c, " dropout0.1 hdrop b5");
      v.push_back(c);
    }
  // An odd count of (batch, head)s, 5 x 21 (the persistent grids' last head pairs its own two ends, see
  // persistent_unit), GQA 3:1, 315 tiles (query or key blocks of 128) in both directions: a whole round
  // of 2 x 132 tiles and a partial one; at d64 without a mask 210 forward tiles of 192 rows.
  for (int d : {64, 128})
    for (int causal = 0; causal < 2; ++causal) {
      Case c;
      c.D = d, c.causal = causal, c.B = 5, c.sq = 300, c.sk = 300, c.H = 21, c.Hk = 7;
      c.name = name(c, " bgrid b5");
      v.push_back(c);
    }
  {
    Case c;
    c.D = 256, c.sq = 200, c.sk = 200, c.H = 6, c.Hk = 2, c.causal = true, c.softcap = 30.f, c.alibi = true;
    c.name = name(c, " gqa softcap alibi");
    v.push_back(c);
    c = Case();
    c.D = 192, c.B = 3, c.sq = 200, c.sk = 200, c.varlen = true, c.wl = 20, c.wr = 5, c.bf16 = false;
    c.name = name(c, " varlen3 window(20,5)");
    v.push_back(c);
  }
  return v;
}

// ---- benchmark ----
// Median of 10 timed calls after 3 warm-ups, on random bf16 inputs (q, k, v and dout distinct), in this
// process, under the environment's FLASHATTN_HOPPER / FLASHATTN_HOPPER_FWD_VARIANT: one line per
// configuration, "bench bf16 B=.. H=.. S=.. D=.. causal=..: fwd [path] ms TFLOP/s" and, with with_bwd,
// "| bwd ms TFLOP/s"; under 0.3 ms a forward, then "| queued: fwd ms [bwd ms]" (20 calls back to back, per call).
struct BenchConfig {
  int B, H, S, D, causal;
};
// hidden 1024 / 2048 at 16k tokens, causal or not; and the GPT-2 training shape
constexpr BenchConfig kBenchConfigs[] = {{4, 16, 4096, 64, 0},  {4, 16, 4096, 64, 1}, {4, 16, 4096, 128, 0},
                                         {4, 16, 4096, 128, 1}, {16, 12, 1024, 64, 1}};
// The shapes of ../shared/peers/pytorch_baselines.py attn (16k tokens, hidden 2048: B = 16384 / S, H = 2048 / D;
// issue 17's bar is S >= 2048, S 512 the peer's short row), and GPT-2's training shape.
constexpr BenchConfig kPeerConfigs[] = {
    {32, 32, 512, 64, 0},   {8, 32, 2048, 64, 0},   {2, 32, 8192, 64, 0},  {1, 32, 16384, 64, 0},
    {32, 32, 512, 64, 1},   {8, 32, 2048, 64, 1},   {2, 32, 8192, 64, 1},  {1, 32, 16384, 64, 1},
    {32, 16, 512, 128, 0},  {8, 16, 2048, 128, 0},  {2, 16, 8192, 128, 0}, {1, 16, 16384, 128, 0},
    {32, 16, 512, 128, 1},  {8, 16, 2048, 128, 1},  {2, 16, 8192, 128, 1}, {1, 16, 16384, 128, 1},
    {16, 12, 1024, 64, 1}};
// --bench-peer's second pass: d128 causal at S 8192 again and beside it the same 2048 tiles of 64 query
// blocks as B 1 H 32, half of them (B 2 H 8), and 32 blocks a head (B 4 H 16 S 4096), then S 16384 again.
// The persistent schedulers' balance differs between these (tests/persistent_schedule_sim.py); the
// repeated rows are the noise.
constexpr BenchConfig kPeerRecheckConfigs[] = {
    {2, 16, 8192, 128, 1}, {1, 32, 8192, 128, 1}, {2, 8, 8192, 128, 1}, {4, 16, 4096, 128, 1}, {1, 16, 16384, 128, 1}};

// One bench shape's buffers (bf16, BSHD, seqlen_q = seqlen_k) and its forward and backward calls at the defaults.
// Inputs: four rotations of one normal draw (random), or zeros (--path-of, which only reads the paths).
struct BenchCalls {
  int B, H, S, D, causal;
  size_t n;
  void *q, *k, *v, *o, *dout, *dq, *dk, *dv, *ws;
  float* lse;
  int64_t wsb;
  BenchCalls(int B_, int H_, int S_, int D_, int causal_, bool random)
      : B(B_), H(H_), S(S_), D(D_), causal(causal_), n(size_t(B_) * S_ * H_ * D_) {
    for (void** p : {&q, &k, &v, &o, &dout, &dq, &dk, &dv}) {
      CK(cudaMalloc(p, n * 2));
      CK(cudaMemset(*p, 0, n * 2));
    }
    CK(cudaMalloc(&lse, size_t(B) * H * S * 4));
    wsb = FlashAttn_flash_bwd_workspace_size(B, S, S, H, H, D, 0);
    CK(cudaMalloc(&ws, wsb));
    if (!random) return;
    std::vector<uint16_t> h(n);
    Rng gen(1);
    for (auto& x : h) x = to_bits(gen.normal(), true);
    // distinct inputs from one draw: each tensor the draw rotated by a different amount
    auto upload = [&](void* dst, size_t shift) {
      CK(cudaMemcpy(dst, h.data() + shift, (n - shift) * 2, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(static_cast<uint16_t*>(dst) + (n - shift), h.data(), shift * 2, cudaMemcpyHostToDevice));
    };
    upload(q, 0), upload(k, n / 3), upload(v, 2 * (n / 3)), upload(dout, n / 2);
  }
  ~BenchCalls() {
    for (void* p : {q, k, v, o, dout, dq, dk, dv, ws, static_cast<void*>(lse)}) CK(cudaFree(p));
  }
  FlashAttnStatus fwd() const {
    const int64_t bs = int64_t(S) * H * D, rs = H * D;
    return FlashAttn_flash_fwd(q, k, v, o, lse, FLASHATTN_DTYPE_BFLOAT16, nullptr, nullptr, B, S, S, H, H, D, bs, rs,
                               D, bs, rs, D, bs, rs, D, bs, rs, D, scale(), -1, causal ? 0 : -1, 0.f, nullptr, 0, 0.f,
                               0, 0, nullptr, nullptr, 0, nullptr);
  }
  FlashAttnStatus bwd() const {
    const int64_t bs = int64_t(S) * H * D, rs = H * D;
    return FlashAttn_flash_bwd(dout, q, k, v, o, lse, dq, dk, dv, FLASHATTN_DTYPE_BFLOAT16, nullptr, nullptr, B, S, S,
                               H, H, D, bs, rs, D, bs, rs, D, bs, rs, D, bs, rs, D, bs, rs, D, bs, rs, D, bs, rs, D,
                               bs, rs, D, scale(), -1, causal ? 0 : -1, 0.f, nullptr, 0, 0.f, 0, 0, 0, ws, wsb,
                               nullptr);
  }
  float scale() const { return 1.f / std::sqrt(float(D)); }
};

// This executable's path, for the child processes of --bench and of bench_here.
std::string self_path() {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return "";
  self[n] = 0;
  return self;
}

// The forward's and the backward's path at one bench shape, from a child process (--path-of): the library reads
// FLASHATTN_LOG_PATH once per process, so logging the first call in the timing process would log every timed call
// too (a write to stderr inside each "a call" timing). Out: "hopper overlap", "hopper", "sm80", or "?".
std::pair<std::string, std::string> paths_in_child(int B, int H, int S, int D, int causal, bool with_bwd) {
  std::pair<std::string, std::string> paths{"?", "?"};
  const std::string cmd = "'" + self_path() + "' --path-of " + std::to_string(B) + " " + std::to_string(H) + " " +
                          std::to_string(S) + " " + std::to_string(D) + " " + std::to_string(causal) +
                          (with_bwd ? " bwd" : "");
  FILE* child = popen(cmd.c_str(), "r");
  if (child == nullptr) return paths;
  char buf[256];
  while (std::fgets(buf, sizeof buf, child) != nullptr) {
    std::string line(buf);
    while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
    if (line.rfind("fwd ", 0) == 0) paths.first = line.substr(4);
    if (line.rfind("bwd ", 0) == 0) paths.second = line.substr(4);
  }
  pclose(child);
  return paths;
}

// --path-of B H S D causal [bwd]: one forward (and backward) call at a bench shape on zeroed inputs, with
// FLASHATTN_LOG_PATH=1; prints "fwd <path>[ <kernel>]" and "bwd <path>".
int path_of(int B, int H, int S, int D, int causal, bool with_bwd) {
  setenv("FLASHATTN_LOG_PATH", "1", 1);
  const BenchCalls calls(B, H, S, D, causal, false);
  PathCapture capture;
  capture.begin();
  FlashAttnStatus st = calls.fwd();
  const std::string fwd_path = capture.end();
  if (st != FLASHATTN_STATUS_OK) return 3;
  std::printf("fwd %s%s%s\n", fwd_path.c_str(), capture.kernel.empty() ? "" : " ", capture.kernel.c_str());
  if (with_bwd) {
    PathCapture bwd_capture;
    bwd_capture.begin();
    st = calls.bwd();
    const std::string bwd_path = bwd_capture.end();
    if (st != FLASHATTN_STATUS_OK) return 3;
    std::printf("bwd %s\n", bwd_path.c_str());
  }
  CK(cudaDeviceSynchronize());
  return 0;
}

template <size_t N>
void bench_here(const BenchConfig (&configs)[N], int only_d, int only_causal, bool with_bwd, int only_s = 0) {
  for (const BenchConfig& cfg : configs) {
    const int B = cfg.B, H = cfg.H, S = cfg.S, D = cfg.D, causal = cfg.causal;
    if ((only_d > 0 && D != only_d) || (only_causal >= 0 && causal != only_causal) || (only_s > 0 && S != only_s))
      continue;
    const BenchCalls calls(B, H, S, D, causal, true);
    auto fwd = [&] { return calls.fwd(); };
    auto bwd = [&] { return calls.bwd(); };
    // Events around `calls` calls after a synchronisation, per call: one call includes its dispatch while the GPU
    // waits (microseconds; PyTorch's peer times the same way); 20 queued back to back hide it, as training does.
    auto time_it = [&](auto fn, int calls = 1) {
      cudaEvent_t a, b;
      CK(cudaEventCreate(&a));
      CK(cudaEventCreate(&b));
      std::vector<float> ms;
      for (int it = 0; it < 13; ++it) {
        CK(cudaEventRecord(a));
        for (int c = 0; c < calls; ++c) {
          if (fn() != FLASHATTN_STATUS_OK) {
            std::printf("bench call failed: %s\n", FlashAttn_core_last_error());
            std::exit(3);
          }
        }
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float t;
        CK(cudaEventElapsedTime(&t, a, b));
        if (it >= 3) ms.push_back(t / calls);
      }
      CK(cudaEventDestroy(a));
      CK(cudaEventDestroy(b));
      std::sort(ms.begin(), ms.end());
      return double(ms[ms.size() / 2]);
    };
    // The paths the forward and backward take (a child process's calls), then their median times.
    const auto paths = paths_in_child(B, H, S, D, causal, with_bwd);
    const double tf = time_it(fwd);
    const double flops = 4.0 * B * H * double(S) * S * D * (causal ? 0.5 : 1.0);
    std::printf("bench bf16 B=%d H=%d S=%d D=%d causal=%d: fwd [%s] %.3f ms %.1f TFLOP/s", B, H, S, D, causal,
                paths.first.c_str(), tf, flops / tf * 1e-9);
    if (with_bwd) {
      const double tb = time_it(bwd);
      std::printf(" | bwd %.3f ms %.1f TFLOP/s [%s]", tb, 2.5 * flops / tb * 1e-9, paths.second.c_str());
    }
    if (tf < 0.3) {  // where a call's dispatch is a visible share of it: the queued figures too
      std::printf(" | queued: fwd %.3f ms", time_it(fwd, 20));
      if (with_bwd) std::printf(" bwd %.3f ms", time_it(bwd, 20));
    }
    std::printf("\n");
    std::fflush(stdout);
  }
}

// Each setting in a child process (bench_here); their lines are printed as they come, tagged with
// the setting, then a table: forward TFLOP/s per forward setting, the best Hopper variant over sm_80,
// then backward TFLOP/s per backward setting (each Hopper backward variant, and sm_80's).
int bench(const char* self, int only_d, int only_causal) {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  int clock_khz = 0;
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  std::printf("device %s, %d SMs, max SM clock %d MHz; %s\n", prop.name, prop.multiProcessorCount, clock_khz / 1000,
              FlashAttn_core_build_info());
  std::fflush(stdout);
  struct Setting {
    const char* name;
    const char* env;
    bool fwd, bwd;  // which of its timings go in the table
  };
  // The backward variants' children run the default forward (timed, not tabled); sm_80's child times
  // both directions.
  const Setting settings[] = {{"pingpong", "FLASHATTN_HOPPER_FWD_VARIANT=pingpong", true, false},
                              {"overlap", "FLASHATTN_HOPPER_FWD_VARIANT=overlap", true, false},
                              {"rows192", "FLASHATTN_HOPPER_FWD_VARIANT=rows192", true, false},
                              {"persist", "FLASHATTN_HOPPER_FWD_VARIANT=persistent", true, false},
                              {"pers192", "FLASHATTN_HOPPER_FWD_VARIANT=persistent192", true, false},
                              {"persist2", "FLASHATTN_HOPPER_FWD_VARIANT=persistent2", true, false},
                              {"pers_ov", "FLASHATTN_HOPPER_FWD_VARIANT=persistent_overlap", true, false},
                              {"pers_xt", "FLASHATTN_HOPPER_FWD_VARIANT=persistent_expturn", true, false},
                              {"p192snk", "FLASHATTN_HOPPER_FWD_VARIANT=persistent192_snake", true, false},
                              {"sm80", "FLASHATTN_HOPPER=0", true, true},
                              {"b:atomic", "FLASHATTN_HOPPER_BWD_VARIANT=atomic", false, true},
                              {"b:dqtma", "FLASHATTN_HOPPER_BWD_VARIANT=dqtma", false, true},
                              {"b:dqfirst", "FLASHATTN_HOPPER_BWD_VARIANT=dqfirst", false, true},
                              {"b:persist", "FLASHATTN_HOPPER_BWD_VARIANT=persistent", false, true}};
  constexpr int kSettings = sizeof(settings) / sizeof(settings[0]);
  constexpr int kConfigs = sizeof(kBenchConfigs) / sizeof(kBenchConfigs[0]);
  double fwd_tflops[kConfigs][kSettings] = {}, bwd_tflops[kConfigs][kSettings] = {};
  int rc = 0;
  for (int si = 0; si < kSettings; ++si) {
    const Setting& st = settings[si];
    const std::string cmd = std::string(st.env) + " '" + self + "' --bench-here " + std::to_string(only_d) + " " +
                            std::to_string(only_causal) + (st.bwd ? " bwd" : "");
    FILE* child = popen(cmd.c_str(), "r");
    if (child == nullptr) return 4;
    char buf[512];
    while (std::fgets(buf, sizeof buf, child) != nullptr) {
      int B, H, S, D, causal, used = 0;
      char path[32];
      double ms, tflops;
      if (std::sscanf(buf, "bench bf16 B=%d H=%d S=%d D=%d causal=%d: fwd [%31[^]]] %lf ms %lf TFLOP/s%n", &B, &H, &S,
                      &D, &causal, path, &ms, &tflops, &used) < 8) {
        std::fputs(buf, stdout);
        continue;
      }
      std::printf("bench %s: %s", st.name, buf + 6);
      for (int c = 0; c < kConfigs; ++c) {
        const BenchConfig& k = kBenchConfigs[c];
        if (k.B != B || k.H != H || k.S != S || k.D != D || k.causal != causal) continue;
        fwd_tflops[c][si] = tflops;
        double bwd_ms, bwd_tf;
        if (std::sscanf(buf + used, " | bwd %lf ms %lf", &bwd_ms, &bwd_tf) == 2) bwd_tflops[c][si] = bwd_tf;
      }
    }
    std::fflush(stdout);
    const int status = pclose(child);
    if (status != 0) {
      std::printf("%s: exit status %d\n", cmd.c_str(), status);
      rc = 5;
    }
  }
  std::printf("%-26s", "# bf16 TFLOP/s");
  for (const Setting& st : settings)
    if (st.fwd) std::printf("  %8s", st.name);
  std::printf("  %7s |", "best/80");
  for (const Setting& st : settings)
    if (st.bwd) std::printf("  %9s", st.name);
  std::printf("  (| backward)\n");
  for (int c = 0; c < kConfigs; ++c) {
    const BenchConfig& k = kBenchConfigs[c];
    if ((only_d > 0 && k.D != only_d) || (only_causal >= 0 && k.causal != only_causal)) continue;
    std::printf("B%-2d S%-5d H%-2d d%-3d %-6s ", k.B, k.S, k.H, k.D, k.causal ? "causal" : "full");
    double best = 0, sm80 = 0;
    for (int si = 0; si < kSettings; ++si) {
      if (!settings[si].fwd) continue;
      std::printf("  %8.1f", fwd_tflops[c][si]);
      if (std::strcmp(settings[si].name, "sm80") == 0)
        sm80 = fwd_tflops[c][si];
      else
        best = std::max(best, fwd_tflops[c][si]);
    }
    std::printf("  %6.2fx |", sm80 > 0 ? best / sm80 : 0.0);
    for (int si = 0; si < kSettings; ++si)
      if (settings[si].bwd) std::printf("  %9.1f", bwd_tflops[c][si]);
    std::printf("\n");
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--bench-peer") {
    // --bench-peer: both directions at the PyTorch peer's shapes, default variants, in this process.
    bench_here(kPeerConfigs, 0, -1, true);
    std::printf("# second pass: d128 causal at S 8192 and its neighbours\n");
    bench_here(kPeerRecheckConfigs, 0, -1, true);
    return 0;
  }
  if (argc > 6 && std::string(argv[1]) == "--path-of")
    return path_of(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]), std::atoi(argv[6]),
                   argc > 7 && std::string(argv[7]) == "bwd");
  if (argc > 1 && (std::string(argv[1]) == "--bench-peer-fwd" || std::string(argv[1]) == "--bench-peer-bwd")) {
    bench_here(kPeerConfigs, argc > 2 ? std::atoi(argv[2]) : 0, argc > 3 ? std::atoi(argv[3]) : -1,
               std::string(argv[1]) == "--bench-peer-bwd", argc > 4 ? std::atoi(argv[4]) : 0);
    return 0;
  }
  if (argc > 1 && (std::string(argv[1]) == "--bench-here" || std::string(argv[1]) == "--bench-bwd")) {
    // --bench-here D causal [bwd]: D 0 = every head dim, causal -1 = both; --bench-bwd [D [causal]]: with the backward.
    const bool bwd = std::string(argv[1]) == "--bench-bwd" || (argc > 4 && std::string(argv[4]) == "bwd");
    bench_here(kBenchConfigs, argc > 2 ? std::atoi(argv[2]) : 0, argc > 3 ? std::atoi(argv[3]) : -1, bwd);
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "--bench") {
    // --bench [D [causal]]: every configuration, or those of one head dim / causality.
    const std::string self = self_path();
    if (self.empty()) return 4;
    return bench(self.c_str(), argc > 2 ? std::atoi(argv[2]) : 0, argc > 3 ? std::atoi(argv[3]) : -1);
  }
  setenv("FLASHATTN_LOG_PATH", "1", 1);  // each case reads back which forward and backward ran (PathCapture)
  std::string filter = argc > 1 ? argv[1] : "";
  int passed = 0, failed = 0;
  for (const Case& c : cases()) {
    bool match = true;
    for (size_t from = 0; match && from <= filter.size();) {
      const size_t amp = std::min(filter.find('&', from), filter.size());
      match = c.name.find(filter.substr(from, amp - from)) != std::string::npos;
      from = amp + 1;
    }
    if (!match) continue;
    (run_case(c, false) ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
