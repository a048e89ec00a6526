#!/usr/bin/env bash
# Runs on the GPU machine over a bundle built by ../shared/tools/gpu-bundle (carried as .gpu/, or
# packed by scripts/pack-gpu-bundle.sh and carried as .gpu-packed/):
# the GPU tests (MOEKIT_REQUIRE_GPU=1), compute-sanitizer memcheck and racecheck over them, the
# benchmark report and the torch anchors of the same machine. Logs go to $OUT; a summary is
# printed last. Steps: any of tests,memcheck,racecheck,bench,anchors,demo,router,criterion,ncu-gemm,ncu-gating,ncu-mla,power,energy,ceiling
# (default: tests,memcheck,racecheck,bench,anchors). Extra env: REPORT_FILTER (bench_report
# --filter), SANITIZE (test binaries for the sanitizers, default all), ANCHOR_CASES, ANCHOR_TOKENS, NCU_GEMM_CASES,
# POWER_CASES, ENERGY_CASES, CEILING_FILTER, CEILING_ROUNDS, DEADLINE (seconds; later sanitizer runs skip).
set -u
cd "$(dirname "$0")/.."
# A bundle carried packed (scripts/pack-gpu-bundle.sh) is unpacked first.
if [ -f .gpu-packed/bundle.tar.xz ]; then
  rm -rf .gpu
  python3 -c "import tarfile; tarfile.open('.gpu-packed/bundle.tar.xz').extractall('.')"
fi
# Without a bundle every step would fail one by one and still spend the device time (run 26 call 8
# carried .gpu-packed without a bundle.tar.xz in it).
if [ ! -x .gpu/examples/bench_report ]; then
  echo "device-check: no GPU bundle (.gpu/ or .gpu-packed/bundle.tar.xz); carry one" >&2
  exit 1
fi
# Logs are written outside $OUT and packed into $OUT/logs.tgz at the end: the device tool returns at
# most 8 files.
final=${OUT:-/tmp/moekit-out}; mkdir -p "$final"
out=$(mktemp -d /tmp/moekit-logs.XXXX)
steps=${1:-tests,memcheck,racecheck,bench,anchors}
export MOEKIT_REQUIRE_GPU=1 RUST_BACKTRACE=1
# Examples that cargo test also builds are not test binaries.
for e in .gpu/examples/*; do rm -f ".gpu/tests/$(basename "$e")"; done
summary=()
has() { [[ ",$steps," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv >"$out/smi.txt" 2>&1
if has tests; then
  OUT="$out" bash .gpu/run.sh >"$out/tests.txt" 2>&1; summary+=("tests: $(tail -1 "$out/tests.txt")")
fi
# The device tool stops a command at 600 s and then returns only what is already under $OUT:
# sanitizer binaries that would start after DEADLINE seconds are skipped (and reported).
deadline=${DEADLINE:-520}
san() { # $1 tool
  local fails=0
  for t in .gpu/tests/*; do
    n=$(basename "$t")
    [ "$n" = lib-moekit ] && continue  # no tests: the sanitizer would report "no CUDA API call"
    [ -n "${SANITIZE:-}" ] && [[ ",$SANITIZE," != *",$n,"* ]] && continue
    if [ "$SECONDS" -gt "$deadline" ]; then echo "$1 $n: skipped (deadline)" >>"$out/sanitizer.txt"; continue; fi
    PROPTEST_CASES=8 timeout 300 compute-sanitizer --tool "$1" --error-exitcode 99 "$t" --include-ignored --skip deepseek_v3 --skip gpu_decompress_large_matches_oracle \
      >"$out/$1-$n.txt" 2>&1 || { fails=$((fails+1)); echo "$1 $n: rc=$?" >>"$out/$1-failures.txt"; }
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/$1-$n.txt" | tail -1 | sed "s/^/$1 $n: /" >>"$out/sanitizer.txt"
  done
  summary+=("$1: $fails failing binaries")
}
if has bench; then
  if has anchors; then
    PYTHONUNBUFFERED=1 timeout 400 python3 .gpu/anchors/torch_anchors.py --cases "${ANCHOR_CASES:-dsv3,qwen3,mixtral}" \
      --tokens "${ANCHOR_TOKENS:-128,4096,16384}" --json "$out/torch.json" >"$out/anchors.txt" 2>&1
    summary+=("anchors: rc=$?")
  fi
  a=(); [ -f "$out/torch.json" ] && a=(--anchors "$out/torch.json")
  timeout 560 .gpu/examples/bench_report --filter "${REPORT_FILTER:-}" --json "$out/bench.json" "${a[@]}" >"$out/bench.txt" 2>&1
  summary+=("bench_report: rc=$?")
fi
if has demo; then
  # The README's first command: the DeepSeek-V3-shaped layer with random weights, checked against
  # the CPU reference, eager and as a CUDA graph.
  timeout 300 .gpu/examples/moe_layer >"$out/demo.txt" 2>&1; summary+=("demo: rc=$?")
  timeout 300 .gpu/examples/moe_layer --graph >"$out/demo-graph.txt" 2>&1; summary+=("demo --graph: rc=$?")
fi
if has router; then
  # The router GEMM through cuBLAS (torch), against the crate's own (the layer's router stage).
  timeout 120 python3 scripts/router_cublas.py >"$out/router-cublas.txt" 2>&1; summary+=("router-cublas: rc=$?")
  for m in qwen3-30b-a3b mixtral-8x7b; do
    timeout 300 .gpu/examples/moe_layer --preset $m >"$out/demo-$m.txt" 2>&1; summary+=("demo $m: rc=$?")
  done
fi
if has criterion; then
  for b in .gpu/benches/*; do [ "$(basename "$b")" = lib-moekit ] && continue; timeout 200 "$b" --bench >>"$out/criterion.txt" 2>&1; done
  summary+=("criterion: done")
fi
if has ncu-gemm; then
  for c in ${NCU_GEMM_CASES:-dsv3/T16384/gemm-up dsv3/T4096/gemm-up}; do
    timeout 200 ncu --clock-control none -k regex:grouped_gemm_wgmma --launch-skip 3 --launch-count 1 --set full \
      .gpu/examples/bench_report --filter "$c" --tokens "$(echo $c | sed 's|.*/T\([0-9]*\)/.*|\1|')" --reps 2 \
      >"$out/ncu-$(echo $c | tr / _).txt" 2>&1
  done
  summary+=("ncu-gemm: done")
fi
if has ncu-gating; then
  timeout 300 ncu --clock-control none -k regex:topk_gating --launch-skip 10 --launch-count 1 --set full \
    .gpu/examples/bench_report --filter dsv3/T16384/gate-noaux-tc --tokens 16384 --reps 12 >"$out/ncu-gating.txt" 2>&1
  summary+=("ncu-gating: rc=$?")
  # Executed instructions per SASS instruction (which lines of the kernel cost the ~1000
  # instructions per row?): the source page of a SourceCounters report.
  timeout 200 ncu --clock-control none -k regex:topk_gating --launch-skip 10 --launch-count 1 --section SourceCounters \
    -f -o "$out/gating-source" .gpu/examples/bench_report --filter dsv3/T4096/gate-noaux-tc --tokens 4096 --reps 12 \
    >"$out/ncu-gating-source.txt" 2>&1
  ncu -i "$out/gating-source.ncu-rep" --page source --print-source sass --csv >"$out/gating-sass.csv" 2>&1
  summary+=("ncu-gating source: rc=$?")
fi
if has ncu-mla; then
  timeout 200 ncu --clock-control none -k regex:decompress_wgmma --launch-skip 3 --launch-count 1 --set full \
    .gpu/examples/bench_report --filter mla/T8192/decompress --reps 2 >"$out/ncu-mla.txt" 2>&1
  summary+=("ncu-mla: rc=$?")
  # Per-SASS-instruction stall samples and counts: where do the epilogue's ~3 us per tile go?
  timeout 200 ncu --clock-control none -k regex:decompress_wgmma --launch-skip 3 --launch-count 1 \
    --section SourceCounters --section WarpStateStats -f -o "$out/mla-source" \
    .gpu/examples/bench_report --filter mla/T8192/decompress --reps 2 >"$out/ncu-mla-source.txt" 2>&1
  ncu -i "$out/mla-source.ncu-rep" --page source --print-source sass --csv >"$out/mla-sass.csv" 2>&1
  summary+=("ncu-mla source: rc=$?")
fi
if has ceiling; then
  # Each bar against what any GEMM of its FLOPs reaches here: bench_report's `*-dense` cases (ours)
  # and scripts/dense_ceiling.py (cuBLAS, timed the same way) beside the routed cases, in
  # CEILING_ROUNDS interleaved rounds (BENCHMARKS.md run 34).
  cfilter=${CEILING_FILTER:-"dense,=dsv3/T16384/gemm-up,=dsv3/T16384/gemm-down,=dsv3/T16384/gemm-up-swiglu,-balanced,=mixtral/T16384/gemm-up,=qwen3/T16384/gemm-up,=mla/T32768/decompress,=mla/T8192/decompress,=mla/T1024/decompress,=dsv3/T4096/gemm-up"}
  for r in $(seq 1 "${CEILING_ROUNDS:-2}"); do
    timeout 250 .gpu/examples/bench_report --tokens 4096,16384 --filter "$cfilter" --json "$out/ceiling-ours$r.json" \
      >"$out/ceiling-ours$r.txt" 2>&1
    timeout 150 python3 scripts/dense_ceiling.py --json "$out/ceiling-cublas$r.json" >"$out/ceiling-cublas$r.txt" 2>&1
    summary+=("ceiling round $r: done")
  done
fi
if has power; then
  # Is a case's time the kernel's or the power cap's? SM clock, instantaneous power and the SW
  # power cap flag while the case runs 300 times back to back (scripts/power_sample.py).
  for c in ${POWER_CASES:-dsv3/T16384/gemm-up-swiglu dsv3/T4096/gemm-up mla/T32768/decompress dsv3/T4096/layer}; do
    timeout 200 python3 scripts/power_sample.py "$c" -- .gpu/examples/bench_report --filter "$c" --reps 300 \
      2>>"$out/power-bench.txt" | tee -a "$out/power.txt"
  done
  summary+=("power: $(wc -l <"$out/power.txt" 2>/dev/null || echo 0) cases")
fi
if has energy; then
  # Joules per launch at the power limit (scripts/energy_per_launch.py, NVML's energy counter): cuBLAS
  # GEMMs of the T = 4096 layer's FLOPs, a read of its weights, and bench_report cases back to
  # back for ~5 s each (BENCHMARKS.md run 41: each bar as a joule budget).
  timeout 500 python3 scripts/energy_per_launch.py \
    --cases "${ENERGY_CASES:-dsv3/T4096/layer,dsv3/T16384/gemm-up,dsv3/T16384/gemm-up-swiglu-balanced,dsv3/T16384/gemm-up-dense}" \
    --json "$out/energy.json" >"$out/energy.txt" 2>&1
  summary+=("energy: rc=$?")
fi
# Sanitizers last: the slowest step, cut by DEADLINE.
has memcheck && san memcheck
has racecheck && san racecheck
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
tar czf "$final/logs.tgz" -C "$out" .
for f in bench.txt bench.json torch.json summary.txt demo.txt router-cublas.txt energy.json; do [ -f "$out/$f" ] && cp "$out/$f" "$final/"; done
exit 0  # the steps' results are in the summary; a missing optional file is not a failure
