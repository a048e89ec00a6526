#!/usr/bin/env python3
"""cuBLAS (torch.mm) on the dense GEMM of each grouped case's FLOPs: the compute ceiling.

A grouped GEMM of T·k routed rows cannot beat one dense GEMM of the same M, N and K on the same
machine: same math, no ragged tiles, no per-expert weight traffic. This script times that dense
GEMM through cuBLAS two ways, under the names bench_report gives its own dense cases
(`<model>/T<t>/gemm-up-dense`, `gemm-down-dense`, `mla/T<t>/gemm-dense`):

- `bench`: bench_report's method (src/bench/mod.rs time_launches): 5 untimed launches, then 50,
  each behind a ~100 us device spin and between its own pair of CUDA events; the median. Back to
  back for ~0.5-1 s, so the long cases reach the 700 W power cap as ours do.
- `do_bench`: torch_anchors.py's method (triton do_bench, warmup 25 ms, rep 100 ms, median).

usage: python3 scripts/dense_ceiling.py [--json FILE] [--filter SUBSTRING]
"""
import argparse
import json
import os
import statistics

import torch
from triton.testing import do_bench

PRESETS = {  # name: (experts, top_k, hidden, moe_intermediate), as torch_anchors.py
    "dsv3": (256, 8, 7168, 2048),
    "qwen3": (128, 8, 2048, 768),
    "mixtral": (8, 2, 4096, 14336),
}


def shapes():
    """(case name, M, N, K) of every dense case, as bench_report names them."""
    for model, (_, k, h, i) in PRESETS.items():
        for t in (4096, 16384):
            yield f"{model}/T{t}/gemm-up-dense", t * k, 2 * i, h
            yield f"{model}/T{t}/gemm-down-dense", t * k, h, i
    for t in (1024, 8192, 32768):  # MLA: [T, r] x kv_b_proj [H (d_nope + d_v), r]^T, H = 128
        yield f"mla/T{t}/gemm-dense", t, 128 * 256, 512


def time_like_bench_report(fn, warmup=5, reps=50, spin_us=100.0):
    for _ in range(warmup):
        fn()
    # torch.cuda._sleep spins for a number of cycles: ~2 GHz at most, so this is >= spin_us.
    cycles = int(spin_us * 2000)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "dense_ceiling.json"))
    ap.add_argument("--filter", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    res = {}
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'case':40s} {'bench us':>10s} {'TFLOP/s':>8s} {'do_bench us':>12s} {'TFLOP/s':>8s}")
    for name, m, n, k in shapes():
        if a.filter not in name:
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        fn = lambda: torch.mm(x, w.t(), out=y)
        flops = 2.0 * m * n * k
        us_bench = time_like_bench_report(fn)
        us_do = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
        res[name] = {"us": us_bench, "tflops": flops / us_bench / 1e6, "do_bench_us": us_do,
                     "do_bench_tflops": flops / us_do / 1e6}
        print(f"{name:40s} {us_bench:10.1f} {flops / us_bench / 1e6:8.1f} {us_do:12.1f} {flops / us_do / 1e6:8.1f}",
              flush=True)
        del x, w, y
        torch.cuda.empty_cache()
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
