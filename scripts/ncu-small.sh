#!/usr/bin/env bash
# Profile of the small kernels (gating, routing plan) on the GPU machine: the gating tests, ncu
# --set full per case and SASS source pages (executed instructions and stall samples per
# instruction), logs packed into $OUT/ncu.tgz.
# usage (device): bash scripts/ncu-small.sh   (carry .gpu-packed with bundle.tar.xz)
set -u
cd "$(dirname "$0")/.."
rm -rf .gpu && python3 -c "import tarfile; tarfile.open('.gpu-packed/bundle.tar.xz').extractall('.')"
o=$(mktemp -d /tmp/ncu.XXXX); final=${OUT:-/tmp/ncu-out}; mkdir -p "$final"
b=.gpu/examples/bench_report
MOEKIT_REQUIRE_GPU=1 timeout 60 .gpu/tests/gating >"$o/test-gating.txt" 2>&1; echo "gating tests rc=$? $(grep 'test result' "$o/test-gating.txt")"
for c in dsv3/T4096/gate-noaux-tc dsv3/T16384/gate-noaux-tc qwen3/T4096/gate-softmax-topk; do
  t=$(echo $c | sed 's|.*/T\([0-9]*\)/.*|\1|'); n=$(echo $c | tr / _)
  timeout 120 ncu --clock-control none -k regex:topk_gating --launch-skip 10 --launch-count 1 --set full \
    $b --filter "$c" --tokens "$t" --reps 12 >"$o/ncu-$n.txt" 2>&1
  timeout 120 ncu --clock-control none -k regex:topk_gating --launch-skip 10 --launch-count 1 --section SourceCounters \
    --section WarpStateStats -f -o "$o/src-$n" $b --filter "$c" --tokens "$t" --reps 12 >/dev/null 2>&1
  ncu -i "$o/src-$n.ncu-rep" --page source --print-source sass --csv >"$o/sass-$n.csv" 2>&1
done
for t in 4096 16384; do
  timeout 120 ncu --clock-control none -k regex:'rank_kernel|scan_kernel|place_kernel' --launch-skip 30 --launch-count 3 --set full \
    $b --filter "dsv3/T$t/plan" --tokens $t --reps 12 >"$o/ncu-plan-$t.txt" 2>&1
done
tar czf "$final/ncu.tgz" -C "$o" --exclude '*.ncu-rep' .
grep -h -E "^  [a-z_].*\(|Duration|Achieved Occupancy|Registers Per|Executed Ipc A|Issue Slots Busy|Theoretical Occ" "$o"/ncu-*.txt | head -120
