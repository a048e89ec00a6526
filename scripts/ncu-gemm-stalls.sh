#!/usr/bin/env bash
# Where the grouped GEMM's warps wait, per SASS instruction, on the GPU machine: ncu's full set
# (with warp-state sampling) over one launch of the grouped GEMM in each bench_report case given,
# exported as the details page and the per-instruction source page (CSV); logs in $OUT/ncu-gemm.tgz.
# usage (device, .gpu-packed carried): bash scripts/ncu-gemm-stalls.sh TOKENS CASE [CASE...]
set -u
cd "$(dirname "$0")/.."
tokens=$1; shift
b=/tmp/ncu-gemm-bundle; o=$(mktemp -d /tmp/ncu-gemm.XXXX); final=${OUT:-/tmp/ncu-gemm-out}; mkdir -p "$final"
rm -rf "$b" && mkdir -p "$b"
python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" ".gpu-packed/${BUNDLE:-bundle}.tar.xz" "$b" || exit 1
for c in "$@"; do
  n=$(echo "$c" | tr '/=' '__')
  timeout 240 ncu --clock-control none -k regex:grouped_gemm_wgmma --launch-skip 3 --launch-count 1 --set full \
    --import-source no -o "$o/$n" "$b/.gpu/examples/bench_report" --filter "$c" --tokens "$tokens" --reps 1 \
    >"$o/run-$n.txt" 2>&1
  echo "$c: rc=$?"
  ncu -i "$o/$n.ncu-rep" --page details >"$o/details-$n.txt" 2>&1
  ncu -i "$o/$n.ncu-rep" --page source --print-source sass --csv >"$o/sass-$n.csv" 2>&1
  tar czf "$final/ncu-gemm.tgz" -C "$o" --exclude '*.ncu-rep' .
done
# Summaries: scripts/ncu_stalls.py $o/sass-CASE.csv [TOP] [--regions] (per instruction and per region).
grep -h -E "Duration|Executed Ipc A|Issue Slots Busy|SM Frequency|Compute \(SM\) Throughput|L2 Cache Throughput|DRAM Throughput" "$o"/details-*.txt
