#!/usr/bin/env python3
"""One training step's kernels from two ncu runs of `flashattn train` (build/step-profile.sh).

  step_profile.py SHORT.csv SHORT_STEPS LONG.csv LONG_STEPS METRICS.jsonl OUT.tsv [TOP]
  step_profile.py --wall METRICS.jsonl LABEL     one line: wall time a step, tokens/s, .NET collections

SHORT.csv / LONG.csv: `ncu --csv --metrics gpu__time_duration.sum` logs of trainer.max_steps=SHORT_STEPS and
=LONG_STEPS; per kernel name, (LONG - SHORT) / (LONG_STEPS - SHORT_STEPS) is one step (start-up, the final evaluation
and the checkpoint cancel out). METRICS.jsonl: the trainer's metrics of a run without ncu, whose logged steps from
step 30 on give the wall time per step (the mean: a garbage collection's pause is part of the cost). Writes OUT.tsv (and prints it): kernel time, launches and wall time
per step, the host gap between them, tokens/s, and the TOP kernels by time per step, grouped by kernel name.
"""
import collections
import csv
import json
import sys

# ncu scales units per row unless --print-units base; both are read
UNITS = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
METRIC = "gpu__time_duration.sum"


def kernels(path):
    """{kernel name: [seconds, launches]} over the METRIC rows of an ncu CSV log (other lines are skipped)."""
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith('"ID"') and '"Kernel Name"' in line), None)
    if header is None:
        sys.exit(f"{path}: no ncu CSV header (\"ID\",...,\"Kernel Name\",...): did ncu profile any kernel?")
    totals = collections.defaultdict(lambda: [0.0, 0])
    for row in csv.DictReader(lines[header:]):
        if row.get("Metric Name") != METRIC:
            continue
        unit = row["Metric Unit"].strip()
        if unit not in UNITS:
            sys.exit(f"{path}: unknown unit {unit!r} for {METRIC}")
        entry = totals[row["Kernel Name"]]
        entry[0] += float(row["Metric Value"].replace(",", "")) * UNITS[unit]
        entry[1] += 1
    return totals


def wall(path, skip=30):
    """(seconds per step, tokens per step, the trainer's last tokens/s) from the first logged step >= `skip` to the last
    (the first steps run tier-0 JIT code)."""
    records = []
    with open(path) as f:
        for line in f:
            r = json.loads(line) if line.strip() else {}
            if "elapsed_s" in r and r.get("elapsed_s") is not None:
                records.append(r)
    if len(records) < 2:
        sys.exit(f"{path}: fewer than two logged steps")
    last = records[-1]
    first = next((r for r in records if r["step"] >= skip and r is not last), records[0])
    steps = last["step"] - first["step"]
    seconds = (last["elapsed_s"] - first["elapsed_s"]) / steps
    tokens = (last["tokens"] - first["tokens"]) / steps if "tokens" in last else None
    # the .NET runtime's share of a step, where the trainer logs it (cumulative counters)
    gc = {k: (last[k] - first[k]) / steps for k in ("gc_collections", "gc_pause_ms", "alloc_mb") if k in last and k in first}
    return seconds, tokens, last.get("tok_per_s"), first["step"], last["step"], gc


def wall_line(metrics, label):
    """One line for a wall-time run alone (step-profile.sh's PROFILE_WALL_ENVS): wall per step, tokens/s, collections."""
    wall_s, tokens, _, from_step, to_step, gc = wall(metrics)
    line = f"wall\t{label}\tsteps {from_step}-{to_step}: {wall_s * 1e3:.2f} ms a step"
    if tokens:
        line += f", {tokens / wall_s:.0f} tok/s"
    if gc:
        line += (f", {gc['gc_collections']:.2f} .NET collections ({gc['gc_pause_ms']:.3f} ms of pauses) and "
                 f"{gc['alloc_mb']:.2f} MB allocated a step")
    print(line)


def main(argv):
    if len(argv) == 4 and argv[1] == "--wall":
        return wall_line(argv[2], argv[3])
    if len(argv) not in (7, 8):
        sys.exit(__doc__)
    short_csv, short_steps, long_csv, long_steps, metrics, out = argv[1:7]
    top = int(argv[7]) if len(argv) == 8 else 25
    steps = int(long_steps) - int(short_steps)
    if steps <= 0:
        sys.exit("LONG_STEPS must exceed SHORT_STEPS")
    short, long_ = kernels(short_csv), kernels(long_csv)
    per_step = {}
    for name in set(short) | set(long_):
        (t0, n0), (t1, n1) = short.get(name, (0.0, 0)), long_.get(name, (0.0, 0))
        per_step[name] = ((t1 - t0) / steps, (n1 - n0) / steps)
    kernel_s = sum(t for t, _ in per_step.values())
    launches = sum(n for _, n in per_step.values())
    wall_s, tokens, tok_per_s, from_step, to_step, gc = wall(metrics)

    rows = [
        "# step\tvalue\tunit",
        f"kernel time per step\t{kernel_s * 1e3:.2f}\tms",
        f"kernel launches per step\t{launches:.0f}\tlaunches",
        f"wall time per step (steps {from_step}-{to_step}, no ncu)\t{wall_s * 1e3:.2f}\tms",
        f"host gap (wall - kernels)\t{(wall_s - kernel_s) * 1e3:.2f}\tms ({(wall_s - kernel_s) / wall_s * 100:.1f}% of the step)",
    ]
    if tokens:
        rows.append(f"tokens/s (tokens per step / wall time)\t{tokens / wall_s:.0f}\ttok/s")
    if tok_per_s:
        rows.append(f"tokens/s (trainer, last 20 steps)\t{tok_per_s:.0f}\ttok/s")
    if gc:
        rows.append(f".NET garbage collections per step (same steps)\t{gc['gc_collections']:.2f}\tcollections")
        rows.append(f".NET collection pauses per step\t{gc['gc_pause_ms']:.3f}\tms")
        rows.append(f"managed allocations per step\t{gc['alloc_mb']:.2f}\tMB")
    rows.append(f"# top {top} kernels by time per step\tms\tlaunches\tshare of kernel time")
    # kernels of the start-up or the evaluation alone (no launches per step) add only noise to the table
    ranked = sorted(((k, v) for k, v in per_step.items() if v[1] != 0), key=lambda kv: -kv[1][0])
    for name, (t, n) in ranked[:top]:
        rows.append(f"{name}\t{t * 1e3:.3f}\t{n:.1f}\t{t / kernel_s * 100:.1f}%")
    rest = ranked[top:]
    if rest:
        t, n = sum(v[0] for _, v in rest), sum(v[1] for _, v in rest)
        rows.append(f"(the other {len(rest)} kernels)\t{t * 1e3:.3f}\t{n:.1f}\t{t / kernel_s * 100:.1f}%")
    text = "\n".join(rows) + "\n"
    with open(out, "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv)
