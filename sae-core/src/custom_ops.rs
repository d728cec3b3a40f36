//! What the device path's own ops share ([`crate::pairs`], [`crate::fused_adam`]): the
//! contiguous part of a storage a layout covers; on CUDA, kernels compiled from their `.cu`
//! source by NVRTC once per process and launched one thread per element, grid-strided; and, for
//! tests, the same `.cu` source built for the CPU by the host's C++ compiler, with stand-ins for
//! CUDA's thread indices, so that a kernel's arithmetic is checked where no GPU is at hand.

use candle_core::Layout;

/// The part of `v` that `l` covers, which must be contiguous (`op`, `what`: for the error).
pub(crate) fn part<'v, T>(
    v: &'v [T],
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'v [T]> {
    let (start, end) = offsets(l, op, what)?;
    Ok(&v[start..end])
}

/// [`part`], mutably.
pub(crate) fn part_mut<'v, T>(
    v: &'v mut [T],
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'v mut [T]> {
    let (start, end) = offsets(l, op, what)?;
    Ok(&mut v[start..end])
}

/// Where the contiguous elements `l` covers start and end.
pub(crate) fn offsets(l: &Layout, op: &str, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} is not contiguous")))
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, CudaViewMut, LaunchArgs, LaunchConfig,
    };
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};

    /// The elements of `s` that layout `l` covers (contiguous), as `T`, from their start on.
    pub(crate) fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &candle_core::Layout,
        op: &str,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        Ok(s.as_cuda_slice::<T>()?
            .slice(super::offsets(l, op, what)?.0..))
    }

    /// [`view`], mutably.
    pub(crate) fn view_mut<'a, T: CudaDType>(
        s: &'a mut CudaStorage,
        l: &candle_core::Layout,
        op: &str,
        what: &str,
    ) -> candle_core::Result<CudaViewMut<'a, T>> {
        let start = super::offsets(l, op, what)?.0;
        Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(start..))
    }

    /// A kernel source's PTX, compiled by NVRTC the first time it is asked for (`cell` keeps
    /// it, or NVRTC's refusal, for the process).
    pub(crate) fn ptx(
        cell: &'static OnceLock<Result<String, String>>,
        source: &str,
        what: &str,
    ) -> candle_core::Result<&'static str> {
        cell.get_or_init(|| {
            nvrtc::compile_ptx(source)
                .map(|p| p.to_src())
                .map_err(|e| format!("compiling the {what} with NVRTC: {e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// Launches a kernel, its arguments pushed, over `n` elements: blocks of 256 threads, at
    /// most 2^20 blocks (the kernels stride over the rest).
    pub(crate) fn launch(mut b: LaunchArgs<'_>, name: &str, n: u64) -> candle_core::Result<()> {
        let threads = 256u32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(u64::from(threads)).min(1 << 20) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller pushed the kernel's arguments in its order: slices on this device
        // holding what the kernel reads and writes for `n` elements, and its scalars.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| candle_core::Error::Msg(format!("kernel {name}: {e:?}")))
    }
}

#[cfg(test)]
pub(crate) mod emulation {
    use std::io::Write;
    use std::path::PathBuf;

    /// `v` as the harness reads it: shortest round-trip decimals, space-separated (C's
    /// `scanf("%a")` and `"%f"` take them exactly).
    pub(crate) fn floats(v: &[f32]) -> String {
        v.iter().map(|x| format!("{x:e} ")).collect()
    }

    /// A program built from `sae-core/src/<kernel>` for the CPU: CUDA's thread indices become
    /// globals (`launch_all(grid, block, f)` runs `f` once per thread, one after another),
    /// `__global__` and `__device__` plain functions, `atomicAdd` a plain add (one thread runs
    /// at a time) and the bit casts `memcpy`; `main_body` is `main`'s. `None`, after saying so,
    /// where there is no C++ compiler.
    pub(crate) struct Harness {
        _dir: tempfile::TempDir,
        exe: PathBuf,
    }

    impl Harness {
        pub(crate) fn build(kernel: &str, main_body: &str) -> Option<Harness> {
            let dir = tempfile::tempdir().unwrap();
            let source = dir.path().join("harness.cpp");
            let kernel = format!("{}/src/{kernel}", env!("CARGO_MANIFEST_DIR"));
            std::fs::write(
                &source,
                format!(
                    r#"#include <cstdio>
#include <cstring>
#include <cmath>
struct Dim3 {{ unsigned x, y, z; }};
static Dim3 blockIdx, blockDim, gridDim, threadIdx;
#define __global__
#define __device__ static
template <typename T> T atomicAdd(T *p, T v) {{ T old = *p; *p += v; return old; }}
static float __uint_as_float(unsigned int u) {{ float f; std::memcpy(&f, &u, 4); return f; }}
static unsigned int __float_as_uint(float f) {{ unsigned int u; std::memcpy(&u, &f, 4); return u; }}
#include "{kernel}"
template <typename F> void launch_all(unsigned grid, unsigned block, F f) {{
  gridDim.x = grid; blockDim.x = block;
  for (unsigned b = 0; b < grid; b++)
    for (unsigned t = 0; t < block; t++) {{ blockIdx.x = b; threadIdx.x = t; f(); }}
}}
int main() {{
{main_body}
}}
"#
                ),
            )
            .unwrap();
            let exe = dir.path().join("harness");
            let Ok(built) = std::process::Command::new("c++")
                .args(["-O1", "-std=c++17", "-o"])
                .arg(&exe)
                .arg(&source)
                .output()
            else {
                eprintln!("skipped: no C++ compiler (c++) to build {kernel} for the CPU");
                return None;
            };
            assert!(
                built.status.success(),
                "{}",
                String::from_utf8_lossy(&built.stderr)
            );
            Some(Harness { _dir: dir, exe })
        }

        /// Runs the program on `input` (its stdin) and returns its stdout.
        pub(crate) fn run(&self, input: &str) -> String {
            let mut child = std::process::Command::new(&self.exe)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "the harness failed");
            String::from_utf8(out.stdout).unwrap()
        }
    }
}
