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
    /// The same measures on each group of tokens, when [`TokenGroups`] were given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_group: Vec<GroupEvaluation>,
}

/// A partition of the evaluation tokens into named groups (e.g. the template, the user's turn
/// and the model's turn of chat conversations), to measure an SAE on each separately: an SAE can
/// keep the loss on one kind of token and lose it on another, which the mean over all hides.
///
/// `labels[i]` holds one group index per token of batch `i`, row-major `[batch, seq]`. A
/// prediction counts in the group of the token it predicts (the loss on the model's turn is the
/// loss of predicting its tokens); an activation (FVU, L0) in the group of its own token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenGroups {
    pub names: Vec<String>,
    pub labels: Vec<Vec<u8>>,
}

/// Spliced NLL, loss recovered, KL and reconstruction on one group of tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupEvaluation {
    pub group: String,
    /// Predictions of this group's tokens.
    pub n_predictions: u64,
    pub clean: f64,
    pub spliced: f64,
    pub zero_ablated: f64,
    pub mean_ablated: f64,
    pub loss_recovered_zero: f64,
    pub loss_recovered_mean: f64,
    pub kl_clean_spliced: f64,
    pub kl_div_score: f64,
    /// Spliced activations of this group's tokens.
    pub n_activations: u64,
    /// FVU over those activations, with the variance taken around the group's own mean.
    pub fvu: f64,
    pub l0: f64,
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
    evaluate_spliced_grouped(model, saes, batches, None, cfg, progress)
}

/// [`evaluate_spliced_many`], and with `groups` the same measures on each group of tokens in
/// [`SplicedEvaluation::by_group`] (same passes: the grouping only sorts what they produce).
///
/// # Errors
/// As [`evaluate_spliced_many`]; `ShapeMismatch` for labels that do not cover their batch, and
/// `InvalidArgument` for a label with no name.
pub fn evaluate_spliced_grouped(
    model: &mut dyn SpliceTarget,
    saes: &[&SaeModel],
    batches: &[Tensor],
    groups: Option<&TokenGroups>,
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
    if let Some(g) = groups {
        check_groups(g, batches)?;
    }
    let n_groups = groups.map_or(0, |g| g.names.len());
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
    let mut gs: Vec<Shared> = (0..n_groups).map(|_| Shared::default()).collect();
    let gper: Vec<RefCell<Vec<GroupSae>>> = saes
        .iter()
        .map(|_| RefCell::new((0..n_groups).map(|_| GroupSae::new(width)).collect()))
        .collect();
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
    for (bi, tokens) in batches.iter().enumerate() {
        let t = tokens.dim(1)?;
        // Group of each prediction (its target token) and of each spliced activation.
        let labels = groups.map(|g| g.labels[bi].as_slice());
        let pred_group: Vec<usize> = labels.map_or_else(Vec::new, |l| {
            (0..l.len() / t)
                .flat_map(|r| (1..t).map(move |p| usize::from(l[r * t + p])))
                .collect()
        });
        let act_group: Vec<usize> = labels.map_or_else(Vec::new, |l| {
            (0..l.len() / t)
                .flat_map(|r| (first.min(t)..t).map(move |p| usize::from(l[r * t + p])))
                .collect()
        });
        let by_group = |v: &[f32], out: &mut dyn FnMut(usize, f64)| {
            for (&x, &g) in v.iter().zip(&pred_group) {
                out(g, f64::from(x));
            }
        };
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
        by_group(&clean_lp, &mut |g, x| {
            gs[g].clean -= x;
            gs[g].n += 1;
        });
        tick();

        for (((sae, acc), p), gp) in saes.iter().zip(&accs).zip(per.iter_mut()).zip(&gper) {
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
                if !act_group.is_empty() {
                    let xs = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let xh = x_hat
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let mut gp = gp.borrow_mut();
                    for (r, &g) in act_group.iter().enumerate() {
                        let active = codes.offsets[r + 1] - codes.offsets[r];
                        gp[g].add(&xs[r * d..(r + 1) * d], &xh[r * d..(r + 1) * d], active);
                    }
                }
                let full = Tensor::cat(&[&x.narrow(1, 0, first)?, &x_hat], 1)?;
                *x_hat_saved.borrow_mut() = Some(full.clone());
                Ok(full)
            };
            let spliced = HostLogits::new(&model.forward(tokens, Some(&mut splice))?)?;
            let lp = spliced.target_log_probs(&ids)?;
            let kl = clean.kl_to(&spliced)?;
            p.spliced -= sum(&lp);
            p.kl_spliced += sum(&kl);
            {
                let mut gp = gp.borrow_mut();
                by_group(&lp, &mut |g, x| gp[g].spliced -= x);
                by_group(&kl, &mut |g, x| gp[g].kl_spliced += x);
            }
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
        let lp = zeroed.target_log_probs(&ids)?;
        let kl = clean.kl_to(&zeroed)?;
        s.zero -= sum(&lp);
        s.kl_zero += sum(&kl);
        by_group(&lp, &mut |g, x| gs[g].zero -= x);
        by_group(&kl, &mut |g, x| gs[g].kl_zero += x);
        drop(zeroed);
        tick();

        if let MeanActivation::Provided(m) = &cfg.mean {
            let lp = mean_ablated_log_probs(model, tokens, &ids, m, first)?;
            s.mean -= sum(&lp);
            by_group(&lp, &mut |g, x| gs[g].mean -= x);
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
            for (bi, tokens) in batches.iter().enumerate() {
                let t = tokens.dim(1)?;
                let ids = tokens
                    .to_dtype(DType::U32)?
                    .flatten_all()?
                    .to_vec1::<u32>()?;
                let lp = mean_ablated_log_probs(model, tokens, &ids, &mean, first)?;
                s.mean -= lp.iter().map(|&x| f64::from(x)).sum::<f64>();
                if let Some(g) = groups {
                    let l = &g.labels[bi];
                    for (i, &x) in lp.iter().enumerate() {
                        let (r, p) = (i / (t - 1), i % (t - 1));
                        gs[usize::from(l[r * t + p + 1])].mean -= f64::from(x);
                    }
                }
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
        .zip(gper)
        .map(|((p, acc), gp)| {
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
            let by_group = match groups {
                Some(g) => g
                    .names
                    .iter()
                    .zip(&gs)
                    .zip(gp.into_inner())
                    .map(|((name, sh), ga)| ga.finish(name, sh))
                    .collect(),
                None => Vec::new(),
            };
            Ok(SplicedEvaluation {
                spliced: spliced_nll,
                reconstruction,
                by_group,
            })
        })
        .collect()
}

/// Every prediction's log-probability in one batch with positions `first..` set to `mean`.
fn mean_ablated_log_probs(
    model: &mut dyn SpliceTarget,
    tokens: &Tensor,
    ids: &[u32],
    mean: &[f32],
    first: usize,
) -> Result<Vec<f32>> {
    let mut ablate = |x: &Tensor| -> Result<Tensor> {
        let m = Tensor::from_slice(mean, mean.len(), x.device())?
            .to_dtype(x.dtype())?
            .broadcast_as(x.shape())?
            .contiguous()?;
        splice_positions(x, &m, first)
    };
    HostLogits::new(&model.forward(tokens, Some(&mut ablate))?)?.target_log_probs(ids)
}

fn check_groups(g: &TokenGroups, batches: &[Tensor]) -> Result<()> {
    if g.labels.len() != batches.len() {
        return Err(shape_err(
            "token group labels",
            format!("one list per token batch ({})", batches.len()),
            format!("{} lists", g.labels.len()),
        ));
    }
    for (i, (l, b)) in g.labels.iter().zip(batches).enumerate() {
        if l.len() != b.elem_count() {
            return Err(shape_err(
                format!("token group labels of batch {i}"),
                format!("{} labels ({:?})", b.elem_count(), b.dims()),
                format!("{} labels", l.len()),
            ));
        }
        if let Some(&bad) = l.iter().find(|&&x| usize::from(x) >= g.names.len()) {
            return Err(MetricsError::InvalidArgument {
                what: format!("token group label {bad} in batch {i}"),
                reason: format!("there are {} group names", g.names.len()),
            });
        }
    }
    Ok(())
}

/// One SAE's sums over one group of tokens.
struct GroupSae {
    spliced: f64,
    kl_spliced: f64,
    sum_x: Vec<f64>,
    sum_sq: f64,
    err_sq: f64,
    active: u64,
    rows: u64,
}

impl GroupSae {
    fn new(width: usize) -> Self {
        Self {
            spliced: 0.0,
            kl_spliced: 0.0,
            sum_x: vec![0.0; width],
            sum_sq: 0.0,
            err_sq: 0.0,
            active: 0,
            rows: 0,
        }
    }

    fn add(&mut self, x: &[f32], x_hat: &[f32], active: usize) {
        for ((s, &a), &b) in self.sum_x.iter_mut().zip(x).zip(x_hat) {
            let (a, b) = (f64::from(a), f64::from(b));
            *s += a;
            self.sum_sq += a * a;
            self.err_sq += (a - b) * (a - b);
        }
        self.active += active as u64;
        self.rows += 1;
    }

    fn finish(self, name: &str, sh: &Shared) -> GroupEvaluation {
        let n = sh.n as f64;
        let (clean, zero, mean) = (sh.clean / n, sh.zero / n, sh.mean / n);
        let (spliced, kl_spliced, kl_zero) =
            (self.spliced / n, self.kl_spliced / n, sh.kl_zero / n);
        let rows = self.rows as f64;
        let total_var = self.sum_sq - self.sum_x.iter().map(|s| s * s).sum::<f64>() / rows;
        GroupEvaluation {
            group: name.to_string(),
            n_predictions: sh.n,
            clean,
            spliced,
            zero_ablated: zero,
            mean_ablated: mean,
            loss_recovered_zero: loss_recovered(clean, spliced, zero),
            loss_recovered_mean: loss_recovered(clean, spliced, mean),
            kl_clean_spliced: kl_spliced,
            kl_div_score: if kl_zero > 0.0 {
                (kl_zero - kl_spliced) / kl_zero
            } else {
                f64::NAN
            },
            n_activations: self.rows,
            fvu: if total_var > 0.0 {
                self.err_sq / total_var
            } else {
                f64::NAN
            },
            l0: self.active as f64 / rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ToyModel, perfect_sae, positive_part_sae, zero_sae};
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
        mean_of(&host_grouped(model, &|_| 0, edit).0, 0)
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

    /// Per-prediction NLL (computed on the host) with the label of the predicted token, and the
    /// spliced activations with the label of their own token, for `edit` at positions >= 1.
    #[allow(clippy::type_complexity)]
    fn host_grouped(
        model: &ToyModel,
        label: &dyn Fn(u32) -> u8,
        edit: &dyn Fn(&[f32]) -> Vec<f32>,
    ) -> (Vec<(u8, f64)>, Vec<(u8, Vec<f32>)>) {
        let (mut preds, mut acts) = (Vec::new(), Vec::new());
        for b in batches() {
            for row in b.to_vec2::<u32>().unwrap() {
                let d = model.d;
                let mut h = model.hook_acts(&row);
                for p in 1..row.len() {
                    acts.push((label(row[p]), h[p * d..(p + 1) * d].to_vec()));
                    let e = edit(&h[p * d..(p + 1) * d]);
                    h[p * d..(p + 1) * d].copy_from_slice(&e);
                }
                let logits = model.logits_from(&h);
                let v = model.vocab;
                for p in 0..row.len() - 1 {
                    let l = &logits[p * v..(p + 1) * v];
                    let m = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
                    let lse = m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    preds.push((label(row[p + 1]), lse - l[row[p + 1] as usize] as f64));
                }
            }
        }
        (preds, acts)
    }

    fn mean_of(v: &[(u8, f64)], g: u8) -> f64 {
        let xs: Vec<f64> = v.iter().filter(|x| x.0 == g).map(|x| x.1).collect();
        xs.iter().sum::<f64>() / xs.len() as f64
    }

    #[test]
    fn groups_match_host_figures_and_add_up_to_the_whole() {
        let mut model = ToyModel::new(11, 6, 3);
        let d = 6;
        let label = |t: u32| (t % 2) as u8;
        let b = batches();
        let groups = TokenGroups {
            names: vec!["even".into(), "odd".into()],
            labels: b
                .iter()
                .map(|t| {
                    t.flatten_all()
                        .unwrap()
                        .to_vec1::<u32>()
                        .unwrap()
                        .into_iter()
                        .map(label)
                        .collect()
                })
                .collect(),
        };
        let cfg = SplicedConfig::default();
        let sae = positive_part_sae(d);
        let got = evaluate_spliced_grouped(&mut model, &[&sae], &b, Some(&groups), &cfg, None)
            .unwrap()
            .remove(0);
        let (clean, acts) = host_grouped(&model, &label, &|x| x.to_vec());
        let (spliced, _) =
            host_grouped(&model, &label, &|x| x.iter().map(|v| v.max(0.0)).collect());
        let (zero, _) = host_grouped(&model, &label, &|x| vec![0.0; x.len()]);
        assert_eq!(got.by_group.len(), 2);
        let mut n_total = 0;
        let mut weighted = (0.0, 0.0);
        for (gi, g) in got.by_group.iter().enumerate() {
            let gl = gi as u8;
            let n = clean.iter().filter(|x| x.0 == gl).count();
            assert!(n > 0);
            assert_eq!(g.n_predictions, n as u64);
            assert_relative_eq!(g.clean, mean_of(&clean, gl), epsilon = 1e-5);
            assert_relative_eq!(g.spliced, mean_of(&spliced, gl), epsilon = 1e-5);
            assert_relative_eq!(g.zero_ablated, mean_of(&zero, gl), epsilon = 1e-5);
            let want = (g.zero_ablated - g.spliced) / (g.zero_ablated - g.clean);
            assert_relative_eq!(g.loss_recovered_zero, want, epsilon = 1e-9);
            assert!(g.kl_clean_spliced > 0.0 && g.kl_div_score < 1.0);
            // FVU by hand: the error of ReLU(x) is min(x, 0); variance about the group's mean.
            let rows: Vec<&Vec<f32>> = acts.iter().filter(|a| a.0 == gl).map(|a| &a.1).collect();
            assert_eq!(g.n_activations, rows.len() as u64);
            let mut mean = vec![0.0f64; d];
            for r in &rows {
                for j in 0..d {
                    mean[j] += f64::from(r[j]) / rows.len() as f64;
                }
            }
            let (mut num, mut den) = (0.0, 0.0);
            for r in &rows {
                for j in 0..d {
                    num += f64::from(r[j].min(0.0)).powi(2);
                    den += (f64::from(r[j]) - mean[j]).powi(2);
                }
            }
            assert_relative_eq!(g.fvu, num / den, epsilon = 1e-6);
            assert_relative_eq!(g.l0, d as f64, epsilon = 1e-12);
            n_total += g.n_predictions;
            weighted.0 += g.n_predictions as f64 * g.spliced;
            weighted.1 += g.n_predictions as f64 * g.mean_ablated;
        }
        assert_eq!(n_total, got.spliced.n_tokens);
        let n = n_total as f64;
        assert_relative_eq!(weighted.0 / n, got.spliced.spliced, epsilon = 1e-9);
        assert_relative_eq!(weighted.1 / n, got.spliced.mean_ablated, epsilon = 1e-9);
        // Without groups the rest of the evaluation is unchanged.
        let plain = evaluate_spliced(&mut model, &sae, &b, &cfg, None).unwrap();
        assert!(plain.by_group.is_empty());
        assert_eq!(plain.spliced, got.spliced);

        let mut bad = groups.clone();
        bad.labels[1].pop();
        let e =
            evaluate_spliced_grouped(&mut model, &[&sae], &b, Some(&bad), &cfg, None).unwrap_err();
        assert!(e.to_string().contains("batch 1"), "{e}");
        let mut bad = groups.clone();
        bad.labels[0][2] = 2;
        let e =
            evaluate_spliced_grouped(&mut model, &[&sae], &b, Some(&bad), &cfg, None).unwrap_err();
        assert!(e.to_string().contains("label 2"), "{e}");
    }

    #[test]
    fn loss_recovered_formula() {
        assert_relative_eq!(loss_recovered(3.0, 3.5, 5.0), 0.75);
        assert!(loss_recovered(3.0, 3.5, 3.0).is_nan());
    }
}
