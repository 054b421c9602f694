// AdamW over many tensors in a few launches (PyTorch's fused multi-tensor AdamW, plus float32 master weights), with
// the global gradient norm, clipping and the non-finite skip decided on the device, and micro-batch accumulation:
//   norm:       grad (+ grad_sum) -> one partial sum of g^2 per block          (a launch per 80 tensors)
//   finalize:   partials -> grad_norm, found_inf, clip coefficient, skip flag  (one block)
//   update:     grad, grad_sum, master or param, exp_avg, exp_avg_sq -> the same, param, step counts
//   accumulate: grad (+ grad_sum) -> grad_sum
// Each launch carries its tensors as a table in the kernel parameters (as torch's multi_tensor_apply does), so the
// gradients' addresses may change from step to step at no cost. A block walks the chunks blockIdx.x,
// blockIdx.x + gridDim.x, ... of the table's tensors, 8 elements (16 bytes of a 16-bit tensor) per access.
// Memory-bound: per element of a bf16 weight with a float32 master, the step reads grad 2 (norm) + grad 2 + master 4
// + exp_avg 4 + exp_avg_sq 4 and writes master 4 + exp_avg 4 + exp_avg_sq 4 + param 2 bytes: 30 in all.

#include <algorithm>
#include <climits>

#include "common/cuda_check.cuh"
#include "common/device.h"
#include "common/dtype.h"
#include "common/numeric.cuh"
#include "optim/optim.h"

namespace flashattn {

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;                      // elements per thread and access
constexpr int kChunk = kThreads * kVec * 4;  // elements per chunk, a block's unit of work: 8192
constexpr int kMaxBlocks = 2048;             // of the update and accumulate launches when occupancy is unknown
constexpr int kFinalizeThreads = 512;
constexpr uint8_t kAligned = 0x80;           // table-only flag: param and grad 16-byte aligned (vector access)

struct TableEntry {
  void* param;
  const void* grad;
  int64_t offset;
  int64_t numel;
  int32_t step_index;
  uint16_t group;
  uint8_t dtype;
  uint8_t flags;  // FlashAttnOptimTensorFlag bits | kAligned
};

struct Table {
  TableEntry t[kOptimTensorsPerLaunch];
  int32_t chunk_start[kOptimTensorsPerLaunch + 1];  // tensor j covers chunks [chunk_start[j], chunk_start[j + 1])
  int32_t count;
};

struct KernelArgs {
  Table table;
  float* master;
  float* exp_avg;
  float* exp_avg_sq;
  float* grad_sum;  // read by norm and update, written by accumulate
  float* steps;
  const double* group_hparams;
  const float* grad_scale;
  float* partials;       // norm: this launch's kOptimNormBlocks slots
  const float* control;  // update: [clip coefficient, skip] written by finalize
  unsigned* ticket;      // update: blocks done; the last one increments the step counts
};
static_assert(sizeof(KernelArgs) <= 4096, "kernel parameters are limited to 4 KB");

// ----------------------------------------------------------------------------
// CUDA kernels

// kVec elements from element e of p (n elements): one or two 16-byte loads when `vec` (aligned and e + kVec <= n),
// else element by element, 0 past the end.
template <typename T>
__device__ __forceinline__ void load8(const T* p, int64_t e, int64_t n, bool vec, float (&v)[kVec]) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      load_float<T, kVec>(p + e, v);
    } else {
      load_float<T, 4>(p + e, *reinterpret_cast<float(*)[4]>(v));
      load_float<T, 4>(p + e + 4, *reinterpret_cast<float(*)[4]>(v + 4));
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = e + j < n ? to_float(p[e + j]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, int64_t e, int64_t n, bool vec, const float (&v)[kVec]) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      store_float<T, kVec>(p + e, v);
    } else {
      store_float<T, 4>(p + e, *reinterpret_cast<const float(*)[4]>(v));
      store_float<T, 4>(p + e + 4, *reinterpret_cast<const float(*)[4]>(v + 4));
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (e + j < n) p[e + j] = from_float<T>(v[j]);
  }
}

// Calls f(entry, its index, first element) for each kVec-element access of this block: the chunks blockIdx.x,
// blockIdx.x + gridDim.x, ... of the table, in order, each as kChunk / (kThreads * kVec) accesses per thread.
template <typename F>
__device__ __forceinline__ void for_each_access(const Table& tb, F&& f) {
  const int total = tb.chunk_start[tb.count];
  int j = 0;
  for (int c = blockIdx.x; c < total; c += gridDim.x) {
    while (c >= tb.chunk_start[j + 1]) ++j;
    const TableEntry& t = tb.t[j];
    const int64_t base = int64_t(c - tb.chunk_start[j]) * kChunk;
#pragma unroll
    for (int k = 0; k < kChunk / (kThreads * kVec); ++k) {
      const int64_t e = base + (int64_t(k) * kThreads + threadIdx.x) * kVec;
      if (e < t.numel) f(t, j, e);
    }
  }
}

// f(T{}) with T the entry's element type.
template <typename F>
__device__ __forceinline__ void dtype_switch(uint8_t dtype, F&& f) {
  if (dtype == FLASHATTN_DTYPE_BFLOAT16) {
    f(__nv_bfloat16{});
  } else if (dtype == FLASHATTN_DTYPE_FLOAT16) {
    f(__half{});
  } else {
    f(float{});
  }
}

// g = grad (+ grad_sum) of the access at element e, before unscaling.
template <typename T>
__device__ __forceinline__ void load_grad(const KernelArgs& a, const TableEntry& t, int64_t e, float (&g)[kVec]) {
  const bool full = e + kVec <= t.numel;
  if (t.grad != nullptr) {
    load8(static_cast<const T*>(t.grad), e, t.numel, full && (t.flags & kAligned), g);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) g[j] = 0.f;
  }
  if (t.flags & FLASHATTN_OPTIM_TENSOR_GRAD_SUM) {
    float s[kVec];
    load8(a.grad_sum + t.offset, e, t.numel, full, s);
#pragma unroll
    for (int j = 0; j < kVec; ++j) g[j] += s[j];
  }
}

__device__ __forceinline__ float inverse_scale(const float* grad_scale) {
  return grad_scale != nullptr ? 1.f / *grad_scale : 1.f;
}

// Sum over a block (every thread gets it); `red` holds kThreads / 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  T total = 0;
#pragma unroll
  for (int w = 0; w < int(blockDim.x / 32); ++w) total += red[w];
  return total;
}

// One partial sum of (g / grad_scale)^2 per block, written to its slot (0 for blocks without chunks).
__global__ void __launch_bounds__(kThreads) norm_kernel(const KernelArgs a) {
  const float inv_scale = inverse_scale(a.grad_scale);
  float acc = 0.f;
  for_each_access(a.table, [&](const TableEntry& t, int, int64_t e) {
    float g[kVec];
    dtype_switch(t.dtype, [&](auto tag) { load_grad<decltype(tag)>(a, t, e, g); });
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float x = g[j] * inv_scale;
      acc += x * x;
    }
  });
  __shared__ float red[kThreads / 32];
  const float total = block_sum(acc, red);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
}

// The norm from every launch's partials (float64, fixed order), the clip coefficient (torch's clip_grad_norm_:
// min(1, max_norm / (norm + 1e-6))) and the skip decision; resets the update launches' tickets.
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const float* partials, int n, float max_norm,
                                                                    float* grad_norm, float* found_inf,
                                                                    float* control, unsigned* tickets, int launches) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += kFinalizeThreads) acc += partials[i];
  __shared__ double red[kFinalizeThreads / 32];
  const double total = block_sum(acc, red);
  if (threadIdx.x == 0) {
    const float norm = float(sqrt(total));
    const bool finite = isfinite(norm);
    control[0] = max_norm > 0.f && finite ? fminf(1.f, max_norm / (norm + 1e-6f)) : 1.f;
    control[1] = finite ? 0.f : 1.f;
    if (grad_norm != nullptr) *grad_norm = norm;
    if (found_inf != nullptr) *found_inf = finite ? 0.f : 1.f;
  }
  for (int i = threadIdx.x; i < launches; i += kFinalizeThreads) tickets[i] = 0u;
}

// The per-tensor constants of the update: bias corrections in float64 from the step count, rounded once.
struct Constants {
  float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias2_sqrt, eps;
};

__device__ __forceinline__ Constants tensor_constants(const KernelArgs& a, const TableEntry& t) {
  const double* hp = a.group_hparams + 5 * t.group;
  const double lr = hp[0], beta1 = hp[1], beta2 = hp[2], eps = hp[3], weight_decay = hp[4];
  const double step = double(a.steps[t.step_index]) + 1.0;
  Constants c;
  c.decay = float(1.0 - lr * weight_decay);
  c.beta1 = float(beta1);
  c.one_minus_beta1 = float(1.0 - beta1);
  c.beta2 = float(beta2);
  c.one_minus_beta2 = float(1.0 - beta2);
  c.neg_step_size = float(-lr / (1.0 - pow(beta1, step)));
  c.bias2_sqrt = float(sqrt(1.0 - pow(beta2, step)));
  c.eps = float(eps);
  return c;
}

// One access of the update, in the operation order of torch.optim.AdamW (float32, as its single-tensor path):
// w *= decay; m = m beta1 + (1 - beta1) g; v = v beta2 + (1 - beta2) g g; w += -step_size m / (sqrt(v) / bc2 + eps).
template <typename T, bool kMaster>
__device__ __forceinline__ void adamw_access(const KernelArgs& a, const TableEntry& t, int64_t e, const Constants& c,
                                             float inv_scale, float coef) {
  const bool full = e + kVec <= t.numel;
  const bool vec = full && (t.flags & kAligned);
  T* param = static_cast<T*>(t.param);
  float* master = a.master + t.offset;
  float* m_ptr = a.exp_avg + t.offset;
  float* v_ptr = a.exp_avg_sq + t.offset;
  float g[kVec], w[kVec], m[kVec], v[kVec];
  load_grad<T>(a, t, e, g);
  if constexpr (kMaster) {
    load8(master, e, t.numel, full, w);
  } else {
    load8(param, e, t.numel, vec, w);
  }
  load8(m_ptr, e, t.numel, full, m);
  load8(v_ptr, e, t.numel, full, v);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float gj = g[j] * inv_scale * coef;
    w[j] *= c.decay;
    m[j] = m[j] * c.beta1 + c.one_minus_beta1 * gj;
    v[j] = v[j] * c.beta2 + c.one_minus_beta2 * gj * gj;
    const float denom = sqrtf(v[j]) / c.bias2_sqrt + c.eps;
    w[j] += c.neg_step_size * (m[j] / denom);
  }
  store8(m_ptr, e, t.numel, full, m);
  store8(v_ptr, e, t.numel, full, v);
  if constexpr (kMaster) store8(master, e, t.numel, full, w);
  store8(param, e, t.numel, vec, w);
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(const KernelArgs a) {
  if (a.control[1] != 0.f) return;  // non-finite gradients: nothing changes, the step counts included
  const float inv_scale = inverse_scale(a.grad_scale);
  const float coef = a.control[0];
  int current = -1;
  Constants c{};
  for_each_access(a.table, [&](const TableEntry& t, int j, int64_t e) {
    if (j != current) {  // the block's chunks come in table order: the constants change with the tensor only
      c = tensor_constants(a, t);
      current = j;
    }
    const bool master = t.flags & FLASHATTN_OPTIM_TENSOR_MASTER;
    dtype_switch(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (sizeof(T) == 2) {
        if (master) {
          adamw_access<T, true>(a, t, e, c, inv_scale, coef);
          return;
        }
      }
      adamw_access<T, false>(a, t, e, c, inv_scale, coef);
    });
  });

  // Every block read the step counts of its tensors above; the last block to finish increments them.
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(a.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {
    for (int j = threadIdx.x; j < a.table.count; j += kThreads) a.steps[a.table.t[j].step_index] += 1.f;
  }
}

__global__ void __launch_bounds__(kThreads) accumulate_kernel(const KernelArgs a) {
  for_each_access(a.table, [&](const TableEntry& t, int, int64_t e) {
    const bool full = e + kVec <= t.numel;
    float* sum = a.grad_sum + t.offset;
    float g[kVec];
    dtype_switch(t.dtype, [&](auto tag) {
      load8(static_cast<const decltype(tag)*>(t.grad), e, t.numel, full && (t.flags & kAligned), g);
    });
    if (t.flags & FLASHATTN_OPTIM_TENSOR_GRAD_SUM) {
      float s[kVec];
      load8(sum, e, t.numel, full, s);
#pragma unroll
      for (int j = 0; j < kVec; ++j) g[j] += s[j];
    }
    store8(sum, e, t.numel, full, g);
  });
}

// ----------------------------------------------------------------------------
// kernel launchers

// The table of tensors [first, first + n) and its chunk prefix; false when its chunks overflow int32.
bool fill_table(Table& tb, const std::vector<OptimTensor>& tensors, size_t first, int n) {
  int64_t chunks = 0;
  tb.count = n;
  for (int j = 0; j < n; ++j) {
    const OptimTensor& s = tensors[first + size_t(j)];
    TableEntry& t = tb.t[j];
    t.param = s.param;
    t.grad = s.grad;
    t.offset = s.offset;
    t.numel = s.numel;
    t.step_index = s.step_index;
    t.group = uint16_t(s.group);
    t.dtype = uint8_t(s.dtype);
    const bool aligned = is_aligned(s.param, 16) && is_aligned(s.grad, 16);
    t.flags = uint8_t(s.flags) | (aligned ? kAligned : 0);
    tb.chunk_start[j] = int32_t(chunks);
    chunks += (s.numel + kChunk - 1) / kChunk;
    if (chunks > INT_MAX) return false;
  }
  tb.chunk_start[n] = int32_t(chunks);
  return true;
}

// Blocks of `kernel` resident at once on the current device (SMs x blocks per SM): a grid-stride launch of that many
// runs as one wave, without the tail of a partial last wave (2048 blocks of the update kernel at 3 per SM on an H200's
// 132 SMs would leave the sixth wave a sixth full).
int resident_blocks(const void* kernel) {
  DeviceInfo info;
  int per_sm = 0;
  if (current_device_info(&info, "resident_blocks") != FLASHATTN_STATUS_OK ||
      blocks_per_sm(kernel, info.device, kThreads, 0, &per_sm, "resident_blocks") != FLASHATTN_STATUS_OK ||
      info.sms * per_sm < 1) {
    return kMaxBlocks;  // a failed query only costs the tail wave
  }
  return info.sms * per_sm;
}

int grid_for(const Table& tb, int resident) { return std::max(1, std::min(tb.chunk_start[tb.count], resident)); }

FlashAttnStatus too_large(const char* function) {
  return fail(FLASHATTN_STATUS_INVALID_ARGUMENT, function,
              "the tensors of one launch (%d) hold more than 2^31 chunks of %d elements", kOptimTensorsPerLaunch,
              kChunk);
}

}  // namespace

FlashAttnStatus run_adamw_step(const AdamWParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t count = p.tensors.size();
  const int launches = int(optim_launches(int64_t(count)));
  char* ws = static_cast<char*>(p.workspace);
  float* control = reinterpret_cast<float*>(ws);
  unsigned* tickets = reinterpret_cast<unsigned*>(ws + optim_tickets_offset());
  float* partials = reinterpret_cast<float*>(ws + optim_partials_offset(int64_t(count)));

  KernelArgs a{};
  a.master = p.master;
  a.exp_avg = p.exp_avg;
  a.exp_avg_sq = p.exp_avg_sq;
  a.grad_sum = const_cast<float*>(p.grad_sum);
  a.steps = p.steps;
  a.group_hparams = p.group_hparams;
  a.grad_scale = p.grad_scale;
  a.control = control;
  for (int l = 0; l < launches; ++l) {
    const size_t first = size_t(l) * kOptimTensorsPerLaunch;
    if (!fill_table(a.table, p.tensors, first, int(std::min(count - first, size_t(kOptimTensorsPerLaunch)))))
      return too_large(function);
    a.partials = partials + size_t(l) * kOptimNormBlocks;
    norm_kernel<<<kOptimNormBlocks, kThreads, 0, stream>>>(a);
    FlashAttnStatus s = check_launch(function, "norm_kernel");
    if (s != FLASHATTN_STATUS_OK) return s;
  }
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, launches * kOptimNormBlocks, p.max_norm, p.grad_norm,
                                                      p.found_inf, control, tickets, launches);
  FlashAttnStatus s = check_launch(function, "finalize_kernel");
  if (s != FLASHATTN_STATUS_OK) return s;
  const int resident = resident_blocks(reinterpret_cast<const void*>(adamw_kernel));
  for (int l = 0; l < launches; ++l) {
    const size_t first = size_t(l) * kOptimTensorsPerLaunch;
    fill_table(a.table, p.tensors, first, int(std::min(count - first, size_t(kOptimTensorsPerLaunch))));
    a.ticket = tickets + l;
    adamw_kernel<<<grid_for(a.table, resident), kThreads, 0, stream>>>(a);
    s = check_launch(function, "adamw_kernel");
    if (s != FLASHATTN_STATUS_OK) return s;
  }
  return FLASHATTN_STATUS_OK;
}

FlashAttnStatus run_grad_accumulate(const GradAccumulateParams& p, void* stream_ptr, const char* function) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t count = p.tensors.size();
  KernelArgs a{};
  a.grad_sum = p.grad_sum;
  const int resident = resident_blocks(reinterpret_cast<const void*>(accumulate_kernel));
  for (size_t first = 0; first < count; first += kOptimTensorsPerLaunch) {
    if (!fill_table(a.table, p.tensors, first, int(std::min(count - first, size_t(kOptimTensorsPerLaunch)))))
      return too_large(function);
    accumulate_kernel<<<grid_for(a.table, resident), kThreads, 0, stream>>>(a);
    FlashAttnStatus s = check_launch(function, "accumulate_kernel");
    if (s != FLASHATTN_STATUS_OK) return s;
  }
  return FLASHATTN_STATUS_OK;
}

}  // namespace flashattn
