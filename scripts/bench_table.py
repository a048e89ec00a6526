#!/usr/bin/env python3
"""Markdown rows for BENCHMARKS.md from bench_report's JSON (which carries the torch anchor of the
same run as "torch_us"): case | ours us | torch us | x torch | GB/s | TFLOP/s | %roofline."""
import json, sys

def fmt(v, p=1):
    return "-" if v is None else f"{v:.{p}f}"

rows = json.load(open(sys.argv[1]))
print("| case | moekit µs | torch µs | × torch | GB/s | TFLOP/s | % roofline |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for case, r in rows.items():
    t = r.get("torch_us")
    ratio = f"{t / r['us']:.2f}" if t else "-"
    print(f"| `{case}` | {fmt(r['us'], 2)} | {fmt(t)} | {ratio} | {fmt(r.get('gbps'), 0)} | {fmt(r.get('tflops'))} | {fmt(r.get('roofline_pct'))} |")
