#!/usr/bin/env python3
"""Runs a command while sampling the GPU's SM clock, instantaneous power and clock-event reasons.

Why: the long GEMMs run power-capped (BENCHMARKS.md run 19: SW Power Cap active, 602-731 W,
SM clock 1155-1350 MHz during DeepSeek-V3 T = 16384 gate+up). nvidia-smi's `power.draw` query
field is a running average that lags a case of a few seconds; `nvidia-smi -q -d ...` reports the
instantaneous draw and whether the software power cap is holding the clock down, which is what
decides whether a case's time is the kernel's or the power limit's.

usage: python3 scripts/power_sample.py LABEL -- COMMAND [ARGS...]
  e.g. python3 scripts/power_sample.py gemm-up -- .gpu/examples/bench_report \
           --filter dsv3/T16384/gemm-up-swiglu --reps 200
Prints one summary line (LABEL: busy samples, SM clock median/min, instantaneous power median/max,
share of busy samples with the SW power cap active); the command's own output goes to stderr.
"""
import re
import statistics
import subprocess
import sys
import time


def sample():
    """One reading: (sm_mhz, instant_watts, limit_watts, sw_power_cap_active), None where absent."""
    text = subprocess.run(
        ["nvidia-smi", "-q", "-d", "PERFORMANCE,POWER,CLOCK"], capture_output=True, text=True, timeout=10
    ).stdout
    sm = watts = limit = None
    cap = False
    in_clocks = False
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if not value:
            # A section header: the first "SM" under "Clocks" is the current clock (later sections
            # list application and maximum clocks).
            in_clocks = key == "Clocks"
            continue
        if key == "SW Power Cap" and value == "Active":
            cap = True
        elif key == "Instantaneous Power Draw" and watts is None and value.endswith("W"):
            watts = float(value.split()[0])
        elif key in ("Current Power Limit", "Power Limit") and limit is None and value.endswith("W"):
            limit = float(value.split()[0])
        elif key == "SM" and in_clocks and sm is None and value.endswith("MHz"):
            sm = float(value.split()[0])
    return sm, watts, limit, cap


def main():
    if "--" not in sys.argv or sys.argv.index("--") != 2:
        sys.exit(__doc__)
    label, command = sys.argv[1], sys.argv[3:]
    proc = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
    samples = []
    while proc.poll() is None:
        samples.append(sample())
        time.sleep(0.2)
    readings = [s for s in samples if s[0] is not None and s[1] is not None]
    if not readings:
        print(f"{label}: no readings (rc {proc.returncode})")
        return
    limit = next((s[2] for s in readings if s[2]), 700.0)
    # Busy: drawing at least half the limit (the command's setup and idle gaps draw ~80-130 W).
    busy = [s for s in readings if s[1] >= 0.5 * limit] or readings
    clocks = [s[0] for s in busy]
    watts = [s[1] for s in busy]
    capped = sum(1 for s in busy if s[3])
    print(
        f"{label}: {len(busy)}/{len(readings)} busy samples, SM clock median {statistics.median(clocks):.0f} MHz "
        f"(min {min(clocks):.0f}), power median {statistics.median(watts):.0f} W (max {max(watts):.0f}) of "
        f"{limit:.0f} W, SW power cap active in {capped}/{len(busy)} (rc {proc.returncode})"
    )


if __name__ == "__main__":
    main()
