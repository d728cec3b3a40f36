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
//! Two refinements make the list say what the text is about:
//!
//! - Tokens that are only whitespace do not count. Steered text often degenerates into runs of
//!   blank lines, and the features of those runs would otherwise fill the list.
//! - Features that fire on (nearly) the same tokens are one trait. An SAE splits a topic over
//!   several features (the sea over four or five in the steering SAE); listed one by one, they
//!   crowd out everything else. A feature whose firing positions overlap a stronger trait's by a
//!   Jaccard index of at least `merge_overlap` is folded into that trait (`Trait::also`).
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
    /// `Σ_t (a(t) / max) · ln(1 / rate)` over the response tokens that are not whitespace.
    pub score: f64,
    /// The response tokens where it fires hardest (at most three), strongest first.
    pub tokens: Vec<TraitToken>,
    /// Weaker features firing on (nearly) the same tokens, folded into this trait, strongest
    /// first.
    #[serde(default)]
    pub also: Vec<RelatedFeature>,
}

/// A feature folded into a stronger trait.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelatedFeature {
    pub feature: usize,
    pub label: String,
    /// Its own score, as if it were a trait.
    pub score: f64,
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
    /// A feature whose firing positions overlap a stronger trait's by at least this Jaccard
    /// index joins that trait instead of being one. Above 1, every feature is its own trait.
    /// 0.6 was chosen on the steering experiment's tuning and first evaluation prompts (78
    /// responses per clamp): it folds the sea features of sea-clamped answers together while a
    /// trait stays small (2.4 features on average on unsteered answers, under 5 on steered
    /// ones); at 0.5 traits hold twice as many features, at 0.8 the sea stays split.
    pub merge_overlap: f64,
}

impl Default for TraitOptions {
    fn default() -> Self {
        Self {
            top: 5,
            max_firing_rate: 0.01,
            merge_overlap: 0.6,
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
        merge_overlap,
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
    let tok = model.tokenizer()?;
    let weight: Vec<Option<(f32, f64)>> = (0..sae.d_sae())
        .map(|f| {
            let (max, rate) = (stats.max_activation[f], stats.firing_rate[f]);
            (max > 0.0 && rate > 0.0 && rate <= max_firing_rate).then(|| (max, (1.0 / rate).ln()))
        })
        .collect();
    let mut score = vec![0f64; sae.d_sae()];
    // Per feature, the response positions where it fires, in order, with relative activations.
    let mut fired: Vec<Vec<(usize, f32)>> = vec![Vec::new(); sae.d_sae()];
    // Each response token's text, decoded once: for the blank-token rule and the listing.
    let texts: Vec<String> = tokens[span.clone()]
        .iter()
        .map(|&t| tok.decode(&[t]))
        .collect::<std::result::Result<_, _>>()?;
    for (p, row) in acts[span.clone()].iter().enumerate() {
        if texts[p].trim().is_empty() {
            continue;
        }
        for (f, &a) in row.iter().enumerate() {
            if a <= 0.0 {
                continue;
            }
            if let Some((max, idf)) = weight[f] {
                let rel = a / max;
                score[f] += f64::from(rel) * idf;
                fired[f].push((p, rel));
            }
        }
    }
    let mut order: Vec<usize> = (0..score.len()).filter(|&f| score[f] > 0.0).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));

    // Greedy grouping, strongest first: a feature joins the first trait whose leading feature
    // fires on nearly the same positions, or leads a new trait while there is room.
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for f in order {
        let room = groups.len() < top;
        match groups
            .iter_mut()
            .find(|(lead, _)| jaccard(&fired[*lead], &fired[f]) >= merge_overlap)
        {
            Some((_, also)) => also.push(f),
            None if room => groups.push((f, Vec::new())),
            None => {}
        }
    }
    let label = |f: usize| stats.labels.get(f).cloned().unwrap_or_default();
    let traits = groups
        .into_iter()
        .map(|(f, also)| {
            let mut pk = std::mem::take(&mut fired[f]);
            pk.sort_by(|a, b| b.1.total_cmp(&a.1));
            pk.truncate(3);
            let tokens = pk
                .into_iter()
                .map(|(p, relative)| TraitToken {
                    position: p,
                    token: texts[p].clone(),
                    relative,
                })
                .collect();
            Trait {
                feature: f,
                label: label(f),
                score: score[f],
                tokens,
                also: also
                    .into_iter()
                    .map(|g| RelatedFeature {
                        feature: g,
                        label: label(g),
                        score: score[g],
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(traits)
}

/// |A ∩ B| / |A ∪ B| of two features' firing positions (each list in increasing position).
fn jaccard(a: &[(usize, f32)], b: &[(usize, f32)]) -> f64 {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let either = a.len() + b.len() - both;
    if either == 0 {
        0.0
    } else {
        both as f64 / either as f64
    }
}
