//! Next-token log-likelihoods and KL divergences from logits.
//!
//! Position `i`'s logits predict token `i + 1`, so a `[b, t]` batch has `b * (t - 1)` predictions;
//! every function here works on those `t - 1` positions, and the KL is averaged over the same
//! positions as the NLL so that both count the same tokens.
//!
//! The tensor functions are the reference; [`HostLogits`] does the same reductions in one fused
//! pass per row for speed, and is tested against them.

use candle_core::{D, DType, Tensor};

use crate::error::{Result, shape_err};

/// Log-softmax over the last dimension, in f32 (candle-nn's, the one the model's own
/// log-probabilities fall back to off the CPU).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

fn check_pair(logits: &Tensor, tokens: &Tensor) -> Result<(usize, usize, usize)> {
    let (b, t, v) = logits.dims3().map_err(|_| {
        shape_err(
            "logits",
            "[batch, seq, vocab]",
            format!("{:?}", logits.dims()),
        )
    })?;
    if tokens.dims() != [b, t] {
        return Err(shape_err(
            "tokens",
            format!("[{b}, {t}] (the logits' batch and sequence)"),
            format!("{:?}", tokens.dims()),
        ));
    }
    if t < 2 {
        return Err(shape_err(
            "tokens",
            "at least 2 positions (one prediction needs a next token)",
            format!("{t}"),
        ));
    }
    Ok((b, t, v))
}

/// log p(tokens[:, i + 1] | tokens[:, ..=i]) for i in 0..t-1.
///
/// # Shapes
/// `logits`: `[b, t, vocab]`; `tokens`: `[b, t]` (u32 or i64). Returns `[b, t - 1]` f32.
///
/// # Errors
/// `ShapeMismatch` naming `logits` or `tokens`.
pub fn next_token_log_probs(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (_, t, _) = check_pair(logits, tokens)?;
    let lp = log_softmax(&logits.narrow(1, 0, t - 1)?)?;
    let targets = tokens
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .unsqueeze(2)?;
    Ok(lp.gather(&targets.contiguous()?, 2)?.squeeze(2)?)
}

/// KL(p || q) per predicting position, from logits: Σ_v p_v (log p_v - log q_v) over the
/// first `t - 1` positions.
///
/// # Shapes
/// Both `[b, t, vocab]`. Returns `[b, t - 1]` f32.
///
/// # Errors
/// `ShapeMismatch` if the shapes differ or `t < 2`.
pub fn kl_per_position(p_logits: &Tensor, q_logits: &Tensor) -> Result<Tensor> {
    if p_logits.dims() != q_logits.dims() {
        return Err(shape_err(
            "logits for KL",
            format!("{:?} (as the reference logits)", p_logits.dims()),
            format!("{:?}", q_logits.dims()),
        ));
    }
    let (_, t, _) = p_logits.dims3().map_err(|_| {
        shape_err(
            "logits",
            "[batch, seq, vocab]",
            format!("{:?}", p_logits.dims()),
        )
    })?;
    if t < 2 {
        return Err(shape_err("logits", "at least 2 positions", format!("{t}")));
    }
    let lp = log_softmax(&p_logits.narrow(1, 0, t - 1)?)?;
    let lq = log_softmax(&q_logits.narrow(1, 0, t - 1)?)?;
    let kl = (lp.exp()? * (&lp - lq)?)?.sum(D::Minus1)?;
    // Rounding can leave tiny negative values for identical distributions.
    Ok(kl.relu()?)
}

/// A batch's logits on the host with the log-sum-exp of every predicting position, for the
/// reductions spliced evaluation needs (target log-probabilities, KL against another condition).
///
/// Each is one fused pass over a vocabulary-sized row, parallel over rows; done with candle ops
/// on the CPU the same reductions take several passes over a `[batch, seq, vocab]` tensor each
/// (tens of ms per 16M elements), more than the forward pass of a small model.
#[derive(Debug, Clone)]
pub struct HostLogits {
    data: Vec<f32>,
    b: usize,
    t: usize,
    v: usize,
    /// log Σ exp(logits) of row (bi, p) at `bi * (t - 1) + p`, for p < t - 1.
    lse: Vec<f32>,
}

impl HostLogits {
    /// Copies `logits` (`[b, t, vocab]`, any float dtype, any device) to the host.
    ///
    /// # Errors
    /// `ShapeMismatch` if not 3-D or `t < 2`.
    pub fn new(logits: &Tensor) -> Result<Self> {
        use rayon::prelude::*;
        let (b, t, v) = logits.dims3().map_err(|_| {
            shape_err(
                "logits",
                "[batch, seq, vocab]",
                format!("{:?}", logits.dims()),
            )
        })?;
        if t < 2 {
            return Err(shape_err("logits", "at least 2 positions", format!("{t}")));
        }
        let data = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let lse = (0..b * (t - 1))
            .into_par_iter()
            .map(|i| {
                let (bi, p) = (i / (t - 1), i % (t - 1));
                let row = &data[(bi * t + p) * v..(bi * t + p + 1) * v];
                transformer_hooks::log_sum_exp(row)
            })
            .collect();
        Ok(Self { data, b, t, v, lse })
    }

    /// Number of predictions, `b * (t - 1)`.
    pub fn n_predictions(&self) -> usize {
        self.b * (self.t - 1)
    }

    fn row(&self, i: usize) -> &[f32] {
        let (bi, p) = (i / (self.t - 1), i % (self.t - 1));
        let o = (bi * self.t + p) * self.v;
        &self.data[o..o + self.v]
    }

    /// log p(token_{p+1} | ..=p) for every prediction, row-major `[b, t - 1]`.
    ///
    /// # Errors
    /// `ShapeMismatch` if `tokens` is not `b * t` ids; `InvalidArgument` for an id outside the
    /// vocabulary.
    pub fn target_log_probs(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.len() != self.b * self.t {
            return Err(shape_err(
                "tokens",
                format!("{} ids ([{}, {}])", self.b * self.t, self.b, self.t),
                format!("{}", tokens.len()),
            ));
        }
        (0..self.n_predictions())
            .map(|i| {
                let (bi, p) = (i / (self.t - 1), i % (self.t - 1));
                let target = tokens[bi * self.t + p + 1] as usize;
                let x = self.row(i).get(target).ok_or_else(|| {
                    crate::error::MetricsError::InvalidArgument {
                        what: format!("token id {target}"),
                        reason: format!("the vocabulary has {} tokens", self.v),
                    }
                })?;
                Ok(x - self.lse[i])
            })
            .collect()
    }

    /// KL(self ‖ q) for every prediction, row-major `[b, t - 1]`.
    ///
    /// # Errors
    /// `ShapeMismatch` if the two batches differ in shape.
    pub fn kl_to(&self, q: &HostLogits) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        if (self.b, self.t, self.v) != (q.b, q.t, q.v) {
            return Err(shape_err(
                "logits for KL",
                format!("[{}, {}, {}]", self.b, self.t, self.v),
                format!("[{}, {}, {}]", q.b, q.t, q.v),
            ));
        }
        Ok((0..self.n_predictions())
            .into_par_iter()
            .map(|i| {
                let (pr, qr) = (self.row(i), q.row(i));
                let (lp0, lq0) = (self.lse[i], q.lse[i]);
                let mut kl = 0.0f64;
                for (&a, &c) in pr.iter().zip(qr) {
                    let lp = a - lp0;
                    let lq = c - lq0;
                    kl += f64::from(lp.exp() * (lp - lq));
                }
                kl.max(0.0) as f32
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use candle_core::Device;

    #[test]
    fn log_probs_match_hand_softmax() {
        let dev = Device::Cpu;
        // One sequence of 3 tokens, vocab 3.
        let logits = Tensor::new(
            &[[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]],
            &dev,
        )
        .unwrap();
        let tokens = Tensor::new(&[[0u32, 2, 1]], &dev).unwrap();
        let lp = next_token_log_probs(&logits, &tokens).unwrap();
        let lp = lp.to_vec2::<f32>().unwrap();
        let z: f64 = [1f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        assert_relative_eq!(lp[0][0] as f64, 3.0 - z.ln(), epsilon = 1e-6);
        assert_relative_eq!(lp[0][1] as f64, -(3f64).ln(), epsilon = 1e-6);
    }

    #[test]
    fn kl_of_identical_is_zero_and_of_known_pair_matches() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[[0.3f32, -1.0], [2.0, 0.0], [0.0, 0.0]]], &dev).unwrap();
        let kl = kl_per_position(&a, &a).unwrap().to_vec2::<f32>().unwrap();
        assert!(kl[0].iter().all(|&v| v.abs() < 1e-7), "{kl:?}");
        // p = softmax(0, 0) = (.5, .5), q = softmax(ln 3, 0) = (.75, .25):
        // KL = .5 ln(.5/.75) + .5 ln(.5/.25).
        let p = Tensor::new(&[[[0.0f32, 0.0], [0.0, 0.0]]], &dev).unwrap();
        let q = Tensor::new(&[[[3f32.ln(), 0.0], [0.0, 0.0]]], &dev).unwrap();
        let kl = kl_per_position(&p, &q).unwrap().to_vec2::<f32>().unwrap();
        let want = 0.5 * (0.5f64 / 0.75).ln() + 0.5 * 2f64.ln();
        assert_relative_eq!(kl[0][0] as f64, want, epsilon = 1e-6);
        assert_eq!(kl[0].len(), 1);
    }

    #[test]
    fn host_kernels_match_candle_ops() {
        let dev = Device::Cpu;
        let (b, t, v) = (3, 5, 37);
        let mut state = 7u64;
        let vals: Vec<f32> = (0..2 * b * t * v)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 12.0
            })
            .collect();
        let p = Tensor::from_slice(&vals[..b * t * v], (b, t, v), &dev).unwrap();
        let q = Tensor::from_slice(&vals[b * t * v..], (b, t, v), &dev).unwrap();
        let toks: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
        let tt = Tensor::from_slice(&toks, (b, t), &dev).unwrap();
        let want = next_token_log_probs(&p, &tt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let hp = HostLogits::new(&p).unwrap();
        let got = hp.target_log_probs(&toks).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert_relative_eq!(*a, *b, epsilon = 1e-4);
        }
        let want = kl_per_position(&p, &q)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = hp.kl_to(&HostLogits::new(&q).unwrap()).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert_relative_eq!(*a, *b, epsilon = 1e-4, max_relative = 1e-4);
        }
        assert!(hp.kl_to(&hp).unwrap().iter().all(|&k| k.abs() < 1e-6));
        assert!(hp.target_log_probs(&toks[1..]).is_err());
    }

    #[test]
    fn shape_errors_name_the_input() {
        let dev = Device::Cpu;
        let l = Tensor::zeros((1, 3, 4), DType::F32, &dev).unwrap();
        let t = Tensor::zeros((1, 2), DType::U32, &dev).unwrap();
        let e = next_token_log_probs(&l, &t).unwrap_err().to_string();
        assert!(e.contains("tokens"), "{e}");
        let l1 = Tensor::zeros((1, 1, 4), DType::F32, &dev).unwrap();
        let t1 = Tensor::zeros((1, 1), DType::U32, &dev).unwrap();
        assert!(next_token_log_probs(&l1, &t1).is_err());
    }
}
