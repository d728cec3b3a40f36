#!/usr/bin/env bash
# Creates (once) the Python environment used by the side-by-side benchmarks and by the scripts that
# write the reference fixtures: SAELens 6.x, HF transformers with GGUF support, PyTorch (CPU use).
# About 3 GB and ten minutes the first time (PyPI's torch wheel carries CUDA libraries); reused after.
# Not part of CI's path: the fixtures these scripts write are committed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${SAE_VENV:-$here/.venv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import sae_lens, transformers, gguf" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "sae-lens==6.54.*" "gguf>=0.10" transformers
fi
echo "$venv"
