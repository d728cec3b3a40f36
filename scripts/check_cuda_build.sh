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
# And as the trainer compiles them there: NVRTC (CUDA 13's, and 12's as PyTorch's wheels carry it),
# no options, the PTX assembled for the chip (scripts/nvrtc_check.py). NVRTC 13 finds its builtins
# library through the library path, as gpu_check.sh's run sets it.
"$venv/bin/pip" install --quiet "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-nvrtc-cu12==12.9.86"
nvrtc13=$root/lib
nvrtc12=$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cuda_nvrtc", "lib"))')
LD_LIBRARY_PATH="$nvrtc13:$nvrtc12:${LD_LIBRARY_PATH:-}" "$venv/bin/python" scripts/nvrtc_check.py \
  "$nvrtc13/libnvrtc.so.13" "$nvrtc12/libnvrtc.so.12" --ptxas "$root/bin/ptxas" --arch "sm_$CUDA_COMPUTE_CAP"
cargo check --workspace --all-targets --features cuda --target-dir "${CUDA_TARGET:-target/cuda-check}"
# The NCCL collective (sae-core's `nccl` feature), with its test.
cargo check -p sae-core --all-targets --features nccl --target-dir "${CUDA_TARGET:-target/cuda-check}"
