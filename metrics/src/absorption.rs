//! Feature absorption: when a concept has a latent of its own ("starts with S"), does that latent
//! fail to fire on some inputs that carry the concept, because a more specific latent ("short")
//! has absorbed it?
//!
//! This is SAEBench's `absorption_first_letter` evaluation (Chanin et al., "A is for
//! Absorption"), with its thresholds kept so that numbers compare. Its inputs are one activation
//! per word (the word's token in a first-letter prompt) with the word's class (its first letter):
//!
//! 1. A balanced one-vs-rest logistic probe per class on the hook's activations: the ground
//!    truth that the model carries the concept ([`AbsorptionProbes`]).
//! 2. The SAE's own latents for the class: an L1-penalised logistic probe on the codes ranks the
//!    latents; k-sparse probes on its top k (k = 1, 2, ...) are kept while each added latent
//!    raises held-out F1 by more than 0.03 ("feature splitting": several latents share the
//!    concept). These are the *main* latents.
//! 3. On each held-out word of the class that the ground-truth probe gets right, the probe
//!    direction's projection of the activation is split into the latents' contributions
//!    `a_f · (W_dec[f] · p̂)`. What the main latents miss and up to three other latents aligned
//!    with the probe supply is the *absorption fraction*; a word whose main latents are silent
//!    while one aligned latent carries 40% of the projection is *fully absorbed*.
//!
//! Where SAEBench multiplies a latent's activation by the cosine between its decoder row and the
//! probe (the same thing for unit-norm rows), this takes the row's actual projection, so SAEs
//! that keep an input scale folded into `W_dec` are measured in the activation's own units.
//! The L1 probe is solved by FISTA to a tolerance instead of by 50 epochs of Adam, and the
//! logistic probes by L-BFGS to convergence, so the same inputs give the same result.

use indicatif::ProgressBar;
use rayon::prelude::*;
use sae_core::{SaeModel, SparseCodes};
use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result, check_finite, shape_err};
use crate::probing::{LabelledFeatures, LogisticProbe, sigmoid};

/// SAEBench's settings (its `AbsorptionEvalConfig` and the thresholds of `feature_absorption.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbsorptionConfig {
    /// The largest k of the k-sparse probes (10).
    pub max_k: usize,
    /// A latent joins the main latents when it raises the k-sparse probe's F1 by more (0.03).
    pub f1_jump_threshold: f64,
    /// L1 strength of the latent-ranking probe, on its mean loss (0.01).
    pub l1_penalty: f64,
    /// FISTA iterations at most for that probe.
    pub l1_max_iterations: usize,
    /// sklearn's `C` of the ground-truth and k-sparse probes (1.0).
    pub c: f64,
    /// Classes whose ground-truth probe has a held-out F1 at or below this are left out (0.6).
    pub min_probe_f1: f64,
    /// Fewer classes left than this and there is no summary (20 of the 26 letters).
    pub min_classes: usize,
    /// Full absorption: the top latent's cosine with the probe at least this (0.025).
    pub full_absorption_cos: f64,
    /// Absorption fraction: a latent counts as an absorber at this cosine or more (0.1).
    pub absorber_cos: f64,
    /// The absorbers must carry at least this share of the probe projection (0.4).
    pub projection_share: f64,
    /// The most absorbers that may make up for the main latents (3).
    pub max_absorbers: usize,
}

impl Default for AbsorptionConfig {
    fn default() -> Self {
        AbsorptionConfig {
            max_k: 10,
            f1_jump_threshold: 0.03,
            l1_penalty: 0.01,
            l1_max_iterations: 2000,
            c: 1.0,
            min_probe_f1: 0.6,
            min_classes: 20,
            full_absorption_cos: 0.025,
            absorber_cos: 0.1,
            projection_share: 0.4,
            max_absorbers: 3,
        }
    }
}

/// Held-out F1, precision and recall of a binary decision.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BinaryScores {
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
}

impl BinaryScores {
    /// Scores of `predicted` against `truth` (sklearn's convention: 0 where undefined).
    pub fn of(predicted: &[bool], truth: &[bool]) -> Self {
        let tp = predicted
            .iter()
            .zip(truth)
            .filter(|(p, t)| **p && **t)
            .count() as f64;
        let pp = predicted.iter().filter(|&&p| p).count() as f64;
        let ap = truth.iter().filter(|&&t| t).count() as f64;
        let precision = if pp > 0.0 { tp / pp } else { 0.0 };
        let recall = if ap > 0.0 { tp / ap } else { 0.0 };
        let f1 = if tp > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        BinaryScores {
            f1,
            precision,
            recall,
        }
    }
}

/// The ground truth: a balanced one-vs-rest logistic probe per class on the hook's activations,
/// fitted once per hook and shared by every SAE evaluated on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbsorptionProbes {
    pub probes: Vec<LogisticProbe>,
    /// Each probe on the held-out rows (positive decision = the class).
    pub test: Vec<BinaryScores>,
}

impl AbsorptionProbes {
    /// Fits one probe per class `0..n_classes` on `train`, scores it on `test`.
    ///
    /// # Errors
    /// Mismatched shapes, a label out of range, a class with no training row, NaN or infinite
    /// activations, a non-positive `c`.
    pub fn fit(
        train: LabelledFeatures<'_>,
        test: LabelledFeatures<'_>,
        n_classes: usize,
        c: f64,
        progress: Option<&ProgressBar>,
    ) -> Result<Self> {
        train.check("training word", n_classes)?;
        test.check("held-out word", n_classes)?;
        if train.d != test.d {
            return Err(shape_err(
                "held-out word features",
                format!("rows of {} values, as the training rows", train.d),
                format!("rows of {}", test.d),
            ));
        }
        let mut probes = Vec::with_capacity(n_classes);
        let mut scores = Vec::with_capacity(n_classes);
        for class in 0..n_classes {
            let y: Vec<bool> = train.labels.iter().map(|&l| l == class).collect();
            if !y.contains(&true) {
                return Err(MetricsError::InvalidArgument {
                    what: "absorption training labels".into(),
                    reason: format!("class {class} has no training row"),
                });
            }
            let probe = LogisticProbe::fit_balanced(train.x, train.d, &y, c)?;
            let predicted: Vec<bool> = test
                .x
                .chunks(test.d)
                .map(|row| probe.decision(row) > 0.0)
                .collect();
            let truth: Vec<bool> = test.labels.iter().map(|&l| l == class).collect();
            scores.push(BinaryScores::of(&predicted, &truth));
            probes.push(probe);
            if let Some(pb) = progress {
                pb.inc(1);
            }
        }
        Ok(AbsorptionProbes {
            probes,
            test: scores,
        })
    }
}

/// A probe on the top `k` latents of the L1 ranking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KSparseProbe {
    pub k: usize,
    pub features: Vec<usize>,
    pub test: BinaryScores,
}

/// One held-out word of the class that the ground-truth probe gets right.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WordAbsorption {
    /// Its row in the test set.
    pub row: usize,
    /// `x · p̂`: the activation along the probe's unit direction.
    pub probe_projection: f64,
    /// The main latents' part of it.
    pub main_projection: f64,
    /// The main latents' activations, in the order of `split_features`.
    pub main_activations: Vec<f32>,
    pub absorption_fraction: f64,
    pub full_absorption: bool,
    /// The active latent with the largest projection, its projection and cosine with the probe.
    pub top_feature: Option<usize>,
    pub top_projection: f64,
    pub top_cos: f64,
}

/// One class's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAbsorption {
    pub class: usize,
    /// The ground-truth probe on the held-out rows.
    pub probe: BinaryScores,
    /// Whether the class counts in the summary (probe F1 above `min_probe_f1`, a true positive).
    pub evaluated: bool,
    pub k_sparse: Vec<KSparseProbe>,
    /// The main latents (SAEBench's `split_feats`).
    pub split_features: Vec<usize>,
    pub probe_true_positives: usize,
    /// Sum of the words' absorption fractions over `probe_true_positives`.
    pub mean_absorption_fraction: f64,
    pub n_full_absorption: usize,
    pub full_absorption_rate: f64,
    pub words: Vec<WordAbsorption>,
}

/// SAEBench's means over the evaluated classes, under its key names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbsorptionSummary {
    pub mean_absorption_fraction_score: f64,
    pub mean_full_absorption_score: f64,
    pub mean_num_split_features: f64,
    pub std_dev_absorption_fraction_score: f64,
    pub std_dev_full_absorption_score: f64,
    pub std_dev_num_split_features: f64,
    pub n_classes_evaluated: usize,
}

/// Every class's result and, when enough classes were evaluated, the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Absorption {
    pub classes: Vec<ClassAbsorption>,
    pub summary: Option<AbsorptionSummary>,
}

/// Measures `sae`'s absorption of the classes that `probes` read from the hook.
///
/// `train_codes` are the SAE's codes of the training rows (`train_labels`, the rows the probes
/// were fitted on); `test` the held-out activations with their labels and `test_codes` their
/// codes. Classes are evaluated in parallel.
///
/// # Errors
/// Codes that disagree with the SAE or the rows, activations of another width than the SAE's,
/// NaN or infinite values, probes of another count or width.
pub fn feature_absorption(
    sae: &SaeModel,
    probes: &AbsorptionProbes,
    train_codes: &SparseCodes,
    train_labels: &[usize],
    test: LabelledFeatures<'_>,
    test_codes: &SparseCodes,
    cfg: &AbsorptionConfig,
) -> Result<Absorption> {
    let n_classes = probes.probes.len();
    check_inputs(
        sae,
        probes,
        train_codes,
        train_labels,
        test,
        test_codes,
        cfg,
    )?;
    let w_dec: Vec<&[f32]> = (0..sae.d_sae())
        .map(|f| {
            sae.w_dec_row(f)
                .ok_or_else(|| MetricsError::InvalidArgument {
                    what: "SAE".into(),
                    reason: format!("no decoder row {f}"),
                })
        })
        .collect::<Result<_>>()?;
    let classes: Vec<ClassAbsorption> = (0..n_classes)
        .into_par_iter()
        .map(|class| {
            evaluate_class(
                class,
                &probes.probes[class],
                probes.test[class],
                &w_dec,
                train_codes,
                train_labels,
                test,
                test_codes,
                cfg,
            )
        })
        .collect::<Result<_>>()?;
    let summary = summarise(&classes, cfg.min_classes);
    Ok(Absorption { classes, summary })
}

fn check_inputs(
    sae: &SaeModel,
    probes: &AbsorptionProbes,
    train_codes: &SparseCodes,
    train_labels: &[usize],
    test: LabelledFeatures<'_>,
    test_codes: &SparseCodes,
    cfg: &AbsorptionConfig,
) -> Result<()> {
    let n_classes = probes.probes.len();
    if n_classes == 0 || probes.test.len() != n_classes {
        return Err(MetricsError::InvalidArgument {
            what: "absorption probes".into(),
            reason: format!(
                "{n_classes} probes with {} test scores: need one of each per class",
                probes.test.len()
            ),
        });
    }
    test.check("held-out word", n_classes)?;
    if test.d != sae.d_in() {
        return Err(shape_err(
            "held-out word features",
            format!("rows of the SAE's d_in = {}", sae.d_in()),
            format!("rows of {}", test.d),
        ));
    }
    if let Some(p) = probes.probes.iter().find(|p| p.weights.len() != test.d) {
        return Err(shape_err(
            "absorption probe",
            format!("{} weights (the activations' width)", test.d),
            format!("{}", p.weights.len()),
        ));
    }
    if let Some(&bad) = train_labels.iter().find(|&&l| l >= n_classes) {
        return Err(MetricsError::InvalidArgument {
            what: "absorption training labels".into(),
            reason: format!("class {bad}, but there are {n_classes} classes"),
        });
    }
    for (what, codes, rows) in [
        ("training codes", train_codes, train_labels.len()),
        ("test codes", test_codes, test.labels.len()),
    ] {
        codes.validate()?;
        if codes.n_tokens != rows || codes.d_sae != sae.d_sae() {
            return Err(shape_err(
                format!("absorption {what}"),
                format!("{rows} rows of the SAE's {} latents", sae.d_sae()),
                format!("{} rows of {}", codes.n_tokens, codes.d_sae),
            ));
        }
        check_finite(&codes.values, || {
            format!("a value of the absorption {what}")
        })?;
    }
    if cfg.max_k == 0 || cfg.max_absorbers == 0 {
        return Err(MetricsError::InvalidArgument {
            what: "absorption config".into(),
            reason: "max_k and max_absorbers must be at least 1".into(),
        });
    }
    if !(cfg.l1_penalty.is_finite() && cfg.l1_penalty >= 0.0) {
        return Err(MetricsError::InvalidArgument {
            what: "absorption L1 penalty".into(),
            reason: format!("{}: must be zero or positive", cfg.l1_penalty),
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn evaluate_class(
    class: usize,
    probe: &LogisticProbe,
    probe_scores: BinaryScores,
    w_dec: &[&[f32]],
    train_codes: &SparseCodes,
    train_labels: &[usize],
    test: LabelledFeatures<'_>,
    test_codes: &SparseCodes,
    cfg: &AbsorptionConfig,
) -> Result<ClassAbsorption> {
    let y_train: Vec<bool> = train_labels.iter().map(|&l| l == class).collect();
    let y_test: Vec<bool> = test.labels.iter().map(|&l| l == class).collect();
    let ranking = l1_ranking(train_codes, &y_train, cfg.l1_penalty, cfg.l1_max_iterations);
    // The top `max_k` latents' columns, read from the codes once; each k takes a prefix.
    let top = &ranking[..cfg.max_k.min(ranking.len())];
    let (all_tr, all_te) = (columns(train_codes, top), columns(test_codes, top));
    let prefix = |all: &[f32], k: usize| -> Vec<f32> {
        all.chunks(top.len().max(1))
            .flat_map(|row| row[..k].iter().copied())
            .collect()
    };
    let mut k_sparse = Vec::with_capacity(cfg.max_k);
    for k in 1..=top.len() {
        let features = ranking[..k].to_vec();
        let xtr = prefix(&all_tr, k);
        let xte = prefix(&all_te, k);
        let scores = if y_train.contains(&true) && y_train.contains(&false) {
            let p = LogisticProbe::fit_balanced(&xtr, k, &y_train, cfg.c)?;
            let predicted: Vec<bool> = xte.chunks(k).map(|r| p.decision(r) > 0.0).collect();
            BinaryScores::of(&predicted, &y_test)
        } else {
            BinaryScores::of(&vec![false; y_test.len()], &y_test)
        };
        k_sparse.push(KSparseProbe {
            k,
            features,
            test: scores,
        });
    }
    let f1s: Vec<f64> = k_sparse.iter().map(|p| p.test.f1).collect();
    let n_split = split_count(&f1s, cfg.f1_jump_threshold);
    let split_features: Vec<usize> = ranking[..n_split].to_vec();

    let frame = ProbeFrame::new(&probe.weights, w_dec);
    let mut words = Vec::new();
    for (row, x) in test.x.chunks(test.d).enumerate() {
        if !y_test[row] || probe.decision(x) <= 0.0 {
            continue;
        }
        words.push(frame.word(row, x, test_codes.row(row), &split_features, cfg));
    }
    let probe_true_positives = words.len();
    let n_full_absorption = words.iter().filter(|w| w.full_absorption).count();
    let per_word = |v: f64| {
        if probe_true_positives > 0 {
            v / probe_true_positives as f64
        } else {
            0.0
        }
    };
    Ok(ClassAbsorption {
        class,
        probe: probe_scores,
        evaluated: probe_scores.f1 > cfg.min_probe_f1 && probe_true_positives > 0,
        k_sparse,
        split_features,
        probe_true_positives,
        mean_absorption_fraction: per_word(words.iter().map(|w| w.absorption_fraction).sum()),
        n_full_absorption,
        full_absorption_rate: per_word(n_full_absorption as f64),
        words,
    })
}

/// One probe's unit direction `p̂` with each latent's decoder projection `W_dec[f] · p̂` and
/// cosine along it: what SAEBench's calculator needs to judge a word.
pub(crate) struct ProbeFrame {
    p_hat: Vec<f64>,
    along: Vec<f64>,
    cos: Vec<f64>,
}

impl ProbeFrame {
    pub(crate) fn new(probe_weights: &[f64], w_dec: &[&[f32]]) -> Self {
        let norm = probe_weights.iter().map(|w| w * w).sum::<f64>().sqrt();
        let p_hat: Vec<f64> = probe_weights
            .iter()
            .map(|w| if norm > 0.0 { w / norm } else { 0.0 })
            .collect();
        let along: Vec<f64> = w_dec
            .iter()
            .map(|row| row.iter().zip(&p_hat).map(|(&r, p)| f64::from(r) * p).sum())
            .collect();
        let cos = w_dec
            .iter()
            .zip(&along)
            .map(|(row, a)| {
                let n = row
                    .iter()
                    .map(|&r| f64::from(r).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if n > 0.0 { a / n } else { 0.0 }
            })
            .collect();
        ProbeFrame { p_hat, along, cos }
    }

    /// The verdicts on the word of test row `row`: activation `x`, code `(features, values)`.
    pub(crate) fn word(
        &self,
        row: usize,
        x: &[f32],
        (features, values): (&[u32], &[f32]),
        main: &[usize],
        cfg: &AbsorptionConfig,
    ) -> WordAbsorption {
        let probe_projection: f64 = x
            .iter()
            .zip(&self.p_hat)
            .map(|(&v, p)| f64::from(v) * p)
            .sum();
        let active: Vec<LatentProjection> = features
            .iter()
            .zip(values)
            .map(|(&f, &a)| LatentProjection {
                feature: f as usize,
                activation: a,
                projection: f64::from(a) * self.along[f as usize],
                cos: self.cos[f as usize],
            })
            .collect();
        word_absorption(row, probe_projection, &active, main, cfg)
    }
}

/// How many of the ranked latents are main latents: k grows while its F1 beats the best so far
/// by more than `threshold` (SAEBench's `add_feature_splits_to_metrics_df`).
pub(crate) fn split_count(f1_by_k: &[f64], threshold: f64) -> usize {
    let mut best = f64::NEG_INFINITY;
    let mut count = 0;
    for (i, &f1) in f1_by_k.iter().enumerate() {
        if f1 > best + threshold {
            best = f1;
            count = i + 1;
        } else {
            break;
        }
    }
    count
}

/// An active latent on one word.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LatentProjection {
    pub feature: usize,
    pub activation: f32,
    /// `a_f · (W_dec[f] · p̂)`.
    pub projection: f64,
    pub cos: f64,
}

/// SAEBench's two verdicts on one word (`FeatureAbsorptionCalculator.calculate_absorption`).
pub(crate) fn word_absorption(
    row: usize,
    probe_projection: f64,
    active: &[LatentProjection],
    main: &[usize],
    cfg: &AbsorptionConfig,
) -> WordAbsorption {
    let is_main = |f: usize| main.contains(&f);
    let main_projection: f64 = active
        .iter()
        .filter(|l| is_main(l.feature))
        .map(|l| l.projection)
        .sum();
    let main_activations: Vec<f32> = main
        .iter()
        .map(|&m| {
            active
                .iter()
                .find(|l| l.feature == m)
                .map_or(0.0, |l| l.activation)
        })
        .collect();

    // Absorption fraction: up to `max_absorbers` aligned latents make up what the main ones miss.
    let mut absorbers: Vec<f64> = active
        .iter()
        .filter(|l| !is_main(l.feature) && l.cos >= cfg.absorber_cos && l.projection > 0.0)
        .map(|l| l.projection)
        .collect();
    absorbers.sort_by(|a, b| b.total_cmp(a));
    let absorbed: f64 = absorbers.iter().take(cfg.max_absorbers).sum();
    let absorption_fraction = if main_projection >= probe_projection
        || absorbed / probe_projection < cfg.projection_share
    {
        0.0
    } else if main_projection <= 0.0 {
        1.0
    } else {
        let a = absorbed.min(probe_projection - main_projection);
        (a / (a + main_projection)).clamp(0.0, 1.0)
    };

    // Full absorption: the main latents are silent and one aligned latent carries the projection.
    let top = active
        .iter()
        .max_by(|a, b| a.projection.total_cmp(&b.projection));
    let main_silent = main_activations.iter().all(|&a| a < 1e-8);
    let full_absorption = match top {
        Some(t) => {
            main_silent
                && t.cos >= cfg.full_absorption_cos
                && probe_projection >= 0.0
                && t.projection / probe_projection >= cfg.projection_share
        }
        None => false,
    };
    WordAbsorption {
        row,
        probe_projection,
        main_projection,
        main_activations,
        absorption_fraction,
        full_absorption,
        top_feature: top.map(|t| t.feature),
        top_projection: top.map_or(0.0, |t| t.projection),
        top_cos: top.map_or(0.0, |t| t.cos),
    }
}

fn summarise(classes: &[ClassAbsorption], min_classes: usize) -> Option<AbsorptionSummary> {
    let done: Vec<&ClassAbsorption> = classes.iter().filter(|c| c.evaluated).collect();
    if done.len() < min_classes.max(2) {
        return None;
    }
    let stats = |v: Vec<f64>| {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt())
    };
    let (fa, fa_sd) = stats(done.iter().map(|c| c.mean_absorption_fraction).collect());
    let (full, full_sd) = stats(done.iter().map(|c| c.full_absorption_rate).collect());
    let (split, split_sd) = stats(done.iter().map(|c| c.split_features.len() as f64).collect());
    Some(AbsorptionSummary {
        mean_absorption_fraction_score: fa,
        mean_full_absorption_score: full,
        mean_num_split_features: split,
        std_dev_absorption_fraction_score: fa_sd,
        std_dev_full_absorption_score: full_sd,
        std_dev_num_split_features: split_sd,
        n_classes_evaluated: done.len(),
    })
}

/// The dense `rows x features.len()` block of `codes` for the chosen latents.
fn columns(codes: &SparseCodes, features: &[usize]) -> Vec<f32> {
    let k = features.len();
    let mut out = vec![0.0f32; codes.n_tokens * k];
    for row in 0..codes.n_tokens {
        let (fs, vs) = codes.row(row);
        for (&f, &v) in fs.iter().zip(vs) {
            if let Some(j) = features.iter().position(|&c| c == f as usize) {
                out[row * k + j] = v;
            }
        }
    }
    out
}

/// The latents ranked by the weights of an L1-penalised logistic probe on the codes, largest
/// first (SAEBench's `train_sparse_multi_probe`: BCE with the positive rows weighted by
/// negatives / positives, mean over rows, plus `l1 · |w|_1`), solved by FISTA.
pub(crate) fn l1_ranking(codes: &SparseCodes, y: &[bool], l1: f64, max_iter: usize) -> Vec<usize> {
    let (w, _) = l1_logistic(codes, y, l1, max_iter);
    let mut order: Vec<usize> = (0..codes.d_sae).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    order
}

/// `(weights, bias)` minimising `mean_i [pw·y_i·softplus(-z_i) + (1-y_i)·softplus(z_i)] +
/// l1·|w|_1`, `z = x·w + b`, `pw = negatives / positives`.
pub(crate) fn l1_logistic(
    codes: &SparseCodes,
    y: &[bool],
    l1: f64,
    max_iter: usize,
) -> (Vec<f64>, f64) {
    let (n, d) = (codes.n_tokens, codes.d_sae);
    let pos = y.iter().filter(|&&v| v).count();
    if n == 0 || pos == 0 || pos == n {
        return (vec![0.0; d], 0.0);
    }
    let pw = (n - pos) as f64 / pos as f64;
    // Step 1/L, L bounding the loss's curvature: max weight / 4 · |[X 1]|² / n.
    let sigma2 = spectral_norm_sq(codes);
    let lipschitz = pw.max(1.0) / 4.0 * sigma2 / n as f64 * 1.05;
    let step = 1.0 / lipschitz.max(1e-12);
    let grad = |w: &[f64], b: f64| -> (Vec<f64>, f64) {
        let mut gw = vec![0.0f64; d];
        let mut gb = 0.0;
        for (row, &yi) in y.iter().enumerate() {
            let (fs, vs) = codes.row(row);
            let z = b + fs
                .iter()
                .zip(vs)
                .map(|(&f, &v)| w[f as usize] * f64::from(v))
                .sum::<f64>();
            let r = if yi { -pw * sigmoid(-z) } else { sigmoid(z) } / n as f64;
            gb += r;
            for (&f, &v) in fs.iter().zip(vs) {
                gw[f as usize] += r * f64::from(v);
            }
        }
        (gw, gb)
    };
    let shrink = |v: f64, t: f64| v.signum() * (v.abs() - t).max(0.0);
    let (mut w, mut b) = (vec![0.0f64; d], 0.0f64);
    let (mut vw, mut vb) = (w.clone(), b);
    let mut t = 1.0f64;
    for _ in 0..max_iter {
        let (gw, gb) = grad(&vw, vb);
        let nw: Vec<f64> = vw
            .iter()
            .zip(&gw)
            .map(|(v, g)| shrink(v - step * g, step * l1))
            .collect();
        let nb = vb - step * gb;
        let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
        let momentum = (t - 1.0) / t_next;
        let change = nw
            .iter()
            .zip(&w)
            .map(|(a, c)| (a - c).abs())
            .fold((nb - b).abs(), f64::max);
        let scale = nw.iter().fold(nb.abs(), |m, v| m.max(v.abs())).max(1.0);
        vw = nw
            .iter()
            .zip(&w)
            .map(|(a, c)| a + momentum * (a - c))
            .collect();
        vb = nb + momentum * (nb - b);
        w = nw;
        b = nb;
        t = t_next;
        if change <= 1e-7 * scale {
            break;
        }
    }
    (w, b)
}

/// `|[X 1]|²`, the largest eigenvalue of `[X 1]ᵀ[X 1]`, by power iteration (an upper estimate
/// after a fixed number of steps is not guaranteed, so the caller adds a margin).
fn spectral_norm_sq(codes: &SparseCodes) -> f64 {
    let (n, d) = (codes.n_tokens, codes.d_sae);
    let mut v = vec![1.0f64 / ((d + 1) as f64).sqrt(); d + 1];
    let mut lambda = 0.0;
    for _ in 0..50 {
        let mut u = vec![0.0f64; d + 1];
        for row in 0..n {
            let (fs, vs) = codes.row(row);
            let xv = v[d]
                + fs.iter()
                    .zip(vs)
                    .map(|(&f, &x)| v[f as usize] * f64::from(x))
                    .sum::<f64>();
            u[d] += xv;
            for (&f, &x) in fs.iter().zip(vs) {
                u[f as usize] += xv * f64::from(x);
            }
        }
        let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        lambda = norm;
        v = u.into_iter().map(|x| x / norm).collect();
    }
    lambda
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::sae_with_decoder;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn latent(feature: usize, projection: f64, cos: f64) -> LatentProjection {
        LatentProjection {
            feature,
            activation: 1.0,
            projection,
            cos,
        }
    }

    #[test]
    fn binary_scores_match_hand_counts() {
        // 3 true positives, 1 false positive, 2 false negatives.
        let p = [true, true, true, true, false, false, false];
        let t = [true, true, true, false, true, true, false];
        let s = BinaryScores::of(&p, &t);
        assert!((s.precision - 0.75).abs() < 1e-12);
        assert!((s.recall - 0.6).abs() < 1e-12);
        assert!((s.f1 - 2.0 * 0.75 * 0.6 / 1.35).abs() < 1e-12);
        let none = BinaryScores::of(&[false; 3], &[true, false, true]);
        assert_eq!((none.f1, none.precision, none.recall), (0.0, 0.0, 0.0));
    }

    #[test]
    fn main_latents_grow_while_f1_jumps_by_more_than_the_threshold() {
        assert_eq!(split_count(&[0.5, 0.6, 0.61, 0.9], 0.03), 2);
        assert_eq!(split_count(&[0.0, 0.02], 0.03), 1);
        assert_eq!(split_count(&[0.7, 0.75, 0.8, 0.85], 0.03), 4);
        // The jump is against the best so far, and the first k always counts.
        assert_eq!(split_count(&[0.9, 0.5, 0.95], 0.03), 1);
        assert_eq!(split_count(&[], 0.03), 0);
    }

    #[test]
    fn a_word_is_absorbed_by_saebenchs_rules() {
        let cfg = AbsorptionConfig::default();
        let main = [0];
        // The main latent carries the whole projection: nothing absorbed.
        let w = word_absorption(0, 1.8, &[latent(0, 2.0, 0.9)], &main, &cfg);
        assert_eq!(w.absorption_fraction, 0.0);
        assert!(!w.full_absorption);
        assert_eq!(w.main_activations, vec![1.0]);
        // The main latent is silent and an aligned latent carries 75%: absorbed, fully.
        let w = word_absorption(1, 2.0, &[latent(5, 1.5, 0.5)], &main, &cfg);
        assert_eq!(w.absorption_fraction, 1.0);
        assert!(w.full_absorption);
        assert_eq!(w.top_feature, Some(5));
        assert_eq!(w.main_activations, vec![0.0]);
        // Partly: main 0.5, absorbers 1.0 + 0.6 capped at the 1.5 unaccounted: 1.5 / 2.0.
        let w = word_absorption(
            2,
            2.0,
            &[
                latent(0, 0.5, 0.9),
                latent(3, 1.0, 0.3),
                latent(4, 0.6, 0.2),
            ],
            &main,
            &cfg,
        );
        assert!((w.absorption_fraction - 0.75).abs() < 1e-12, "{w:?}");
        assert!(!w.full_absorption, "the main latent fired");
        // Uncapped: main 0.5 and one absorber 1.0 of 2.0: the absorber's share of the two.
        let w = word_absorption(
            2,
            2.0,
            &[latent(0, 0.5, 0.9), latent(3, 1.0, 0.3)],
            &main,
            &cfg,
        );
        assert!((w.absorption_fraction - 1.0 / 1.5).abs() < 1e-12, "{w:?}");
        // A latent at cosine 0.05 is no absorber (0.1), but can fully absorb (0.025).
        let w = word_absorption(3, 2.0, &[latent(3, 1.5, 0.05)], &main, &cfg);
        assert_eq!(w.absorption_fraction, 0.0);
        assert!(w.full_absorption);
        // ... and not below 0.025.
        let w = word_absorption(3, 2.0, &[latent(3, 1.5, 0.02)], &main, &cfg);
        assert!(!w.full_absorption);
        // Only the three largest absorbers count: 0.9 of 2.4 is under 40%.
        let four: Vec<LatentProjection> = (1..=4).map(|f| latent(f, 0.3, 0.5)).collect();
        assert_eq!(
            word_absorption(4, 2.4, &four, &main, &cfg).absorption_fraction,
            0.0
        );
        assert_eq!(
            word_absorption(4, 2.2, &four, &main, &cfg).absorption_fraction,
            1.0
        );
        // Latents pushing against the probe absorb nothing; a small top latent is no full absorber.
        let w = word_absorption(
            5,
            2.0,
            &[latent(3, -1.5, 0.5), latent(4, 0.5, 0.9)],
            &main,
            &cfg,
        );
        assert_eq!(w.absorption_fraction, 0.0);
        assert!(!w.full_absorption);
        // No active latent at all.
        let w = word_absorption(6, 1.0, &[], &main, &cfg);
        assert_eq!(
            (w.absorption_fraction, w.full_absorption, w.top_feature),
            (0.0, false, None)
        );
    }

    /// Codes of `n` rows over `d` latents where latent 3 fires (about 2) on most positives and
    /// the rest fire at random on any row.
    fn planted_codes(n: usize, d: usize, seed: u64) -> (SparseCodes, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut rows = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let positive = i % 5 == 0;
            let mut row: Vec<(u32, f32)> = Vec::new();
            if positive && rng.random_range(0.0..1.0) < 0.9 {
                row.push((3, rng.random_range(1.5..2.5)));
            }
            for f in 0..d as u32 {
                if f != 3 && rng.random_range(0.0..1.0) < 0.2 {
                    row.push((f, rng.random_range(0.0..2.0)));
                }
            }
            row.sort_by_key(|p| p.0);
            rows.push(row);
            y.push(positive);
        }
        (SparseCodes::from_rows(d, rows), y)
    }

    #[test]
    fn the_l1_probe_meets_its_optimality_conditions_and_ranks_the_planted_latent_first() {
        let (n, d, l1) = (400, 12, 0.01);
        let (codes, y) = planted_codes(n, d, 5);
        let (w, b) = l1_logistic(&codes, &y, l1, 20_000);
        // The gradient of the smooth part, computed directly from the dense rows.
        let dense = codes.to_dense();
        let pos = y.iter().filter(|&&v| v).count() as f64;
        let pw = (n as f64 - pos) / pos;
        let (mut gw, mut gb) = (vec![0.0f64; d], 0.0);
        for (row, &yi) in dense.chunks(d).zip(&y) {
            let z = b + row
                .iter()
                .zip(&w)
                .map(|(&x, w)| f64::from(x) * w)
                .sum::<f64>();
            let r = if yi {
                -pw / (1.0 + z.exp())
            } else {
                1.0 / (1.0 + (-z).exp())
            } / n as f64;
            gb += r;
            for (g, &x) in gw.iter_mut().zip(row) {
                *g += r * f64::from(x);
            }
        }
        assert!(gb.abs() < 1e-5, "bias gradient {gb}");
        for j in 0..d {
            if w[j] != 0.0 {
                assert!(
                    (gw[j] + l1 * w[j].signum()).abs() < 1e-5,
                    "latent {j}: {} {}",
                    w[j],
                    gw[j]
                );
            } else {
                assert!(
                    gw[j].abs() <= l1 + 1e-5,
                    "latent {j} at zero with gradient {}",
                    gw[j]
                );
            }
        }
        let order = l1_ranking(&codes, &y, l1, 20_000);
        assert_eq!(order[0], 3);
        assert!(w[3] > 0.5, "{w:?}");
        assert!(
            w.iter().filter(|&&v| v == 0.0).count() >= 6,
            "L1 zeroes the noise: {w:?}"
        );
    }

    /// Activations, labels and codes of one split.
    type Split = (Vec<f32>, Vec<usize>, SparseCodes);

    fn features<'a>(split: &'a Split) -> LabelledFeatures<'a> {
        LabelledFeatures {
            x: &split.0,
            d: 6,
            labels: &split.1,
        }
    }

    /// The world's letter probes, fitted on its training split.
    fn world_probes(train: &Split, test: &Split) -> AbsorptionProbes {
        AbsorptionProbes::fit(features(train), features(test), 3, 1.0, None).unwrap()
    }

    /// Three classes along e0, e1, e2 of a 6-wide hook. Latents 0-2 are the classes' own; latents
    /// 3, 4, 5 are "token" latents along (e0 + e3/e4/e5)/√2 that each replace latent 0 on one
    /// held-out word of class 0 (and on two training words each). Their decoder rows have norm 4
    /// (their codes a quarter), so a latent's projection is its row's, not its cosine. One more
    /// held-out word of class 0 looks like class 1 (latent 1), and the probe misses it.
    fn absorbed_world() -> (SaeModel, Split, Split) {
        let (d_in, d_sae) = (6, 6);
        let s = std::f32::consts::FRAC_1_SQRT_2;
        let mut w_dec = vec![0.0f32; d_sae * d_in];
        for c in 0..3 {
            w_dec[c * d_in + c] = 1.0;
        }
        for t in 3..6 {
            w_dec[t * d_in] = 4.0 * s;
            w_dec[t * d_in + t] = 4.0 * s;
        }
        let sae = sae_with_decoder(d_in, d_sae, w_dec.clone());
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut make = |per_class: usize, absorbed_per_token: usize| {
            let mut x = Vec::new();
            let mut labels = Vec::new();
            let mut rows = Vec::new();
            for c in 0..3 {
                for i in 0..per_class {
                    // Class 0's first words go to the token latents, `absorbed_per_token` each.
                    let latent = if c == 0 && i < 3 * absorbed_per_token {
                        3 + i / absorbed_per_token
                    } else {
                        c
                    };
                    let mut a: f32 = rng.random_range(1.5..2.5);
                    if latent >= 3 {
                        a /= 4.0;
                    }
                    for j in 0..d_in {
                        x.push(a * w_dec[latent * d_in + j] + rng.random_range(-0.1..0.1));
                    }
                    labels.push(c);
                    rows.push(vec![(latent as u32, a)]);
                }
            }
            (x, labels, rows)
        };
        let (xtr, ltr, rtr) = make(60, 2);
        let (mut xte, mut lte, mut rte) = make(40, 1);
        xte.extend([0.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
        lte.push(0);
        rte.push(vec![(1, 2.0)]);
        let (ctr, cte) = (
            SparseCodes::from_rows(d_sae, rtr),
            SparseCodes::from_rows(d_sae, rte),
        );
        (sae, (xtr, ltr, ctr), (xte, lte, cte))
    }

    #[test]
    fn token_latents_that_replace_the_class_latent_are_found_absorbing_it() {
        let (sae, tr, te) = absorbed_world();
        let probes = world_probes(&tr, &te);
        let ((_, ltr, ctr), (_, lte, cte)) = (&tr, &te);
        let test = features(&te);
        for s in &probes.test {
            assert!(s.f1 > 0.95, "the classes are linear: {s:?}");
        }
        let cfg = AbsorptionConfig {
            min_classes: 3,
            max_k: 4,
            ..AbsorptionConfig::default()
        };
        let res = feature_absorption(&sae, &probes, ctr, ltr, test, cte, &cfg).unwrap();
        let c0 = &res.classes[0];
        // Each token latent adds one word of 41 (F1 +0.013): not a split of the class latent.
        assert_eq!(c0.split_features, vec![0], "{:?}", c0.k_sparse);
        // 41 held-out words of class 0, one of which the probe misreads.
        assert_eq!(lte.iter().filter(|&&l| l == 0).count(), 41);
        assert_eq!(c0.probe_true_positives, 40);
        let absorbed: Vec<&WordAbsorption> =
            c0.words.iter().filter(|w| w.full_absorption).collect();
        assert_eq!(absorbed.len(), 3, "{:?}", c0.words);
        let mut tops: Vec<usize> = absorbed.iter().map(|w| w.top_feature.unwrap()).collect();
        tops.sort_unstable();
        assert_eq!(tops, vec![3, 4, 5]);
        for w in &absorbed {
            assert_eq!(w.absorption_fraction, 1.0);
            assert_eq!(lte[w.row], 0);
            assert_eq!(w.main_activations, vec![0.0]);
        }
        assert!((c0.mean_absorption_fraction - 3.0 / 40.0).abs() < 1e-12);
        assert!((c0.full_absorption_rate - 3.0 / 40.0).abs() < 1e-12);
        for c in &res.classes[1..] {
            assert_eq!(c.split_features, vec![c.class]);
            assert_eq!((c.mean_absorption_fraction, c.n_full_absorption), (0.0, 0));
        }
        let s = res.summary.expect("three classes evaluated");
        assert_eq!(s.n_classes_evaluated, 3);
        assert!((s.mean_absorption_fraction_score - 0.025).abs() < 1e-12);
        assert!((s.mean_num_split_features - 1.0).abs() < 1e-12);
        // Fewer evaluated classes than asked for: no summary.
        let strict = AbsorptionConfig {
            min_classes: 4,
            ..cfg
        };
        let res = feature_absorption(&sae, &probes, ctr, ltr, test, cte, &strict).unwrap();
        assert!(res.summary.is_none());
    }

    #[test]
    fn bad_inputs_are_named() {
        let (sae, tr, te) = absorbed_world();
        let probes = world_probes(&tr, &te);
        let ((xtr, ltr, ctr), (xte, lte, cte)) = (&tr, &te);
        let test = features(&te);
        let cfg = AbsorptionConfig::default();
        let err = |r: Result<Absorption>| r.unwrap_err().to_string();
        // Codes of the training rows given for the test rows.
        let e = err(feature_absorption(&sae, &probes, ctr, ltr, test, ctr, &cfg));
        assert!(e.contains("test codes") && e.contains("121 rows"), "{e}");
        // Codes of another SAE's width.
        let wide = SparseCodes::from_rows(7, vec![vec![]; 180]);
        let e = err(feature_absorption(
            &sae, &probes, &wide, ltr, test, cte, &cfg,
        ));
        assert!(
            e.contains("training codes") && e.contains("6 latents"),
            "{e}"
        );
        // A NaN activation.
        let mut bad = xte.clone();
        bad[7] = f32::NAN;
        let t2 = LabelledFeatures {
            x: &bad,
            d: 6,
            labels: lte,
        };
        let e = err(feature_absorption(&sae, &probes, ctr, ltr, t2, cte, &cfg));
        assert_eq!(e, "a held-out word feature is not finite (NaN)");
        // A label beyond the probes' classes.
        let mut l2 = ltr.clone();
        l2[0] = 3;
        let e = err(feature_absorption(&sae, &probes, ctr, &l2, test, cte, &cfg));
        assert!(e.contains("class 3"), "{e}");
        // Probes of another count, and a zero max_k.
        let two = AbsorptionProbes {
            probes: probes.probes[..2].to_vec(),
            test: probes.test.clone(),
        };
        let e = err(feature_absorption(&sae, &two, ctr, ltr, test, cte, &cfg));
        assert!(e.contains("2 probes with 3 test scores"), "{e}");
        let zero = AbsorptionConfig {
            max_k: 0,
            ..AbsorptionConfig::default()
        };
        let e = err(feature_absorption(
            &sae, &probes, ctr, ltr, test, cte, &zero,
        ));
        assert!(e.contains("max_k"), "{e}");
        // A class without training rows.
        let only01: Vec<usize> = ltr.iter().map(|&l| l.min(1)).collect();
        let t01 = LabelledFeatures {
            x: xtr,
            d: 6,
            labels: &only01,
        };
        let e = AbsorptionProbes::fit(t01, test, 3, 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("class 2 has no training row"), "{e}");
    }

    /// SAEBench's own calculator (sae-bench 0.6.0) judged these words; so must `ProbeFrame`.
    /// And sklearn's balanced logistic regressions, which SAEBench's k-sparse probes are.
    /// (`scripts/absorption_fixtures.py` wrote the file.)
    #[test]
    fn words_and_balanced_probes_match_saebench_and_sklearn() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/absorption/saebench.json");
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let cfg = AbsorptionConfig::default();
        let mut judged = 0;
        for problem in fixture["words"].as_array().unwrap() {
            let (d_in, d_sae) = (
                problem["d_in"].as_u64().unwrap() as usize,
                problem["d_sae"].as_u64().unwrap() as usize,
            );
            let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            let w_dec = to_f32(floats(&problem["w_dec"]));
            let acts = to_f32(floats(&problem["acts"]));
            let dense = to_f32(floats(&problem["codes"]));
            let main: Vec<usize> = problem["main"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_u64().unwrap() as usize)
                .collect();
            let rows: Vec<&[f32]> = w_dec.chunks(d_in).collect();
            let frame = ProbeFrame::new(&floats(&problem["probe"]), &rows);
            let n = acts.len() / d_in;
            let codes = SparseCodes::from_dense(&dense, n, d_sae);
            for (i, want) in problem["words"].as_array().unwrap().iter().enumerate() {
                let got = frame.word(
                    i,
                    &acts[i * d_in..(i + 1) * d_in],
                    codes.row(i),
                    &main,
                    &cfg,
                );
                // SAEBench rounds the cosines to f32, so latent projections agree to about 1e-8.
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
                let (fraction, projection) = (
                    want["absorption_fraction"].as_f64().unwrap(),
                    want["probe_projection"].as_f64().unwrap(),
                );
                assert!(
                    close(got.probe_projection, projection),
                    "word {i}: {got:?} vs {want}"
                );
                assert!(
                    close(got.absorption_fraction, fraction),
                    "word {i}: {got:?} vs {want}"
                );
                assert_eq!(
                    got.full_absorption,
                    want["full_absorption"].as_bool().unwrap(),
                    "word {i}: {got:?} vs {want}"
                );
                // SAEBench ranks inactive latents at 0 too; where an active one leads, it is ours.
                let top = want["top_projection"].as_f64().unwrap();
                if top > 0.0 {
                    assert_eq!(
                        got.top_feature,
                        Some(want["top_feature"].as_u64().unwrap() as usize)
                    );
                    assert!(
                        close(got.top_projection, top),
                        "word {i}: {} vs {top}",
                        got.top_projection
                    );
                }
                judged += 1;
            }
        }
        assert_eq!(judged, 160);
        for problem in fixture["balanced"].as_array().unwrap() {
            let d = problem["d"].as_u64().unwrap() as usize;
            let x: Vec<f32> = floats(&problem["x"])
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let y: Vec<bool> = problem["y"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect();
            let p = LogisticProbe::fit_balanced(&x, d, &y, 1.0).unwrap();
            for (a, b) in p.weights.iter().zip(floats(&problem["coef"])) {
                assert!(
                    (a - b).abs() < 1e-5 * b.abs().max(1.0),
                    "{:?} vs {}",
                    p.weights,
                    problem["coef"]
                );
            }
            let b = problem["intercept"].as_f64().unwrap();
            assert!(
                (p.bias - b).abs() < 1e-5 * b.abs().max(1.0),
                "{} vs {b}",
                p.bias
            );
        }
    }
}
