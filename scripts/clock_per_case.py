#!/usr/bin/env python3
"""Per benchmark case, the GPU's mean SM clock, power and temperature while it ran: joins
bench_report's JSON (start_unix_ms / end_unix_ms per case) with device-check's smi-log.csv
(nvidia-smi samples every 200 ms; its timestamps are the device machine's local time, UTC there).

    python3 scripts/clock_per_case.py bench.json smi-log.csv
"""
import csv
import json
import sys
from datetime import datetime, timezone


def samples(path):
    out = []
    with open(path) as f:
        for row in csv.reader(f):
            if not row or row[0].startswith("timestamp"):
                continue
            try:
                t = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=timezone.utc)
                clock = float(row[1].split()[0])
                power = float(row[3].split()[0])
                temp = float(row[4])
            except (ValueError, IndexError):
                continue
            out.append((t.timestamp() * 1000.0, clock, power, temp))
    return out


def main():
    cases = json.load(open(sys.argv[1]))
    log = samples(sys.argv[2])
    print(f"{'case':44} {'MHz':>6} {'W':>6} {'°C':>4} {'n':>4}")
    for name, r in cases.items():
        a, b = r.get("start_unix_ms"), r.get("end_unix_ms")
        if a is None or b is None:
            continue
        window = [s for s in log if a <= s[0] <= b]
        if not window:
            continue
        n = len(window)
        mean = lambda i: sum(s[i] for s in window) / n
        print(f"{name:44} {mean(1):6.0f} {mean(2):6.0f} {mean(3):4.0f} {n:4d}")


if __name__ == "__main__":
    main()
