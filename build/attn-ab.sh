#!/usr/bin/env bash
# On the GPU host, after build/device-run.sh built the native tree (/tmp/flashattn-native) in the same call:
#   AB_VARIANTS='persistent persistent_expturn persistent192' AB_PASSES=2 bash build/attn-ab.sh [D [causal [S]]]
# The Hopper forward's variants timed against each other at flash_selftest --bench-peer-fwd's shapes (the PyTorch
# peer's 16k tokens at S 512-16384, GPT-2's B 16 S 1024), narrowed by D, causal and S as that command takes them.
# A variant may carry settings after commas, and "default" forces none: AB_VARIANTS='default
# default,FLASHATTN_HOPPER_BWD_VARIANT=dqfirst'. AB_BWD=1 times the backward too (--bench-peer-bwd), its TFLOP/s
# printed beside the forward's (FLASHATTN_HOPPER_BWD_VARIANT=dqfirst, say, as such a setting).
# Each variant runs in a process of its own (the library reads FLASHATTN_HOPPER_FWD_VARIANT once), the variants
# alternated pass after pass so that a drift of the clocks falls on all of them alike (one process after another of
# the same variant read up to 3% apart in run H67). Every line goes to $OUT/attn-ab.txt; printed last, each shape's
# TFLOP/s by variant, every pass and the median, and GPT-2's queued ms.
set -uo pipefail
OUT=${OUT:-/tmp/flashattn-out}
mkdir -p "$OUT"
selftest=/tmp/flashattn-native/FlashAttn.Native/flash_selftest
[ -x "$selftest" ] || { echo "no $selftest: run build/device-run.sh (any step) first"; exit 1; }
variants=${AB_VARIANTS:-persistent overlap}
passes=${AB_PASSES:-2}
log=$OUT/attn-ab.txt
mode=--bench-peer-fwd
[ "${AB_BWD:-0}" = 1 ] && mode=--bench-peer-bwd
: >"$log"
for pass in $(seq "$passes"); do
  for v in $variants; do
    echo "== pass $pass $v" >>"$log"
    IFS=',' read -ra settings <<<"$v"
    name=${settings[0]}
    settings=("${settings[@]:1}")
    [ "$name" = default ] || settings+=("FLASHATTN_HOPPER_FWD_VARIANT=$name")
    env "${settings[@]}" timeout 120 "$selftest" "$mode" "$@" >>"$log" 2>&1 ||
      echo "== failed: rc $? ($v, pass $pass)" >>"$log"
  done
done
python3 - "$log" <<'PYEOF'
import re, statistics, sys
runs = {}  # (shape, variant) -> [TFLOP/s per pass]; GPT-2's queued ms and the backward's TFLOP/s beside
queued = {}
bwd = {}
variant = None
order_shapes, order_variants = [], []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"== pass \d+ (\S+)", line)
    if m:
        variant = m.group(1)
        if variant not in order_variants:
            order_variants.append(variant)
        continue
    m = re.match(r"bench bf16 (B=\d+ H=\d+ S=\d+ D=\d+ causal=\d): fwd \[([^\]]*)\] [\d.]+ ms ([\d.]+) TFLOP/s", line)
    if not m or variant is None:
        continue
    shape = m.group(1)
    if shape not in order_shapes:
        order_shapes.append(shape)
    runs.setdefault((shape, variant), []).append(float(m.group(3)))
    q = re.search(r"queued: fwd ([\d.]+) ms", line)
    if q:
        queued.setdefault((shape, variant), []).append(q.group(1))
    b = re.search(r"\| bwd [\d.]+ ms ([\d.]+) TFLOP/s", line)
    if b:
        bwd.setdefault((shape, variant), []).append(float(b.group(1)))
for shape in order_shapes:
    print(shape)
    for v in order_variants:
        xs = runs.get((shape, v), [])
        if not xs:
            continue
        extra = f"  queued ms {' / '.join(queued[(shape, v)])}" if (shape, v) in queued else ""
        if (shape, v) in bwd:
            bs = bwd[(shape, v)]
            extra += f"  bwd median {statistics.median(bs):6.1f} ({' / '.join(f'{x:.1f}' for x in bs)})"
        print(f"  {v:20s} median {statistics.median(xs):6.1f}  ({' / '.join(f'{x:.1f}' for x in xs)}){extra}")
PYEOF
grep "^== failed" "$log"
exit 0
