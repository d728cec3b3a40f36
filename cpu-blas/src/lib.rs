//! `x W^T` through the system's OpenBLAS, when one is installed.
//!
//! Nearly all of a forward pass is `x W^T` (q/k/v, o, the MLP, the unembedding), and so is the
//! floor of an SAE training step (the encoder, `x W_enc`). candle's CPU
//! matmul (the `gemm` crate) reached 100-110 GFLOP/s inside a SmolLM2 forward pass on these 2-core
//! AVX2 machines, against about 150 for OpenBLAS's `sgemm` on the same shapes, and that gap was most
//! of the gap to PyTorch. OpenBLAS is a C library that not every machine has, so it is opened at
//! run time rather than linked: with Debian's `libopenblas0` installed the products go through it,
//! and without it they stay on candle's matmul with no difference in results beyond rounding.
//!
//! `CPU_BLAS=off` keeps candle's matmul (for side-by-side measurements);
//! `CPU_BLAS=/path/to/lib.so` names another library exporting `cblas_sgemm`.

mod packed;

pub use packed::PackedWeight;

use std::ffi::c_int;
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// The environment variable that turns the BLAS path off or names its library.
pub const BLAS_ENV: &str = "CPU_BLAS";

/// Library names tried in order when the environment names none.
const CANDIDATES: [&str; 3] = ["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"];

type CblasSgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

// CBLAS enum values (cblas.h).
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

struct Blas {
    name: String,
    /// OpenBLAS's kernel family for this CPU (`openblas_get_corename`), where it says.
    core: Option<String>,
    sgemm: CblasSgemm,
    /// Kept open for the life of the process: `sgemm` points into it.
    _lib: libloading::Library,
}

fn open(name: &str) -> Option<Blas> {
    // SAFETY: loading a shared library runs its initialisers; OpenBLAS's only set up its thread
    // pool. The symbol is looked up by its C name and given the CBLAS signature.
    unsafe {
        let lib = libloading::Library::new(name).ok()?;
        let sgemm = *lib.get::<CblasSgemm>(b"cblas_sgemm\0").ok()?;
        // One BLAS thread per call; the calls are spread over rayon's threads instead (see
        // `try_matmul_t`). OpenBLAS's own pool spins in `sched_yield` between products, taking a core
        // from the candle ops that run between them: 8% of a forward pass in `__schedule`.
        if let Ok(set) = lib.get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0") {
            set(1);
        }
        let core = lib
            .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"openblas_get_corename\0")
            .ok()
            .map(|f| f())
            .filter(|p| !p.is_null())
            .map(|p| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned());
        Some(Blas {
            name: name.to_string(),
            core,
            sgemm,
            _lib: lib,
        })
    }
}

fn blas() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let found = match std::env::var(BLAS_ENV).ok().as_deref() {
            Some("off" | "0" | "none") => None,
            Some(path) if !path.is_empty() => {
                let lib = open(path);
                if lib.is_none() {
                    tracing::warn!(
                        "{BLAS_ENV}={path}: no cblas_sgemm there; using candle's matmul"
                    );
                }
                lib
            }
            _ => CANDIDATES.iter().find_map(|n| open(n)),
        };
        match &found {
            Some(b) => tracing::debug!("x W^T products through {}", b.name),
            None => tracing::debug!("no OpenBLAS found; x W^T products through candle's matmul"),
        }
        found
    })
    .as_ref()
}

/// The library the products go through: `"libopenblas.so.0"`, say, or `None` when they
/// use candle's matmul. Benchmarks print it beside their numbers.
pub fn blas_library() -> Option<&'static str> {
    blas().map(|b| b.name.as_str())
}

/// The CPU kernel family OpenBLAS chose (`"Haswell"`, `"SkylakeX"`, `"Zen"`...), or `None`
/// without OpenBLAS. Results are identical across thread counts, but each family sums in its own
/// order: two machines agree bit for bit only on the same family, which `OPENBLAS_CORETYPE`
/// (read when the library loads) pins. Reports record it beside [`blas_library`].
pub fn blas_core() -> Option<&'static str> {
    blas().and_then(|b| b.core.as_deref())
}

/// The output buffer, shared by the column blocks that each write their own columns.
struct SendPtr(*mut f32);
// SAFETY: the blocks write disjoint elements and the buffer outlives the parallel loop.
unsafe impl Sync for SendPtr {}

fn f32_slice<'a>(st: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(d)), Some((a, z))) => Some(&d[a..z]),
        _ => None,
    }
}

/// `x W^T` for `x` `[m, k]` and `w` `[n, k]` (both row-major, as a linear layer stores its
/// weight): through BLAS where [`try_matmul_t`] applies, else candle's matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if let Some(y) = try_small_m(x, w)? {
        return Ok(y);
    }
    match try_matmul_t(x, w)? {
        Some(y) => Ok(y),
        None => x.matmul(&w.t()?),
    }
}

/// Rows of `x` up to which [`try_small_m`] applies.
pub const SMALL_M: usize = 8;

/// `x W^T` for a few rows of `x` (at most [`SMALL_M`]: a generation step, one row per
/// sequence), as dot products that read each row of `w` once, from memory, while the rows of `x`
/// stay in cache; or `None` where it does not apply (more rows, not f32 on the CPU, on the
/// autograd graph, not contiguous, mismatched or empty inner dimension).
///
/// BLAS's `sgemm` copies ("packs") all of `w` before multiplying, which for one row of `x` costs
/// more than the product itself: at batch 1, decoding SmolLM2 spent 44% of its time in that copy.
/// A product with one row of `x` reads each weight once, so memory bandwidth bounds it; this
/// reads each weight once for all rows.
pub fn try_small_m(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
    if !on_cpu_f32(x) || !on_cpu_f32(w) {
        return Ok(None);
    }
    let ((m, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    if m == 0 || m > SMALL_M || k != k2 || k == 0 || n == 0 {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Some(xd), Some(wd)) = (f32_slice(&xs, xl), f32_slice(&ws, wl)) else {
        return Ok(None);
    };
    // Output transposed, [n, m]: each task fills whole rows of it from its block of w's rows.
    const ROWS_PER_TASK: usize = 64;
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .zip(wd.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(out, w_blk)| {
            for (o, w_row) in out.chunks_mut(m).zip(w_blk.chunks(k)) {
                rows_dot(xd, k, w_row, o);
            }
        });
    let y = if m == 1 {
        yt
    } else {
        let mut y = vec![0f32; m * n];
        for (j, row) in yt.chunks(m).enumerate() {
            for (i, v) in row.iter().enumerate() {
                y[i * n + j] = *v;
            }
        }
        y
    };
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
}

/// `out[i] = x_i · w_row` for the `out.len()` (at most [`SMALL_M`]) rows `x_i` of `xs`, each of
/// length `k`: one pass over `w_row`, every loaded chunk of it used for all rows.
fn rows_dot(xs: &[f32], k: usize, w_row: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); the kernels read xs[..m * k]
        // and w_row[..k], which the callers' slices hold (m = out.len()).
        unsafe {
            match out.len() {
                1 => rows_dot_avx2::<1>(xs, k, w_row, out),
                2 => rows_dot_avx2::<2>(xs, k, w_row, out),
                3 => rows_dot_avx2::<3>(xs, k, w_row, out),
                4 => rows_dot_avx2::<4>(xs, k, w_row, out),
                5 => rows_dot_avx2::<5>(xs, k, w_row, out),
                6 => rows_dot_avx2::<6>(xs, k, w_row, out),
                7 => rows_dot_avx2::<7>(xs, k, w_row, out),
                _ => rows_dot_avx2::<8>(xs, k, w_row, out),
            }
        }
        return;
    }
    for (o, x) in out.iter_mut().zip(xs.chunks(k)) {
        *o = x.iter().zip(w_row).map(|(a, b)| a * b).sum();
    }
}

/// [`rows_dot`] for `M` rows: `M` accumulators of 8 lanes stay in registers, and each 8-float
/// chunk of the weight row is loaded once for all of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_dot_avx2<const M: usize>(xs: &[f32], k: usize, w_row: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(xs.len() >= M * k && w_row.len() >= k && out.len() >= M);
    let chunks = k / 8;
    let mut acc = [_mm256_setzero_ps(); M];
    let (wp, xp) = (w_row.as_ptr(), xs.as_ptr());
    for c in 0..chunks {
        // SAFETY: c * 8 + 8 <= k, and row i's chunk ends at i * k + c * 8 + 8 <= M * k (asserted).
        unsafe {
            let w = _mm256_loadu_ps(wp.add(c * 8));
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(xp.add(i * k + c * 8));
                *a = _mm256_fmadd_ps(x, w, *a);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let mut lanes = [0f32; 8];
        // SAFETY: lanes has room for 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
        let mut s: f32 = lanes.iter().sum();
        for j in chunks * 8..k {
            s += xs[i * k + j] * w_row[j];
        }
        out[i] = s;
    }
}

/// `x W^T` as [`matmul_t`], through BLAS, or `None` where it does not apply
/// (no library, not f32 on the CPU, on the autograd graph, not contiguous, an empty inner
/// dimension, too large for a C int).
pub fn try_matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Some(blas) = blas() else { return Ok(None) };
    let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
    if !on_cpu_f32(x) || !on_cpu_f32(w) {
        return Ok(None);
    }
    let ((m, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    // k = 0 would leave the output unwritten below; candle's matmul gives its zeros.
    if k != k2 || k == 0 {
        return Ok(None);
    }
    let (Ok(_), Ok(ni), Ok(ki)) = (c_int::try_from(m), c_int::try_from(n), c_int::try_from(k))
    else {
        return Ok(None);
    };
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Some(xd), Some(wd)) = (f32_slice(&xs, xl), f32_slice(&ws, wl)) else {
        return Ok(None);
    };
    let threads = rayon::current_num_threads().max(1);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    if m < 32 * threads && n >= 64 * threads {
        // Few rows (a generation step: one per sequence): the rows cannot be shared out, so the
        // output columns are. Each thread multiplies all of x by its block of w's rows and writes
        // its columns of c (leading dimension n), so every weight is read once, by one thread.
        let cols = n.div_ceil(threads);
        let out = SendPtr(c.as_mut_ptr());
        (0..n.div_ceil(cols)).into_par_iter().for_each(|j| {
            let out = &out;
            let j0 = j * cols;
            let nb = cols.min(n - j0);
            // SAFETY: x is [m, k] and w [n, k], row-major; this block reads w's rows
            // j0..j0 + nb and writes c[i * n + j0..][..nb] for i < m, within the m*n capacity;
            // blocks write disjoint columns, and with beta = 0 sgemm reads none of c.
            unsafe {
                (blas.sgemm)(
                    ROW_MAJOR,
                    NO_TRANS,
                    TRANS,
                    m as c_int,
                    nb as c_int,
                    ki,
                    1.0,
                    xd.as_ptr(),
                    ki.max(1),
                    wd.as_ptr().add(j0 * k),
                    ki.max(1),
                    0.0,
                    out.0.add(j0),
                    ni.max(1),
                );
            }
        });
    } else {
        // Rows split evenly over rayon's threads, each block one single-threaded sgemm; at
        // least 32 rows a block so that small products are not split into pieces that cost
        // more than they save.
        let rows = m.div_ceil(threads).max(32);
        c.spare_capacity_mut()
            .par_chunks_mut(rows * n.max(1))
            .zip(xd.par_chunks(rows * k.max(1)))
            .for_each(|(c_blk, x_blk)| {
                let m_blk = c_blk.len() / n.max(1);
                // SAFETY: x_blk is [m_blk, k] and w is [n, k], row-major, read within their
                // lengths; c_blk has room for [m_blk, n] and, with beta = 0, sgemm writes every
                // element of it without reading any. m_blk <= m, so the casts are exact.
                unsafe {
                    (blas.sgemm)(
                        ROW_MAJOR,
                        NO_TRANS,
                        TRANS,
                        m_blk as c_int,
                        ni,
                        ki,
                        1.0,
                        x_blk.as_ptr(),
                        ki.max(1),
                        wd.as_ptr(),
                        ki.max(1),
                        0.0,
                        c_blk.as_mut_ptr().cast::<f32>(),
                        ni.max(1),
                    );
                }
            });
    }
    // SAFETY: either branch above writes all m*n elements.
    unsafe { c.set_len(m * n) };
    Ok(Some(Tensor::from_vec(c, (m, n), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The few-row kernel gives candle's products (1 to 8 rows, odd widths), and declines more
    /// rows, other dtypes and tracked tensors.
    #[test]
    fn small_m_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 1, 1),
            (1, 576, 1536),
            (3, 33, 130),
            (8, 1536, 577),
            (5, 17, 64),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let ours = try_small_m(&x, &w)?.expect("applies");
            let reference = x.matmul(&w.t()?)?;
            let diff = (ours - reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-3, "[{m},{k}]x[{n},{k}]^T: max |diff| {diff}");
        }
        let w = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
        assert!(try_small_m(&Tensor::randn(0f32, 1.0, (9, 8), &dev)?, &w)?.is_none());
        assert!(try_small_m(&Tensor::randn(0f32, 1.0, (1, 7), &dev)?, &w)?.is_none());
        let v = Var::randn(0f32, 1.0, (1, 8), &dev)?;
        assert!(try_small_m(v.as_tensor(), &w)?.is_none());
        Ok(())
    }

    /// Same products as candle's matmul, including empty and odd shapes; untouched where it does
    /// not apply.
    #[test]
    fn blas_matches_candle() -> Result<()> {
        let Some(name) = blas_library() else {
            eprintln!("SKIP: no OpenBLAS (apt-get install libopenblas0); candle's matmul is used");
            return Ok(());
        };
        if name.contains("openblas") {
            let core = blas_core().expect("OpenBLAS names its kernel family");
            assert!(
                core.chars().all(|c| c.is_ascii_alphanumeric()) && !core.is_empty(),
                "{core:?}"
            );
        }
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 1, 1),
            (7, 33, 5),
            (300, 576, 960),
            (0, 8, 4),
            (5, 8, 0),
            (64, 1536, 576),
            (1, 576, 1536),
            (3, 1536, 49152),
            (8, 577, 4099),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let ours = try_matmul_t(&x, &w)?.expect("f32 CPU tensors take the BLAS path");
            let reference = x.matmul(&w.t()?)?;
            assert_eq!(ours.dims(), reference.dims());
            if m * n > 0 {
                let diff = (ours - reference)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(
                    diff < 1e-3,
                    "{name} [{m},{k}]x[{n},{k}]^T: max |diff| {diff}"
                );
            }
        }
        // A trainable weight keeps candle's differentiable matmul.
        let w = Var::randn(0f32, 1.0, (4, 8), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
        assert!(try_matmul_t(&x, w.as_tensor())?.is_none());
        // So do an empty inner dimension and f64.
        assert!(try_matmul_t(&x.narrow(1, 0, 0)?, &w.narrow(1, 0, 0)?)?.is_none());
        assert!(try_matmul_t(&x.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?)?.is_none());
        Ok(())
    }
}
