//! Next-token log-likelihoods and KL divergences from logits.
//!
//! Position `i`'s logits predict token `i + 1`, so a `[b, t]` batch has `b * (t - 1)` predictions;
//! every function here works on those `t - 1` positions, and the KL is averaged over the same
//! positions as the NLL so that both count the same tokens.

use candle_core::{D, DType, Tensor};

use crate::error::{Result, shape_err};

/// Numerically stable log-softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
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
    kl_from_log_probs(&lp, q_logits)
}

/// KL(p || q) where p is already a log-softmax over the first `t - 1` positions (so the clean
/// distribution is computed once per batch and reused for every condition).
pub(crate) fn kl_from_log_probs(p_log_probs: &Tensor, q_logits: &Tensor) -> Result<Tensor> {
    let t1 = p_log_probs.dim(1)?;
    let lq = log_softmax(&q_logits.narrow(1, 0, t1)?)?;
    let kl = (p_log_probs.exp()? * (p_log_probs - lq)?)?.sum(D::Minus1)?;
    // Rounding can leave tiny negative values for identical distributions.
    Ok(kl.relu()?)
}

/// Sum of a tensor's values in f64 (after an f32 reduction on its device).
pub(crate) fn sum_f64(t: &Tensor) -> Result<f64> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(v.iter().map(|&x| f64::from(x)).sum())
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
