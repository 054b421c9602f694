#!/usr/bin/env python3
"""Training-loss curves of several runs in one PNG (device-run.sh's losscurve step writes the metrics).

    python3 build/loss_curves.py OUT.png LABEL=metrics.jsonl [LABEL=metrics.jsonl ...]

Each metrics.jsonl is a trainer's log ({"step": ..., "loss": ...} lines; validation lines carry val_loss instead and are
left out). Prints, per run, the loss at the first and last step and the mean over the last 20 logged steps, and for the
second run on, its largest difference to the first at a step both logged, so the page can say how far apart they are.
Needs matplotlib (Debian: apt-get install python3-matplotlib, then run it with /usr/bin/python3).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    series = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("loss") is not None:
                series[int(rec["step"])] = float(rec["loss"])
    return series


def main(argv):
    if len(argv) < 3 or any("=" not in a for a in argv[2:]):
        sys.exit(__doc__)
    out, runs = argv[1], [a.split("=", 1) for a in argv[2:]]
    curves = [(label, read(path)) for label, path in runs]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, s in curves:
        steps = sorted(s)
        ax.plot(steps, [s[k] for k in steps], label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    first = curves[0][1]
    for label, s in curves:
        steps = sorted(s)
        tail = [s[k] for k in steps[-20:]]
        line = f"{label}: step {steps[0]} loss {s[steps[0]]:.4f}, step {steps[-1]} loss {s[steps[-1]]:.4f}, " \
               f"mean of the last {len(tail)} {sum(tail) / len(tail):.4f}"
        common = sorted(set(s) & set(first))
        if s is not first and common:
            k = max(common, key=lambda k: abs(s[k] - first[k]))
            line += f"; largest difference to {curves[0][0]}: {s[k] - first[k]:+.4f} at step {k}"
        print(line)
    print(f"plot: {out}")


if __name__ == "__main__":
    main(sys.argv)
