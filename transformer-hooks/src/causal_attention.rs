//! Causal attention on the CPU without the masked half.
//!
//! Written as tensor ops, attention computes every query-key score, materialises a
//! `[batch, heads, seq, seq]` tensor, adds a `-inf` mask over the half above the diagonal, runs a
//! softmax that calls libm's `expf` once per score, and multiplies the masked zeros into `v`. On
//! SmolLM2 at batch 8 x 256 that was a fifth of each layer. Here each block of 64 queries meets only
//! the keys at or before its last position (5/8 of the products at 256 tokens), the scores stay in a
//! per-head scratch buffer, and the exponential is a polynomial the compiler vectorises.
//!
//! The layer uses it for f32 inference on the CPU when no hook reads the scores or the pattern;
//! everything else (autograd, other dtypes, GPUs, hooks on `attn_scores`/`pattern`) takes the
//! tensor-op path, and `tests::fused_matches_composed` holds the two to the same numbers.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::ops::{self, exp};

/// Queries per block: each block's scores are one `[BLOCK, keys]` product.
const BLOCK: usize = 64;

/// Whether [`causal_attention`] can take these inputs (f32 on the CPU, off the autograd graph).
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> bool {
    [q, k, v, mask]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

/// `softmax(q k^T + mask) v`.
///
/// `q` is `[batch, heads, seq, d_head]` (already scaled): the last `seq` of `keys` positions, so
/// that a generation step (a few queries after a KV cache) runs here as well as a whole pass.
/// `k`/`v` are `[batch, kv_heads, keys, d_head]` (query head `h` reads kv head
/// `h / (heads / kv_heads)`), and may be views of a longer cache buffer: only their last two
/// dimensions need to be contiguous. `mask` is the additive `[batch or 1, 1, seq, keys]` mask,
/// which must be `-inf` wherever a query would see a later key: those entries are never read.
/// Returns `[batch, heads, seq, d_head]`.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, h, s, dh) = q.dims4()?;
    let (_, kvh, t, _) = k.dims4()?;
    if t < s {
        candle_core::bail!("causal_attention: {s} queries but only {t} keys");
    }
    let mask_rows = mask.dim(0)?;
    let (q, mask) = (q.contiguous()?, mask.contiguous()?);
    let (k, v) = (rows_contiguous(k)?, rows_contiguous(v)?);
    let (q_st, q_l) = q.storage_and_layout();
    let (k_st, k_l) = k.storage_and_layout();
    let (v_st, v_l) = v.storage_and_layout();
    let (m_st, m_l) = mask.storage_and_layout();
    let (qd, md) = (f32_slice(&q_st, q_l)?, f32_slice(&m_st, m_l)?);
    let (kd, vd) = (from_offset(&k_st, k_l)?, from_offset(&v_st, v_l)?);
    // Element offsets of each (batch, kv head)'s rows in the k and v storages.
    let base = |l: &Layout, bi: usize, g: usize| bi * l.stride()[0] + g * l.stride()[1];
    let n_rep = h / kvh;
    let mut out = vec![0f32; b * h * s * dh];
    out.par_chunks_mut(s * dh)
        .enumerate()
        .for_each(|(head, out)| {
            let (bi, hi) = (head / h, head % h);
            let g = hi / n_rep;
            let mrow = if mask_rows == 1 { 0 } else { bi };
            one_head(
                &qd[head * s * dh..][..s * dh],
                &kd[base(k_l, bi, g)..][..t * dh],
                &vd[base(v_l, bi, g)..][..t * dh],
                &md[mrow * s * t..][..s * t],
                out,
                s,
                t,
                dh,
            );
        });
    Tensor::from_vec(out, (b, h, s, dh), q.device())
}

/// `t` itself where its last two dimensions are contiguous (a narrowed KV cache buffer), else
/// a contiguous copy.
fn rows_contiguous(t: &Tensor) -> Result<Tensor> {
    let (_, _, _, dh) = t.dims4()?;
    let st = t.layout().stride();
    if st[3] == 1 && st[2] == dh {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

fn f32_slice<'a>(st: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    ops::cpu_f32(st, l)
        .ok_or_else(|| candle_core::Error::Msg("causal_attention: expected f32 CPU tensors".into()))
}

/// A CPU f32 storage from the layout's first element on (the rows are addressed by strides).
fn from_offset<'a>(st: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match st {
        Storage::Cpu(CpuStorage::F32(d)) => Ok(&d[l.start_offset()..]),
        _ => Err(candle_core::Error::Msg(
            "causal_attention: expected f32 CPU tensors".into(),
        )),
    }
}

/// One head: queries `s` rows of `q`, the last `s` of the `t` positions of `k` and `v`.
#[allow(clippy::too_many_arguments)]
fn one_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &mut [f32],
    s: usize,
    t: usize,
    dh: usize,
) {
    let offset = t - s;
    let mut scores = vec![0f32; BLOCK.min(s) * t];
    for i0 in (0..s).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(s);
        // Query i (position offset + i) sees keys up to offset + i; the block up to offset + i1.
        let (n, keys) = (i1 - i0, offset + i1);
        let scores = &mut scores[..n * keys];
        // scores = q[i0..i1] k[..keys]^T, then each row's softmax, then out[i0..i1] = scores v.
        product(
            scores,
            &q[i0 * dh..][..n * dh],
            &k[..keys * dh],
            n,
            keys,
            dh,
            true,
        );
        for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
            let i = i0 + r;
            softmax_causal_row(row, &mask[i * t..][..keys], offset + i + 1);
        }
        product(
            &mut out[i0 * dh..][..n * dh],
            scores,
            &v[..keys * dh],
            n,
            dh,
            keys,
            false,
        );
    }
}

fn product(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rhs_transposed: bool,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == k * n);
    // Strides of rhs as a [k, n] matrix: (column, row).
    let (rhs_cs, rhs_rs) = if rhs_transposed { (k, 1) } else { (1, n) };
    // SAFETY: the lengths asserted above hold every element the strides address; with read_dst
    // false gemm writes all of dst without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Softmax of `row[..valid] + mask[..valid]` in place; the entries from `valid` on become 0.
fn softmax_causal_row(row: &mut [f32], mask: &[f32], valid: usize) {
    let (live, dead) = row.split_at_mut(valid);
    dead.fill(0.0);
    let mut max = f32::NEG_INFINITY;
    for (x, m) in live.iter_mut().zip(mask) {
        *x += m;
        max = max.max(*x);
    }
    if max == f32::NEG_INFINITY {
        // Cannot happen with our masks (a token always sees itself); no NaN if it ever does.
        live.fill(0.0);
        return;
    }
    for x in live.iter_mut() {
        *x = exp(*x - max);
    }
    let mut acc = [0f32; 8];
    let mut chunks = live.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let sum = acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for x in live.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The composed ops the layer uses otherwise: full scores, mask, softmax, product.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, h, s, dh) = q.dims4()?;
        let (kvh, t) = (k.dim(1)?, k.dim(2)?);
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let q = q.reshape((b, kvh, h / kvh * s, dh))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, h, s, t))?;
        let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)?;
        p.reshape((b, kvh, h / kvh * s, t))?
            .matmul(&v)?
            .reshape((b, h, s, dh))
    }

    fn mask(rows: usize, s: usize, window: usize, pad: &[usize]) -> Result<Tensor> {
        let mut m = vec![0f32; rows * s * s];
        for r in 0..rows {
            for i in 0..s {
                for j in 0..s {
                    let padded = j < pad[r] && j != i;
                    if j > i || i - j >= window || padded {
                        m[(r * s + i) * s + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (rows, 1, s, s), &Device::Cpu)
    }

    /// Against the tensor ops, over sequence lengths around the block size, grouped kv heads,
    /// a sliding window, and left padding per row.
    /// Causal mask for `s` queries at positions `t - s..t` over `t` keys, the first `pad[r]`
    /// keys of row `r` padding (masked except for a query's own position).
    fn cached_mask(rows: usize, s: usize, t: usize, pad: &[usize]) -> Result<Tensor> {
        let mut m = vec![0f32; rows * s * t];
        for r in 0..rows {
            for i in 0..s {
                let pos = t - s + i;
                for j in 0..t {
                    if j > pos || (j < pad[r] && j != pos) {
                        m[(r * s + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (rows, 1, s, t), &Device::Cpu)
    }

    /// The few queries of a generation step against a KV cache, with the keys and values as
    /// views of longer buffers (as the cache holds them), give the composed ops' result.
    #[test]
    fn cached_queries_over_buffer_views_match_composed() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, kvh, s, t, cap, dh, pad) in [
            (2, 6, 3, 1, 70, 128, 16, vec![0, 5]),
            (1, 4, 4, 3, 9, 9, 8, vec![0]),
            (2, 4, 2, 2, 130, 200, 32, vec![3, 0]),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, h, s, dh), &dev)?;
            let kb = Tensor::randn(0f32, 1.0, (b, kvh, cap, dh), &dev)?;
            let vb = Tensor::randn(0f32, 1.0, (b, kvh, cap, dh), &dev)?;
            let (k, v) = (kb.narrow(2, 0, t)?, vb.narrow(2, 0, t)?);
            assert_eq!(k.is_contiguous(), t == cap);
            let m = cached_mask(b, s, t, &pad)?;
            assert!(applies(&q, &k, &v, &m));
            let fused = causal_attention(&q, &k, &v, &m)?;
            let reference = composed(&q, &k, &v, &m)?;
            let diff = (fused - reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "s={s} t={t} cap={cap}: max |diff| {diff}");
        }
        Ok(())
    }

    #[test]
    fn fused_matches_composed() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, kvh, s, dh, window, pad) in [
            (2, 4, 2, 1, 8, usize::MAX, vec![0, 0]),
            (1, 3, 1, 63, 16, usize::MAX, vec![0]),
            (2, 6, 3, 130, 32, usize::MAX, vec![0, 0]),
            (2, 2, 2, 150, 64, 40, vec![0, 0]),
            (2, 4, 1, 100, 16, usize::MAX, vec![0, 37]),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, h, s, dh), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, kvh, s, dh), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, kvh, s, dh), &dev)?;
            let rows = if pad.iter().any(|&p| p > 0) { b } else { 1 };
            let m = mask(rows, s, window, &pad)?;
            assert!(applies(&q, &k, &v, &m));
            let fused = causal_attention(&q, &k, &v, &m)?;
            let reference = composed(&q, &k, &v, &m)?;
            let diff = (fused - reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "s={s} h={h} kvh={kvh} window={window}: max |diff| {diff}"
            );
        }
        Ok(())
    }
}
