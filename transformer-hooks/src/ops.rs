//! The kernels where speed and differentiability part ways.
//!
//! candle-nn's fused RMSNorm, LayerNorm, softmax and rotary kernels are several times faster than
//! the same maths written in tensor ops, but they are applied with `apply_op*_no_bwd`: their output
//! is cut from the autograd graph, so a gradient through them would silently be zero. Each function
//! here uses the fused kernel when nothing upstream is tracked (inference) and the composed,
//! differentiable ops when something is (a `Var` weight or input): one forward pass, fast for
//! inference and trainable for fine-tuning, with no flag to forget.

use candle_core::{CpuStorage, D, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::config::RopeLayout;

/// Whether the composed ops must be used: something is on the autograd graph, or the dtype is
/// one the fused kernels do not implement (f64, used for gradient checks).
fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter()
        .any(|t| t.track_op() || !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16))
}

fn f32_internal(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !tracked(&[x, w]) {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if f32_cpu(x) && f32_cpu(w) && w.rank() == 1 && x.dims().last() == Some(&w.dim(0)?) {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps });
    }
    let dtype = x.dtype();
    let xf = f32_internal(x)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if !tracked(&[x, w, b]) {
        return candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32);
    }
    let dtype = x.dtype();
    let xf = f32_internal(x)?;
    let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax over the last dimension.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !tracked(&[x]) {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Rotary embedding of `x` `[batch, heads, seq, d_head]` with `cos`/`sin` of shape
/// `[seq, d_head/2]` or `[batch, seq, d_head/2]`.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    if !tracked(&[x, cos, sin]) {
        let x = x.contiguous()?;
        return match layout {
            RopeLayout::Half => candle_nn::rotary_emb::rope(&x, cos, sin),
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin),
        };
    }
    let (b, h, s, d) = x.dims4()?;
    // [batch or 1, 1, seq, d/2]
    let (cos, sin) = match cos.rank() {
        2 => (
            cos.unsqueeze(0)?.unsqueeze(0)?,
            sin.unsqueeze(0)?.unsqueeze(0)?,
        ),
        _ => (cos.unsqueeze(1)?, sin.unsqueeze(1)?),
    };
    match layout {
        RopeLayout::Half => {
            let x1 = x.narrow(D::Minus1, 0, d / 2)?;
            let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
            let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::cat(&[y1, y2], D::Minus1)
        }
        RopeLayout::Interleaved => {
            let xr = x.reshape((b, h, s, d / 2, 2))?;
            let x1 = xr.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
            let x2 = xr.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
            let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::stack(&[y1, y2], D::Minus1)?.reshape((b, h, s, d))
        }
    }
}

/// `silu(gate) * up`, the gated MLP's product, in one pass over both (the composed ops write and
/// reread a `silu(gate)` tensor and call libm's `expf` per element).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fast = !tracked(&[gate, up])
        && gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims();
    if !fast {
        return gate.silu()? * up;
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let out = {
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (Some(g), Some(u)) = (cpu_f32(&gs, gl), cpu_f32(&us, ul)) else {
            // Unreachable for contiguous f32 CPU tensors.
            candle_core::bail!("silu_mul: expected contiguous f32 CPU tensors");
        };
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + exp(-g)) * u;
                }
            });
        out
    };
    Tensor::from_vec(out, gate.shape(), gate.device())
}

/// `log softmax(logits)[r, targets[r]]` for `logits` `[rows, vocab]`: the next-token
/// log-probability that a language model's loss is made of.
///
/// For a 262k-token vocabulary the composed ops (max, subtract, exp, sum, log, gather, and their
/// backward) each write and reread a `rows x vocab` tensor; here the forward reads the logits
/// twice and writes `rows` numbers, and the backward writes the one gradient it must. Autograd
/// sees it as a single op. Off the CPU or in another dtype it falls back to the composed ops.
pub(crate) fn target_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    check_targets(targets, rows, vocab)?;
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return logits.contiguous()?.apply_op1(TargetLogprobs {
            targets: targets.to_vec(),
        });
    }
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let t = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    lsm.gather(&t, 1)?.squeeze(1)
}

fn check_targets(targets: &[u32], rows: usize, vocab: usize) -> Result<()> {
    if targets.len() != rows {
        candle_core::bail!(
            "next-token log-probabilities: {} targets for {rows} rows",
            targets.len()
        );
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!(
            "next-token log-probabilities: target {t} outside a vocabulary of {vocab}"
        );
    }
    Ok(())
}

/// The gradient of `g_r · (x_r[t_r] - logsumexp(x_r))` in the logits: per row
/// `g_r · (onehot(t_r) - exp(x_r - shift_r))`, with `shift_r` the row's log-sum-exp.
fn logprob_gradient(
    logits: &[f32],
    vocab: usize,
    targets: &[u32],
    g: &[f32],
    shift: &[f32],
) -> Vec<f32> {
    let mut out = vec![0f32; logits.len()];
    out.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter().zip(g.par_iter().zip(shift.par_iter())))
        .for_each(|((o, row), (&t, (&g, &shift)))| {
            for (o, &x) in o.iter_mut().zip(row) {
                *o = -g * exp(x - shift);
            }
            o[t as usize] += g;
        });
    out
}

struct TargetLogprobs {
    targets: Vec<u32>,
}

/// `ln sum_j e^(x_j)` of one row of logits, stably (the maximum first, the sum in f64): the
/// host-side log-normaliser the fused log-prob op uses, for crates that reduce logits on the
/// host. A row whose maximum is not finite (all `-inf`, or an `inf` or NaN) returns that maximum.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let (max, lse) = row_logsumexp(row);
    if max.is_finite() { max + lse } else { max }
}

/// Per row: the maximum and `ln sum exp(x - max)`. The sum is kept in f64: over a 49k-262k
/// vocabulary an f32 running sum drops the low bits of each small term, a bias of about 1e-4
/// nats in the mean log-probability.
fn row_logsumexp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f64 = row
        .chunks(8)
        .map(|c| f64::from(c.iter().map(|&x| exp(x - max)).sum::<f32>()))
        .sum();
    (max, sum.ln() as f32)
}

impl candle_core::CustomOp1 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "target-logprobs"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        let (Some((a, z)), CpuStorage::F32(d)) = (l.contiguous_offsets(), st) else {
            candle_core::bail!("target-logprobs: expected contiguous f32 logits");
        };
        let rows = self.targets.len();
        let d = &d[a..z];
        let vocab = d.len() / rows.max(1);
        let out: Vec<f32> = d
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let (max, lse) = row_logsumexp(row);
                row[t as usize] - max - lse
            })
            .collect();
        Ok((CpuStorage::F32(out), candle_core::Shape::from(rows)))
    }

    /// d/dx_j of `x_t - logsumexp(x)` is `1[j = t] - softmax(x)_j`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = arg.dims2()?;
        let g: Vec<f32> = grad_res.to_dtype(DType::F32)?.to_vec1()?;
        let arg = arg.contiguous()?;
        let (st, l) = arg.storage_and_layout();
        let Some(d) = cpu_f32(&st, l) else {
            candle_core::bail!("target-logprobs: expected contiguous f32 logits");
        };
        let shift: Vec<f32> = d
            .par_chunks(vocab)
            .map(|row| {
                let (max, lse) = row_logsumexp(row);
                max + lse
            })
            .collect();
        let out = logprob_gradient(d, vocab, &self.targets, &g, &shift);
        Ok(Some(Tensor::from_vec(out, (rows, vocab), arg.device())?))
    }
}

/// [`target_logprobs`] of `x W^T` for a constant `w` `[vocab, d]`, differentiable in `x` only.
pub(crate) fn frozen_unembed_logprobs(x: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    check_targets(targets, x.dim(0)?, w.dim(0)?)?;
    let vocab = w.dim(0)?;
    let logits = cpu_blas::matmul_t(&x.detach().contiguous()?, w)?;
    let (values, shift) = {
        let (st, l) = logits.storage_and_layout();
        let Some(d) = cpu_f32(&st, l) else {
            candle_core::bail!("unembed: expected contiguous f32 logits");
        };
        let per_row: Vec<(f32, f32)> = d
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let (max, lse) = row_logsumexp(row);
                (row[t as usize] - max - lse, max + lse)
            })
            .collect();
        per_row.into_iter().unzip::<f32, f32, Vec<f32>, Vec<f32>>()
    };
    x.apply_op1(FrozenUnembed {
        logits,
        w: w.clone(),
        targets: targets.to_vec(),
        values,
        shift,
    })
}

struct FrozenUnembed {
    /// `x W^T`, kept for the backward pass's softmax.
    logits: Tensor,
    w: Tensor,
    targets: Vec<u32>,
    values: Vec<f32>,
    /// Per row, `max + ln sum exp(x - max)`.
    shift: Vec<f32>,
}

impl candle_core::CustomOp1 for FrozenUnembed {
    fn name(&self) -> &'static str {
        "frozen-unembed-logprobs"
    }

    fn cpu_fwd(&self, _st: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        Ok((
            CpuStorage::F32(self.values.clone()),
            candle_core::Shape::from(self.values.len()),
        ))
    }

    /// `dx = (g * (onehot(t) - softmax(logits))) W`.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = self.logits.dims2()?;
        let g: Vec<f32> = grad_res.to_dtype(DType::F32)?.to_vec1()?;
        let (st, l) = self.logits.storage_and_layout();
        let Some(d) = cpu_f32(&st, l) else {
            candle_core::bail!("unembed: expected contiguous f32 logits");
        };
        let dl = logprob_gradient(d, vocab, &self.targets, &g, &self.shift);
        let dl = Tensor::from_vec(dl, (rows, vocab), self.logits.device())?;
        Ok(Some(dl.matmul(&self.w)?))
    }
}

/// RMS norm as one autograd op for f32 on the CPU: composed, it is seven element-wise ops
/// forward and about twice that backward, each writing a full activation-sized tensor, on every
/// norm of every layer (Gemma-3 has six per layer).
struct RmsNorm {
    eps: f64,
}

/// Rows per parallel task of the RMS norm kernels; fixed, so that the weight gradient's partial
/// sums are added in the same order on every run.
const NORM_ROWS: usize = 64;

impl RmsNorm {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|&v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps as f32).sqrt()
    }
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (CpuStorage::F32(xd), CpuStorage::F32(wd)) = (xs, ws) else {
            candle_core::bail!("rms-norm: expected f32");
        };
        let (Some((xa, xz)), Some((wa, wz))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("rms-norm: expected contiguous tensors");
        };
        let (x, w) = (&xd[xa..xz], &wd[wa..wz]);
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * NORM_ROWS)
            .zip(x.par_chunks(d * NORM_ROWS))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                    let r = self.inv_rms(xr);
                    for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
                        *y = x * r * w;
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    /// With `g = dy * w` and `r = 1/rms(x)`: `dx = r g - x r^3 mean(g x)`, `dw = sum_rows dy x r`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let xv = x.contiguous()?;
        let dyv = dy.contiguous()?;
        let wv: Vec<f32> = w.to_vec1()?;
        let (xs, xl) = xv.storage_and_layout();
        let (gs, gl) = dyv.storage_and_layout();
        let (Some(xd), Some(gd)) = (cpu_f32(&xs, xl), cpu_f32(&gs, gl)) else {
            candle_core::bail!("rms-norm: expected contiguous f32 tensors");
        };
        let mut dx = vec![0f32; xd.len()];
        let partial_dw: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * NORM_ROWS)
            .zip(
                xd.par_chunks(d * NORM_ROWS)
                    .zip(gd.par_chunks(d * NORM_ROWS)),
            )
            .map(|(dxc, (xc, gc))| {
                let mut dw = vec![0f32; d];
                for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                    let r = self.inv_rms(xr);
                    let mut dot = 0f32;
                    for ((&x, &g), &w) in xr.iter().zip(gr).zip(&wv) {
                        dot += g * w * x;
                    }
                    let k = r * r * r * dot / d as f32;
                    for (((dx, &x), &g), (&w, dw)) in dxr
                        .iter_mut()
                        .zip(xr)
                        .zip(gr)
                        .zip(wv.iter().zip(dw.iter_mut()))
                    {
                        *dx = r * g * w - x * k;
                        *dw += g * x * r;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; d];
        for p in &partial_dw {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, d, w.device())?),
        ))
    }
}

/// Elements per parallel task of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// The data of a contiguous f32 CPU tensor.
pub(crate) fn cpu_f32<'a>(st: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(d)), Some((a, z))) => Some(&d[a..z]),
        _ => None,
    }
}

/// `e^x` to 3e-7 relative for `x` in [-87, 88] (Cephes' `expf` polynomial); exactly 0 below
/// -87 (so `-inf` gives 0) and `e^88` above 88. Branch-free, so a loop over a slice vectorises,
/// where libm's `expf` is one call per element.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a rounding
    // instruction the baseline x86-64 target lacks.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow { 0.0 } else { e * scale }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fused next-token log-probability and its gradient equal the composed ops' (which
    /// autograd differentiates op by op).
    #[test]
    fn target_logprobs_matches_log_softmax_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3., (5, 37), &dev)?))?;
        let targets = [0u32, 36, 7, 7, 20];
        let weights = Tensor::new(&[1f32, -2., 0.5, 3., 0.], &dev)?;
        let fused = target_logprobs(x.as_tensor(), &targets)?;
        let t = Tensor::new(&targets, &dev)?.unsqueeze(1)?;
        let composed = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)?
            .gather(&t, 1)?
            .squeeze(1)?;
        assert!(max_diff(&fused, &composed) < 1e-5);
        let g_fused = (fused * &weights)?.sum_all()?.backward()?;
        let g_comp = (composed * &weights)?.sum_all()?.backward()?;
        let (a, b) = (
            g_fused.get(x.as_tensor()).expect("fused gradient"),
            g_comp.get(x.as_tensor()).expect("composed gradient"),
        );
        assert!(
            max_diff(a, b) < 1e-5,
            "gradients differ by {}",
            max_diff(a, b)
        );
        assert!(target_logprobs(x.as_tensor(), &[0, 1, 2, 3, 37]).is_err());
        // A vocabulary-sized row: the sum over 262k terms must not drift.
        let big = Tensor::randn(0f32, 3., (2, 262_144), &dev)?;
        let fused = target_logprobs(&big, &[5, 200_000])?;
        let t = Tensor::new(&[5u32, 200_000], &dev)?.unsqueeze(1)?;
        let big64 = big.to_dtype(DType::F64)?;
        let exact = candle_nn::ops::log_softmax(&big64, D::Minus1)?
            .gather(&t, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?;
        assert!(
            max_diff(&fused, &exact) < 2e-6,
            "{}",
            max_diff(&fused, &exact)
        );
        Ok(())
    }

    /// The frozen-weight unembedding gives `x` the gradient the composed ops give it.
    #[test]
    fn frozen_unembed_matches_the_composed_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (6, 8), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (50, 8), &dev)?;
        let targets = [3u32, 49, 0, 17, 17, 8];
        let weights = Tensor::new(&[1f32, -1., 2., 0.5, 0., 3.], &dev)?;
        let fused = frozen_unembed_logprobs(x.as_tensor(), &w, &targets)?;
        let logits = x.as_tensor().matmul(&w.t()?)?;
        let t = Tensor::new(&targets, &dev)?.unsqueeze(1)?;
        let composed = candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&t, 1)?
            .squeeze(1)?;
        assert!(max_diff(&fused, &composed) < 1e-5);
        let a = (fused * &weights)?.sum_all()?.backward()?;
        let b = (composed * &weights)?.sum_all()?.backward()?;
        let (ga, gb) = (
            a.get(x.as_tensor()).expect("fused gradient"),
            b.get(x.as_tensor()).expect("composed gradient"),
        );
        assert!(
            max_diff(ga, gb) < 1e-4,
            "gradients differ by {}",
            max_diff(ga, gb)
        );
        Ok(())
    }

    /// The one-op RMS norm's gradients equal autograd's through the composed ops (f64 takes
    /// the composed path).
    #[test]
    fn rms_norm_op_gradients_match_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 2., (3, 70, 24), &dev)?;
        let w0 = Tensor::randn(1f32, 0.3, 24, &dev)?;
        let up = Tensor::randn(0f32, 1., (3, 70, 24), &dev)?;
        let grads = |dtype: DType| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let x = Var::from_tensor(&x0.to_dtype(dtype)?)?;
            let w = Var::from_tensor(&w0.to_dtype(dtype)?)?;
            let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)?;
            let g = (y.clone() * up.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let f = |t: &Tensor| -> Result<Vec<f32>> {
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
            };
            let gx = g.get(x.as_tensor()).expect("dx");
            let gw = g.get(w.as_tensor()).expect("dw");
            Ok((f(&y)?, f(gx)?, f(gw)?))
        };
        let (y32, dx32, dw32) = grads(DType::F32)?;
        let (y64, dx64, dw64) = grads(DType::F64)?;
        let close = |a: &[f32], b: &[f32], tol: f32| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() <= tol * (1.0 + b.abs()))
        };
        assert!(close(&y32, &y64, 1e-5));
        assert!(close(&dx32, &dx64, 1e-4));
        assert!(close(&dw32, &dw64, 1e-4));
        Ok(())
    }

    /// The fused (inference) and composed (autograd) paths compute the same function.
    #[test]
    fn fused_and_composed_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 8), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let bias = Tensor::randn(0f32, 0.1, 8, &dev)?;
        let xv = Var::from_tensor(&x)?;
        let (cos, sin) = {
            let ang = Tensor::randn(0f32, 1., (5, 4), &dev)?;
            (ang.cos()?, ang.sin()?)
        };
        assert!(
            max_diff(
                &rms_norm(&x, &w, 1e-5)?,
                &rms_norm(xv.as_tensor(), &w, 1e-5)?
            ) < 1e-5
        );
        assert!(
            max_diff(
                &layer_norm(&x, &w, &bias, 1e-5)?,
                &layer_norm(xv.as_tensor(), &w, &bias, 1e-5)?
            ) < 1e-5
        );
        assert!(max_diff(&softmax_last_dim(&x)?, &softmax_last_dim(xv.as_tensor())?) < 1e-6);
        for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
            let fused = rope(&x, &cos, &sin, layout)?;
            let composed = rope(xv.as_tensor(), &cos, &sin, layout)?;
            assert!(max_diff(&fused, &composed) < 1e-5, "{layout:?}");
        }
        // Per-batch positions ([batch, seq, d/2]).
        let ang = Tensor::randn(0f32, 1., (2, 5, 4), &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
            let fused = rope(&x, &cos, &sin, layout)?;
            let composed = rope(xv.as_tensor(), &cos, &sin, layout)?;
            assert!(max_diff(&fused, &composed) < 1e-5, "{layout:?} batched");
        }
        Ok(())
    }

    /// Interleaved rotary on a vector equals half rotary on the same vector with its dimensions
    /// permuted (even indices first, then odd): the identity that un-permuting Llama's GGUF q/k
    /// weights relies on.
    #[test]
    fn interleaved_is_permuted_half() -> Result<()> {
        let dev = Device::Cpu;
        let d = 8;
        let x = Tensor::randn(0f32, 1., (1, 2, 3, d), &dev)?;
        let ang = Tensor::randn(0f32, 1., (3, d / 2), &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let perm: Vec<u32> = (0..d as u32 / 2)
            .map(|i| 2 * i)
            .chain((0..d as u32 / 2).map(|i| 2 * i + 1))
            .collect();
        let perm = Tensor::new(perm.as_slice(), &dev)?;
        let a = rope(&x, &cos, &sin, RopeLayout::Interleaved)?.index_select(&perm, 3)?;
        let b = rope(&x.index_select(&perm, 3)?, &cos, &sin, RopeLayout::Half)?;
        assert!(max_diff(&a, &b) < 1e-5);
        Ok(())
    }

    #[test]
    fn exp_matches_libm() {
        let (mut worst, mut at) = (0f32, 0f32);
        for i in -86_000..=87_900 {
            let x = i as f32 * 1e-3;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            if rel > worst {
                (worst, at) = (rel, x);
            }
        }
        assert!(worst < 3e-7, "worst relative error {worst} at {at}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(1000.0).is_finite());
    }

    /// The fused SiLU-times-up product against candle's ops, with values far into both tails.
    #[test]
    fn silu_mul_matches_ops() -> Result<()> {
        let dev = Device::Cpu;
        let g = (Tensor::randn(0f32, 1.0, (3, 1000), &dev)? * 30.0)?;
        let u = Tensor::randn(0f32, 1.0, (3, 1000), &dev)?;
        let fused = silu_mul(&g, &u)?;
        let reference = (g.silu()? * &u)?;
        assert!(max_diff(&fused, &reference) < 1e-5);
        // A tracked input takes the differentiable ops.
        let gv = Var::from_tensor(&g)?;
        let tracked = silu_mul(gv.as_tensor(), &u)?;
        assert!(max_diff(&tracked, &reference) < 1e-6);
        Ok(())
    }
}
