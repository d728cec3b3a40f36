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
source scripts/cuda_env.sh
nvcc --version | tail -1
# Our own kernels (NVRTC compiles them at run time there), compiled here to PTX for the same chip.
for cu in sae-core/src/pairs.cu sae-core/src/fused_adam.cu; do
  nvcc --ptx -arch="sm_$CUDA_COMPUTE_CAP" -o /dev/null "$cu"
done
cargo check --workspace --all-targets --features cuda --target-dir "${CUDA_TARGET:-target/cuda-check}"
# The NCCL collective (sae-core's `nccl` feature), with its test.
cargo check -p sae-core --all-targets --features nccl --target-dir "${CUDA_TARGET:-target/cuda-check}"
