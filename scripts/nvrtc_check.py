#!/usr/bin/env python3
"""Compiles our CUDA kernels' sources with NVRTC as the trainer does at run time, without a GPU.

`sae-core` compiles `pairs.cu` and `fused_adam.cu` with NVRTC the first time a CUDA trainer needs
them (`custom_ops::cuda::ptx`: cudarc's `compile_ptx`, no options), and falls back to candle's
tensor ops where that fails. NVRTC is a library that needs no GPU, so this script loads a real
`libnvrtc` (from NVIDIA's PyPI wheels, the same files PyTorch's CUDA wheels carry) through ctypes,
compiles each source the same way, and hands the PTX to `ptxas` for the target chip: a source
NVRTC refuses, or PTX the chip's assembler refuses, fails here, not on the GPU machine.

    python3 scripts/nvrtc_check.py LIBNVRTC [LIBNVRTC ...] --ptxas PATH --arch sm_90

Prints one line per (library, source) and exits 1 if any failed.
"""

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

SOURCES = ["sae-core/src/pairs.cu", "sae-core/src/fused_adam.cu"]


def compile_with(lib, path):
    """NVRTC's PTX for the source at `path` (no options), or raises with NVRTC's log."""
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(),
                                      0, None, None), "create")
    try:
        status = lib.nvrtcCompileProgram(prog, 0, None)
        if status != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"{error(lib, status)}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
        ptx = ctypes.create_string_buffer(size.value)
        check(lib, lib.nvrtcGetPTX(prog, ptx), "PTX")
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def error(lib, status):
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib.nvrtcGetErrorString(status).decode()


def check(lib, status, what):
    if status != 0:
        raise RuntimeError(f"{what}: {error(lib, status)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("libs", nargs="+", help="libnvrtc.so files to compile with")
    ap.add_argument("--ptxas", required=True, help="ptxas to assemble the PTX with")
    ap.add_argument("--arch", default="sm_90", help="the chip the PTX is assembled for")
    args = ap.parse_args()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    failed = 0
    for path in args.libs:
        lib = ctypes.CDLL(path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        for src in SOURCES:
            what = f"NVRTC {major.value}.{minor.value} {src}"
            try:
                ptx = compile_with(lib, src)
                kernels = [l.split()[-1].rstrip("(") for l in ptx.splitlines()
                           if l.startswith(".visible .entry")]
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                    f.write(ptx)
                    f.flush()
                    out = subprocess.run([args.ptxas, f"-arch={args.arch}", "-o", os.devnull,
                                          f.name], capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"ptxas {args.arch}: {out.stderr.strip()}")
                print(f"ok   {what}: {len(kernels)} kernels ({', '.join(kernels)}), "
                      f"assembled for {args.arch}")
            except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
                failed += 1
                print(f"FAIL {what}: {e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
