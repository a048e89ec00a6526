#!/usr/bin/env bash
# Installs what moekit's build needs on a machine with no CUDA toolkit:
#   - nvcc, the CUDA runtime (cudart_static), CRT headers, NVVM and CCCL from NVIDIA's pip wheels,
#     pinned to 13.0.* so the code it builds runs on the H200's driver (580, CUDA 13.0);
#   - libclang for bindgen, from the `libclang` pip wheel.
# Everything goes under .toolkit/ in the repository root (ignored by git). build.rs looks there
# after NVCC, CUDA_HOME, CUDA_PATH, PATH and /usr/local/cuda, so after this script a plain
# `cargo build` works. Idempotent: a second run only checks the versions and returns.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tk="$root/.toolkit"
cuda_ver="13.0"
clang_ver="18.1.1"
py=${PYTHON:-python3}

have_cuda() { [ -x "$tk/cuda/nvidia/cu13/bin/nvcc" ] && [ -f "$tk/cuda/.moekit-cuda-$cuda_ver" ]; }
have_clang() { [ -f "$tk/libclang/clang/native/libclang.so" ] && [ -f "$tk/libclang/.moekit-libclang-$clang_ver" ]; }

pip_install() { # $1 = target dir, rest = requirements
  local dest=$1; shift
  rm -rf "$dest"
  "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir --target "$dest" "$@"
}

if have_cuda; then
  echo "install-cuda: nvcc $cuda_ver already in $tk/cuda" >&2
else
  echo "install-cuda: installing nvcc $cuda_ver.* from pip wheels into $tk/cuda (about 270 MB)" >&2
  pip_install "$tk/cuda" \
    "nvidia-cuda-nvcc==$cuda_ver.*" "nvidia-cuda-runtime==$cuda_ver.*" "nvidia-cuda-crt==$cuda_ver.*" \
    "nvidia-nvvm==$cuda_ver.*" "nvidia-cuda-cccl==$cuda_ver.*"
  # The wheels keep nvcc's companions (cicc, ptxas, crt headers) where nvcc.profile expects them
  # only once the pieces share one prefix: they do, under nvidia/cu13.
  "$tk/cuda/nvidia/cu13/bin/nvcc" --version | tail -2 >&2
  touch "$tk/cuda/.moekit-cuda-$cuda_ver"
fi

if have_clang; then
  echo "install-cuda: libclang $clang_ver already in $tk/libclang" >&2
else
  echo "install-cuda: installing libclang $clang_ver (for bindgen) into $tk/libclang" >&2
  pip_install "$tk/libclang" "libclang==$clang_ver"
  touch "$tk/libclang/.moekit-libclang-$clang_ver"
fi
