#!/usr/bin/env bash
# On the GPU machine: the grouped cases beside the dense GEMM of the same FLOPs, ours
# (bench_report's `*-dense` cases) and cuBLAS's (scripts/dense_ceiling.py), rounds interleaved,
# plus the torch anchors, so that each bar can be read against what this machine's power cap
# lets any GEMM of that size reach. Logs in $OUT.
# usage: bash scripts/ceiling-check.sh [ROUNDS]
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/ceiling-out}; mkdir -p "$out"
if [ -f .gpu-packed/bundle.tar.xz ]; then
  rm -rf .gpu && python3 -c "import tarfile; tarfile.open('.gpu-packed/bundle.tar.xz').extractall('.')"
fi
filter=${FILTER:-"dense,=dsv3/T16384/gemm-up,=dsv3/T16384/gemm-down,=dsv3/T16384/gemm-up-swiglu,-balanced,=mixtral/T16384/gemm-up,=qwen3/T16384/gemm-up,=mla/T32768/decompress,=mla/T8192/decompress,=mla/T1024/decompress,=dsv3/T4096/gemm-up"}
nvidia-smi --query-gpu=name,clocks.sm,power.limit,temperature.gpu --format=csv >"$out/smi.txt" 2>&1
for r in $(seq 1 "${1:-2}"); do
  timeout 250 .gpu/examples/bench_report --tokens 4096,16384 --filter "$filter" --json "$out/ours$r.json" >"$out/ours$r.txt" 2>&1
  echo "ours round $r: rc=$?"
  timeout 150 python3 scripts/dense_ceiling.py --json "$out/dense$r.json" >"$out/dense$r.txt" 2>&1
  echo "cublas round $r: rc=$?"
done
if [ -n "${ANCHORS:-}" ]; then
  timeout 200 python3 .gpu/anchors/torch_anchors.py --cases "$ANCHORS" --tokens 16384 --json "$out/torch.json" >"$out/anchors.txt" 2>&1
  echo "anchors: rc=$?"
fi
