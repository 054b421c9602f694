#!/usr/bin/env python3
"""Host-side simulation of the Hopper kernels' persistent tile schedulers (hopper/NOTES.md, "Persistent
schedulers: balance").

Each CTA of a persistent grid runs a fixed list of work tiles; CTAs are independent, so a launch lasts as
long as its busiest CTA. For each shape this prints, per scheduler, the tiles per CTA (min-max), the work per
CTA in 128 x 128 query-block x key-block products under the causal mask (min / mean / max), and
max / mean: the kernel's time over that of a perfectly balanced grid (work + alpha per tile; alpha is a
tile's fixed cost in products: Q load, epilogue, pipeline fill, 0 by default).

Schedulers (G = the grid, 132 SMs on the H200):
  pairs   the pairs' order strided by the grid, which persistent_unit replaced: tile t -> position
          j = t mod 2m of a pair of (batch, head)s, the first head heaviest block first, the second
          lightest first; CTA c runs t = c, c + G, c + 2G...; G = SMs, one fewer when causal and SMs is
          a multiple of 2m.
  units   the kernels' order (kernel_traits.h persistent_unit, called by flash_fwd_kernel.cuh
          persistent_tile and flash_bwd_kernel.cuh persistent_bwd_tile): the same pairs of heads cut
          into units of two tiles whose work sums to m + 1 blocks (heavy block i of the first head,
          light block i of the second), consecutive; CTA c runs units c, c + G, ... (both tiles of
          each), the last partial round of 2G tiles giving whole units to as many CTAs as it can;
          G = SMs. units_tile below is persistent_unit line for line.
  snake   persistent192_snake's order (kernel_traits.h persistent_snake; the d64 causal forward's from S 8192,
          where it measured 3-4% above units; it lost at short rows and at d128): every tile sorted heaviest
          first (block rank r of every head before rank r + 1), dealt to the CTAs round by round, the
          direction alternating (CTA c takes
          position c of even rounds and G - 1 - c of odd ones), so that a CTA's heavy tile of one round
          meets a light one in the next; a round spans every head (a round of units spans a few: L2).
  grid    the non-persistent launch (one CTA a tile, heaviest first in launch order, each to the
          first SM free): list scheduling, for reference.
  dynamic persistent_dynamic's order (flash_fwd_kernel.cuh dynamic_tile, forward only; a global counter hands
          each CTA its next tile when it is free): list scheduling over every tile heaviest first (rank r of
          every head before rank r + 1; FLASHATTN_HOPPER_TILE_GROUP unset).

Then the same for the forward's 192-row tiles (persistent192) under a causal mask ("fwd192").

  python3 FlashAttn.Native/tests/persistent_schedule_sim.py [--sms 132] [--alpha 0.5]
"""
import argparse
import heapq


def ceil_div(a, b):
    return -(-a // b)


def fwd_work(S, D, causal, rows):
    """Forward tile work: (m_blocks, work(m_block)) in 128 x 128 products (rows-query blocks)."""
    m = ceil_div(S, rows)
    return m, (lambda mb: (ceil_div(min(mb * rows + rows, S), 128) if causal else ceil_div(S, 128)) * rows / 128)


def bwd_work(S, D, causal):
    """Backward tile work: (n_blocks, work(n_block)); query blocks of 64 rows at d128, 128 at d64."""
    bm = 64 if D == 128 else 128
    nb = ceil_div(S, 128)
    mq = ceil_div(S, bm)
    return nb, (lambda n: (mq - (n * 128) // bm if causal else mq) * bm / 128)


def pairs_tile(t, m, heavy_first_is_high):
    """Old mapping: (block, head index hb) of tile t."""
    pair, j = divmod(t, 2 * m)
    hb = 2 * pair + (1 if j >= m else 0)
    if heavy_first_is_high:  # forward: heaviest query block is the last
        blk = m - 1 - j if j < m else j - m
    else:  # backward: heaviest key block is the first
        blk = j if j < m else 2 * m - 1 - j
    return blk, hb


def units_tile(t, G, total, m, heavy_first_is_high):
    """New mapping (persistent_unit in the kernels): tile t of CTA t mod G -> (block, head index hb)."""
    k, c = divmod(t, G)
    base = (k >> 1) * 2 * G
    r = min(total - base, 2 * G)
    twos = max(r - G, 0)
    s = base + 2 * c + (k & 1) if c < twos else base + twos + c
    pair, r2 = divmod(s, 2 * m)
    i, half = r2 >> 1, r2 & 1
    lone = (pair + 1) * 2 * m > total  # an odd head count's last head pairs with itself
    hb = 2 * pair + (0 if lone else half)
    if heavy_first_is_high:
        blk = i if half else m - 1 - i
    else:
        blk = m - 1 - i if half else i
    return blk, hb


def snake_tile(t, G, heads, m, heavy_first_is_high):
    """Candidate mapping: tile t of CTA t mod G -> (block, head index hb), heaviest first, rounds alternating."""
    k, c = divmod(t, G)
    pos = k * G + (c if k % 2 == 0 else G - 1 - c)
    if pos >= m * heads:  # the last round is partial: its CTAs counted from the round's own start
        pos = k * G + c
    rank, hb = divmod(pos, heads)
    return (m - 1 - rank if heavy_first_is_high else rank), hb


def persistent(total, G, tile_fn, work, alpha):
    per_cta = []
    seen = set()
    for c in range(G):
        w, n = 0.0, 0
        for t in range(c, total, G):
            blk, hb = tile_fn(t)
            assert (blk, hb) not in seen, "not a bijection"
            seen.add((blk, hb))
            w += work(blk) + alpha
            n += 1
        per_cta.append((w, n))
    assert len(seen) == total, "not a bijection"
    return per_cta


def list_schedule(order, sms, work, alpha):
    free = [(0.0, s) for s in range(sms)]
    heapq.heapify(free)
    busy = [[0.0, 0] for _ in range(sms)]
    for blk in order:
        t, s = heapq.heappop(free)
        t += work(blk) + alpha
        busy[s][0] = t
        busy[s][1] += 1
        heapq.heappush(free, (t, s))
    return [tuple(b) for b in busy]


def report(name, per_cta):
    ws = [w for w, _ in per_cta]
    ns = [n for _, n in per_cta]
    mean = sum(ws) / len(ws)
    return "%-7s G %3d  tiles %2d-%2d  work %7.1f / %7.1f / %7.1f  max/mean %.3f" % (
        name, len(per_cta), min(ns), max(ns), min(ws), mean, max(ws), max(ws) / mean)


def simulate(label, B, H, S, D, causal, sms, alpha, direction):
    if direction in ("fwd", "fwd192"):
        # the default variant: persistent192 at d64 without a causal mask and causal from S 8192; "fwd192" asks for it
        # at d64 causal below
        rows = 192 if (D == 64 and (not causal or S >= 8192 or direction == "fwd192")) else 128
        m, work = fwd_work(S, D, causal, rows)
        high = True
    else:
        m, work = bwd_work(S, D, causal)
        high = False
    total = m * B * H
    G_old = sms - 1 if (causal and sms > 1 and sms % (2 * m) == 0) else sms
    G_old = min(G_old, total)
    G_new = min(sms, total)
    old = persistent(total, G_old, lambda t: pairs_tile(t, m, high), work, alpha)
    new = persistent(total, G_new, lambda t: units_tile(t, G_new, total, m, high), work, alpha)
    snake = persistent(total, G_new, lambda t: snake_tile(t, G_new, B * H, m, high), work, alpha)
    grid_order = [(m - 1 - j if high else j) for _ in range(B * H) for j in range(m)]
    grid = list_schedule(grid_order, sms, work, alpha)
    dyn_order = [(m - 1 - r if high else r) for r in range(m) for _ in range(B * H)]
    dynamic = list_schedule(dyn_order, min(sms, total), work, alpha)
    print("%s %s: B %d H %d S %d d%d %s, %d blocks a head, %d tiles" % (
        label, direction, B, H, S, D, "causal" if causal else "full", m, total))
    for name, r in (("pairs", old), ("units", new), ("snake", snake), ("grid", grid), ("dynamic", dynamic)):
        print("  " + report(name, r))
    ratio = max(w for w, _ in old) / max(w for w, _ in new)
    print("  pairs/units makespan %.3f" % ratio)
    return ratio


SHAPES = [
    ("peer", 8, 32, 2048, 64, 0), ("peer", 2, 32, 8192, 64, 0), ("peer", 1, 32, 16384, 64, 0),
    ("peer", 8, 32, 2048, 64, 1), ("peer", 2, 32, 8192, 64, 1), ("peer", 1, 32, 16384, 64, 1),
    ("peer", 8, 16, 2048, 128, 0), ("peer", 2, 16, 8192, 128, 0), ("peer", 1, 16, 16384, 128, 0),
    ("peer", 8, 16, 2048, 128, 1), ("peer", 2, 16, 8192, 128, 1), ("peer", 1, 16, 16384, 128, 1),
    ("gpt2", 16, 12, 1024, 64, 1),
    ("bench", 4, 16, 4096, 64, 1), ("bench", 4, 16, 4096, 128, 1),
    ("check", 1, 32, 8192, 128, 1), ("check", 4, 16, 4096, 128, 1), ("check", 2, 8, 8192, 128, 1),
    ("odd", 3, 5, 1000, 128, 1), ("odd", 1, 1, 130, 64, 1),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--alpha", type=float, default=0.0, help="fixed cost of a tile, in 128 x 128 products")
    a = ap.parse_args()
    for label, B, H, S, D, causal in SHAPES:
        for direction in ("fwd", "bwd"):
            simulate(label, B, H, S, D, causal, a.sms, a.alpha, direction)
    # persistent192 (192-row query blocks) under a causal mask, not a default: its pairs' work is uneven
    for label, B, H, S, D, causal in SHAPES:
        if D == 64 and causal and label in ("peer", "gpt2", "bench"):
            simulate(label, B, H, S, D, causal, a.sms, a.alpha, "fwd192")


if __name__ == "__main__":
    main()
