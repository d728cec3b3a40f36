# Sourced by check_cuda_build.sh and gpu_check.sh: NVIDIA's compiler from PyPI's wheels (nvcc, its
# front-end and libnvvm pinned to one release, since a newer libnvvm writes PTX that the older
# ptxas refuses) in $CUDA_VENV (default /tmp/cuda-venv), put on PATH and in the variables the CUDA
# crates read, code for CUDA_COMPUTE_CAP (default 90, an H100/H200). Sets $venv and $root.
venv=${CUDA_VENV:-/tmp/cuda-venv}
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install --quiet "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" \
  "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
root=$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13"))')
export PATH="$root/bin:$PATH" CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
