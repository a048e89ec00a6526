#!/usr/bin/env python3
"""Summarizes ncu's per-instruction warp-stall samples (the CSV written by
scripts/ncu-gemm-stalls.sh: `ncu -i REP --page source --print-source sass --csv`).

usage: scripts/ncu_stalls.py SASS.csv [TOP] [--regions]
  prints the TOP (default 30) instructions by samples with their three main stall reasons (offsets
  from the kernel's first instruction); --regions adds the samples per 512-byte region of code with
  the largest execution count in it, which tells loops (counts ~ k-blocks x warps) from per-tile
  code.
"""
import csv
import sys
from collections import defaultdict


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = list(csv.reader(open(args[0])))
    top = int(args[1]) if len(args) > 1 else 30
    hdr, data = rows[1], rows[2:]
    ia, isrc = hdr.index("Address"), hdr.index("Source")
    iall, iex = hdr.index("Warp Stall Sampling (All Samples)"), hdr.index("Instructions Executed")
    stall_cols = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    samples = lambda r: int(r[iall] or 0)
    total = sum(samples(r) for r in data)
    base = int(data[0][ia], 16)
    print(f"{rows[0][1][:120]}\ntotal samples {total}")
    for r in sorted(data, key=lambda r: -samples(r))[:top]:
        reasons = sorted(((int(r[i] or 0), hdr[i][6:]) for i in stall_cols), reverse=True)[:3]
        why = " ".join(f"{name}={v}" for v, name in reasons if v)
        print(f"{int(r[ia], 16) - base:6x} {100 * samples(r) / total:5.1f}% ex={r[iex]:>9} {r[isrc].strip()[:58]:58} {why}")
    if "--regions" in sys.argv:
        share, count = defaultdict(int), defaultdict(int)
        for r in data:
            b = (int(r[ia], 16) - base) // 0x200
            share[b] += samples(r)
            count[b] = max(count[b], int(r[iex] or 0))
        print("region  samples  max executions")
        for b in sorted(share):
            if share[b] / total > 0.004:
                print(f"{b * 0x200:6x} {100 * share[b] / total:6.1f}%  {count[b]}")


if __name__ == "__main__":
    main()
