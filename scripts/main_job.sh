#!/usr/bin/env bash
# The main job (README's first command): fetch the pinned assets, build, and run the neuron-SAE
# experiment end to end on SmolLM2-135M-Instruct. Extra arguments go to the program
# (`bash scripts/main_job.sh --help` lists them; `--tokens`, `--d-sae` etc. scale it up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_openblas.sh
python3 scripts/fetch_assets.py smollm2 corpora
# OpenBLAS picks a kernel family per CPU (AVX-512 machines get SkylakeX/Cooperlake, others
# Haswell or Zen), and each sums in its own order: the harvested activations, and so the trained
# SAEs, then differ in the last bits and training amplifies that. Pinning one family that every
# x86-64 machine with AVX2 runs makes the headline the same on all of them (docs/reliability.md).
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-Haswell}"
features=()
if [ -n "${SAE_CUDA:-}" ]; then features=(--features cuda); fi
cargo run --release "${features[@]}" --example main_job -- "$@"
