// hopper_probe: the Hopper forward's building blocks (src/flash/hopper/sm90.cuh, tensor_map.h) checked
// one at a time on an sm_90 device, so that a forward that fails says which layout assumption broke.
// For bf16 and fp16, head dims 64 and 128:
//   tma  Q-like boxes (D x 128 rows of a tensor 100 rows long) land in shared memory as the 128-byte
//        swizzle the kernel's descriptors assume (64-column chunks 16 KB apart, row r at 128 r, the
//        16-byte unit u at u ^ (r % 8)), rows 100..127 as zeros, and the mbarrier completes with the
//        whole boxes' bytes (a wait that never ends is reported, not hung on);
//   qk   S = Q K^T by wgmma, both operands K-major with the kernel's descriptors and k16 steps, Q rows
//        64..127 (the second consumer warpgroup's start) against K 97 rows long, read back through
//        the accumulator layout;
//   pv   O = P V by wgmma, P in registers through the A-fragment layout, V MN-major with the kernel's
//        (leading, stride) byte offsets (16 KB, 1 KB); and again swapped (1 KB, 16 KB), printed as
//        INFO: if only the swapped one matched, the kernel's V descriptor would be the thing to swap.
//   flash_selftest exercises the whole kernel; this isolates its parts.
// Exit code 0 when every PASS/FAIL line passed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "flash/hopper/kernel_traits.h"
#include "flash/hopper/sm90.cuh"
#include "flash/hopper/tensor_map.h"
#include "test_common.h"


using namespace flashattn::flash::hopper;

namespace {

constexpr int kQRows = 100, kKRows = 97, kVRows = 128;  // tensor lengths; every box is 128 rows

// Shared memory from a 1024-byte aligned base: Q, K, V tiles, then the mbarrier. The V region spans
// what the swapped V descriptor reads too: its 16 KB stride puts the second 8-key group of each k16
// step 16 KB past the first, up to 31 KB into V, past a d64 tile (16 KB): allocated, or the probe
// itself reads outside its shared memory (an illegal address).
template <typename Tr>
struct ProbeSmem {
  static constexpr int kVSpan = 2 * Tr::kChunkBytes > Tr::kTileBytes ? 2 * Tr::kChunkBytes : Tr::kTileBytes;
  static constexpr int kOffBar = 2 * Tr::kTileBytes + kVSpan;
  static constexpr int kBytes = kOffBar + 8 + 1024;  // + 1024: the kernel rounds the base up
};

template <typename T, int D>
__global__ void __launch_bounds__(128) probe_kernel(const __grid_constant__ CUtensorMap tm_q,
                                                    const __grid_constant__ CUtensorMap tm_k,
                                                    const __grid_constant__ CUtensorMap tm_v, const T* p_in,
                                                    uint4* raw_q, float* s_out, float* o_out, int* timed_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = FwdTraits<D, T>;
  constexpr int kChunkBytes = Tr::kChunkBytes, kTileBytes = Tr::kTileBytes;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const unsigned char* base_ptr = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sQ = base, sK = base + kTileBytes, sV = base + 2 * kTileBytes, bar = base + ProbeSmem<Tr>::kOffBar;
  if (threadIdx.x == 0) {
    mbar_init(bar, 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(bar, 3 * kTileBytes);
    for (int c = 0; c < Tr::kChunks; ++c) {
      tma_load_4d(sQ + c * kChunkBytes, &tm_q, bar, c * Tr::kBoxCols, 0, 0, 0);
      tma_load_4d(sK + c * kChunkBytes, &tm_k, bar, c * Tr::kBoxCols, 0, 0, 0);
      tma_load_4d(sV + c * kChunkBytes, &tm_v, bar, c * Tr::kBoxCols, 0, 0, 0);
    }
  }
  bool done = false;
  const long long start = clock64();
  while (!done && clock64() - start < (1ll << 32)) done = mbar_try_wait(bar, 0);  // about 2 s
  if (!done) {  // the phase never completed: every thread gets here
    if (threadIdx.x == 0) *timed_out = 1;
    return;
  }
  // tma: the Q tile's bytes as they lie in shared memory
  for (int i = threadIdx.x; i < kTileBytes / 16; i += 128) raw_q[i] = reinterpret_cast<const uint4*>(base_ptr)[i];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // qk
  float s[64];
  for (int i = 0; i < 64; ++i) s[i] = 0.f;
  const uint64_t desc_q = sw128_desc(sQ + 64 * 128, 16, 1024), desc_k = sw128_desc(sK, 16, 1024);
  reg_fence(s);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint32_t off = ((ks / 4) * kChunkBytes + (ks % 4) * 32) >> 4;
    Wgmma<T, 128>::ss(s, desc_q + off, desc_k + off, ks > 0 ? 1u : 0u);
  }
  wgmma_commit();
  wgmma_wait<0>();
  reg_fence(s);
#pragma unroll
  for (int i = 0; i < 64; ++i)
    s_out[(16 * warp + g + 8 * ((i / 2) % 2)) * 128 + 8 * (i / 4) + 2 * t + i % 2] = s[i];

  // pv: P (64 x 128, row-major) into A fragments: register q of k16 step kk holds row
  // 16 w + g + 8 (q % 2), columns 16 kk + 2 t + 8 (q / 2) .. +1
  uint32_t pk[32];
#pragma unroll
  for (int q = 0; q < 32; ++q) {
    const int kk = q / 4, r = q % 4;
    const int row = 16 * warp + g + 8 * (r % 2), col = 16 * kk + 2 * t + 8 * (r / 2);
    pk[q] = *reinterpret_cast<const uint32_t*>(p_in + row * 128 + col);
  }
#pragma unroll
  for (int variant = 0; variant < 2; ++variant) {
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    const uint64_t desc_v = variant == 0 ? sw128_desc(sV, kChunkBytes, 1024) : sw128_desc(sV, 1024, kChunkBytes);
    reg_fence(pk);
    reg_fence(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
      Wgmma<T, D>::rs(o, pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3], desc_v + ((kk * 16 * 128) >> 4));
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(o);
    reg_fence(pk);
#pragma unroll
    for (int i = 0; i < D / 2; ++i)
      o_out[variant * 64 * D + (16 * warp + g + 8 * ((i / 2) % 2)) * D + 8 * (i / 4) + 2 * t + i % 2] = o[i];
  }
#endif
}

using test::from_bits;
using test::to_bits;

// |got - want|, with NaN (the poison: an element never written) as +inf
double abs_err(float got, double want) { return std::isnan(got) ? INFINITY : std::fabs(double(got) - want); }

int failures = 0;
void report(bool ok, const char* what, const char* name, double err, double tol) {
  std::printf("%s %-4s %-12s max err %.3g (tolerance %.3g)\n", ok ? "PASS" : "FAIL", what, name, err, tol);
  failures += ok ? 0 : 1;
}

template <typename T, int D>
void probe(bool bf16) {
  using Tr = FwdTraits<D, T>;
  char name[32];
  std::snprintf(name, sizeof name, "%s d%d", bf16 ? "bf16" : "fp16", D);
  uint64_t state = 0x9E3779B97F4A7C15ULL * (D + (bf16 ? 1 : 2));
  auto uniform = [&] {
    state ^= state >> 12, state ^= state << 25, state ^= state >> 27;
    return double((state * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
  };
  auto fill = [&](int n, double lo, double hi) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = to_bits(float(lo + (hi - lo) * uniform()), bf16);
    return v;
  };
  const std::vector<uint16_t> q = fill(kQRows * D, -2, 2), k = fill(kKRows * D, -2, 2), v = fill(kVRows * D, -2, 2),
                              p = fill(64 * 128, 0, 1);
  void *dq, *dk, *dv, *dp, *raw;
  float *ds, *dout;
  int* dtimeout;
  CK(cudaMalloc(&dq, q.size() * 2));
  CK(cudaMalloc(&dk, k.size() * 2));
  CK(cudaMalloc(&dv, v.size() * 2));
  CK(cudaMalloc(&dp, p.size() * 2));
  CK(cudaMalloc(&raw, Tr::kTileBytes));
  CK(cudaMalloc(&ds, 64 * 128 * 4));
  CK(cudaMalloc(&dout, 2 * 64 * D * 4));
  CK(cudaMalloc(&dtimeout, 4));
  CK(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dp, p.data(), p.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemset(raw, 0xff, Tr::kTileBytes));  // poisoned: unwritten bytes show up
  CK(cudaMemset(ds, 0xff, 64 * 128 * 4));
  CK(cudaMemset(dout, 0xff, 2 * 64 * D * 4));
  CK(cudaMemset(dtimeout, 0, 4));

  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) {
    std::printf("FAIL tma  %-12s cuTensorMapEncodeTiled not found in the driver\n", name);
    ++failures;
    return;
  }
  const FlashAttnDType dt = bf16 ? FLASHATTN_DTYPE_BFLOAT16 : FLASHATTN_DTYPE_FLOAT16;
  CUtensorMap mq, mk, mv;
  // (B = 1, rows, H = 1, D), contiguous
  if (!encode_bshd(fn, &mq, dt, dq, D, kQRows, 1, 1, D, D, int64_t(kQRows) * D, Tr::kBoxCols, Tr::kBoxRows) ||
      !encode_bshd(fn, &mk, dt, dk, D, kKRows, 1, 1, D, D, int64_t(kKRows) * D, Tr::kBoxCols, Tr::kBoxRows) ||
      !encode_bshd(fn, &mv, dt, dv, D, kVRows, 1, 1, D, D, int64_t(kVRows) * D, Tr::kBoxCols, Tr::kBoxRows)) {
    std::printf("FAIL tma  %-12s cuTensorMapEncodeTiled refused the maps\n", name);
    ++failures;
    return;
  }
  const int smem = ProbeSmem<Tr>::kBytes;
  auto kernel = probe_kernel<T, D>;
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<1, 128, smem>>>(mq, mk, mv, static_cast<const T*>(dp), static_cast<uint4*>(raw), ds, dout, dtimeout);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  int timed_out = 0;
  CK(cudaMemcpy(&timed_out, dtimeout, 4, cudaMemcpyDeviceToHost));
  if (timed_out) {
    std::printf("FAIL tma  %-12s the mbarrier never completed (expect_tx bytes vs. what the TMA delivered)\n", name);
    ++failures;
    return;
  }
  std::vector<uint16_t> raw_h(Tr::kTileBytes / 2);
  std::vector<float> s_h(64 * 128), o_h(2 * 64 * D);
  CK(cudaMemcpy(raw_h.data(), raw, Tr::kTileBytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(s_h.data(), ds, s_h.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(o_h.data(), dout, o_h.size() * 4, cudaMemcpyDeviceToHost));
  for (void* x : {dq, dk, dv, dp, raw, (void*)ds, (void*)dout, (void*)dtimeout}) CK(cudaFree(x));

  // tma: element (r, col) at byte chunk * 16 KB + 128 r + 16 (u ^ r % 8) + 2 e, col = 64 chunk + 8 u + e
  int bad = 0;
  for (int c = 0; c < Tr::kChunks; ++c)
    for (int r = 0; r < 128; ++r)
      for (int u = 0; u < 8; ++u)
        for (int e = 0; e < 8; ++e) {
          const uint16_t got = raw_h[(c * Tr::kChunkBytes + 128 * r + 16 * (u ^ (r % 8)) + 2 * e) / 2];
          const uint16_t want = r < kQRows ? q[r * D + 64 * c + 8 * u + e] : 0;
          bad += got != want;
        }
  report(bad == 0, "tma", name, bad, 0);

  auto qv = [&](int r, int d) { return r < kQRows ? double(from_bits(q[r * D + d], bf16)) : 0.0; };
  auto kv = [&](int r, int d) { return r < kKRows ? double(from_bits(k[r * D + d], bf16)) : 0.0; };
  double err = 0, scale = 0;
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 128; ++j) {
      double ref = 0, mag = 0;
      for (int d = 0; d < D; ++d) {
        ref += qv(64 + i, d) * kv(j, d);
        mag += std::fabs(qv(64 + i, d) * kv(j, d));
      }
      err = std::max(err, abs_err(s_h[i * 128 + j], ref));
      scale = std::max(scale, mag);
    }
  // f32 accumulation of exact products: a few ulps of the sum of magnitudes
  report(err <= 1e-5 * scale, "qk", name, err, 1e-5 * scale);

  for (int variant = 0; variant < 2; ++variant) {
    err = 0, scale = 0;
    for (int i = 0; i < 64; ++i)
      for (int d = 0; d < D; ++d) {
        double ref = 0, mag = 0;
        for (int j = 0; j < 128; ++j) {
          const double x = double(from_bits(p[i * 128 + j], bf16)) * from_bits(v[j * D + d], bf16);
          ref += x;
          mag += std::fabs(x);
        }
        err = std::max(err, abs_err(o_h[variant * 64 * D + i * D + d], ref));
        scale = std::max(scale, mag);
      }
    if (variant == 0) {
      report(err <= 1e-5 * scale, "pv", name, err, 1e-5 * scale);
    } else {
      std::printf("INFO pv   %-12s V descriptor swapped (leading 1 KB, stride 16 KB): max err %.3g (%s)\n", name, err,
                  err <= 1e-5 * scale ? "MATCHES: swap the kernel's V descriptor" : "differs, as it should");
    }
  }
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
  if (prop.major != 9 || prop.minor != 0) {
    std::printf("FAIL needs an sm_90 device\n");
    return 1;
  }
  probe<__nv_bfloat16, 64>(true);
  probe<__nv_bfloat16, 128>(true);
  probe<__half, 64>(false);
  probe<__half, 128>(false);
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
