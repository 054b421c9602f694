// What a CUDA process asked of the GPU and when the GPU did it, for build/step-profile.sh's PROFILE_TRACE_STEPS: a
// CUPTI activity trace loaded by the CUDA driver itself at cuInit (CUDA_INJECTION64_PATH, the hook the Nsight tools
// use), so the traced program is run unchanged. Every kernel, copy and fill with its GPU start and end, every runtime
// and driver API call with its host start, end and thread, and every synchronisation, all on CUPTI's one clock: the
// correlation id ties a kernel to the call that launched it. build/cuda_trace.py reads the file.
//
//   g++ -std=c++17 -O2 -shared -fPIC build/cuda_trace.cpp -I<cuda>/include -I<cupti include> <libcupti.so> -o libcuda_trace.so
//   CUDA_INJECTION64_PATH=$PWD/libcuda_trace.so CUDA_TRACE_FILE=trace.tsv <program>
//
// One tab-separated line per record: kind, start ns, end ns, correlation id, stream (GPU work) or thread (API calls),
// name. Kinds: K kernel (demangled name), M copy ("HtoD pinned->device 131200"), S fill (bytes), R runtime API call, D
// driver API call, Y synchronisation (its type). Lines starting with '#' are remarks (dropped records).
#include <cupti.h>
#include <cxxabi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

namespace {

// The newest layout of each record the headers define: CUPTI hands out its own newest, whose leading fields (all this
// file reads) stay where the older layouts have them.
#if CUPTI_API_VERSION >= 130200
using KernelRecord = CUpti_ActivityKernel11;
#elif CUPTI_API_VERSION >= 130000
using KernelRecord = CUpti_ActivityKernel10;
#elif CUPTI_API_VERSION >= 19
using KernelRecord = CUpti_ActivityKernel9;
#else
using KernelRecord = CUpti_ActivityKernel8;
#endif
#if CUPTI_API_VERSION >= 26
using MemcpyRecord = CUpti_ActivityMemcpy6;
using SyncRecord = CUpti_ActivitySynchronization2;
#else
using MemcpyRecord = CUpti_ActivityMemcpy5;
using SyncRecord = CUpti_ActivitySynchronization;
#endif
using MemsetRecord = CUpti_ActivityMemset4;

constexpr size_t kBufferBytes = 8 << 20;

std::mutex g_mutex;  // the file and the name cache: CUPTI completes buffers on its own thread and on the flushing one
FILE* g_out = nullptr;
std::unordered_map<std::string, std::string> g_demangled;
uint64_t g_dropped = 0;

const char* demangled(const char* name) {
  if (name == nullptr) return "?";
  auto it = g_demangled.find(name);
  if (it == g_demangled.end()) {
    int status = 0;
    char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
    it = g_demangled.emplace(name, status == 0 && d != nullptr ? d : name).first;
    std::free(d);
  }
  return it->second.c_str();
}

const char* copy_kind(uint8_t k) {
  switch (k) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "DtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOH: return "HtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP: return "PtoP";
    default: return "other";
  }
}

const char* memory_kind(uint8_t k) {
  switch (k) {
    case CUPTI_ACTIVITY_MEMORY_KIND_PAGEABLE: return "pageable";
    case CUPTI_ACTIVITY_MEMORY_KIND_PINNED: return "pinned";
    case CUPTI_ACTIVITY_MEMORY_KIND_DEVICE: return "device";
    case CUPTI_ACTIVITY_MEMORY_KIND_MANAGED: return "managed";
    default: return "other";
  }
}

const char* sync_type(int t) {
  switch (t) {
    case CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_EVENT_SYNCHRONIZE: return "cudaEventSynchronize";
    case CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_STREAM_WAIT_EVENT: return "cudaStreamWaitEvent";
    case CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_STREAM_SYNCHRONIZE: return "cudaStreamSynchronize";
    case CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_CONTEXT_SYNCHRONIZE: return "cudaDeviceSynchronize";
    default: return "unknown";
  }
}

void api_line(char kind, const CUpti_ActivityAPI* a, CUpti_CallbackDomain domain) {
  const char* name = nullptr;
  if (cuptiGetCallbackName(domain, a->cbid, &name) != CUPTI_SUCCESS || name == nullptr) name = "?";
  std::fprintf(g_out, "%c\t%llu\t%llu\t%u\t%u\t%s\n", kind, (unsigned long long)a->start, (unsigned long long)a->end,
               a->correlationId, a->threadId, name);
}

void write_record(const CUpti_Activity* r) {
  switch (r->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL: {
      auto k = reinterpret_cast<const KernelRecord*>(r);
      std::fprintf(g_out, "K\t%llu\t%llu\t%u\t%u\t%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                   k->correlationId, k->streamId, demangled(k->name));
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
      auto m = reinterpret_cast<const MemcpyRecord*>(r);
      std::fprintf(g_out, "M\t%llu\t%llu\t%u\t%u\t%s %s->%s %llu\n", (unsigned long long)m->start,
                   (unsigned long long)m->end, m->correlationId, m->streamId, copy_kind(m->copyKind),
                   memory_kind(m->srcKind), memory_kind(m->dstKind), (unsigned long long)m->bytes);
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
      auto s = reinterpret_cast<const MemsetRecord*>(r);
      std::fprintf(g_out, "S\t%llu\t%llu\t%u\t%u\tmemset %llu\n", (unsigned long long)s->start,
                   (unsigned long long)s->end, s->correlationId, s->streamId, (unsigned long long)s->bytes);
      break;
    }
    case CUPTI_ACTIVITY_KIND_RUNTIME:
      api_line('R', reinterpret_cast<const CUpti_ActivityAPI*>(r), CUPTI_CB_DOMAIN_RUNTIME_API);
      break;
    case CUPTI_ACTIVITY_KIND_DRIVER:
      api_line('D', reinterpret_cast<const CUpti_ActivityAPI*>(r), CUPTI_CB_DOMAIN_DRIVER_API);
      break;
    case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
      auto y = reinterpret_cast<const SyncRecord*>(r);
      std::fprintf(g_out, "Y\t%llu\t%llu\t%u\t%u\t%s\n", (unsigned long long)y->start, (unsigned long long)y->end,
                   y->correlationId, y->streamId, sync_type(int(y->type)));
      break;
    }
    default:
      break;
  }
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream, uint8_t* buffer, size_t, size_t valid) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    CUpti_Activity* r = nullptr;
    while (g_out != nullptr && cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) write_record(r);
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(context, stream, &dropped) == CUPTI_SUCCESS) g_dropped += dropped;
  }
  std::free(buffer);
}

void finish() {
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_out == nullptr) return;
  if (g_dropped > 0) std::fprintf(g_out, "# dropped %llu records\n", (unsigned long long)g_dropped);
  std::fclose(g_out);
  g_out = nullptr;
}

void enable(CUpti_ActivityKind kind, const char* what) {
  CUptiResult r = cuptiActivityEnable(kind);
  if (r == CUPTI_SUCCESS) return;
  const char* message = nullptr;
  cuptiGetResultString(r, &message);
  std::fprintf(stderr, "cuda_trace: cuptiActivityEnable(%s) failed: %s\n", what, message != nullptr ? message : "?");
}

}  // namespace

// Called by the CUDA driver once, at cuInit, when CUDA_INJECTION64_PATH names this library. A trace that cannot start
// says so and leaves the program to run untraced (the analysis then finds no steps).
extern "C" __attribute__((visibility("default"))) int InitializeInjection(void) {
  const char* path = std::getenv("CUDA_TRACE_FILE");
  g_out = std::fopen(path != nullptr && path[0] != '\0' ? path : "cuda-trace.tsv", "w");
  if (g_out == nullptr) {
    std::perror("cuda_trace: the trace file");
    return 1;
  }
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "cuda_trace: cuptiActivityRegisterCallbacks failed\n");
    return 1;
  }
  enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, "CONCURRENT_KERNEL");
  enable(CUPTI_ACTIVITY_KIND_MEMCPY, "MEMCPY");
  enable(CUPTI_ACTIVITY_KIND_MEMSET, "MEMSET");
  enable(CUPTI_ACTIVITY_KIND_RUNTIME, "RUNTIME");
  enable(CUPTI_ACTIVITY_KIND_DRIVER, "DRIVER");
  enable(CUPTI_ACTIVITY_KIND_SYNCHRONIZATION, "SYNCHRONIZATION");
  // exit() runs its handlers in reverse order: this one before the teardown the CUDA runtime registered as it started
  std::atexit(finish);
  return 1;
}
