#!/usr/bin/env bash
# A/B of two builds on the GPU machine: bundles packed by scripts/pack-gpu-bundle.sh from two
# commits (e.g. main as .gpu-packed/bundle.tar.xz, a branch renamed to .gpu-packed/next.tar.xz),
# carried together as .gpu-packed. Runs B's test binaries (MOEKIT_REQUIRE_GPU=1), bench_report on
# A and B alternately (rounds times, so both see the same clocks), optionally B's demo and
# compute-sanitizer over some test binaries. Results in $OUT/ab.tgz; a side-by-side table and the
# summary are printed.
#
# usage: bash scripts/ab-bundles.sh A.tar.xz B.tar.xz FILTER [ROUNDS] [SANITIZE]
#   e.g. bash scripts/ab-bundles.sh .gpu-packed/bundle.tar.xz .gpu-packed/next.tar.xz plan,gate 2 permute,gating
# Extra env: TEST_SIDES="a b" (whose test binaries run; default b, "" for none); SANITIZE_SIDE=a|b; B_ENV="VAR=value ..." (set for B's bench runs only, e.g.
# MOEKIT_GEMM_CLUSTER=2); DEMO_ARGS="args;args" (B's moe_layer once per ';'-separated set, e.g.
# "--shared-ctas 0;--shared-ctas 16 --graph"); SMI_CASES, SMI_REPS (below).
set -u
cd "$(dirname "$0")/.."
a_pack=$1; b_pack=$2; filter=$3; rounds=${4:-2}; sanitize=${5:-}
# The device returns at most 8 files from $OUT, so everything goes into $OUT/ab.tgz (plus
# summary.txt and table.txt), refreshed after each step: a run cut off by the time limit still
# returns what it did.
o=$(mktemp -d /tmp/ab.XXXX); final=${OUT:-/tmp/ab-out}; mkdir -p "$final"
save() { tar czf "$final/ab.tgz" -C "$o" . ; cp "$o"/summary.txt "$o"/table.txt "$final/" 2>/dev/null; true; }
for side in a b; do
  pack=$a_pack; [ $side = b ] && pack=$b_pack
  rm -rf "/tmp/ab-$side"; mkdir -p "/tmp/ab-$side" && python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$pack" "/tmp/ab-$side"
  for e in /tmp/ab-$side/.gpu/examples/*; do rm -f "/tmp/ab-$side/.gpu/tests/$(basename "$e")"; done
done
export MOEKIT_REQUIRE_GPU=1
for side in ${TEST_SIDES-b}; do
  for t in /tmp/ab-$side/.gpu/tests/*; do
    n=$(basename "$t"); [ "$n" = lib-moekit ] && continue
    timeout 200 "$t" >"$o/test-$side-$n.txt" 2>&1
    echo "test $side $n: rc=$? $(grep 'test result' "$o/test-$side-$n.txt" | tail -1)" | tee -a "$o/summary.txt"
  done
  save
done
for r in $(seq 1 "$rounds"); do
  for side in a b; do
    extra=""; [ $side = b ] && extra=${B_ENV:-}
    env $extra timeout 300 /tmp/ab-$side/.gpu/examples/bench_report --filter "$filter" --json "$o/bench-$side-$r.json" \
      >"$o/bench-$side-$r.txt" 2>&1
  done
  save
done
if [ -n "${DEMO_ARGS:-}" ]; then
  IFS=';' read -ra sets <<<"$DEMO_ARGS"
  for i in "${!sets[@]}"; do
    # shellcheck disable=SC2086
    timeout 300 /tmp/ab-b/.gpu/examples/moe_layer ${sets[$i]} >"$o/demo-$i.txt" 2>&1
    echo "demo ${sets[$i]}: rc=$? $(grep -E '/layer|check' "$o/demo-$i.txt" | tr '\n' ' ')" | tee -a "$o/summary.txt"
  done
  save
fi
san_side=${SANITIZE_SIDE:-b}
for n in ${sanitize//,/ }; do
  for tool in memcheck racecheck; do
    PROPTEST_CASES=4 timeout 200 compute-sanitizer --tool $tool --error-exitcode 99 "/tmp/ab-$san_side/.gpu/tests/$n" --skip deepseek_v3 \
      >"$o/$tool-$n.txt" 2>&1
    echo "$tool $san_side $n: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$o/$tool-$n.txt" | tail -1)" | tee -a "$o/summary.txt"
  done
  save
done
# SMI_CASES="f1,f2": each bench filter timed again (SMI_REPS launches, default 300) on A then B
# under scripts/power_sample.py: SM clock, instantaneous power and whether the SW power cap holds
# the clock (ncu locks clocks; this does not), one summary line per case and side.
if [ -n "${SMI_CASES:-}" ]; then
  for c in ${SMI_CASES//,/ }; do
    for side in a b; do
      extra=""; [ $side = b ] && extra=${B_ENV:-}
      env $extra timeout 200 python3 scripts/power_sample.py "smi $side $c" -- \
        /tmp/ab-$side/.gpu/examples/bench_report --filter "$c" --reps "${SMI_REPS:-300}" \
        2>"$o/smi-bench-$side-${c//\//_}.txt" | tee -a "$o/summary.txt"
    done
  done
  save
fi
python3 - "$o" "$rounds" <<'PY' | tee "$o/table.txt"
import json, sys
o, rounds = sys.argv[1], int(sys.argv[2])
runs = {}
for s in "ab":
    for r in range(1, rounds + 1):
        try:
            runs[(s, r)] = json.load(open(f"{o}/bench-{s}-{r}.json"))
        except (OSError, ValueError) as e:
            print(f"bench {s}{r}: {e}")
cases = list(dict.fromkeys(c for v in runs.values() for c in v))
print(f"{'case':44s}" + "".join(f"{s + str(r):>11}" for r in range(1, rounds + 1) for s in "ab") + "   b/a (best of each)")
for c in cases:
    vals = {k: v[c]["us"] for k, v in runs.items() if c in v}
    a = min(vals.get(("a", r), 1e30) for r in range(1, rounds + 1))
    b = min(vals.get(("b", r), 1e30) for r in range(1, rounds + 1))
    print(f"{c:44s}" + "".join(f"{vals.get((s, r), float('nan')):11.2f}" for r in range(1, rounds + 1) for s in "ab") + f"  {b / a:5.3f}")
PY
save
cat "$o/summary.txt" 2>/dev/null
exit 0
