#!/usr/bin/env bash
# Type-checks the whole workspace with `--features cuda` on a machine without a GPU or a CUDA
# install: NVIDIA's compiler comes from PyPI's wheels (nvcc, its front-end and libnvvm pinned to one
# release, since a newer libnvvm writes PTX that the older ptxas refuses), candle's kernels are
# compiled to PTX for CUDA_COMPUTE_CAP (default 90, an H100/H200), and our code is checked against
# candle's CUDA backend. It proves the CUDA build compiles, not that it runs: that needs a GPU.
# About 12 minutes on 2 cores the first time; the toolchain goes in $CUDA_VENV (default
# /tmp/cuda-venv), the build in $CUDA_TARGET (default target/cuda-check).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CUDA_VENV:-/tmp/cuda-venv}
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install --quiet "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" \
  "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
root=$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13"))')
export PATH="$root/bin:$PATH" CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
nvcc --version | tail -1
cargo check --workspace --all-targets --features cuda --target-dir "${CUDA_TARGET:-target/cuda-check}"
# The NCCL collective (sae-core's `nccl` feature), with its test.
cargo check -p sae-core --all-targets --features nccl --target-dir "${CUDA_TARGET:-target/cuda-check}"
