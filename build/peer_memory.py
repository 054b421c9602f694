"""The PyTorch peer's GPT-2 peak memory measured as `FlashAttn.Benchmarks --memory` measures ours (device-run.sh's
peermemory step):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 python3 build/peer_memory.py .device/peers/pytorch_baselines.py gpt[,gptdrop]

The peer script reports `torch.cuda.max_memory_allocated`: the caching allocator's tensor bytes. Ours is the device's
used memory (NVML, sampled by a second thread) with every tensor its own cudaMalloc, less the figure before the model
was made: it also counts cuBLAS's workspaces and the driver's allocation granularity. Here the peer script runs
unchanged under the same method: each case's `torch.manual_seed` (called right before its model is built) takes the
baseline, `torch.cuda.reset_peak_memory_stats` (after its warm-up steps) restarts the peak, and
`torch.cuda.max_memory_allocated` returns NVML's peak since then less the baseline; so its "peak mem" lines carry
NVML figures. Its tokens/s lines are not comparable (no caching allocator): take them from the `peers` step.
"""
import ctypes
import os
import runpy
import sys
import threading

import torch


class NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def main(peer, parts):
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        sys.exit("peer_memory.py needs PYTORCH_NO_CUDA_MEMORY_CACHING=1 (else the caching allocator hides frees)")
    nvml = ctypes.CDLL("libnvidia-ml.so.1")
    device = ctypes.c_void_p()
    if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(device)) != 0:
        sys.exit("NVML unavailable")

    def used():
        m = NvmlMemory()
        return m.used if nvml.nvmlDeviceGetMemoryInfo(device, ctypes.byref(m)) == 0 else 0

    state = {"before": used(), "peak": 0, "run": True}

    def sample():
        while state["run"]:
            u = used()
            if u > state["peak"]:
                state["peak"] = u

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    seed = torch.manual_seed

    def manual_seed(s):  # the peer's first call of each case, before its model
        torch.cuda.synchronize()
        state["before"] = used()
        return seed(s)

    def reset_peak_memory_stats(*args, **kwargs):
        torch.cuda.synchronize()
        state["peak"] = used()

    def max_memory_allocated(*args, **kwargs):
        torch.cuda.synchronize()
        return max(state["peak"], used()) - state["before"]

    torch.manual_seed = manual_seed
    torch.cuda.reset_peak_memory_stats = reset_peak_memory_stats
    torch.cuda.max_memory_allocated = max_memory_allocated
    sys.argv = [peer, parts]
    try:
        runpy.run_path(peer, run_name="__main__")
    finally:
        state["run"] = False
        sampler.join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gpt")
