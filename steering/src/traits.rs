//! Traits of a response: the SAE features most characteristic of a piece of generated text.
//!
//! A feature's score on a response is its activation, relative to its maximum, summed over the
//! response's tokens and weighted by how rare the feature is on ordinary text:
//!
//! ```text
//! score_i = Σ_t (a_i(t) / max_i) · ln(1 / rate_i)
//! ```
//!
//! This is TF-IDF with features for terms. Dividing by the firing rate outright, the literal
//! "normalise by density", lets a feature scanned a handful of times win with one weak firing
//! (its rate is tiny and noisy); the logarithm keeps rare features ahead of ubiquitous ones
//! (a feature on 30% of tokens weighs 1.2, one on 0.3% weighs 5.8) without letting noise win.
//!
//! The activations are those of the *unsteered* model reading prompt and response: traits say
//! what the text is about, not which intervention produced it (under a clamp, the clamped
//! feature would trivially top the list).

use std::ops::Range;

use sae_core::SaeModel;
use serde::{Deserialize, Serialize};
use transformer_hooks::{HookPoint, Model};

use crate::error::{Result, SteeringError};
use crate::features::{FeatureStats, activations};

/// One trait of a response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trait {
    pub feature: usize,
    pub label: String,
    /// `Σ_t (a(t) / max) · ln(1 / rate)` over the response tokens.
    pub score: f64,
    /// The response tokens where it fires hardest (at most three), strongest first.
    pub tokens: Vec<TraitToken>,
}

/// Where a trait fires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraitToken {
    /// Index within the response (0 = its first token).
    pub position: usize,
    pub token: String,
    /// Activation relative to the feature's maximum.
    pub relative: f32,
}

/// How many traits, and which features may be one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TraitOptions {
    /// Traits returned.
    pub top: usize,
    /// Features firing on more than this fraction of tokens are left out (at 0.05, features of
    /// "was", "I", "a" crowd the list on SmolLM2).
    pub max_firing_rate: f64,
}

impl Default for TraitOptions {
    fn default() -> Self {
        Self {
            top: 5,
            max_firing_rate: 0.01,
        }
    }
}

/// The top traits of the response `tokens[span]` (the prompt before it is read as context),
/// strongest first. Features that never fired in the stats' scan have no scale and are left
/// out, as are features denser than `opts.max_firing_rate`.
///
/// # Errors
/// An empty or out-of-range span, stats for another dictionary size, model and SAE errors.
pub fn traits(
    model: &Model,
    sae: &SaeModel,
    hook: HookPoint,
    stats: &FeatureStats,
    tokens: &[u32],
    span: Range<usize>,
    opts: TraitOptions,
) -> Result<Vec<Trait>> {
    let TraitOptions {
        top,
        max_firing_rate,
    } = opts;
    if span.is_empty() || span.end > tokens.len() {
        return Err(SteeringError::invalid(
            "response span",
            format!("{span:?} of a {}-token sequence", tokens.len()),
        ));
    }
    if stats.d_sae() != sae.d_sae() || stats.firing_rate.len() != sae.d_sae() {
        return Err(SteeringError::invalid(
            "feature stats",
            format!(
                "they describe {} features, the SAE has {}",
                stats.d_sae(),
                sae.d_sae()
            ),
        ));
    }
    let acts = activations(model, sae, hook, tokens)?;
    let weight: Vec<Option<(f32, f64)>> = (0..sae.d_sae())
        .map(|f| {
            let (max, rate) = (stats.max_activation[f], stats.firing_rate[f]);
            (max > 0.0 && rate > 0.0 && rate <= max_firing_rate).then(|| (max, (1.0 / rate).ln()))
        })
        .collect();
    let mut score = vec![0f64; sae.d_sae()];
    let mut peaks: Vec<Vec<(usize, f32)>> = vec![Vec::new(); sae.d_sae()];
    for (p, row) in acts[span.clone()].iter().enumerate() {
        for (f, &a) in row.iter().enumerate() {
            if a <= 0.0 {
                continue;
            }
            if let Some((max, idf)) = weight[f] {
                let rel = a / max;
                score[f] += f64::from(rel) * idf;
                peaks[f].push((p, rel));
            }
        }
    }
    let mut order: Vec<usize> = (0..score.len()).filter(|&f| score[f] > 0.0).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
    order.truncate(top);
    let tok = model.tokenizer()?;
    order
        .into_iter()
        .map(|f| {
            let mut pk = std::mem::take(&mut peaks[f]);
            pk.sort_by(|a, b| b.1.total_cmp(&a.1));
            pk.truncate(3);
            let tokens = pk
                .into_iter()
                .map(|(p, relative)| {
                    Ok(TraitToken {
                        position: p,
                        token: tok.decode(&[tokens[span.start + p]])?,
                        relative,
                    })
                })
                .collect::<Result<_>>()?;
            Ok(Trait {
                feature: f,
                label: stats.labels.get(f).cloned().unwrap_or_default(),
                score: score[f],
                tokens,
            })
        })
        .collect()
}
