#!/usr/bin/env python3
"""Where a training step's GPU time goes between kernels, from build/cuda_trace.cpp's CUPTI trace
(build/step-profile.sh's PROFILE_TRACE_STEPS).

  cuda_trace.py TRACE.tsv [--skip N] [--marker REGEX] [--top N]

Steps are cut at each launch of the optimizer's finalize_kernel (one per optimizer step; --marker another kernel name),
the first --skip (20) left out: tier-0 JIT code and the caching allocator's first allocations. For those steps:
- the GPU's busy time (kernels, copies and fills, overlaps counted once) and its idle time;
- the idle time split, gap by gap, into the part the GPU waited for the host (from the moment it ran dry until the call
  that launched its next work returned) and the part it waited with that work already launched (the GPU's own launch
  latency between dependent kernels);
- where the host made it wait: the kernels on either side of those gaps, and the slow CUDA calls made meanwhile;
- every synchronisation and the CUDA calls by time spent in them, per step: a cudaStreamSynchronize, a copy to pageable
  memory, a cudaMalloc or cudaFree, a cudaFuncSetAttribute or occupancy query repeated every step;
- how far ahead of the GPU the host launches (a kernel's start minus its launch call's end);
- each kernel's time in the run itself: ncu's figures (step_profile.py) time each kernel alone, its clocks unloaded;
- every gap by the work on either side, and each kernel's (copy's, fill's) duration: median, min, max.
With --marker flush_l2 it reads ops_bench's samples (device-run.sh's OPS_TRACE), each sample a "step".
"""
import argparse
import bisect
import collections
import re
import statistics

GPU_KINDS = "KMS"
API_KINDS = "RD"
# calls that wait for the device, or reach the driver for memory, by design
BLOCKING = re.compile(r"Synchronize|^cudaMemcpy$|^cuMemcpy[DH]to[DH]$|Malloc|Free|HostAlloc|HostRegister|cuMemAlloc|"
                      r"cuMemFree|cuMemCreate|cuMemMap")


def short(name, width=70):
    """A kernel's name without its argument list and template arguments, cut to width."""
    n = re.sub(r"^void ", "", name.replace("(anonymous namespace)::", ""))
    n = re.sub(r"\(.*$", "", n)
    while True:
        m = re.sub(r"<[^<>]*>", "", n)
        if m == n:
            break
        n = m
    return n if len(n) <= width else n[:width - 1] + "…"


def api_name(name):
    return re.sub(r"_v\d+$", "", name)


def read(path):
    gpu, api, api_list, syncs = [], {}, [], []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("#"):
                print(line.strip())
                continue
            parts = line.rstrip("\n").split("\t", 5)
            if len(parts) < 6:
                continue
            kind, start, end, corr, where, name = parts
            start, end, corr, where = int(start), int(end), int(corr), int(where)
            if kind in GPU_KINDS:
                gpu.append((start, end, corr, kind, name))
            elif kind in API_KINDS:
                record = (start, end, where, api_name(name), kind)
                api[corr] = record
                api_list.append(record)
            elif kind == "Y":
                syncs.append((start, end, name))
    gpu.sort()
    api_list.sort()
    syncs.sort()
    return gpu, api, api_list, syncs


def ms(ns):
    return ns / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--skip", type=int, default=20, help="steps left out at the start (default 20)")
    p.add_argument("--marker", default=r"(^|::)finalize_kernel\(", help="regex of the kernel that starts each step")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()

    gpu, api, api_list, syncs = read(a.trace)
    marker = re.compile(a.marker)
    marks = [(s, c) for s, _, c, k, n in gpu if k == "K" and marker.search(n) and c in api]
    if len(marks) < a.skip + 2:
        raise SystemExit(f"{len(marks)} steps (launches of {a.marker}) in the trace, fewer than --skip {a.skip} + 2")
    marks = marks[a.skip:]
    steps = len(marks) - 1
    # the same steps on the GPU's timeline and on the host's (the host runs ahead: its calls of a step come earlier)
    bounds = [s for s, _ in marks]
    host_bounds = [api[c][0] for _, c in marks]
    w0, w1, h0, h1 = bounds[0], bounds[-1], host_bounds[0], host_bounds[-1]
    window = [g for g in gpu if w0 <= g[0] < w1]
    per = lambda x: x / steps  # noqa: E731

    # busy time (overlaps once) and the gaps, each split into the host's part and the GPU's own
    busy = host_wait = gpu_wait = unknown_wait = 0
    gaps = []  # (gap, host's part or None, when the GPU ran dry, the op it ran last, the next op, the next op's launch call)
    cur_end, last = window[0][0], None
    for op in window:
        start, end, corr = op[0], op[1], op[2]
        if start > cur_end:
            gap, call = start - cur_end, api.get(corr)
            host = None if call is None else min(max(call[1] - cur_end, 0), gap)
            if host is None:
                unknown_wait += gap
            else:
                host_wait += host
                gpu_wait += gap - host
            gaps.append((gap, host, cur_end, last, op, call))
        if end > cur_end:
            busy += end - max(start, cur_end)
            cur_end, last = end, op
    wall = w1 - w0
    idle = wall - busy

    print(f"steps {a.skip}-{a.skip + steps} ({steps} steps, cut at {a.marker}): {ms(per(wall)):.2f} ms a step")
    print(f"  GPU busy {ms(per(busy)):.2f} ms, idle {ms(per(idle)):.2f} ms ({idle / wall * 100:.1f}%) in "
          f"{per(len(gaps)):.0f} gaps a step")
    print(f"  idle waiting for the host (launch call not returned when the GPU ran dry): {ms(per(host_wait)):.2f} ms")
    print(f"  idle with the next work already launched (the GPU's launch latency):       {ms(per(gpu_wait)):.2f} ms")
    if unknown_wait:
        print(f"  idle before work whose launch call is not in the trace:                    {ms(per(unknown_wait)):.2f} ms")
    edges = [2, 5, 20, 100, 1000]  # us
    labels = [f"< {edges[0]} us"] + [f"{lo}-{hi} us" for lo, hi in zip(edges, edges[1:])] + [f">= {edges[-1]} us"]
    hist = collections.defaultdict(lambda: [0, 0])
    for g in gaps:
        h = hist[bisect.bisect_right(edges, g[0] / 1000)]
        h[0] += 1
        h[1] += g[0]
    print("  gaps by length (a step: count, ms): " +
          ", ".join(f"{labels[i]} {per(n):.1f}, {ms(per(t)):.3f}" for i, (n, t) in sorted(hist.items())))

    # every gap by the work on either side: its length and the host's part (ops_bench's samples: the gap between two
    # kernels of one call, with the second already launched, is the GPU's own launch latency between them)
    every = collections.defaultdict(list)
    for gap, host, _, prev_op, op, _ in gaps:
        every[(short(prev_op[4], 50) if prev_op else "(start)", short(op[4], 50))].append((gap, host or 0))
    print(f"\n-- every gap by the work on either side, the {a.top} largest by time (a step: count; median and max "
          f"us; median us of it waiting for the host)")
    for (before, after), g in sorted(every.items(), key=lambda kv: -sum(x for x, _ in kv[1]))[:a.top]:
        print(f"{per(len(g)):6.2f}  {statistics.median(x for x, _ in g) / 1000:8.2f} {max(x for x, _ in g) / 1000:8.2f}  "
              f"{statistics.median(h for _, h in g) / 1000:8.2f}  {before}  ->  {after}")

    # the steps with a read-back to the host (a synchronisation, a copy to host memory) against the others
    reads = [s for s, _, n in syncs if n != "cudaStreamWaitEvent"] + \
        [api[g[2]][0] for g in window if g[3] == "M" and g[4].startswith("DtoH") and g[2] in api]
    read_steps = {bisect.bisect_right(host_bounds, t) - 1 for t in reads if h0 <= t < h1}
    walls = [bounds[i + 1] - bounds[i] for i in range(steps)]
    if read_steps and len(read_steps) < steps:
        print(f"  steps with a read-back to the host: {len(read_steps)}, "
              f"{ms(statistics.mean(walls[i] for i in read_steps)):.2f} ms each; the others "
              f"{ms(statistics.mean(w for i, w in enumerate(walls) if i not in read_steps)):.2f} ms")

    # where the host made the GPU wait: the kernels around those gaps, summed by pair
    late = [g for g in gaps if g[1]]
    pairs = collections.defaultdict(lambda: [0, 0])
    for gap, host, _, prev_op, op, _ in late:
        key = (short(prev_op[4]) if prev_op else "(start)", short(op[4]))
        pairs[key][0] += host
        pairs[key][1] += 1
    if pairs:
        print(f"\n-- where the GPU waited for the host: the {a.top} largest places (ms a step, gaps a step, before -> after)")
        for (before, after), (t, n) in sorted(pairs.items(), key=lambda kv: -kv[1][0])[:a.top]:
            print(f"{ms(per(t)):8.3f} {per(n):6.2f}  {before}  ->  {after}")
        print(f"\n-- the {a.top} longest waits for the host, with the CUDA calls of over 20 us made meanwhile")
        for gap, host, dry, prev_op, op, call in sorted(late, key=lambda g: -g[1])[:a.top]:
            during = [c for c in api_list if c[1] > dry and c[0] < call[0] and c[1] - c[0] > 20_000]
            what = ", ".join(f"{c[3]} {ms(c[1] - c[0]):.3f} ms" for c in sorted(during, key=lambda c: c[0] - c[1])[:4])
            print(f"{ms(host):8.3f} ms before {short(op[4], 50)} (launched by {call[3]} on thread {call[2]}, after "
                  f"{short(prev_op[4], 40) if prev_op else '(start)'}){': ' + what if what else ''}")

    # every CUDA call by time spent in it, and the synchronisations
    calls = collections.defaultdict(lambda: [0, 0, 0])
    threads = collections.defaultdict(lambda: [0, 0])
    for start, end, thread, name, _ in api_list:
        if h0 <= start < h1:
            c = calls[name]
            c[0] += 1
            c[1] += end - start
            c[2] = max(c[2], end - start)
            threads[thread][0] += 1
            threads[thread][1] += end - start
    print(f"\n-- CUDA calls by time spent in them (a step: count, ms; the longest one); * waits for the device or "
          f"reaches the driver for memory by design, listed whatever its time")
    ranked = sorted(calls.items(), key=lambda kv: -kv[1][1])
    shown = ranked[:2 * a.top] + [kv for kv in ranked[2 * a.top:] if BLOCKING.search(kv[0])]
    for name, (n, t, longest) in shown:
        print(f"{per(n):8.2f} {ms(per(t)):8.3f} ms  longest {ms(longest):7.3f} ms  {'*' if BLOCKING.search(name) else ' '} {name}")
    print("  by thread: " + "; ".join(f"{t}: {per(n):.0f} calls, {ms(per(d)):.2f} ms a step"
                                      for t, (n, d) in sorted(threads.items(), key=lambda kv: -kv[1][0])))
    ys = collections.defaultdict(lambda: [0, 0])
    for s, e, n in syncs:
        if h0 <= s < h1:
            ys[n][0] += 1
            ys[n][1] += e - s
    print("  synchronisations: " + ("; ".join(f"{n} {per(c):.2f} a step, {ms(per(t)):.3f} ms a step"
                                            for n, (c, t) in sorted(ys.items(), key=lambda kv: -kv[1][1])) or "none"))

    # how far ahead the host runs
    leads = sorted(g[0] - api[g[2]][1] for g in window if g[3] == "K" and g[2] in api)
    if leads:
        q = lambda f: ms(leads[min(len(leads) - 1, int(f * len(leads)))])  # noqa: E731
        print(f"\n-- the host's lead (kernel start - its launch call's end), over {len(leads)} kernels: "
              f"min {ms(leads[0]):.3f} ms, 10% {q(0.1):.3f}, median {q(0.5):.3f}, 90% {q(0.9):.3f}")

    # the kernels' own time in this run
    kinds = collections.Counter()
    kernels = collections.defaultdict(lambda: [0, 0])
    for s, e, _, kind, name in window:
        kinds[kind] += e - s
        if kind == "K":
            kernels[short(name)][0] += e - s
            kernels[short(name)][1] += 1
    print(f"\n-- GPU work a step in this run: kernels {ms(per(kinds['K'])):.2f} ms in {per(sum(v[1] for v in kernels.values())):.0f} "
          f"launches, copies {ms(per(kinds['M'])):.3f} ms, fills {ms(per(kinds['S'])):.3f} ms; the {a.top} largest kernels:")
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"{ms(per(t)):8.3f} ms {per(n):6.1f}  {name}")
    durations = collections.defaultdict(list)
    for s, e, _, kind, name in window:
        durations[short(name, 50) if kind == "K" else kind].append(e - s)
    print(f"\n-- each kind of work's duration, us: median, min, max (M copies, S fills)")
    for name, d in sorted(durations.items(), key=lambda kv: -sum(kv[1]))[:a.top]:
        print(f"{statistics.median(d) / 1000:9.2f} {min(d) / 1000:9.2f} {max(d) / 1000:9.2f}  {len(d):6d}  {name}")


if __name__ == "__main__":
    main()
