#!/usr/bin/env python3
"""Where the host's time goes in a training step, from step-profile.sh's EventPipe trace (PROFILE_HOST_STEPS=N).

  xz -dk host.nettrace.xz && dotnet-trace convert host.nettrace --format Speedscope -o host   (here: dotnet tool
  install -g dotnet-trace), then   build/host_profile.py host.speedscope.json [TOP] [SKIP_STEPS]

Per thread, the share of the step window (from the SKIP_STEPS-th step, default 20, to the last) that each method's
samples cover, inclusive and exclusive. A step starts where the main thread enters LanguageModelingTask.TrainLoss.
The main thread launches the forward, then waits in Tensor.backward() while libtorch's autograd thread for the device
runs the backward (our autograd functions' Backward methods: their launches); CPU_TIME / UNMANAGED_CODE_TIME are the
sampler's leaves for managed and native code.
"""
import collections
import json
import sys


def intervals(profile):
    """(stack of frame ids, start ms, end ms) between consecutive events of an evented speedscope profile."""
    stack, last, out = [], None, []
    for e in profile["events"]:
        t = e["at"]
        if last is not None and stack and t > last:
            out.append((tuple(stack), last, t))
        if e["type"] == "O":
            stack.append(e["frame"])
        elif e["frame"] in stack:
            del stack[len(stack) - 1 - stack[::-1].index(e["frame"]):]
        last = t
    return out


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    data = json.load(open(argv[1]))
    top = int(argv[2]) if len(argv) > 2 else 40
    skip = int(argv[3]) if len(argv) > 3 else 20
    frames = [f["name"].split("!", 1)[-1][:120] for f in data["shared"]["frames"]]
    main_thread = intervals(data["profiles"][0])
    starts, inside = [], False
    for stack, s, _ in main_thread:
        now = any("TrainLoss" in frames[f] for f in stack)
        if now and not inside:
            starts.append(s)
        inside = now
    if len(starts) <= skip + 1:
        sys.exit(f"only {len(starts)} steps in the trace")
    w0, w1 = starts[skip], starts[-1]
    print(f"steps {skip}-{len(starts) - 1}: {(w1 - w0) / (len(starts) - 1 - skip):.2f} ms a step under the profiler")
    for profile in data["profiles"]:
        inclusive, exclusive = collections.Counter(), collections.Counter()
        for stack, s, e in intervals(profile):
            s, e = max(s, w0), min(e, w1)
            if e <= s:
                continue
            for f in set(stack):
                inclusive[f] += e - s
            exclusive[stack[-1]] += e - s
        if not inclusive:
            continue
        print(f"\n== {profile['name']}\n-- inclusive (share of the window)")
        for f, t in inclusive.most_common(top):
            print(f"{t / (w1 - w0) * 100:6.1f}%  {frames[f]}")
        print("-- exclusive")
        for f, t in exclusive.most_common(12):
            print(f"{t / (w1 - w0) * 100:6.1f}%  {frames[f]}")


if __name__ == "__main__":
    main(sys.argv)
