#!/usr/bin/env bash
# The README's demo command: installs what the build needs, then runs the main demo on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-cuda.sh
export LIBCLANG_PATH="${LIBCLANG_PATH:-$PWD/.toolkit/libclang/clang/native}"
cargo run --release --example moe_layer -- "$@"
