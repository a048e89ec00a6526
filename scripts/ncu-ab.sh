#!/usr/bin/env bash
# ncu over one launch of one bench_report case under several settings (run-time switches), on the
# GPU machine: kernel time, SM clock, tensor-pipe utilization and the warp-state section, one file
# per setting under $OUT. Uses the bundle scripts/ab-env.sh unpacked (/tmp/ab-env), or unpacks
# .gpu-packed/bundle.tar.xz there itself.
#   usage: CASE=mla/T1024/decompress KERNEL=decompress_wgmma bash scripts/ncu-ab.sh "SETTING" ...
#   (a SETTING is space-separated VAR=value assignments, "-" for none; BENCHMARKS.md run 38 used it)
# CASE may list several cases, comma-separated; TOKENS is bench_report's --tokens (e.g.
# CASE=dsv3/T16384/gemm-up-swiglu-balanced,dsv3/T16896/gemm-up-swiglu-balanced TOKENS=16384,16896
# KERNEL=grouped_gemm_wgmma: BENCHMARKS.md run 39's fold-cost question). MEMORY=1 adds ncu's memory
# sections (DRAM bytes, L2 hit rate, shared-memory traffic).
set -u
cd "$(dirname "$0")/.."
b=/tmp/ab-env
if [ ! -x "$b/.gpu/examples/bench_report" ]; then
  rm -rf "$b" && mkdir -p "$b"
  python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" .gpu-packed/bundle.tar.xz "$b" || exit 1
fi
out=${OUT:-/tmp/ncu-ab}; mkdir -p "$out"
tok=(); [ -n "${TOKENS:-}" ] && tok=(--tokens "$TOKENS")
metrics=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second,gpu__time_duration.sum
mem=()
if [ "${MEMORY:-0}" = 1 ]; then
  mem=(--section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables)
  metrics+=,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct
fi
IFS=',' read -ra cases <<<"${CASE:-mla/T1024/decompress}"
for case in "${cases[@]}"; do
  for s in "$@"; do
    [ "$s" = - ] && s=""
    env $s timeout 120 ncu --clock-control none -k "regex:${KERNEL:-decompress_wgmma}" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section LaunchStats "${mem[@]}" \
      --metrics "$metrics" \
      "$b/.gpu/examples/bench_report" --filter "=$case" --reps 2 --settle-ms 0 "${tok[@]}" \
      >"$out/ncu-$(echo "${s:-default}" | tr ' =/' '_-_')-$(echo "$case" | tr / _).txt" 2>&1
  done
done
