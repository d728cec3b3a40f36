//! The CPU hot loops, over raw f32 slices with rayon.
//!
//! Once activations are sparse, everything in an SAE step except the dense encoder product
//! touches only the active (token, feature) pairs: the decoder forward, the dot products that
//! give each active feature its gradient, and the per-feature gradient rows of `W_dec` and
//! `W_enc`. These kernels do exactly that. The dense encoder product goes through OpenBLAS
//! when installed (`cpu-blas`), else candle's matmul (on any device). Every reduction runs over fixed-size chunks summed in order, so results are
//! bit-identical from run to run for a given thread count.
//!
//! `W_enc` is kept feature-major here, `[d_sae, d_in]`, so that a feature's encoder row is
//! contiguous (the file layout, `[d_in, d_sae]`, is restored on save).

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Result, SaeError};

/// Rows per rayon task in the token-parallel loops.
const TOKEN_CHUNK: usize = 16;
/// Rows per partial sum in the deterministic reductions.
const REDUCE_CHUNK: usize = 256;

/// Dense pre-activations `[n, d_sae]` held in a CPU candle tensor, read without copying.
pub struct PreActs {
    tensor: Tensor,
    pub n: usize,
    pub d_sae: usize,
}

impl PreActs {
    /// Runs `f` over the row-major values.
    ///
    /// # Errors
    /// If the tensor is not a contiguous CPU f32 tensor (cannot happen for tensors built here).
    pub fn with_slice<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        let (storage, layout) = self.tensor.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
            _ => Err(SaeError::config(
                "pre-activations",
                "expected a contiguous CPU f32 tensor",
            )),
        }
    }
}

/// `xc @ W_enc` as `[n, d_sae]`, with `W_enc` stored feature-major (`[d_sae, d_in]`).
///
/// The dense product is the floor of an SAE step (2·d_in·d_sae FLOP per token); it runs through
/// OpenBLAS when installed (`cpu-blas`), else candle's GEMM on `device`, and the result comes
/// back to the host.
pub fn encoder_preacts(
    xc: &[f32],
    n: usize,
    d_in: usize,
    w_enc_t: &[f32],
    d_sae: usize,
    device: &Device,
) -> Result<PreActs> {
    let x = Tensor::from_slice(xc, (n, d_in), device)?;
    let w = Tensor::from_slice(w_enc_t, (d_sae, d_in), device)?;
    let mut pre = cpu_blas::matmul_t(&x, &w)?;
    if !device.is_cpu() {
        pre = pre.to_device(&Device::Cpu)?;
    }
    let pre = pre.contiguous()?;
    Ok(PreActs {
        tensor: pre,
        n,
        d_sae,
    })
}

/// Whether the CPU has AVX2 and FMA (checked once; the std macro caches it).
#[inline]
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

macro_rules! dot_body {
    ($a:expr, $b:expr, $fma:expr) => {{
        let a: &[f32] = $a;
        let b: &[f32] = &$b[..a.len()];
        let (ac, ar) = a.as_chunks::<16>();
        let (bc, br) = b.as_chunks::<16>();
        let mut acc = [0.0f32; 16];
        for (x, y) in ac.iter().zip(bc) {
            for i in 0..16 {
                acc[i] = $fma(x[i], y[i], acc[i]);
            }
        }
        let mut s = 0.0f32;
        for i in 0..8 {
            s += acc[i] + acc[i + 8];
        }
        for (x, y) in ar.iter().zip(br) {
            s += x * y;
        }
        s
    }};
}

#[inline(always)]
fn mul_add_plain(a: f32, b: f32, c: f32) -> f32 {
    a * b + c
}
#[inline(always)]
fn mul_add_fused(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body!(a, b, mul_add_fused)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

/// `Σ a_i b_i` (AVX2 + FMA when available; the same machine always takes the same path).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { dot_avx2(a, b) };
    }
    dot_body!(a, b, mul_add_plain)
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { axpy_avx2(a, x, y) };
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Below this many multiply-adds per dense product the per-pair loops always win.
const DENSE_MIN_WORK: usize = 1 << 26;
/// Dense products take over above one active pair in this many (token, feature) cells.
const DENSE_RATIO: usize = 32;

/// Whether `nnz` active pairs are dense enough that GEMMs beat the per-pair loops (early in
/// ReLU-family training, when half the features fire). The per-pair loops cost a few memory
/// reads of a `d_in` row per pair; a dense product costs `n · d_sae · d_in` multiply-adds at GEMM
/// speed, which wins above a density of about 1/32.
pub fn use_dense(nnz: usize, n: usize, d_sae: usize, d_in: usize) -> bool {
    n * d_sae * d_in >= DENSE_MIN_WORK && nnz * DENSE_RATIO > n * d_sae
}

/// Dense `[n, d_sae]` from per-pair coefficients.
fn scatter_dense(offsets: &[usize], features: &[u32], coef: &[f32], d_sae: usize) -> Vec<f32> {
    let n = offsets.len() - 1;
    let mut out = vec![0.0f32; n * d_sae];
    out.par_chunks_mut(d_sae).enumerate().for_each(|(t, row)| {
        for p in offsets[t]..offsets[t + 1] {
            row[features[p] as usize] += coef[p];
        }
    });
    out
}

/// `op(a) · op(b)` with candle's GEMM on the CPU; `a` is `[ar, ac]`, `b` is `[br, bc]` as stored.
#[allow(clippy::too_many_arguments)]
fn gemm(
    a: &[f32],
    ar: usize,
    ac: usize,
    ta: bool,
    b: &[f32],
    br: usize,
    bc: usize,
    tb: bool,
) -> Result<Vec<f32>> {
    let dev = Device::Cpu;
    let mut at = Tensor::from_slice(a, (ar, ac), &dev)?;
    let mut bt = Tensor::from_slice(b, (br, bc), &dev)?;
    if ta {
        at = at.t()?;
    }
    if tb {
        bt = bt.t()?;
    }
    Ok(at.matmul(&bt)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Per-token decode, reconstruction gradient and pair dot products in one pass, so that each
/// token's decoder rows are read from memory once and reused from cache:
///
/// * `x̂_t = bias + Σ_p values[p] · W[features[p]]` (pairs with value 0 are skipped);
/// * `d_t = scale · (x̂_t - x_t)` (returned, `[n, d_in]`) and `sq_t = ||x̂_t - x_t||²`;
/// * `dots[p] = d_t · W[features[p]]` for every pair.
#[allow(clippy::too_many_arguments)]
pub fn decode_residual_dots(
    offsets: &[usize],
    features: &[u32],
    values: &[f32],
    w: &[f32],
    d_in: usize,
    bias: Option<&[f32]>,
    x: &[f32],
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = offsets.len() - 1;
    let d_sae = w.len() / d_in.max(1);
    if use_dense(features.len(), n, d_sae, d_in)
        && let Ok(r) =
            decode_residual_dots_dense(offsets, features, values, w, d_in, bias, x, scale)
    {
        return r;
    }
    let mut d = vec![0.0f32; n * d_in];
    let mut sq = vec![0.0f32; n];
    let mut dots = vec![0.0f32; features.len()];
    let parts = split_ragged(&mut dots, offsets);
    d.par_chunks_mut(d_in)
        .zip(sq.par_iter_mut())
        .zip(parts.into_par_iter())
        .enumerate()
        .with_min_len(TOKEN_CHUNK)
        .for_each(|(t, ((row, s), dp))| {
            if let Some(b) = bias {
                row.copy_from_slice(b);
            }
            let r = offsets[t]..offsets[t + 1];
            for p in r.clone() {
                let v = values[p];
                if v != 0.0 {
                    let f = features[p] as usize;
                    axpy(v, &w[f * d_in..(f + 1) * d_in], row);
                }
            }
            let mut acc = 0.0f32;
            for (a, b) in row.iter_mut().zip(&x[t * d_in..(t + 1) * d_in]) {
                let e = *a - b;
                acc += e * e;
                *a = scale * e;
            }
            *s = acc;
            for (o, p) in dp.iter_mut().zip(r) {
                let f = features[p] as usize;
                *o = dot(row, &w[f * d_in..(f + 1) * d_in]);
            }
        });
    (d, sq, dots)
}

/// `x - b` for every row (the pre-encoder bias), or a copy of `x` when `b` is `None`.
pub fn center(x: &[f32], d: usize, b: Option<&[f32]>) -> Vec<f32> {
    let mut out = x.to_vec();
    if let Some(b) = b {
        out.par_chunks_mut(d * TOKEN_CHUNK).for_each(|rows| {
            for row in rows.chunks_mut(d) {
                for (v, bi) in row.iter_mut().zip(b) {
                    *v -= bi;
                }
            }
        });
    }
    out
}

/// Per-token ragged mutable views of `out` split at `offsets`.
fn split_ragged<'a, T>(mut out: &'a mut [T], offsets: &[usize]) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, tail) = out.split_at_mut(w[1] - w[0]);
        parts.push(head);
        out = tail;
    }
    parts
}

/// Sparse decode: row t = `bias + Σ values[p] · W_dec[features[p]]` over token t's pairs.
pub fn decode_sparse(
    offsets: &[usize],
    features: &[u32],
    values: &[f32],
    w_dec: &[f32],
    d_in: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let n = offsets.len() - 1;
    let mut out = vec![0.0f32; n * d_in];
    out.par_chunks_mut(d_in)
        .enumerate()
        .with_min_len(TOKEN_CHUNK)
        .for_each(|(t, row)| {
            if let Some(b) = bias {
                row.copy_from_slice(b);
            }
            for p in offsets[t]..offsets[t + 1] {
                let v = values[p];
                if v != 0.0 {
                    let f = features[p] as usize;
                    axpy(v, &w_dec[f * d_in..(f + 1) * d_in], row);
                }
            }
        });
    out
}

/// [`decode_residual_dots`] with dense GEMMs (same results up to rounding).
#[allow(clippy::too_many_arguments)]
pub fn decode_residual_dots_dense(
    offsets: &[usize],
    features: &[u32],
    values: &[f32],
    w: &[f32],
    d_in: usize,
    bias: Option<&[f32]>,
    x: &[f32],
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let n = offsets.len() - 1;
    let d_sae = w.len() / d_in;
    let a = scatter_dense(offsets, features, values, d_sae);
    let mut d = gemm(&a, n, d_sae, false, w, d_sae, d_in, false)?;
    drop(a);
    let mut sq = vec![0.0f32; n];
    d.par_chunks_mut(d_in)
        .zip(x.par_chunks(d_in))
        .zip(sq.par_iter_mut())
        .for_each(|((row, xr), s)| {
            let mut acc = 0.0f32;
            for i in 0..d_in {
                let e = row[i] + bias.map_or(0.0, |b| b[i]) - xr[i];
                acc += e * e;
                row[i] = scale * e;
            }
            *s = acc;
        });
    let m = gemm(&d, n, d_in, false, w, d_sae, d_in, true)?;
    let mut dots = vec![0.0f32; features.len()];
    for t in 0..n {
        for p in offsets[t]..offsets[t + 1] {
            dots[p] = m[t * d_sae + features[p] as usize];
        }
    }
    Ok((d, sq, dots))
}

/// For each pair p of token t: `dot(vecs[t], W[features[p]])` (e.g. the gradient reaching an
/// active feature from the reconstruction error).
pub fn pair_dots(
    offsets: &[usize],
    features: &[u32],
    vecs: &[f32],
    w: &[f32],
    d_in: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; features.len()];
    let parts = split_ragged(&mut out, offsets);
    parts
        .into_par_iter()
        .enumerate()
        .with_min_len(TOKEN_CHUNK)
        .for_each(|(t, o)| {
            let v = &vecs[t * d_in..(t + 1) * d_in];
            let fs = &features[offsets[t]..offsets[t + 1]];
            for (oi, &f) in o.iter_mut().zip(fs) {
                let f = f as usize;
                *oi = dot(v, &w[f * d_in..(f + 1) * d_in]);
            }
        });
    out
}

/// One set of (token, feature) pairs that contributes to per-feature gradient rows:
/// `gW_dec[f] += dec_coef[p] · dec_vecs[t]` and `gW_enc[f] += enc_coef[p] · enc_vecs[t]`.
pub struct PairSet<'a> {
    pub offsets: &'a [usize],
    pub features: &'a [u32],
    /// Per-pair coefficient on `dec_vecs` (the feature's activation), or `None` to skip.
    pub dec_coef: Option<&'a [f32]>,
    /// `[n, d_in]`, e.g. the gradient of the loss with respect to the reconstruction.
    pub dec_vecs: &'a [f32],
    /// Per-pair gradient with respect to the encoder pre-activation, or `None` to skip.
    pub enc_coef: Option<&'a [f32]>,
}

/// Pairs grouped by feature (compressed-column form): (token, pair index) lists.
struct ByFeature {
    starts: Vec<usize>,
    tokens: Vec<u32>,
    pairs: Vec<u32>,
}

fn group_by_feature(offsets: &[usize], features: &[u32], d_sae: usize) -> ByFeature {
    let mut starts = vec![0usize; d_sae + 1];
    for &f in features {
        starts[f as usize + 1] += 1;
    }
    for i in 0..d_sae {
        starts[i + 1] += starts[i];
    }
    let mut fill = starts.clone();
    let mut tokens = vec![0u32; features.len()];
    let mut pairs = vec![0u32; features.len()];
    for t in 0..offsets.len() - 1 {
        let span = offsets[t]..offsets[t + 1];
        for (p, &f) in span.clone().zip(&features[span]) {
            let f = f as usize;
            tokens[fill[f]] = t as u32;
            pairs[fill[f]] = p as u32;
            fill[f] += 1;
        }
    }
    ByFeature {
        starts,
        tokens,
        pairs,
    }
}

/// Overwrites the gradient rows `g_w_dec` and `g_w_enc` (both `[d_sae, d_in]`) with the sums
/// over every pair set; rows of features without pairs become zero. Also returns, per feature,
/// `Σ enc_coef` (the gradient of the pre-activation bias).
pub fn feature_rows(
    d_sae: usize,
    d_in: usize,
    sets: &[PairSet<'_>],
    enc_vecs: &[f32],
    g_w_dec: &mut [f32],
    g_w_enc: &mut [f32],
) -> Vec<f32> {
    let n = sets.first().map_or(0, |s| s.offsets.len() - 1);
    let nnz: usize = sets.iter().map(|s| s.features.len()).sum();
    if use_dense(nnz, n, d_sae, d_in)
        && let Ok(b) = feature_rows_dense(d_sae, d_in, sets, enc_vecs, g_w_dec, g_w_enc)
    {
        return b;
    }
    let groups: Vec<ByFeature> = sets
        .iter()
        .map(|s| group_by_feature(s.offsets, s.features, d_sae))
        .collect();
    let mut g_bias = vec![0.0f32; d_sae];
    g_w_dec
        .par_chunks_mut(d_in)
        .zip(g_w_enc.par_chunks_mut(d_in))
        .zip(g_bias.par_iter_mut())
        .enumerate()
        .with_min_len(8)
        .for_each(|(f, ((rd, re), gb))| {
            rd.fill(0.0);
            re.fill(0.0);
            let mut bias_sum = 0.0f32;
            for (s, g) in sets.iter().zip(&groups) {
                for i in g.starts[f]..g.starts[f + 1] {
                    let t = g.tokens[i] as usize;
                    let p = g.pairs[i] as usize;
                    if let Some(dc) = s.dec_coef {
                        let c = dc[p];
                        if c != 0.0 {
                            axpy(c, &s.dec_vecs[t * d_in..(t + 1) * d_in], rd);
                        }
                    }
                    if let Some(ec) = s.enc_coef {
                        let c = ec[p];
                        if c != 0.0 {
                            axpy(c, &enc_vecs[t * d_in..(t + 1) * d_in], re);
                            bias_sum += c;
                        }
                    }
                }
            }
            *gb = bias_sum;
        });
    g_bias
}

/// [`feature_rows`] with dense GEMMs: `gW_dec = Σ_sets Aᵀ · dec_vecs`, `gW_enc = Σ_sets Gᵀ · enc_vecs`.
pub fn feature_rows_dense(
    d_sae: usize,
    d_in: usize,
    sets: &[PairSet<'_>],
    enc_vecs: &[f32],
    g_w_dec: &mut [f32],
    g_w_enc: &mut [f32],
) -> Result<Vec<f32>> {
    g_w_dec.fill(0.0);
    g_w_enc.fill(0.0);
    let mut g_bias = vec![0.0f32; d_sae];
    for s in sets {
        let n = s.offsets.len() - 1;
        if let Some(dc) = s.dec_coef {
            let a = scatter_dense(s.offsets, s.features, dc, d_sae);
            let g = gemm(&a, n, d_sae, true, s.dec_vecs, n, d_in, false)?;
            g_w_dec
                .par_iter_mut()
                .zip(g.par_iter())
                .for_each(|(o, v)| *o += v);
        }
        if let Some(ec) = s.enc_coef {
            let a = scatter_dense(s.offsets, s.features, ec, d_sae);
            let g = gemm(&a, n, d_sae, true, enc_vecs, n, d_in, false)?;
            g_w_enc
                .par_iter_mut()
                .zip(g.par_iter())
                .for_each(|(o, v)| *o += v);
            for (&f, &c) in s.features.iter().zip(ec) {
                g_bias[f as usize] += c;
            }
        }
    }
    Ok(g_bias)
}

/// `Σ_f coefs[f] · rows[f]` over `[d_sae, d]` rows, as `[d]` (deterministic order).
pub fn weighted_row_sum(coefs: &[f32], rows: &[f32], d: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = rows
        .par_chunks(d * REDUCE_CHUNK)
        .zip(coefs.par_chunks(REDUCE_CHUNK))
        .map(|(rs, cs)| {
            let mut acc = vec![0.0f32; d];
            for (r, &c) in rs.chunks(d).zip(cs) {
                if c != 0.0 {
                    axpy(c, r, &mut acc);
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f32; d];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// Column sums of a `[n, d]` matrix, scaled by `scale` (deterministic order).
pub fn sum_rows(m: &[f32], d: usize, scale: f32) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = m
        .par_chunks(d * REDUCE_CHUNK)
        .map(|rs| {
            let mut acc = vec![0.0f32; d];
            for r in rs.chunks(d) {
                for (a, v) in acc.iter_mut().zip(r) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f32; d];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out.iter_mut().for_each(|v| *v *= scale);
    out
}

/// Euclidean norm of each `d`-long row.
pub fn row_norms(w: &[f32], d: usize) -> Vec<f32> {
    w.par_chunks(d).map(|r| dot(r, r).sqrt()).collect()
}

/// Scales every row to unit norm (rows of norm zero are left alone).
pub fn normalize_rows(w: &mut [f32], d: usize) {
    w.par_chunks_mut(d).for_each(|r| {
        let n = dot(r, r).sqrt();
        if n > 0.0 {
            r.iter_mut().for_each(|v| *v /= n);
        }
    });
}

/// Removes from each gradient row its component parallel to the matching weight row, so that a
/// step keeps unit-norm rows on the sphere to first order (Towards Monosemanticity).
pub fn remove_parallel_component(w: &[f32], g: &mut [f32], d: usize) {
    g.par_chunks_mut(d)
        .zip(w.par_chunks(d))
        .for_each(|(gr, wr)| {
            let ww = dot(wr, wr);
            if ww > 0.0 {
                let c = dot(gr, wr) / ww;
                axpy(-c, wr, gr);
            }
        });
}

/// Per-row `Σ (xhat - x)²` and `dL/dxhat = scale · (xhat - x)` written over `xhat`.
/// Returns the per-token squared errors.
pub fn residual_grad(xhat: &mut [f32], x: &[f32], d: usize, scale: f32) -> Vec<f32> {
    let mut sq = vec![0.0f32; xhat.len() / d];
    xhat.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(sq.par_iter_mut())
        .with_min_len(TOKEN_CHUNK)
        .for_each(|((xh, xr), s)| {
            let mut acc = 0.0f32;
            for (a, b) in xh.iter_mut().zip(xr) {
                let e = *a - b;
                acc += e * e;
                *a = scale * e;
            }
            *s = acc;
        });
    sq
}

/// Sum of `v` in f64, in a fixed order.
pub fn sum_f64(v: &[f32]) -> f64 {
    v.chunks(4096)
        .map(|c| c.iter().map(|&x| x as f64).sum::<f64>())
        .sum()
}

/// Indices and values of the `k` largest entries of `score(i)` for `i` in `candidates`,
/// written to `out` (unsorted). Uses a running-minimum scan for small `k` and a selection for
/// large `k`.
pub fn top_k(
    candidates: impl Iterator<Item = (u32, f32)>,
    k: usize,
    buf: &mut Vec<(u32, f32)>,
    out: &mut Vec<(u32, f32)>,
) {
    out.clear();
    if k == 0 {
        return;
    }
    if k <= 64 {
        let mut min_pos = 0usize;
        let mut min_val = f32::INFINITY;
        for (i, v) in candidates {
            if out.len() < k {
                out.push((i, v));
                if out.len() == k {
                    let (p, m) = argmin(out);
                    min_pos = p;
                    min_val = m;
                }
            } else if v > min_val {
                out[min_pos] = (i, v);
                let (p, m) = argmin(out);
                min_pos = p;
                min_val = m;
            }
        }
    } else {
        buf.clear();
        buf.extend(candidates);
        if buf.len() > k {
            buf.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            buf.truncate(k);
        }
        out.extend_from_slice(buf);
    }
}

fn argmin(v: &[(u32, f32)]) -> (usize, f32) {
    let mut p = 0;
    let mut m = v[0].1;
    for (i, &(_, x)) in v.iter().enumerate().skip(1) {
        if x < m {
            m = x;
            p = i;
        }
    }
    (p, m)
}

/// Checks a batch: shape `[n, d_in]` and every value finite.
///
/// # Errors
/// [`SaeError::WrongDIn`] or [`SaeError::NonFiniteInput`].
pub fn check_batch(x: &[f32], d_in: usize, what: &str) -> Result<usize> {
    if d_in == 0 || !x.len().is_multiple_of(d_in) {
        return Err(SaeError::WrongDIn {
            what: what.to_string(),
            expected: d_in,
            got: x.len(),
        });
    }
    let bad = x
        .par_chunks(d_in)
        .enumerate()
        .find_first(|(_, r)| r.iter().any(|v| !v.is_finite()));
    if let Some((row, r)) = bad {
        let col = r.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(SaeError::NonFiniteInput {
            what: what.to_string(),
            row,
            col,
            value: r[col],
        });
    }
    Ok(x.len() / d_in)
}

/// Host `[n, d]` f32 copy of a 2-D tensor of any float dtype on any device.
///
/// # Errors
/// [`SaeError::ShapeMismatch`] if the tensor is not 2-D, or [`SaeError::WrongDIn`] if its second
/// dimension is not `d_in`.
pub fn tensor_to_host(x: &Tensor, d_in: usize, what: &str) -> Result<(Vec<f32>, usize)> {
    let dims = x.dims();
    if dims.len() != 2 {
        return Err(SaeError::ShapeMismatch {
            what: what.to_string(),
            expected: vec![0, d_in],
            got: dims.to_vec(),
        });
    }
    if dims[1] != d_in {
        return Err(SaeError::WrongDIn {
            what: what.to_string(),
            expected: d_in,
            got: dims[1],
        });
    }
    let v = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((v, dims[0]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SparseCodes;

    #[test]
    fn top_k_small_and_large_agree_with_sort() {
        let vals: Vec<f32> = (0..500)
            .map(|i| ((i * 7919) % 503) as f32 * 0.1 - 3.0)
            .collect();
        for k in [1, 5, 64, 65, 200] {
            let mut out = Vec::new();
            let mut buf = Vec::new();
            top_k(
                vals.iter().enumerate().map(|(i, &v)| (i as u32, v)),
                k,
                &mut buf,
                &mut out,
            );
            let mut got: Vec<f32> = out.iter().map(|p| p.1).collect();
            got.sort_by(|a, b| b.total_cmp(a));
            let mut want = vals.clone();
            want.sort_by(|a, b| b.total_cmp(a));
            assert_eq!(got, want[..k].to_vec(), "k={k}");
        }
    }

    #[test]
    fn dense_and_sparse_paths_agree() {
        let (n, d_sae, d_in) = (40usize, 24usize, 12usize);
        let mut seed = 1u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let w: Vec<f32> = (0..d_sae * d_in).map(|_| rnd()).collect();
        let x: Vec<f32> = (0..n * d_in).map(|_| rnd()).collect();
        let xc: Vec<f32> = (0..n * d_in).map(|_| rnd()).collect();
        let bias: Vec<f32> = (0..d_in).map(|_| rnd()).collect();
        let rows: Vec<Vec<(u32, f32)>> = (0..n)
            .map(|t| {
                (0..d_sae as u32)
                    .filter(|f| !(f + t as u32).is_multiple_of(3))
                    .map(|f| (f, rnd()))
                    .collect()
            })
            .collect();
        let c = SparseCodes::from_rows(d_sae, rows);
        let (d1, s1, p1) = decode_residual_dots(
            &c.offsets,
            &c.features,
            &c.values,
            &w,
            d_in,
            Some(&bias),
            &x,
            0.3,
        );
        let (d2, s2, p2) = decode_residual_dots_dense(
            &c.offsets,
            &c.features,
            &c.values,
            &w,
            d_in,
            Some(&bias),
            &x,
            0.3,
        )
        .unwrap();
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(u, v)| (u - v).abs() < 1e-4 * (1.0 + u.abs()))
        };
        assert!(close(&d1, &d2) && close(&s1, &s2) && close(&p1, &p2));
        let enc: Vec<f32> = c.values.iter().map(|v| v * 0.7 - 0.1).collect();
        let set = [PairSet {
            offsets: &c.offsets,
            features: &c.features,
            dec_coef: Some(&c.values),
            dec_vecs: &d1,
            enc_coef: Some(&enc),
        }];
        let (mut a1, mut b1, mut a2, mut b2) = (
            vec![0.0; d_sae * d_in],
            vec![0.0; d_sae * d_in],
            vec![1.0; d_sae * d_in],
            vec![1.0; d_sae * d_in],
        );
        let g1 = feature_rows(d_sae, d_in, &set, &xc, &mut a1, &mut b1);
        let g2 = feature_rows_dense(d_sae, d_in, &set, &xc, &mut a2, &mut b2).unwrap();
        assert!(close(&a1, &a2) && close(&b1, &b2) && close(&g1, &g2));
    }

    #[test]
    fn feature_rows_match_dense_products() {
        // 3 tokens, 4 features, d_in 2.
        let offsets = vec![0, 2, 3, 5];
        let features = vec![0u32, 2, 2, 1, 2];
        let acts = vec![1.0f32, 2.0, 3.0, 4.0, 5.0];
        let gpre = vec![0.5f32, -1.0, 2.0, 1.5, 0.25];
        let dvec = vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let xc = vec![2.0f32, 1.0, -1.0, 3.0, 0.5, 0.5];
        let mut gd = vec![9.0f32; 8];
        let mut ge = vec![9.0f32; 8];
        let gb = feature_rows(
            4,
            2,
            &[PairSet {
                offsets: &offsets,
                features: &features,
                dec_coef: Some(&acts),
                dec_vecs: &dvec,
                enc_coef: Some(&gpre),
            }],
            &xc,
            &mut gd,
            &mut ge,
        );
        // feature 2: pairs (t0, a=2, g=-1), (t1, a=3, g=2), (t2, a=5, g=0.25)
        assert_eq!(&gd[4..6], &[2.0 * 1.0 + 5.0, 3.0 + 5.0]);
        assert_eq!(&ge[4..6], &[-2.0 - 2.0 + 0.125, -1.0 + 6.0 + 0.125]);
        assert_eq!(gb, vec![0.5, 1.5, 1.25, 0.0]);
        assert_eq!(&gd[6..8], &[0.0, 0.0]);
    }
}
