#!/usr/bin/env bash
# ncu over one launch of one bench_report case under several settings (run-time switches), on the
# GPU machine: kernel time, SM clock, tensor-pipe utilization and the warp-state section, one file
# per setting under $OUT. Uses the bundle scripts/ab-env.sh unpacked (/tmp/ab-env), or unpacks
# .gpu-packed/bundle.tar.xz there itself.
#   usage: CASE=mla/T1024/decompress KERNEL=decompress_wgmma bash scripts/ncu-ab.sh "SETTING" ...
#   (a SETTING is space-separated VAR=value assignments, "-" for none; BENCHMARKS.md run 38 used it)
set -u
cd "$(dirname "$0")/.."
b=/tmp/ab-env
if [ ! -x "$b/.gpu/examples/bench_report" ]; then
  rm -rf "$b" && mkdir -p "$b"
  python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" .gpu-packed/bundle.tar.xz "$b" || exit 1
fi
case=${CASE:-mla/T1024/decompress}
out=${OUT:-/tmp/ncu-ab}; mkdir -p "$out"
for s in "$@"; do
  [ "$s" = - ] && s=""
  env $s timeout 120 ncu --clock-control none -k "regex:${KERNEL:-decompress_wgmma}" --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section LaunchStats \
    --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second,gpu__time_duration.sum \
    "$b/.gpu/examples/bench_report" --filter "=$case" --reps 2 \
    >"$out/ncu-$(echo "${s:-default}" | tr ' =/' '_-_')-$(echo "$case" | tr / _).txt" 2>&1
done
