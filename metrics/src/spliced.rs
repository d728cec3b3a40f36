//! Spliced NLL: the model's next-token loss with a hook's activations replaced by the SAE's
//! reconstruction, against the clean loss and two ablation baselines.
//!
//! For every batch of token windows, one forward pass per condition, each with a closure at the
//! hook (no second model, no cached activations):
//!
//! | condition | the hook's activations at spliced positions become |
//! |---|---|
//! | clean | unchanged |
//! | spliced | x̂ = SAE(x) |
//! | spliced_with_error | x̂ + (x - x̂): must equal clean, a check that splicing touches nothing else |
//! | zero_ablated | 0 |
//! | mean_ablated | the mean activation (provided, or measured on the evaluation tokens) |
//!
//! loss recovered = (L_ablated - L_spliced) / (L_ablated - L_clean), once per baseline (1 for a
//! perfect SAE, 0 for one no better than the ablation). For an SAE on `blocks.L.mlp.hook_post`
//! (the neurons) the reconstruction then passes through the MLP's down projection, because the
//! edit happens at the hook and the rest of the forward pass is untouched.
//!
//! Positions before `first_spliced_position` keep their clean activations. The default, 1, keeps
//! position 0 (BOS) clean: its activations are attention-sink outliers that the harvest leaves
//! out of the training cache (as SAEBench excludes special tokens), so an SAE has never seen them.
//! Causal attention makes the prediction from position 0 identical in every condition; it is still
//! counted, as SAELens counts every prediction.

use std::cell::RefCell;

use candle_core::{DType, Tensor};
use indicatif::ProgressBar;
use sae_core::SaeModel;
use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result, shape_err};
use crate::nll::HostLogits;
use crate::reconstruction::{
    DEFAULT_DENSE_THRESHOLD, ReconstructionAccumulator, ReconstructionMetrics,
};
use crate::sae_ops::reconstruct;

/// An edit of a hook's activations during a forward pass: `[batch, seq, width]` in, the same
/// shape out.
pub type HookEdit<'a> = dyn FnMut(&Tensor) -> Result<Tensor> + 'a;

/// What spliced evaluation needs from a model: a forward pass in which one hook's activations
/// can be replaced by a function of themselves. [`crate::HookedSplice`] implements it for
/// `transformer-hooks` models; tests implement it for toy models.
pub trait SpliceTarget {
    /// The hook's TransformerLens name (for reports and errors).
    fn hook_name(&self) -> String;
    /// The width of the hook's activations (`d_in` of an SAE that reads it).
    fn hook_width(&self) -> usize;
    /// Where token tensors must live.
    fn device(&self) -> candle_core::Device;
    /// Logits `[batch, seq, vocab]` for `tokens` `[batch, seq]`, with the hook's activations
    /// replaced by `edit(activations)` when `edit` is given.
    ///
    /// # Errors
    /// Whatever the model or the edit returns.
    fn forward(&mut self, tokens: &Tensor, edit: Option<&mut HookEdit<'_>>) -> Result<Tensor>;
}

/// How the mean-ablation baseline gets its mean.
#[derive(Debug, Clone, PartialEq)]
pub enum MeanActivation {
    /// A mean measured elsewhere (e.g. over a held-out activation cache), `d_in` values.
    Provided(Vec<f32>),
    /// The mean of the hook's clean activations over the evaluation tokens themselves (at the
    /// spliced positions); costs no extra forward pass, but the mean-ablated passes then run
    /// after all other conditions.
    EvalTokens,
}

/// Settings of a spliced evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct SplicedConfig {
    /// Positions before this one keep their clean activations (1 keeps BOS clean; see the module
    /// docs).
    pub first_spliced_position: usize,
    /// Where the mean-ablation mean comes from.
    pub mean: MeanActivation,
    /// Firing-rate threshold for the reconstruction metrics' dense fraction.
    pub dense_threshold: f64,
}

impl Default for SplicedConfig {
    fn default() -> Self {
        Self {
            first_spliced_position: 1,
            mean: MeanActivation::EvalTokens,
            dense_threshold: DEFAULT_DENSE_THRESHOLD,
        }
    }
}

/// Spliced NLL and loss recovered; mean NLLs are in nats per predicted token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplicedNll {
    /// The hook the SAE was spliced into.
    pub hook: String,
    /// Mean NLL of the unmodified model.
    pub clean: f64,
    /// Mean NLL with the hook's activations replaced by the SAE's reconstruction.
    pub spliced: f64,
    /// Mean NLL with reconstruction + error term; equals `clean` up to float rounding.
    pub spliced_with_error: f64,
    /// Largest per-token |NLL(spliced_with_error) - NLL(clean)|: the sanity check's worst case.
    pub spliced_with_error_max_abs_diff: f64,
    /// Mean NLL with the hook's activations set to zero.
    pub zero_ablated: f64,
    /// Mean NLL with the hook's activations set to their mean.
    pub mean_ablated: f64,
    /// (zero_ablated - spliced) / (zero_ablated - clean).
    pub loss_recovered_zero: f64,
    /// (mean_ablated - spliced) / (mean_ablated - clean).
    pub loss_recovered_mean: f64,
    /// Mean over predictions of KL(clean ‖ spliced), nats.
    pub kl_clean_spliced: f64,
    /// Mean over predictions of KL(clean ‖ zero-ablated), nats: the scale `kl_clean_spliced` is
    /// judged against.
    pub kl_clean_zero_ablated: f64,
    /// SAEBench's KL score, (KL_zero - KL_spliced) / KL_zero.
    pub kl_div_score: f64,
    /// Predictions counted (batch × (seq - 1) summed over batches).
    pub n_tokens: u64,
    /// Positions before this one were left clean.
    pub first_spliced_position: usize,
    /// Where the mean for `mean_ablated` came from: "provided" or "eval_tokens".
    pub mean_source: String,
}

/// Spliced NLL together with the reconstruction metrics measured on the same activations
/// (the ones the spliced pass saw at the spliced positions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplicedEvaluation {
    pub spliced: SplicedNll,
    pub reconstruction: ReconstructionMetrics,
}

/// (L_ablated - L_spliced) / (L_ablated - L_clean); NaN (JSON `null`) when the ablation does not
/// change the loss, because the ratio is then undefined.
pub fn loss_recovered(clean: f64, spliced: f64, ablated: f64) -> f64 {
    let denom = ablated - clean;
    if denom == 0.0 {
        f64::NAN
    } else {
        (ablated - spliced) / denom
    }
}

/// Replaces positions `first..` of `x` (`[b, t, d]`) with those of `replacement`.
pub fn splice_positions(x: &Tensor, replacement: &Tensor, first: usize) -> Result<Tensor> {
    let t = x.dim(1)?;
    if first == 0 {
        return Ok(replacement.clone());
    }
    if first >= t {
        return Ok(x.clone());
    }
    Ok(Tensor::cat(
        &[
            &x.narrow(1, 0, first)?,
            &replacement.narrow(1, first, t - first)?,
        ],
        1,
    )?)
}

/// Sums over the SAE-independent passes (clean and the two ablations).
#[derive(Default)]
struct Shared {
    clean: f64,
    zero: f64,
    mean: f64,
    kl_zero: f64,
    n: u64,
}

/// Sums over one SAE's passes.
#[derive(Default)]
struct PerSae {
    spliced: f64,
    with_error: f64,
    with_error_max: f64,
    kl_spliced: f64,
}

/// Runs the spliced evaluation of `sae` on `batches` of token windows (`[batch, seq]` each,
/// `seq >= 2`; batches may differ in shape).
///
/// # Errors
/// `SaeHookWidth` if the SAE's `d_in` is not the hook's width; `TextTooShort` if there is no
/// prediction to score; `ShapeMismatch` for a provided mean of the wrong length; model errors.
pub fn evaluate_spliced(
    model: &mut dyn SpliceTarget,
    sae: &SaeModel,
    batches: &[Tensor],
    cfg: &SplicedConfig,
    progress: Option<&ProgressBar>,
) -> Result<SplicedEvaluation> {
    let mut all = evaluate_spliced_many(model, &[sae], batches, cfg, progress)?;
    Ok(all.remove(0))
}

/// [`evaluate_spliced`] for several SAEs on the same hook and tokens, one result per SAE in
/// order. The clean, zero- and mean-ablated passes do not depend on the SAE, so they run once
/// per batch instead of once per SAE: 3 + 2n passes per batch for n SAEs instead of 5n.
///
/// # Errors
/// As [`evaluate_spliced`], for any of the SAEs; `Empty` for an empty `saes`.
pub fn evaluate_spliced_many(
    model: &mut dyn SpliceTarget,
    saes: &[&SaeModel],
    batches: &[Tensor],
    cfg: &SplicedConfig,
    progress: Option<&ProgressBar>,
) -> Result<Vec<SplicedEvaluation>> {
    let width = model.hook_width();
    let hook = model.hook_name();
    if saes.is_empty() {
        return Err(MetricsError::Empty {
            what: "list of SAEs to evaluate".into(),
        });
    }
    for sae in saes {
        if sae.d_in() != width {
            return Err(MetricsError::SaeHookWidth {
                hook,
                sae_d_in: sae.d_in(),
                hook_width: width,
            });
        }
    }
    let mut n_preds = 0usize;
    for (i, b) in batches.iter().enumerate() {
        let (bs, t) = b.dims2().map_err(|_| {
            shape_err(
                format!("token batch {i}"),
                "[batch, seq]",
                format!("{:?}", b.dims()),
            )
        })?;
        if t >= 2 {
            n_preds += bs * (t - 1);
        } else {
            return Err(MetricsError::TextTooShort {
                what: format!("window batch {i}"),
                tokens: t,
                needed: 2,
            });
        }
    }
    if n_preds == 0 {
        return Err(MetricsError::TextTooShort {
            what: "evaluation set".into(),
            tokens: 0,
            needed: 2,
        });
    }
    if let MeanActivation::Provided(m) = &cfg.mean
        && m.len() != width
    {
        return Err(shape_err(
            "provided mean activation",
            format!("{width} values (the width of `{hook}`)"),
            format!("{} values", m.len()),
        ));
    }
    let first = cfg.first_spliced_position;
    let accs: Vec<RefCell<ReconstructionAccumulator>> = saes
        .iter()
        .map(|sae| RefCell::new(ReconstructionAccumulator::new(width, sae.d_sae())))
        .collect();
    let mean_sum = RefCell::new((vec![0.0f64; width], 0u64));
    let mut s = Shared::default();
    let mut per: Vec<PerSae> = saes.iter().map(|_| PerSae::default()).collect();
    let deferred_mean = matches!(cfg.mean, MeanActivation::EvalTokens);
    // clean, zero and mean once, spliced and spliced-with-error per SAE.
    let passes_per_batch = 3 + 2 * saes.len();
    if let Some(pb) = progress {
        pb.set_length((batches.len() * passes_per_batch) as u64);
    }
    let tick = || {
        if let Some(pb) = progress {
            pb.inc(1);
        }
    };

    let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    for tokens in batches {
        let t = tokens.dim(1)?;
        let ids = tokens
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        // Clean, capturing the activations for the eval-token mean.
        let mut capture = |x: &Tensor| -> Result<Tensor> {
            if deferred_mean && first < t {
                let rows = x.narrow(1, first, t - first)?.to_dtype(DType::F32)?;
                let n = rows.dim(0)? * rows.dim(1)?;
                let sums = rows.sum((0, 1))?.to_vec1::<f32>()?;
                let mut ms = mean_sum.borrow_mut();
                for (a, b) in ms.0.iter_mut().zip(sums) {
                    *a += f64::from(b);
                }
                ms.1 += n as u64;
            }
            Ok(x.clone())
        };
        let clean = HostLogits::new(&model.forward(tokens, Some(&mut capture))?)?;
        let clean_lp = clean.target_log_probs(&ids)?;
        s.clean -= sum(&clean_lp);
        tick();

        for ((sae, acc), p) in saes.iter().zip(&accs).zip(per.iter_mut()) {
            // Spliced: reconstruction at positions >= first, recording reconstruction metrics.
            let x_hat_saved: RefCell<Option<Tensor>> = RefCell::new(None);
            let mut splice = |x: &Tensor| -> Result<Tensor> {
                if first >= t {
                    return Ok(x.clone());
                }
                let rows = x.narrow(1, first, t - first)?.contiguous()?;
                let (x_hat, codes) = reconstruct(sae, &rows)?;
                let d = rows.dim(2)?;
                let n = rows.dim(0)? * rows.dim(1)?;
                acc.borrow_mut().update_sparse(
                    &rows.reshape((n, d))?,
                    &x_hat.reshape((n, d))?,
                    &codes.offsets,
                    &codes.features,
                    &codes.values,
                )?;
                let full = Tensor::cat(&[&x.narrow(1, 0, first)?, &x_hat], 1)?;
                *x_hat_saved.borrow_mut() = Some(full.clone());
                Ok(full)
            };
            let spliced = HostLogits::new(&model.forward(tokens, Some(&mut splice))?)?;
            p.spliced -= sum(&spliced.target_log_probs(&ids)?);
            p.kl_spliced += sum(&clean.kl_to(&spliced)?);
            drop(spliced);
            tick();

            // Reconstruction plus the error term computed from the activations this pass sees.
            let x_hat_full = x_hat_saved.into_inner();
            let mut with_error = |x: &Tensor| -> Result<Tensor> {
                match &x_hat_full {
                    Some(xh) => {
                        let err = (x - xh)?;
                        Ok((xh + err)?)
                    }
                    None => Ok(x.clone()),
                }
            };
            let lp = HostLogits::new(&model.forward(tokens, Some(&mut with_error))?)?
                .target_log_probs(&ids)?;
            p.with_error -= sum(&lp);
            let worst = lp
                .iter()
                .zip(&clean_lp)
                .map(|(a, b)| f64::from((a - b).abs()))
                .fold(0.0, f64::max);
            p.with_error_max = p.with_error_max.max(worst);
            tick();
        }

        // Zero ablation.
        let mut zero = |x: &Tensor| splice_positions(x, &x.zeros_like()?, first);
        let zeroed = HostLogits::new(&model.forward(tokens, Some(&mut zero))?)?;
        s.zero -= sum(&zeroed.target_log_probs(&ids)?);
        s.kl_zero += sum(&clean.kl_to(&zeroed)?);
        drop(zeroed);
        tick();

        if let MeanActivation::Provided(m) = &cfg.mean {
            s.mean -= mean_ablated_nll(model, tokens, &ids, m, first)?;
            tick();
        }
        s.n += clean.n_predictions() as u64;
    }

    let mean_source = match &cfg.mean {
        MeanActivation::Provided(_) => "provided",
        MeanActivation::EvalTokens => {
            let (sum, n) = mean_sum.into_inner();
            if n == 0 {
                return Err(MetricsError::TextTooShort {
                    what: format!(
                        "evaluation set (no position at or after {first} to take the mean over)"
                    ),
                    tokens: 0,
                    needed: first + 1,
                });
            }
            let mean: Vec<f32> = sum.iter().map(|v| (v / n as f64) as f32).collect();
            for tokens in batches {
                let ids = tokens
                    .to_dtype(DType::U32)?
                    .flatten_all()?
                    .to_vec1::<u32>()?;
                s.mean -= mean_ablated_nll(model, tokens, &ids, &mean, first)?;
                tick();
            }
            "eval_tokens"
        }
    };

    let n = s.n as f64;
    let (clean, zero, mean) = (s.clean / n, s.zero / n, s.mean / n);
    let kl_zero = s.kl_zero / n;
    per.into_iter()
        .zip(accs)
        .map(|(p, acc)| {
            let spliced = p.spliced / n;
            let kl_spliced = p.kl_spliced / n;
            let spliced_nll = SplicedNll {
                hook: hook.clone(),
                clean,
                spliced,
                spliced_with_error: p.with_error / n,
                spliced_with_error_max_abs_diff: p.with_error_max,
                zero_ablated: zero,
                mean_ablated: mean,
                loss_recovered_zero: loss_recovered(clean, spliced, zero),
                loss_recovered_mean: loss_recovered(clean, spliced, mean),
                kl_clean_spliced: kl_spliced,
                kl_clean_zero_ablated: kl_zero,
                kl_div_score: if kl_zero > 0.0 {
                    (kl_zero - kl_spliced) / kl_zero
                } else {
                    f64::NAN
                },
                n_tokens: s.n,
                first_spliced_position: first,
                mean_source: mean_source.to_string(),
            };
            let reconstruction = acc.into_inner().finish(cfg.dense_threshold)?;
            Ok(SplicedEvaluation {
                spliced: spliced_nll,
                reconstruction,
            })
        })
        .collect()
}

/// Summed log-probability of one batch with positions `first..` set to `mean`.
fn mean_ablated_nll(
    model: &mut dyn SpliceTarget,
    tokens: &Tensor,
    ids: &[u32],
    mean: &[f32],
    first: usize,
) -> Result<f64> {
    let mut ablate = |x: &Tensor| -> Result<Tensor> {
        let m = Tensor::from_slice(mean, mean.len(), x.device())?
            .to_dtype(x.dtype())?
            .broadcast_as(x.shape())?
            .contiguous()?;
        splice_positions(x, &m, first)
    };
    let lp = HostLogits::new(&model.forward(tokens, Some(&mut ablate))?)?.target_log_probs(ids)?;
    Ok(lp.iter().map(|&x| f64::from(x)).sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ToyModel, perfect_sae, zero_sae};
    use approx::assert_relative_eq;
    use candle_core::Device;

    fn batches() -> Vec<Tensor> {
        let dev = Device::Cpu;
        vec![
            Tensor::new(&[[1u32, 4, 2, 9, 3, 3, 7], [0, 5, 5, 1, 10, 2, 6]], &dev).unwrap(),
            Tensor::new(&[[2u32, 8, 1, 0]], &dev).unwrap(),
        ]
    }

    /// Mean NLL computed on the host, independently of candle, with `edit` applied to the
    /// hook's activations at positions >= 1.
    fn host_nll(model: &ToyModel, edit: &dyn Fn(&[f32]) -> Vec<f32>) -> f64 {
        let (mut total, mut n) = (0.0f64, 0usize);
        for b in batches() {
            for row in b.to_vec2::<u32>().unwrap() {
                let d = model.d;
                let mut h = model.hook_acts(&row);
                for p in 1..row.len() {
                    let e = edit(&h[p * d..(p + 1) * d]);
                    h[p * d..(p + 1) * d].copy_from_slice(&e);
                }
                let logits = model.logits_from(&h);
                let v = model.vocab;
                for p in 0..row.len() - 1 {
                    let l = &logits[p * v..(p + 1) * v];
                    let m = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
                    let lse = m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    total += lse - l[row[p + 1] as usize] as f64;
                    n += 1;
                }
            }
        }
        total / n as f64
    }

    #[test]
    fn perfect_sae_recovers_all_loss_and_zero_sae_none() {
        let mut model = ToyModel::new(11, 6, 3);
        let cfg = SplicedConfig::default();
        let perfect =
            evaluate_spliced(&mut model, &perfect_sae(6), &batches(), &cfg, None).unwrap();
        let s = &perfect.spliced;
        assert_eq!(s.n_tokens, 2 * 6 + 3);
        let clean = host_nll(&model, &|x| x.to_vec());
        assert_relative_eq!(s.clean, clean, epsilon = 1e-5);
        let zero = host_nll(&model, &|x| vec![0.0; x.len()]);
        assert_relative_eq!(s.zero_ablated, zero, epsilon = 1e-5);
        assert_relative_eq!(s.spliced, s.clean, epsilon = 1e-5);
        assert_relative_eq!(s.loss_recovered_zero, 1.0, epsilon = 1e-4);
        assert_relative_eq!(s.loss_recovered_mean, 1.0, epsilon = 1e-4);
        assert!(s.kl_clean_spliced.abs() < 1e-6, "{}", s.kl_clean_spliced);
        assert!(s.kl_clean_zero_ablated > 0.01);
        assert_relative_eq!(s.spliced_with_error, s.clean, epsilon = 1e-6);
        assert!(s.spliced_with_error_max_abs_diff < 1e-5);
        assert_relative_eq!(perfect.reconstruction.fvu, 0.0, epsilon = 1e-10);
        assert_eq!(perfect.reconstruction.n_tokens, 2 * 6 + 3);
        assert_eq!(s.mean_source, "eval_tokens");

        let z = evaluate_spliced(&mut model, &zero_sae(6), &batches(), &cfg, None).unwrap();
        let z = z.spliced;
        assert_relative_eq!(z.spliced, z.zero_ablated, epsilon = 1e-6);
        assert_relative_eq!(z.loss_recovered_zero, 0.0, epsilon = 1e-5);
        assert_relative_eq!(z.kl_clean_spliced, z.kl_clean_zero_ablated, epsilon = 1e-6);
        assert_relative_eq!(z.kl_div_score, 0.0, epsilon = 1e-5);
        // The error term alone restores the clean activations even for a useless SAE.
        assert_relative_eq!(z.spliced_with_error, z.clean, epsilon = 1e-6);
        assert_relative_eq!(
            z.loss_recovered_mean,
            (z.mean_ablated - z.zero_ablated) / (z.mean_ablated - z.clean),
            epsilon = 1e-9
        );
    }

    #[test]
    fn mean_ablation_uses_the_mean_of_spliced_positions() {
        let mut model = ToyModel::new(11, 6, 5);
        let d = 6;
        // Mean of the clean activations over positions >= 1 of every sequence.
        let mut mean = vec![0.0f64; d];
        let mut n = 0;
        for b in batches() {
            for row in b.to_vec2::<u32>().unwrap() {
                let h = model.hook_acts(&row);
                for p in 1..row.len() {
                    for j in 0..d {
                        mean[j] += h[p * d + j] as f64;
                    }
                    n += 1;
                }
            }
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / n as f64) as f32).collect();
        let want = host_nll(&model, &|_| mean.clone());
        let cfg = SplicedConfig::default();
        let from_eval = evaluate_spliced(&mut model, &zero_sae(d), &batches(), &cfg, None).unwrap();
        assert_relative_eq!(from_eval.spliced.mean_ablated, want, epsilon = 1e-5);
        let cfg = SplicedConfig {
            mean: MeanActivation::Provided(mean.clone()),
            ..SplicedConfig::default()
        };
        let provided = evaluate_spliced(&mut model, &zero_sae(d), &batches(), &cfg, None).unwrap();
        assert_relative_eq!(provided.spliced.mean_ablated, want, epsilon = 1e-5);
        assert_eq!(provided.spliced.mean_source, "provided");
    }

    /// Counts forward passes, to show the SAE-independent ones run once for all SAEs.
    struct Counting<'a>(&'a mut ToyModel, usize);

    impl SpliceTarget for Counting<'_> {
        fn hook_name(&self) -> String {
            self.0.hook_name()
        }
        fn hook_width(&self) -> usize {
            self.0.hook_width()
        }
        fn device(&self) -> candle_core::Device {
            self.0.device()
        }
        fn forward(&mut self, tokens: &Tensor, edit: Option<&mut HookEdit<'_>>) -> Result<Tensor> {
            self.1 += 1;
            self.0.forward(tokens, edit)
        }
    }

    #[test]
    fn many_saes_match_one_at_a_time_with_fewer_passes() {
        let (d, b) = (6, batches());
        let mut model = ToyModel::new(11, d, 3);
        let cfg = SplicedConfig::default();
        let saes = [perfect_sae(d), zero_sae(d)];
        let mut counting = Counting(&mut model, 0);
        let many =
            evaluate_spliced_many(&mut counting, &[&saes[0], &saes[1]], &b, &cfg, None).unwrap();
        // clean + zero per batch, spliced + with-error per SAE per batch, mean after.
        assert_eq!(counting.1, b.len() * (2 + 2 * saes.len()) + b.len());
        for (sae, got) in saes.iter().zip(&many) {
            let alone = evaluate_spliced(&mut model, sae, &b, &cfg, None).unwrap();
            assert_eq!(&alone, got);
        }
        assert_relative_eq!(many[0].spliced.loss_recovered_zero, 1.0, epsilon = 1e-5);
        assert_relative_eq!(many[1].spliced.loss_recovered_zero, 0.0, epsilon = 1e-5);
        let e = evaluate_spliced_many(&mut model, &[], &b, &cfg, None).unwrap_err();
        assert!(matches!(e, MetricsError::Empty { .. }), "{e}");
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        let mut model = ToyModel::new(11, 6, 3);
        let cfg = SplicedConfig::default();
        let e = evaluate_spliced(&mut model, &perfect_sae(5), &batches(), &cfg, None).unwrap_err();
        assert!(
            matches!(
                e,
                MetricsError::SaeHookWidth {
                    sae_d_in: 5,
                    hook_width: 6,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("blocks.0.mlp.hook_post"));
        let short = vec![Tensor::new(&[[3u32]], &Device::Cpu).unwrap()];
        let e = evaluate_spliced(&mut model, &perfect_sae(6), &short, &cfg, None).unwrap_err();
        assert!(matches!(e, MetricsError::TextTooShort { .. }), "{e}");
        let e = evaluate_spliced(&mut model, &perfect_sae(6), &[], &cfg, None).unwrap_err();
        assert!(matches!(e, MetricsError::TextTooShort { .. }), "{e}");
        let cfg = SplicedConfig {
            mean: MeanActivation::Provided(vec![0.0; 3]),
            ..SplicedConfig::default()
        };
        let e = evaluate_spliced(&mut model, &perfect_sae(6), &batches(), &cfg, None).unwrap_err();
        assert!(e.to_string().contains("mean"), "{e}");
    }

    #[test]
    fn loss_recovered_formula() {
        assert_relative_eq!(loss_recovered(3.0, 3.5, 5.0), 0.75);
        assert!(loss_recovered(3.0, 3.5, 3.0).is_nan());
    }
}
