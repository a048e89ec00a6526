#!/usr/bin/env python3
"""Joules per launch on the GPU (NVML's total-energy counter), for cases that run back to back at
the board's power limit.

Why: back to back, the long GEMMs, the MLA decompression and the MoE layer run at the H200's
700 W limit (BENCHMARKS.md run 36: SW power cap active, SM clock ~1300-1500 MHz). There a
case's time is its joules over ~700 W, so a speed bar of t ms is a budget of ~0.7 t joules, and
what decides it is the energy a launch spends, not its cycles (BENCHMARKS.md run 41 compares
every bar's budget with what its case, the same routing balanced, and a dense GEMM of its FLOPs
spend).

It measures, each back to back until steady:
- cuBLAS bf16 GEMMs (torch.mm) of the DeepSeek-V3 T = 4096 layer's FLOPs, and a read-only
  stream (torch.sum) of the layer's weight bytes: two reference points of energy per FLOP and
  per byte (the read at full clock: its SMs' energy is not what a GEMM spends streaming weights);
- --zero-rows F,...: the gate+up-shaped cuBLAS GEMM with a fraction F of X's rows zero (what
  padding rows of zeros would save);
- --cases C,...: bench_report cases (exact names), ~5 s each, the energy counter sampled while
  they run.

usage: python3 scripts/energy_per_launch.py [--bench .gpu/examples/bench_report] [--cases C1,C2]
                                       [--zero-rows 0,0.25] [--json FILE]
"""
import argparse
import ctypes
import json
import statistics
import subprocess
import threading
import time

import torch


class Nvml:
    """The few NVML calls needed, through ctypes (no pynvml on the GPU machine)."""

    def __init__(self, index=0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        assert self.lib.nvmlInit_v2() == 0, "nvmlInit failed"
        self.handle = ctypes.c_void_p()
        assert self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) == 0

    def energy_j(self):
        """Energy since the driver loaded, joules (the counter is in millijoules)."""
        mj = ctypes.c_ulonglong()
        assert self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(mj)) == 0
        return mj.value / 1000.0

    def limit_w(self):
        mw = ctypes.c_uint()
        assert self.lib.nvmlDeviceGetEnforcedPowerLimit(self.handle, ctypes.byref(mw)) == 0
        return mw.value / 1000.0

    def clock_events(self):
        """Why the clocks are held down now: NVML's clocks-event-reasons bit mask."""
        mask = ctypes.c_ulonglong()
        if self.lib.nvmlDeviceGetCurrentClocksEventReasons(self.handle, ctypes.byref(mask)) != 0:
            return 0
        return mask.value

    def sm_mhz(self):
        mhz = ctypes.c_uint()
        assert self.lib.nvmlDeviceGetClockInfo(self.handle, 1, ctypes.byref(mhz)) == 0  # NVML_CLOCK_SM
        return mhz.value


def steady(nvml, op, warm_s=2.0, window_s=3.0):
    """Runs op back to back: warm_s to reach the steady (capped) state, then a window of whole
    launches timed by CUDA events, the energy counter read at the window's ends (after a sync).
    Returns (ms per op, joules per op, mean watts, median SM MHz during the window)."""
    t0 = time.time()
    while time.time() - t0 < warm_s:
        for _ in range(5):
            op()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    clocks = []
    e0 = nvml.energy_j()
    start.record()
    n, t0 = 0, time.time()
    while time.time() - t0 < window_s:
        for _ in range(5):
            op()
        n += 5
        clocks.append(nvml.sm_mhz())
    end.record()
    torch.cuda.synchronize()
    e1 = nvml.energy_j()
    ms = start.elapsed_time(end)
    # The host's last reads may run a little past the events; the energy covers [e0, e1], which is
    # the events' window plus the sync: divide by the wall time of the window for the power.
    watts = (e1 - e0) / (ms / 1000.0)
    return ms / n, (e1 - e0) / n, watts, statistics.median(clocks)


def idle_power(nvml, seconds=3.0):
    torch.cuda.synchronize()
    time.sleep(1.0)
    e0, t0 = nvml.energy_j(), time.time()
    time.sleep(seconds)
    return (nvml.energy_j() - e0) / (time.time() - t0)


def sample_command(nvml, cmd):
    """Runs cmd, sampling (time, energy) every 20 ms; returns the mean power over the middle 60%
    of its longest busy stretch (100 ms windows drawing over half the limit) and its clocks."""
    samples, stop = [], threading.Event()

    def loop():
        while not stop.is_set():
            samples.append((time.time(), nvml.energy_j(), nvml.sm_mhz(), nvml.clock_events()))
            time.sleep(0.02)

    th = threading.Thread(target=loop)
    th.start()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    stop.set()
    th.join()
    limit = nvml.limit_w()
    # 100 ms windows: busy where the mean power is over half the limit.
    wins = []
    i = 0
    while i < len(samples):
        j = i
        while j < len(samples) and samples[j][0] - samples[i][0] < 0.1:
            j += 1
        if j >= len(samples):
            break
        p = (samples[j][1] - samples[i][1]) / (samples[j][0] - samples[i][0])
        wins.append((p, i, j))  # watts, first and last sample
        i = j
    best, run = [], []
    for w in wins:
        if w[0] > 0.5 * limit:
            run.append(w)
            if len(run) > len(best):
                best = list(run)
        else:
            run = []
    if len(best) < 5:
        return proc, None, None, {}
    k = len(best)
    mid = best[int(0.2 * k) : int(0.8 * k)] or best
    a, b = mid[0][1], mid[-1][2]
    watts = (samples[b][1] - samples[a][1]) / (samples[b][0] - samples[a][0])
    mhz = statistics.median(s[2] for s in samples[a:b + 1])
    # The clock-event reasons seen in the window, by share of samples (BENCHMARKS.md run 41: a
    # short case run for seconds slowed at full clock and under the power limit).
    names = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}
    window = samples[a:b + 1]
    reasons = {n: round(sum(1 for s in window if s[3] & bit) / len(window), 2) for bit, n in names.items()}
    return proc, watts, mhz, {n: v for n, v in reasons.items() if v > 0}


def bench_case(nvml, bench, case, idle):
    """One bench_report case back to back for ~5 s: a short run for its time, then enough launches
    for ~5 s under the sampler. Joules per launch = mean power x (median + the 100 us spin that
    bench_report puts before each timed launch)."""
    tmp = "/tmp/energy-case.json"
    short = [bench, "--filter", "=" + case, "--reps", "20", "--json", tmp]
    if subprocess.run(short, capture_output=True).returncode != 0:
        return {"error": "bench_report failed"}
    us = json.load(open(tmp))[case]["us"]
    reps = max(50, int(5e6 / (us + 100)))
    cmd = [bench, "--filter", "=" + case, "--reps", str(reps), "--json", tmp]
    proc, watts, mhz, reasons = sample_command(nvml, cmd)
    # short_ms: the 20-launch run's median (the report's burst) beside the ~5 s run's.
    out = {"reps": reps, "rc": proc.returncode, "w": watts, "sm_mhz": mhz, "clock_events": reasons,
           "short_ms": us / 1e3}
    try:
        v = json.load(open(tmp))[case]
        out["ms"], out["tflops"] = v["us"] / 1e3, v.get("tflops")
        if watts:
            cycle = (v["us"] + 100) / 1e6
            out["j"], out["dynamic_j"] = watts * cycle, (watts - idle) * cycle
    except (OSError, ValueError, KeyError) as err:
        out["error"] = str(err)
    return out


def zero_rows_gemm(nvml, frac):
    """The routed gate+up's shape ([32768, 7168] x [7168, 4096], bf16) with the first rows of
    every 1024-row band zero, frac of them in whole 64-row blocks: joules and time per GEMM."""
    dev = torch.device("cuda")
    x = torch.randn(32768, 7168, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 7168, device=dev, dtype=torch.bfloat16) * 0.02
    zero = int(round(frac * 16)) * 64  # rows of each 1024-row band
    if zero:
        x.view(32, 1024, 7168)[:, :zero] = 0
    y = torch.empty(32768, 4096, device=dev, dtype=torch.bfloat16)
    ms, j, w_, mhz = steady(nvml, lambda: torch.mm(x, w.t(), out=y))
    return {"zero_rows": zero / 1024, "ms": ms, "j": j, "w": w_, "sm_mhz": mhz}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=".gpu/examples/bench_report")
    ap.add_argument("--cases", default="")
    ap.add_argument("--zero-rows", default="",
                    help="fractions of X's rows set to zero in the gate+up-shaped cuBLAS GEMM "
                         "(whole 64-row blocks), each timed for its joules: what padding rows of "
                         "zeros would save at the power limit")
    ap.add_argument("--skip-reference", action="store_true",
                    help="skip the cuBLAS GEMMs and the read stream (only --cases / --zero-rows)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    nvml = Nvml()
    torch.manual_seed(0)
    res = {"limit_w": nvml.limit_w()}
    res["idle_w"] = idle_power(nvml)

    if not args.skip_reference:
        reference_points(nvml, res)
    idle = res["idle_w"]
    for case in filter(None, args.cases.split(",")):
        res.setdefault("cases", {})[case] = bench_case(nvml, args.bench, case, idle)

    for frac in filter(None, args.zero_rows.split(",")):
        res.setdefault("zero_rows", {})[frac] = zero_rows_gemm(nvml, float(frac))

    print(json.dumps(res, indent=1))
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


def reference_points(nvml, res):
    """cuBLAS GEMMs of the layer's FLOPs and a read of its weight bytes, into res."""
    # DeepSeek-V3 T = 4096, k = 8: the routed FLOPs (32768 rows through gate+up [7168 -> 4096]
    # and down [2048 -> 7168]) and one shared expert over 4096 rows, as dense bf16 GEMMs.
    dev = torch.device("cuda")
    rows, h, i2, i1 = 32768, 7168, 4096, 2048
    xu = torch.randn(rows, h, device=dev, dtype=torch.bfloat16)
    wu = torch.randn(i2, h, device=dev, dtype=torch.bfloat16) * 0.02
    xd = torch.randn(rows, i1, device=dev, dtype=torch.bfloat16)
    wd = torch.randn(h, i1, device=dev, dtype=torch.bfloat16) * 0.02
    xs, xs2 = xu[:4096], xd[:4096]
    flops = 2 * rows * h * i2 + 2 * rows * i1 * h + 2 * 4096 * h * i2 + 2 * 4096 * i1 * h

    def gemms():
        torch.mm(xu, wu.t())
        torch.mm(xd, wd.t())
        torch.mm(xs, wu.t())
        torch.mm(xs2, wd.t())

    ms, j, w, mhz = steady(nvml, gemms)
    res["gemm"] = {"tflop": flops / 1e12, "ms": ms, "j": j, "w": w, "sm_mhz": mhz, "tflops": flops / ms / 1e9}
    del xu, wu, xd, wd

    # The layer's weights read once: 256 experts x (W13 4096 x 7168 + W2 7168 x 2048) bf16 and the
    # shared expert's = 22.7 GB, as a read-only stream over a 2 GiB buffer (L2 is ~60 MB).
    weight_bytes = (256 + 1) * (i2 * h + h * i1) * 2
    buf = torch.randn(2**29, device=dev, dtype=torch.float32)  # 2 GiB
    reps = max(1, round(weight_bytes / buf.numel() / 4))
    out = torch.empty((), device=dev, dtype=torch.float32)

    def read():
        for _ in range(reps):
            torch.sum(buf, dim=0, out=out)

    ms, j, w, mhz = steady(nvml, read)
    gb = reps * buf.numel() * 4 / 1e9
    res["read"] = {"gb": gb, "ms": ms, "j": j, "w": w, "sm_mhz": mhz, "gbps": gb / ms * 1e3}
    del buf


if __name__ == "__main__":
    main()
