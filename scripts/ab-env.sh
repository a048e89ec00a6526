#!/usr/bin/env bash
# A/B of run-time switches (environment variables) on one build, on the GPU machine: unpacks a
# bundle packed by scripts/pack-gpu-bundle.sh, optionally runs test binaries under each setting
# and compute-sanitizer over some, then times bench_report's cases under each setting, rounds
# interleaved so that every setting sees the same clocks. Everything lands in $OUT (ab-env.tgz,
# table.txt, summary.txt), refreshed after each step: a run cut off by the device's time limit
# still returns what it did.
#
# usage: bash scripts/ab-env.sh ROUNDS FILTER "SETTING;SETTING;..."
#   a SETTING is space-separated VAR=value assignments ("-" or "" for none), e.g.
#   bash scripts/ab-env.sh 3 "=dsv3/T16384/gemm-down" "MOEKIT_GEMM_FOLD_SMALL=0;MOEKIT_GEMM_FOLD_SMALL=16"
# ROUNDS = 0 runs the test and sanitizer steps only.
# Env: BUNDLE (name under .gpu-packed/, default bundle), TOKENS (bench_report --tokens), REPS,
#   TESTS (comma-separated test binaries; "all" for every one) run under every TEST_ENV setting
#   (";"-separated, default one run with none), MEMCHECK / RACE (comma-separated test binaries for
#   compute-sanitizer), DEMO (1: the moe_layer demo, eager and --graph, under DEMO_ENV).
set -u
cd "$(dirname "$0")/.."
rounds=${1:-2}; filter=${2:-}; settings=${3:--}
b=/tmp/ab-env; o=$(mktemp -d /tmp/ab-env-out.XXXX); final=${OUT:-/tmp/ab-env-final}; mkdir -p "$final"
save() { tar czf "$final/ab-env.tgz" -C "$o" . ; cp "$o"/summary.txt "$o"/table.txt "$final/" 2>/dev/null; true; }
rm -rf "$b" && mkdir -p "$b"
python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" ".gpu-packed/${BUNDLE:-bundle}.tar.xz" "$b" || exit 1
for e in "$b"/.gpu/examples/*; do rm -f "$b/.gpu/tests/$(basename "$e")"; done
export MOEKIT_REQUIRE_GPU=1 RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.limit --format=csv >"$o/smi.txt" 2>&1
note() { echo "$*" | tee -a "$o/summary.txt"; save; }
with_env() { # $1 = setting, rest = command
  local s=$1; shift
  if [ -z "$s" ] || [ "$s" = - ]; then "$@"; else env $s "$@"; fi
}
if [ -n "${TESTS:-}" ]; then
  IFS=';' read -ra tenvs <<<"${TEST_ENV:--}"
  for te in "${tenvs[@]}"; do
    for t in "$b"/.gpu/tests/*; do
      n=$(basename "$t"); [ "$n" = lib-moekit ] && continue
      [ "$TESTS" != all ] && [[ ",$TESTS," != *",$n,"* ]] && continue
      log="$o/test-$n-$(echo "$te" | tr ' =/' '_-_').txt"
      with_env "$te" timeout 400 "$t" --include-ignored >"$log" 2>&1
      note "test $n [$te]: rc=$? $(grep -E '^test result' "$log" | tail -1)"
    done
  done
fi
for tool in memcheck racecheck; do
  list=${MEMCHECK:-}; [ $tool = racecheck ] && list=${RACE:-}
  [ -z "$list" ] && continue
  for n in ${list//,/ }; do
    PROPTEST_CASES=8 timeout 300 compute-sanitizer --tool $tool --error-exitcode 99 "$b/.gpu/tests/$n" --include-ignored \
      --skip deepseek_v3 --skip gpu_decompress_large_matches_oracle >"$o/$tool-$n.txt" 2>&1
    note "$tool $n: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$o/$tool-$n.txt" | tail -1)"
  done
done
if [ "${DEMO:-0}" = 1 ]; then
  with_env "${DEMO_ENV:--}" timeout 200 "$b/.gpu/examples/moe_layer" >"$o/demo.txt" 2>&1; note "demo: rc=$?"
  with_env "${DEMO_ENV:--}" timeout 200 "$b/.gpu/examples/moe_layer" --graph >"$o/demo-graph.txt" 2>&1; note "demo --graph: rc=$?"
fi
IFS=';' read -ra envs <<<"$settings"
tok=(); [ -n "${TOKENS:-}" ] && tok=(--tokens "$TOKENS")
for ((r = 0; r < rounds; r++)); do
  for i in "${!envs[@]}"; do
    with_env "${envs[$i]}" timeout 300 "$b/.gpu/examples/bench_report" --filter "$filter" --reps "${REPS:-50}" "${tok[@]}" \
      --json "$o/bench-$i-$r.json" >"$o/bench-$i-$r.txt" 2>&1 || note "bench setting $i round $r: rc=$?"
  done
  # Per case: each setting's medians over the rounds so far, as min-max.
  python3 - "$o" "$settings" "$((r + 1))" >"$o/table.txt" <<'PY'
import json, sys, os
o, settings, rounds = sys.argv[1], sys.argv[2].split(';'), int(sys.argv[3])
res = {}
for i in range(len(settings)):
    for r in range(rounds):
        p = os.path.join(o, f"bench-{i}-{r}.json")
        if not os.path.exists(p): continue
        for case, v in json.load(open(p)).items():
            if isinstance(v, dict) and v.get("us") is not None:
                res.setdefault(case, {}).setdefault(i, []).append(v["us"])
print("| case | " + " | ".join(s or "-" for s in settings) + " |")
print("| --- |" + " ---: |" * len(settings))
for case in res:
    cells = []
    for i in range(len(settings)):
        xs = res[case].get(i, [])
        cells.append(f"{min(xs):.1f}-{max(xs):.1f}" if xs else "-")
    print(f"| `{case}` | " + " | ".join(cells) + " |")
PY
  save
done
cat "$o/table.txt" 2>/dev/null
cat "$o/summary.txt" 2>/dev/null
save
