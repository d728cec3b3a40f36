#!/usr/bin/env bash
# The main job (README's first command): fetch the pinned assets, build, and run the neuron-SAE
# experiment end to end on SmolLM2-135M-Instruct. Extra arguments go to the program
# (`bash scripts/main_job.sh --help` lists them; `--tokens`, `--d-sae` etc. scale it up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_openblas.sh
python3 scripts/fetch_assets.py smollm2 corpora
features=()
if [ -n "${SAE_CUDA:-}" ]; then features=(--features cuda); fi
cargo run --release "${features[@]}" --example main_job -- "$@"
