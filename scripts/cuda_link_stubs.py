#!/usr/bin/env python3
"""Link-time stand-ins for the CUDA libraries, so that `--features cuda` binaries link on a machine
without a GPU or a CUDA toolkit (`scripts/gpu_check.sh build`).

candle-core links cudarc with `dynamic-linking`: the binaries name libcuda, libcublas, libcublasLt,
libcurand, libnvrtc (and libnccl with sae-core's `nccl`) as needed libraries. PyPI has the toolkit's
compiler but no driver library, and the others are hundreds of megabytes. So this writes, for each,
a shared library that defines every function cudarc declares for it (read from cudarc's own
bindings) as an empty stub, under the real library's soname. The binaries then record the real
sonames (libcuda.so.1, libcublas.so.13, ...), and on the GPU machine the dynamic loader binds them
to the real libraries (PyTorch's wheels, the driver); the stubs never run. libcudart comes from
PyPI's runtime wheel and is only linked, through an unversioned name.

    python scripts/cuda_link_stubs.py CUDARC_SRC OUT_DIR [CUDART_SO]
"""

import os
import re
import subprocess
import sys

# cudarc module -> (library, soname). CUDA 13's sonames (curand kept its 10).
LIBS = {
    "driver": ("cuda", "libcuda.so.1"),
    "cublas": ("cublas", "libcublas.so.13"),
    "cublaslt": ("cublasLt", "libcublasLt.so.13"),
    "curand": ("curand", "libcurand.so.10"),
    "nvrtc": ("nvrtc", "libnvrtc.so.13"),
    "nccl": ("nccl", "libnccl.so.2"),
}


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for module, (lib, soname) in LIBS.items():
        text = open(os.path.join(src, module, "sys", "mod.rs")).read()
        names = sorted(set(re.findall(r"pub unsafe fn (\w+)\s*\(", text)))
        c = os.path.join(out, f"{lib}_stub.c")
        with open(c, "w") as f:
            f.write("/* Link-time stand-ins; never called (see scripts/cuda_link_stubs.py). */\n")
            for n in names:
                f.write(f"void {n}(void) {{}}\n")
        so = os.path.join(out, f"lib{lib}.so")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", so, c, f"-Wl,-soname,{soname}"], check=True)
        print(f"{so}: {len(names)} functions, soname {soname}")
    if len(sys.argv) > 3:
        link = os.path.join(out, "libcudart.so")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(sys.argv[3]), link)
        print(f"{link} -> {sys.argv[3]}")


if __name__ == "__main__":
    main()
