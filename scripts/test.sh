#!/usr/bin/env bash
# The README's test command: installs what the build needs (nvcc 13.0 and libclang from pip
# wheels, into .toolkit/), then checks formatting, lints, builds the docs and runs every test.
# Without a GPU the GPU tests print "SKIPPED (no GPU): <test>"; with MOEKIT_REQUIRE_GPU=1 they fail
# instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-cuda.sh
export LIBCLANG_PATH="${LIBCLANG_PATH:-$PWD/.toolkit/libclang/clang/native}"
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps
cargo test --release -- --nocapture "$@"
