"""cuDNN's attention (PyTorch SDPA, CUDNN_ATTENTION backend) at GPT-2's training shape, B 16, S 1024, 12 heads of 64,
causal, bf16: the row of issue 17's bar that the shared peer's `attn` part does not time. Two timings (CUDA events,
median of 30 after 5 warm-up calls; the backward is autograd.grad over a kept graph, without the forward): "call", one
call after a synchronisation, as that peer and `flash_selftest --bench-peer` time (it includes the dispatch while the
GPU waits: PyTorch's is tens of microseconds, a tenth of this shape's forward); "queued", 20 calls back to back
divided by 20 (the dispatch hidden behind the queued kernels, as in training). device-run.sh's attnpeer step prints it
beside `flash_selftest --bench-peer`'s GPT-2 line. TSV: section, name, ms.
`--fwd-calls N`: N forward calls and nothing else, no timing (device-run.sh's attnncu profiles one of them beside ours).
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, calls=1, reps=30, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    times.sort()
    return times[len(times) // 2]


b, h, s, d = 16, 12, 1024, 64
q, k, v = [torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
do = torch.randn_like(q)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    if len(sys.argv) > 2 and sys.argv[1] == "--fwd-calls":
        for _ in range(int(sys.argv[2])):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
        sys.exit(0)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for how, calls in (("call", 1), ("queued", 20)):
        fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), calls)
        bwd = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), calls)
        print(f"attn\tcudnn bf16 d64 causal GPT-2 B{b} S{s} H{h} fwd ({how})\t{fwd:.4f}\tms")
        print(f"attn\tcudnn bf16 d64 causal GPT-2 B{b} S{s} H{h} bwd ({how})\t{bwd:.4f}\tms")
