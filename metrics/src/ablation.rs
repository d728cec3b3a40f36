//! The feature-ablation study (Towards Monosemanticity): run a context up to the hook, compute
//! the feature's activation at every token, subtract activation × decoder direction from the
//! hook's activations, finish the forward pass, and record each token's change in
//! log-likelihood.
//!
//! Only the feature's own contribution is removed: the other features and the SAE's error term
//! stay, so the change is due to this one feature. Both passes (clean and ablated) are single
//! forward passes; the ablated one computes the feature's activations inside its hook closure
//! from the activations it is handed, which are the clean ones because nothing upstream changed.

use std::cell::RefCell;

use candle_core::{D, DType, Tensor};
use sae_core::SaeModel;
use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result};
use crate::nll::log_softmax;
use crate::sae_ops::{decoder_row, feature_column, reconstruct};
use crate::spliced::SpliceTarget;

/// One context's ablation: everything indexed by token position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextAblation {
    pub tokens: Vec<u32>,
    /// The feature's activation at each position (0 before `first_spliced_position`).
    pub activations: Vec<f32>,
    /// log p(token_i | tokens_<i) of the clean model; `None` at position 0.
    pub clean_log_probs: Vec<Option<f32>>,
    /// Ablated minus clean log p(token_i | tokens_<i); `None` at position 0. Negative: the
    /// feature helped predict the token.
    pub logprob_delta: Vec<Option<f32>>,
}

/// Log-probability of each next token, `[b, t]` (position 0 set to 0, it has no prediction).
fn per_token_log_probs(logits: &Tensor, tokens: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (b, t, _) = logits.dims3()?;
    let lp = log_softmax(&logits.narrow(1, 0, t - 1)?)?;
    let targets = tokens
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .unsqueeze(D::Minus1)?
        .contiguous()?;
    let got = lp.gather(&targets, 2)?.squeeze(2)?;
    let zeros = Tensor::zeros((b, 1), DType::F32, logits.device())?;
    Ok(Tensor::cat(&[&zeros, &got], 1)?.to_vec2::<f32>()?)
}

/// Ablates `feature` on each of `contexts` (token ids, any lengths ≥ 2), `batch_size` contexts
/// per forward pass.
///
/// Contexts in one pass are right-padded with their own last token; with causal attention
/// padding after a position cannot change anything at or before it, and results are cut to each
/// context's length.
///
/// # Errors
/// `SaeHookWidth`, `InvalidArgument` for a feature out of range, `TextTooShort` for a context
/// shorter than two tokens, model errors.
pub fn ablate_feature(
    model: &mut dyn SpliceTarget,
    sae: &SaeModel,
    feature: usize,
    contexts: &[Vec<u32>],
    first_spliced_position: usize,
    batch_size: usize,
) -> Result<Vec<ContextAblation>> {
    if sae.d_in() != model.hook_width() {
        return Err(MetricsError::SaeHookWidth {
            hook: model.hook_name(),
            sae_d_in: sae.d_in(),
            hook_width: model.hook_width(),
        });
    }
    let dir = decoder_row(sae, feature)?;
    for (i, c) in contexts.iter().enumerate() {
        if c.len() < 2 {
            return Err(MetricsError::TextTooShort {
                what: format!("context {i} of the ablation study"),
                tokens: c.len(),
                needed: 2,
            });
        }
    }
    let first = first_spliced_position;
    let device = model.device();
    let mut out = Vec::with_capacity(contexts.len());
    for chunk in contexts.chunks(batch_size.max(1)) {
        let t = chunk.iter().map(Vec::len).max().unwrap_or(2);
        let mut ids = Vec::with_capacity(chunk.len() * t);
        for c in chunk {
            ids.extend_from_slice(c);
            let pad = *c.last().unwrap_or(&0);
            ids.extend(std::iter::repeat_n(pad, t - c.len()));
        }
        let tokens = Tensor::from_vec(ids, (chunk.len(), t), &device)?;
        let clean = per_token_log_probs(&model.forward(&tokens, None)?, &tokens)?;

        let acts_seen: RefCell<Vec<f32>> = RefCell::new(Vec::new());
        let mut ablate = |x: &Tensor| -> Result<Tensor> {
            let (b, tt, d) = x.dims3()?;
            if first >= tt {
                *acts_seen.borrow_mut() = vec![0.0; b * tt];
                return Ok(x.clone());
            }
            let rows = x.narrow(1, first, tt - first)?.contiguous()?;
            let (_, codes) = reconstruct(sae, &rows)?;
            let a = feature_column(&codes, feature);
            let mut full = vec![0.0f32; b * tt];
            for bi in 0..b {
                for p in first..tt {
                    full[bi * tt + p] = a[bi * (tt - first) + (p - first)];
                }
            }
            let a_t = Tensor::from_slice(&full, (b, tt, 1), x.device())?.to_dtype(x.dtype())?;
            let dir_t = Tensor::from_slice(&dir, (1, 1, d), x.device())?.to_dtype(x.dtype())?;
            *acts_seen.borrow_mut() = full;
            Ok(x.broadcast_sub(&a_t.broadcast_mul(&dir_t)?)?)
        };
        let ablated = per_token_log_probs(&model.forward(&tokens, Some(&mut ablate))?, &tokens)?;
        let acts = acts_seen.into_inner();
        for (bi, c) in chunk.iter().enumerate() {
            let n = c.len();
            let mut clean_lp = Vec::with_capacity(n);
            let mut delta = Vec::with_capacity(n);
            for p in 0..n {
                if p == 0 {
                    clean_lp.push(None);
                    delta.push(None);
                } else {
                    clean_lp.push(Some(clean[bi][p]));
                    delta.push(Some(ablated[bi][p] - clean[bi][p]));
                }
            }
            out.push(ContextAblation {
                tokens: c.clone(),
                activations: acts
                    .get(bi * t..bi * t + n)
                    .map(<[f32]>::to_vec)
                    .unwrap_or_else(|| vec![0.0; n]),
                clean_log_probs: clean_lp,
                logprob_delta: delta,
            });
        }
    }
    Ok(out)
}

/// (token id, logit change) pairs, largest effect first.
pub type TokenEffects = Vec<(u32, f32)>;

/// The tokens whose logits a residual-stream direction raises and lowers most, read directly
/// through the unembedding: `W_U · direction`.
///
/// # Shapes
/// `direction`: `[d_model]`; `w_u`: `[vocab, d_model]`. Returns (raised, lowered), `k` each, as
/// (token id, logit change per unit of activation).
///
/// # Errors
/// Shape errors from candle when the widths differ.
pub fn top_logit_effects(
    direction: &Tensor,
    w_u: &Tensor,
    k: usize,
) -> Result<(TokenEffects, TokenEffects)> {
    let d = direction.to_dtype(DType::F32)?.unsqueeze(1)?;
    let logits = w_u.to_dtype(DType::F32)?.matmul(&d)?.squeeze(1)?;
    let v = logits.to_vec1::<f32>()?;
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]));
    let raised = idx.iter().take(k).map(|&i| (i, v[i as usize])).collect();
    let lowered = idx
        .iter()
        .rev()
        .take(k)
        .map(|&i| (i, v[i as usize]))
        .collect();
    Ok((raised, lowered))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ToyModel, perfect_sae};
    use approx::assert_relative_eq;
    use candle_core::Device;

    fn host_log_probs(model: &ToyModel, toks: &[u32], h: &[f32]) -> Vec<f64> {
        let v = model.vocab;
        let logits = model.logits_from(h);
        let mut out = vec![0.0];
        for p in 0..toks.len() - 1 {
            let l = &logits[p * v..(p + 1) * v];
            let m = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            out.push(l[toks[p + 1] as usize] as f64 - lse);
        }
        out
    }

    #[test]
    fn ablation_matches_host_computation() {
        let d = 6;
        let mut model = ToyModel::new(11, d, 9);
        let sae = perfect_sae(d);
        // Feature 2 of the ±I SAE is ReLU(x_2) along +e_2.
        let feature = 2;
        let contexts = vec![
            vec![1u32, 4, 2, 9, 3],
            vec![0u32, 5, 5],
            vec![7u32, 7, 8, 1, 2, 3, 4],
        ];
        let res = ablate_feature(&mut model, &sae, feature, &contexts, 1, 2).unwrap();
        assert_eq!(res.len(), 3);
        let mut any_nonzero = false;
        for (c, r) in contexts.iter().zip(&res) {
            let h = model.hook_acts(c);
            let clean = host_log_probs(&model, c, &h);
            let mut ha = h.clone();
            for p in 1..c.len() {
                let a = h[p * d + feature].max(0.0);
                assert_relative_eq!(r.activations[p], a, epsilon = 1e-5);
                ha[p * d + feature] -= a;
            }
            assert_eq!(r.activations[0], 0.0, "BOS is not ablated");
            let abl = host_log_probs(&model, c, &ha);
            assert_eq!(r.tokens, *c);
            assert!(r.logprob_delta[0].is_none());
            for p in 1..c.len() {
                let want = abl[p] - clean[p];
                let got = r.logprob_delta[p].unwrap() as f64;
                assert_relative_eq!(got, want, epsilon = 1e-4);
                assert_relative_eq!(
                    r.clean_log_probs[p].unwrap() as f64,
                    clean[p],
                    epsilon = 1e-4
                );
                any_nonzero |= want.abs() > 1e-3;
            }
        }
        assert!(any_nonzero, "the test must exercise a real change");
        assert!(ablate_feature(&mut model, &sae, 99, &contexts, 1, 2).is_err());
        assert!(ablate_feature(&mut model, &sae, 0, &[vec![1]], 1, 2).is_err());
    }

    #[test]
    fn logit_effects_rank_tokens() {
        let dev = Device::Cpu;
        let w_u = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [-1.0, 0.5], [0.2, 0.2]], &dev).unwrap();
        let dir = Tensor::new(&[2.0f32, 1.0], &dev).unwrap();
        let (up, down) = top_logit_effects(&dir, &w_u, 2).unwrap();
        assert_eq!(up, vec![(0, 2.0), (1, 1.0)]);
        assert_eq!(down[0], (2, -1.5));
    }
}
