//! A weight rearranged once for the products of a generation step.
//!
//! [`crate::try_small_m`] takes `W` as a linear layer stores it, `[n, k]`, and computes dot
//! products along `k`. At one row of `x` that reads memory as fast as it can be read, but at
//! eight it reached half of that: each 8-float chunk of `W` needs eight loads of `x` (which for
//! `k` = 1536 no longer fits in L1), and each output ends in a horizontal sum. Measured on one
//! core of these machines, from memory, eight rows: 24-31 GFLOP/s for the dot products against
//! 63-71 for the layout here.
//!
//! Here `W` is cut into panels of 32 rows and each panel stored `k`-major (`[k][32]`), so that one
//! step of `k` is two contiguous 16-float loads of `W`, one broadcast per row of `x`, and two
//! multiply-adds per row into accumulators that stay in registers for the whole panel (8 rows x 2
//! of AVX-512's 32 registers). Each weight is still read once per product, whatever the number of
//! rows. The price is a second copy of the weight, made on first use.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::{SMALL_M, SendPtr, f32_slice};

/// Rows of `W` per panel: two AVX-512 vectors.
const PANEL: usize = 32;

/// A `[n, k]` weight in panels of `PANEL` (32) rows, each `k`-major, the last one zero-padded.
pub struct PackedWeight {
    data: Vec<f32>,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl PackedWeight {
    /// Packs `w` (`[n, k]`, f32 on the CPU, not on the autograd graph), or `None` where the
    /// packed product would not run: a CPU without AVX-512, another dtype or device, a tracked
    /// or non-contiguous tensor, an empty dimension.
    pub fn new(w: &Tensor) -> Result<Option<Self>> {
        if !available() || !w.device().is_cpu() || w.dtype() != DType::F32 || w.track_op() {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        if n == 0 || k == 0 {
            return Ok(None);
        }
        let (st, l) = w.storage_and_layout();
        let Some(wd) = f32_slice(&st, l) else {
            return Ok(None);
        };
        let mut data = vec![0f32; n.div_ceil(PANEL) * PANEL * k];
        data.par_chunks_mut(PANEL * k)
            .enumerate()
            .for_each(|(p, panel)| {
                let rows = PANEL.min(n - p * PANEL);
                for j in 0..rows {
                    let row = &wd[(p * PANEL + j) * k..][..k];
                    for (kk, v) in row.iter().enumerate() {
                        panel[kk * PANEL + j] = *v;
                    }
                }
            });
        Ok(Some(Self { data, n, k }))
    }

    /// Output width `n` (rows of the original weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// `x W^T` for `x` `[m, k]` with at most [`SMALL_M`] rows, or `None` where it does not apply
    /// (more rows, a width other than `k`, not f32 on the CPU, on the autograd graph, not
    /// contiguous).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 || x.track_op() {
            return Ok(None);
        }
        let (m, k) = x.dims2()?;
        if m == 0 || m > SMALL_M || k != self.k {
            return Ok(None);
        }
        let (xs, xl) = x.storage_and_layout();
        let Some(xd) = f32_slice(&xs, xl) else {
            return Ok(None);
        };
        let (n, panels) = (self.n, self.n.div_ceil(PANEL));
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let out = SendPtr(y.as_mut_ptr());
        // A few panels per task: 30 of them make SmolLM2's q/k/v, 1,536 its unembedding.
        const PANELS_PER_TASK: usize = 4;
        (0..panels.div_ceil(PANELS_PER_TASK))
            .into_par_iter()
            .for_each(|t| {
                let out = &out;
                let p0 = t * PANELS_PER_TASK;
                for p in p0..(p0 + PANELS_PER_TASK).min(panels) {
                    let panel = &self.data[p * PANEL * k..][..PANEL * k];
                    let cols = PANEL.min(n - p * PANEL);
                    // SAFETY: `available()` was true when this weight was packed, so the CPU
                    // has AVX-512F; x holds m rows of k and the panel k rows of PANEL; this
                    // panel writes columns p * PANEL..+cols of each of the m rows of y, which
                    // has capacity m * n, and no other panel writes them.
                    unsafe { panel_product(xd, m, k, panel, out.0, n, p * PANEL, cols) };
                }
            });
        // SAFETY: the panels cover all n columns of all m rows.
        unsafe { y.set_len(m * n) };
        Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
    }
}

/// Whether this CPU runs the packed product.
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dispatches [`panel_avx512`] on the number of rows, so that its accumulators are registers.
///
/// # Safety
/// As [`panel_avx512`].
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    xs: &[f32],
    m: usize,
    k: usize,
    panel: &[f32],
    y: *mut f32,
    n: usize,
    col0: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        match m {
            1 => panel_avx512::<1>(xs, k, panel, y, n, col0, cols),
            2 => panel_avx512::<2>(xs, k, panel, y, n, col0, cols),
            3 => panel_avx512::<3>(xs, k, panel, y, n, col0, cols),
            4 => panel_avx512::<4>(xs, k, panel, y, n, col0, cols),
            5 => panel_avx512::<5>(xs, k, panel, y, n, col0, cols),
            6 => panel_avx512::<6>(xs, k, panel, y, n, col0, cols),
            7 => panel_avx512::<7>(xs, k, panel, y, n, col0, cols),
            _ => panel_avx512::<8>(xs, k, panel, y, n, col0, cols),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("PackedWeight::new declines without AVX-512");
}

/// `y[i, col0 + j] = x_i · W[col0 + j]` for `M` rows of `x` and the `cols` (at most 32) rows of
/// `W` in `panel`.
///
/// # Safety
/// The CPU has AVX-512F; `xs` holds at least `M * k` floats, `panel` `k * 32`, and `y` has room
/// for `M` rows of `n` with `col0 + cols <= n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn panel_avx512<const M: usize>(
    xs: &[f32],
    k: usize,
    panel: &[f32],
    y: *mut f32,
    n: usize,
    col0: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    assert!(xs.len() >= M * k && panel.len() >= k * PANEL && col0 + cols <= n && cols <= PANEL);
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let (wp, xp) = (panel.as_ptr(), xs.as_ptr());
    for kk in 0..k {
        // SAFETY: kk < k, so the panel's row kk (32 floats at kk * 32) and x's element
        // i * k + kk (i < M) are within the lengths asserted above.
        unsafe {
            let w0 = _mm512_loadu_ps(wp.add(kk * PANEL));
            let w1 = _mm512_loadu_ps(wp.add(kk * PANEL + 16));
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*xp.add(i * k + kk));
                a[0] = _mm512_fmadd_ps(x, w0, a[0]);
                a[1] = _mm512_fmadd_ps(x, w1, a[1]);
            }
        }
    }
    // Masks for the columns that exist: all 32 except in a last, partial panel.
    let lo = cols.min(16);
    let hi = cols - lo;
    let mask = |c: usize| -> __mmask16 { ((1u32 << c) - 1) as __mmask16 };
    for (i, a) in acc.iter().enumerate() {
        // SAFETY: row i < M of y starts at i * n; columns col0..col0 + cols lie in it, and the
        // masks store only those.
        unsafe {
            let row = y.add(i * n + col0);
            _mm512_mask_storeu_ps(row, mask(lo), a[0]);
            if hi > 0 {
                _mm512_mask_storeu_ps(row.add(16), mask(hi), a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The packed product gives candle's (1 to 8 rows, widths that leave a partial panel or
    /// fill whole ones), and declines what it does not handle.
    #[test]
    fn packed_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let Some(_) = PackedWeight::new(&Tensor::zeros((1, 1), DType::F32, &dev)?)? else {
            eprintln!("no AVX-512 on this CPU: the packed product is not used here");
            return Ok(());
        };
        for (m, k, n) in [
            (1, 1, 1),
            (1, 576, 960),
            (3, 33, 130),
            (8, 1536, 577),
            (5, 17, 64),
            (8, 576, 16),
            (7, 64, 33),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let packed = PackedWeight::new(&w)?.expect("packs");
            assert_eq!(packed.n(), n);
            let ours = packed.matmul_t(&x)?.expect("applies");
            let reference = x.matmul(&w.t()?)?;
            let diff = (ours - reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-3, "[{m},{k}]x[{n},{k}]^T: max |diff| {diff}");
        }
        let packed = PackedWeight::new(&Tensor::randn(0f32, 1.0, (4, 8), &dev)?)?.expect("packs");
        assert!(
            packed
                .matmul_t(&Tensor::zeros((9, 8), DType::F32, &dev)?)?
                .is_none()
        );
        assert!(
            packed
                .matmul_t(&Tensor::zeros((1, 7), DType::F32, &dev)?)?
                .is_none()
        );
        let v = Var::randn(0f32, 1.0, (1, 8), &dev)?;
        assert!(packed.matmul_t(v.as_tensor())?.is_none());
        assert!(PackedWeight::new(v.as_tensor())?.is_none());
        assert!(PackedWeight::new(&Tensor::zeros((4, 8), DType::F64, &dev)?)?.is_none());
        Ok(())
    }
}
