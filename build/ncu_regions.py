#!/usr/bin/env python3
"""Where a persistent attention kernel's warps spend their samples: before, inside and after its key loop.

    python3 build/ncu_regions.py source.csv [top]

source.csv is `ncu -i report.ncu-rep --page source --csv --print-source sass` of one kernel (built with -lineinfo,
profiled with `--set full --import-source yes`). The SASS rows are split by the kernel's loops, found from its
backward branches: the key loop is the innermost loop that issues two or more HGMMA groups, the tile loop the
innermost loop around it; "tile start" is the tile loop's code before the key loop (Q's wait, the first S and its
softmax), "tile end" the code after it (the last P V, the epilogue's stores), "outside" the rest (setup, the
producer warp). For each region: warp-stall samples (all, and not issued where the report has them) and
instructions executed, then its `top` lines by samples (default 12).

The source page's per-line instruction counts come from an instrumented pass: spin loops (mbarrier retries) read
high there; the stall samples are the plain run's (hopper NOTES, "The producer's retries").
"""
import csv
import re
import sys


def number(text):
    text = (text or "").replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return 0.0


def read_rows(path):
    with open(path, newline="", errors="replace") as f:
        table = list(csv.reader(f))
    for i, row in enumerate(table):
        if any(c.strip() == "Address" for c in row) and any(c.strip() == "Source" for c in row):
            header, body = [c.strip() for c in row], table[i + 1:]
            break
    else:
        sys.exit(f"{path}: no header with Address and Source columns")

    def column(*keys):
        for k in keys:
            for j, h in enumerate(header):
                if h.startswith(k):
                    return j
        return None

    c_addr, c_src = header.index("Address"), header.index("Source")
    c_all = column("Warp Stall Sampling (All", "Warp Stall Sampling")
    c_not = column("Warp Stall Sampling (Not")
    c_inst = column("Instructions Executed")
    rows = []
    for r in body:
        if len(r) <= max(c_addr, c_src):
            continue
        try:
            addr = int(r[c_addr].strip(), 16)
        except ValueError:
            continue
        rows.append({
            "addr": addr,
            "src": r[c_src].strip(),
            "all": number(r[c_all]) if c_all is not None else 0.0,
            "not": number(r[c_not]) if c_not is not None else 0.0,
            "inst": number(r[c_inst]) if c_inst is not None else 0.0,
        })
    rows.sort(key=lambda x: x["addr"])
    return rows, c_not is not None


def cfg(rows):
    """Successor row indices of each row's basic-block end: (leaders, successors by leader, block of each row)."""
    base = rows[0]["addr"]
    index = {r["addr"] - base: i for i, r in enumerate(rows)}
    target = {}
    for i, r in enumerate(rows):
        m = re.search(r"\bBRA\b[^;]*?(0x[0-9a-fA-F]+)", r["src"])
        if m:
            t = int(m.group(1), 16)
            j = index.get(t - base if t >= base else t)  # absolute or function-relative targets
            if j is not None:
                target[i] = j
    leaders = {0} | set(target.values()) | {i + 1 for i in target if i + 1 < len(rows)}
    leaders |= {i + 1 for i, r in enumerate(rows) if re.search(r"\b(EXIT|RET)\b", r["src"]) and i + 1 < len(rows)}
    leaders = sorted(leaders)
    block_of = [0] * len(rows)
    ends = {}
    for k, start in enumerate(leaders):
        end = leaders[k + 1] - 1 if k + 1 < len(leaders) else len(rows) - 1
        for i in range(start, end + 1):
            block_of[i] = start
        ends[start] = end
    succ = {}
    for start, end in ends.items():
        src = rows[end]["src"]
        conditional = src.startswith("@")
        out = []
        if end in target:
            out.append(target[end])
        ends_flow = end in target or re.search(r"\b(EXIT|RET)\b", src)
        if (not ends_flow or conditional) and end + 1 < len(rows):
            out.append(end + 1)
        succ[start] = out
    return leaders, succ, block_of, target


def natural_loop(head, tail, succ):
    """Blocks of the loop closed by the back edge tail -> head: those that reach tail without passing head."""
    pred = {}
    for b, out in succ.items():
        for t in out:
            pred.setdefault(t, []).append(b)
    body, work = {head, tail}, [tail]
    while work:
        b = work.pop()
        if b == head:
            continue
        for p in pred.get(b, []):
            if p not in body:
                body.add(p)
                work.append(p)
    return body


def groups_in(rows_in, hgmma):
    """HGMMA groups (runs of consecutive HGMMA rows) among rows_in."""
    inside = set(rows_in)
    n, last = 0, -2
    for i in hgmma:
        if i in inside:
            n += i != last + 1
            last = i
    return n


def main():
    rows, has_not = read_rows(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    if not rows:
        sys.exit("no SASS rows")
    hgmma = [i for i, r in enumerate(rows) if "HGMMA" in r["src"]]

    leaders, succ, block_of, target = cfg(rows)
    back = [(block_of[j], block_of[i]) for i, j in target.items() if j <= i]  # (head, tail) blocks
    found = []
    for head, tail in back:
        body = natural_loop(head, tail, succ)
        rows_in = [i for i in range(len(rows)) if block_of[i] in body]
        found.append((body, rows_in))
    with_products = [l for l in found if groups_in(l[1], hgmma) >= 2]
    if not with_products:
        sys.exit("no loop with two HGMMA groups: not a Hopper attention kernel's SASS, or branch targets not in hex")
    key = min(with_products, key=lambda l: len(l[1]))
    around = [l for l in found if key[0] < l[0]]
    tile = min(around, key=lambda l: len(l[1]), default=key)
    # The tile's end: blocks of the tile loop reached from the key loop's exits without the tile loop's head.
    tile_head = min(tile[0])
    end_blocks, work = set(), [t for b in key[0] for t in succ.get(b, []) if t not in key[0]]
    while work:
        b = work.pop()
        if b in end_blocks or b not in tile[0] or b in key[0] or b == tile_head:
            continue
        end_blocks.add(b)
        work.extend(succ.get(b, []))
    regions = {"outside": [], "tile start": [], "key loop": [], "tile end": []}
    for i, r in enumerate(rows):
        b = block_of[i]
        name = ("key loop" if b in key[0] else "tile end" if b in end_blocks else "tile start" if b in tile[0]
                else "outside")
        regions[name].append(r)
    total = sum(r["all"] for r in rows) or 1.0
    total_inst = sum(r["inst"] for r in rows) or 1.0
    base = rows[0]["addr"]
    print(f"{len(rows)} SASS rows; key loop {len(key[1])} rows ({groups_in(key[1], hgmma)} HGMMA groups), tile loop "
          f"{len(tile[1])}; {total:.0f} stall samples, {total_inst:.0f} instructions executed")
    for name, rs in regions.items():
        samples = sum(r["all"] for r in rs)
        line = (f"== {name}: {len(rs)} rows, samples {samples:.0f} ({100 * samples / total:.1f}%)"
                f", instructions {sum(r['inst'] for r in rs):.0f} ({100 * sum(r['inst'] for r in rs) / total_inst:.1f}%)")
        if has_not:
            line += f", not issued {sum(r['not'] for r in rs):.0f}"
        print(line)
        for r in sorted(rs, key=lambda r: -r["all"])[:top]:
            if r["all"] <= 0:
                break
            print(f"   {r['addr'] - base:#07x} {r['all']:7.0f}  {r['src'][:100]}")


if __name__ == "__main__":
    main()
