//! Finding the feature to steer with, three ways:
//!
//! * **by top contexts**: [`FeatureStats`] scans an activation cache once (maximum activation,
//!   firing rate, automatic label from the tokens it fires hardest on, top contexts) and
//!   [`FeatureStats::search`] finds a word among labels and contexts;
//! * **by contrast**: [`contrast`] ranks features by the difference of their mean activation over
//!   two sets of texts, with Welch's t-statistic, leaving out features dense on everything;
//! * **by a prompt**: [`features_in`] lists what fires on one text, strongest (relative to each
//!   feature's maximum) first.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use activation_store::HookActivations;
use sae_core::SaeModel;
use serde::{Deserialize, Serialize};
use transformer_hooks::{HookPoint, Model};

use crate::error::{Result, SteeringError};

/// File name of [`FeatureStats`] inside an SAE folder.
pub const STATS_FILE: &str = "feature_stats.json";

/// One of a feature's strongest activations, as text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopContext {
    pub activation: f32,
    /// The tokens before, the activating token in `[[ ]]`, a few after.
    pub text: String,
    /// The activating token alone.
    pub token: String,
}

/// What every feature of an SAE does on a cache of activations: the scale for clamps (the
/// maximum activation), how often it fires, a label and its top contexts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    /// The hook the cache holds.
    pub hook: String,
    /// Rows scanned.
    pub rows: u64,
    /// Largest activation seen, per feature (0: never fired).
    pub max_activation: Vec<f32>,
    /// Fraction of rows on which it fired.
    pub firing_rate: Vec<f64>,
    /// Automatic label: the most frequent tokens among its top activations.
    pub labels: Vec<String>,
    /// Strongest activations with their context, largest first.
    pub top_contexts: Vec<Vec<TopContext>>,
}

/// A feature matched by [`FeatureStats::search`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchHit {
    pub feature: usize,
    /// How many of its top contexts fire on a token containing the word (weight 1) or contain
    /// it elsewhere (weight 0.25).
    pub score: f64,
    pub label: String,
    pub max_activation: f32,
    pub firing_rate: f64,
}

impl FeatureStats {
    /// Scans up to `max_rows` rows of `acts` through `sae`; `decode` turns a token id into text.
    ///
    /// # Errors
    /// The SAE's width differs from the cache's; cache and SAE errors.
    pub fn scan(
        acts: &HookActivations,
        sae: &SaeModel,
        max_rows: u64,
        decode: &dyn Fn(u32) -> String,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<Self> {
        let collector = metrics::collect_examples(acts, sae, max_rows, 4096, 12, 0, 0, progress)?;
        let rows = acts.rows().min(max_rows);
        // Every harvested row's (window, position) -> token, to print contexts.
        let cache = acts.cache();
        let mut windows: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
        for r in 0..rows {
            let p = cache.provenance(r)?;
            windows
                .entry(p.window)
                .or_default()
                .push((p.position, p.token));
        }
        windows.values_mut().for_each(|w| w.sort_unstable());
        let context = |window: u32, position: u32| -> String {
            let Some(w) = windows.get(&window) else {
                return String::new();
            };
            let mut s = String::new();
            for &(p, t) in w {
                if p + 12 < position || p > position + 4 {
                    continue;
                }
                if p == position {
                    s.push_str("[[");
                    s.push_str(&decode(t));
                    s.push_str("]]");
                } else {
                    s.push_str(&decode(t));
                }
            }
            s.replace('\n', "⏎")
        };
        let d_sae = sae.d_sae();
        let rates = collector.density().firing_rates();
        let mut out = FeatureStats {
            hook: acts.name().to_string(),
            rows,
            max_activation: Vec::with_capacity(d_sae),
            firing_rate: rates,
            labels: Vec::with_capacity(d_sae),
            top_contexts: Vec::with_capacity(d_sae),
        };
        for f in 0..d_sae {
            out.max_activation.push(collector.max_activation(f));
            let label = collector
                .top_tokens(f, 3)?
                .iter()
                .map(|(t, _)| decode(*t).trim().to_string())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" / ");
            out.labels.push(label);
            let tops = collector.top_examples(f)?;
            out.top_contexts.push(
                tops.iter()
                    .take(6)
                    .map(|e| TopContext {
                        activation: e.activation,
                        text: context(e.source.window, e.source.position),
                        token: decode(e.source.token),
                    })
                    .collect(),
            );
        }
        Ok(out)
    }

    /// Number of features.
    pub fn d_sae(&self) -> usize {
        self.max_activation.len()
    }

    /// Feature `f`'s maximum activation.
    ///
    /// # Errors
    /// `f` out of range, or a feature that never fired (no scale to clamp in).
    pub fn max_of(&self, f: usize) -> Result<f32> {
        let m = *self
            .max_activation
            .get(f)
            .ok_or(SteeringError::NoSuchFeature {
                feature: f,
                d_sae: self.d_sae(),
            })?;
        if m <= 0.0 {
            return Err(SteeringError::invalid(
                format!("feature {f}"),
                format!(
                    "it never fired on the {} rows scanned, so it has no maximum activation to \
                     clamp in units of",
                    self.rows
                ),
            ));
        }
        Ok(m)
    }

    /// Features whose label or top contexts mention `word` (case-insensitive), best first.
    pub fn search(&self, word: &str, max_firing_rate: f64) -> Vec<SearchHit> {
        let w = word.to_lowercase();
        let mut hits: Vec<SearchHit> = (0..self.d_sae())
            .filter(|&f| self.firing_rate[f] > 0.0 && self.firing_rate[f] <= max_firing_rate)
            .filter_map(|f| {
                let score: f64 = self.top_contexts[f]
                    .iter()
                    .map(|c| {
                        if c.token.to_lowercase().contains(&w) {
                            1.0
                        } else if c.text.to_lowercase().contains(&w) {
                            0.25
                        } else {
                            0.0
                        }
                    })
                    .sum::<f64>()
                    + if self.labels[f].to_lowercase().contains(&w) {
                        1.0
                    } else {
                        0.0
                    };
                (score > 0.0).then(|| SearchHit {
                    feature: f,
                    score,
                    label: self.labels[f].clone(),
                    max_activation: self.max_activation[f],
                    firing_rate: self.firing_rate[f],
                })
            })
            .collect();
        hits.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(b.max_activation.total_cmp(&a.max_activation))
        });
        hits
    }

    /// Writes the stats as JSON to `dir/feature_stats.json` (atomically).
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATS_FILE);
        let json = serde_json::to_vec(self).map_err(|e| SteeringError::BadFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(sae_core::io::write_atomic(&path, &json)?)
    }

    /// Reads `dir/feature_stats.json`.
    ///
    /// # Errors
    /// Missing or malformed file, or per-feature lists of different lengths.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(STATS_FILE);
        let raw = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SteeringError::invalid(
                format!("feature stats {}", path.display()),
                format!(
                    "missing: compute them with `cargo run --release --example find_features -- \
                     --sae {} --cache CACHE` (FeatureStats::scan)",
                    dir.display()
                ),
            ),
            _ => SteeringError::io(&path, e),
        })?;
        let s: FeatureStats = serde_json::from_slice(&raw).map_err(|e| SteeringError::BadFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let n = s.max_activation.len();
        if s.firing_rate.len() != n || s.labels.len() != n || s.top_contexts.len() != n {
            return Err(SteeringError::BadFile {
                path,
                reason: "per-feature lists of different lengths".into(),
            });
        }
        Ok(s)
    }
}

/// Dense `[positions, d_sae]` activations of `sae` at `hook` over `tokens` (one sequence), with
/// the pass stopped at the hook.
///
/// # Errors
/// Model and SAE errors (bad tokens, wrong width).
pub fn activations(
    model: &Model,
    sae: &SaeModel,
    hook: HookPoint,
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>> {
    let t = model.tokens(tokens)?;
    let cache = model.run_with_cache(&t, &[hook])?;
    let x = cache.require(hook)?.squeeze(0)?;
    let codes = sae.encode_sparse(&x)?;
    let d = sae.d_sae();
    Ok((0..codes.n_tokens)
        .map(|r| {
            let mut row = vec![0f32; d];
            let span = codes.offsets[r]..codes.offsets[r + 1];
            for (f, v) in codes.features[span.clone()].iter().zip(&codes.values[span]) {
                row[*f as usize] = *v;
            }
            row
        })
        .collect())
}

/// One text of a contrast: its tokens and the positions to average over (e.g. the response
/// after a chat prompt).
#[derive(Clone, Debug)]
pub struct ContrastText {
    pub tokens: Vec<u32>,
    pub span: Range<usize>,
}

/// A feature ranked by [`contrast`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContrastHit {
    pub feature: usize,
    /// Mean (over texts) of its mean activation over each text's span, in set A and set B.
    pub mean_a: f64,
    pub mean_b: f64,
    /// Welch's t-statistic of A against B.
    pub t: f64,
}

/// Features ranked by how much more they fire on texts `a` than on texts `b` (largest t first;
/// reverse the list for B over A). Features whose firing rate (from `stats`) exceeds
/// `max_firing_rate` are left out: a feature on everywhere differs by accident of scale.
///
/// # Errors
/// Fewer than two texts in a set, an empty span, model and SAE errors.
pub fn contrast(
    model: &Model,
    sae: &SaeModel,
    hook: HookPoint,
    a: &[ContrastText],
    b: &[ContrastText],
    stats: Option<&FeatureStats>,
    max_firing_rate: f64,
) -> Result<Vec<ContrastHit>> {
    if a.len() < 2 || b.len() < 2 {
        return Err(SteeringError::invalid(
            "contrast sets",
            format!(
                "need at least 2 texts in each, got {} and {}",
                a.len(),
                b.len()
            ),
        ));
    }
    let d = sae.d_sae();
    let means = |set: &[ContrastText]| -> Result<Vec<Vec<f64>>> {
        set.iter()
            .map(|t| {
                if t.span.is_empty() || t.span.end > t.tokens.len() {
                    return Err(SteeringError::invalid(
                        "contrast span",
                        format!("{:?} of a text of {} tokens", t.span, t.tokens.len()),
                    ));
                }
                let acts = activations(model, sae, hook, &t.tokens)?;
                let mut m = vec![0f64; d];
                for row in &acts[t.span.clone()] {
                    m.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
                }
                let n = t.span.len() as f64;
                m.iter_mut().for_each(|v| *v /= n);
                Ok(m)
            })
            .collect()
    };
    let (ma, mb) = (means(a)?, means(b)?);
    let moments = |m: &[Vec<f64>], f: usize| {
        let n = m.len() as f64;
        let mean = m.iter().map(|r| r[f]).sum::<f64>() / n;
        let var = m.iter().map(|r| (r[f] - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var / n)
    };
    let mut hits: Vec<ContrastHit> = (0..d)
        .filter(|&f| {
            stats.is_none_or(|s| s.firing_rate.get(f).is_some_and(|&r| r <= max_firing_rate))
        })
        .filter_map(|f| {
            let ((mean_a, sa), (mean_b, sb)) = (moments(&ma, f), moments(&mb, f));
            if mean_a == 0.0 && mean_b == 0.0 {
                return None;
            }
            // A small floor keeps features that never vary in one set from dividing by zero.
            let t = (mean_a - mean_b) / (sa + sb).sqrt().max(1e-6);
            Some(ContrastHit {
                feature: f,
                mean_a,
                mean_b,
                t,
            })
        })
        .collect();
    hits.sort_by(|x, y| y.t.total_cmp(&x.t));
    Ok(hits)
}

/// A feature active on a text, from [`features_in`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptHit {
    pub feature: usize,
    /// Its largest activation on the text, and where (token index).
    pub activation: f32,
    pub position: usize,
    /// `activation / max_activation` when stats are given, else the activation.
    pub relative: f32,
    pub label: String,
}

/// The features that fire on `tokens`, strongest relative to their maximum first, leaving out
/// features denser than `max_firing_rate` and position 0 (BOS, where activations are outliers).
///
/// # Errors
/// Model and SAE errors.
pub fn features_in(
    model: &Model,
    sae: &SaeModel,
    hook: HookPoint,
    tokens: &[u32],
    stats: Option<&FeatureStats>,
    max_firing_rate: f64,
) -> Result<Vec<PromptHit>> {
    let acts = activations(model, sae, hook, tokens)?;
    let mut best: HashMap<usize, (f32, usize)> = HashMap::new();
    for (p, row) in acts.iter().enumerate().skip(1) {
        for (f, &v) in row.iter().enumerate() {
            if v > 0.0 && best.get(&f).is_none_or(|b| v > b.0) {
                best.insert(f, (v, p));
            }
        }
    }
    let mut hits: Vec<PromptHit> = best
        .into_iter()
        .filter(|(f, _)| {
            stats.is_none_or(|s| s.firing_rate.get(*f).is_some_and(|&r| r <= max_firing_rate))
        })
        .map(|(f, (v, p))| {
            let max = stats
                .and_then(|s| s.max_activation.get(f).copied())
                .unwrap_or(0.0);
            PromptHit {
                feature: f,
                activation: v,
                position: p,
                relative: if max > 0.0 { v / max } else { v },
                label: stats
                    .and_then(|s| s.labels.get(f).cloned())
                    .unwrap_or_default(),
            }
        })
        .collect();
    hits.sort_by(|a, b| b.relative.total_cmp(&a.relative));
    Ok(hits)
}
