#!/usr/bin/env bash
# Builds the GPU bundle (../shared/tools/gpu-bundle: test, bench and example executables in .gpu/)
# and packs it into .gpu-packed/bundle.tar.xz for the device tool, whose carried folders must stay
# under 64 MiB: every executable links the whole kernel library (~5-8 MB each, ~116 MB in all), but
# the copies are nearly identical, so one solid xz archive with a large dictionary holds them in
# ~5 MB. On the GPU machine, scripts/device-check.sh unpacks it (Python's lzma: no xz needed).
#
# usage: scripts/pack-gpu-bundle.sh [gpu-bundle args]
# then:  run(carry: [".gpu-packed"], command: "bash scripts/device-check.sh [steps]")
set -euo pipefail
cd "$(dirname "$0")/.."
MOEKIT_LINEINFO=${MOEKIT_LINEINFO:-0} ../shared/tools/gpu-bundle "$@"
mkdir -p .gpu-packed
rm -f .gpu-packed/bundle.tar.xz
tar cf - .gpu | xz -T0 -6 --lzma2=dict=192MiB > .gpu-packed/bundle.tar.xz
ls -l .gpu-packed/bundle.tar.xz >&2
