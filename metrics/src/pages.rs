//! Feature pages from an [`ExampleCollector`]: the collector says *which* contexts to show;
//! each context is re-run through the model with and without the feature
//! ([`crate::ablation::ablate_feature`]) to get per-token activations and Δ log p; [`crate::html`]
//! renders the result.

use std::path::Path;

use sae_core::SaeModel;
use serde::{Deserialize, Serialize};

use crate::ablation::ablate_feature;
use crate::error::{MetricsError, Result, io_err};
use crate::examples::{Example, ExampleCollector};
use crate::html::{
    ContextExample, FeaturePage, IndexEntry, IntervalSamples, LogitEffects, render_feature_page,
    render_index,
};
use crate::spliced::SpliceTarget;

/// What a feature page shows and how it is computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageConfig {
    /// Top-activating contexts shown.
    pub top_examples: usize,
    /// Contexts sampled from each decile interval of nonzero activations.
    pub per_interval: usize,
    /// Tokens shown before the selected token.
    pub window_left: usize,
    /// Tokens shown after it (the forward pass runs up to the last shown token).
    pub window_right: usize,
    /// Contexts per forward pass.
    pub batch_size: usize,
    /// Positions before this one are not ablated (1: BOS stays clean, as in spliced evaluation).
    pub first_spliced_position: usize,
    /// Bins of the activation histogram.
    pub histogram_bins: usize,
    /// Seed of the interval sampling.
    pub seed: u64,
}

impl Default for PageConfig {
    fn default() -> Self {
        Self {
            top_examples: 8,
            per_interval: 2,
            window_left: 24,
            window_right: 6,
            batch_size: 8,
            first_spliced_position: 1,
            histogram_bins: 40,
            seed: 0,
        }
    }
}

/// Where a page gets token text and window tokens from.
pub struct TokenSource<'a> {
    /// All tokens of cache window `w` (BOS first), or `None` if unknown.
    pub window_tokens: &'a dyn Fn(u32) -> Option<Vec<u32>>,
    /// Text of one token id.
    pub decode: &'a dyn Fn(u32) -> String,
}

/// A short automatic label: the most frequent tokens among the top examples.
///
/// # Errors
/// `InvalidArgument` for a feature out of range.
pub fn auto_label(
    collector: &ExampleCollector,
    feature: usize,
    decode: &dyn Fn(u32) -> String,
) -> Result<String> {
    let toks = collector.top_tokens(feature, 4)?;
    if toks.is_empty() {
        return Ok("(dead)".into());
    }
    Ok(toks
        .iter()
        .map(|(t, _)| format!("{:?}", decode(*t)))
        .collect::<Vec<_>>()
        .join(" "))
}

/// Builds one feature's page: re-runs the chosen contexts with and without the feature.
///
/// # Errors
/// `InvalidArgument` for a feature out of range or a window the token source does not know;
/// model and SAE errors.
#[allow(clippy::too_many_arguments)]
pub fn build_feature_page(
    model: &mut dyn SpliceTarget,
    sae: &SaeModel,
    sae_name: &str,
    collector: &ExampleCollector,
    feature: usize,
    tokens: &TokenSource<'_>,
    logit_effects: Option<LogitEffects>,
    cfg: &PageConfig,
) -> Result<FeaturePage> {
    let mut top = collector.top_examples(feature)?;
    top.truncate(cfg.top_examples);
    let deciles = collector.decile_examples(feature, cfg.per_interval, cfg.seed)?;
    let mut chosen: Vec<Example> = top.clone();
    for d in &deciles {
        chosen.extend(d.examples.iter().copied());
    }
    // Contexts run from the window's start (so activations are the cached ones) to the last
    // shown token.
    let mut contexts = Vec::with_capacity(chosen.len());
    for e in &chosen {
        let w = (tokens.window_tokens)(e.source.window).ok_or_else(|| {
            MetricsError::InvalidArgument {
                what: format!("window {}", e.source.window),
                reason: "the token source does not know this window of the cache".into(),
            }
        })?;
        let p = e.source.position as usize;
        if p >= w.len() {
            return Err(MetricsError::InvalidArgument {
                what: format!("position {p} of window {}", e.source.window),
                reason: format!("the window has {} tokens", w.len()),
            });
        }
        let end = (p + cfg.window_right + 1).min(w.len()).max(2);
        contexts.push(w[..end].to_vec());
    }
    let results = ablate_feature(
        model,
        sae,
        feature,
        &contexts,
        cfg.first_spliced_position,
        cfg.batch_size,
    )?;
    let to_example = |e: &Example, r: &crate::ablation::ContextAblation| -> ContextExample {
        let p = e.source.position as usize;
        let start = p.saturating_sub(cfg.window_left);
        ContextExample {
            source: format!(
                "window {}, position {}, activation {:.3} (cached)",
                e.source.window, p, e.activation
            ),
            tokens: r.tokens[start..]
                .iter()
                .map(|&t| (tokens.decode)(t))
                .collect(),
            activations: r.activations[start..].to_vec(),
            logprob_delta: r.logprob_delta[start..].to_vec(),
            focus: p - start,
        }
    };
    let mut it = chosen.iter().zip(&results);
    let top_examples: Vec<ContextExample> = it
        .by_ref()
        .take(top.len())
        .map(|(e, r)| to_example(e, r))
        .collect();
    let mut interval_examples = Vec::new();
    for d in &deciles {
        let examples: Vec<ContextExample> = it
            .by_ref()
            .take(d.examples.len())
            .map(|(e, r)| to_example(e, r))
            .collect();
        interval_examples.push(IntervalSamples {
            low: d.low,
            high: d.high,
            label: format!(
                "decile {} ({}-{}%)",
                d.index + 1,
                d.index * 10,
                d.index * 10 + 10
            ),
            examples,
        });
    }
    interval_examples.reverse();
    let (histogram_edges, histogram_counts) =
        collector.activation_histogram(feature, cfg.histogram_bins)?;
    let rates = collector.density().firing_rates();
    Ok(FeaturePage {
        sae_name: sae_name.to_string(),
        hook: model.hook_name(),
        feature,
        label: auto_label(collector, feature, tokens.decode)?,
        density: rates.get(feature).copied().unwrap_or(0.0),
        max_activation: collector.max_activation(feature),
        top_examples,
        interval_examples,
        histogram_edges,
        histogram_counts,
        logit_effects,
    })
}

/// File name of a feature's page.
pub fn feature_file_name(feature: usize) -> String {
    format!("feature_{feature:05}.html")
}

/// Writes `feature_NNNNN.html` for every page and `index.html` listing them, into `dir`.
///
/// # Errors
/// `Io` naming the file that could not be written.
pub fn write_pages(dir: &Path, title: &str, intro: &str, pages: &[FeaturePage]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut entries = Vec::with_capacity(pages.len());
    for p in pages {
        let name = feature_file_name(p.feature);
        let path = dir.join(&name);
        std::fs::write(&path, render_feature_page(p)).map_err(io_err(&path))?;
        entries.push(IndexEntry {
            feature: p.feature,
            density: p.density,
            max_activation: p.max_activation,
            label: p.label.clone(),
            href: name,
        });
    }
    let path = dir.join("index.html");
    std::fs::write(&path, render_index(title, intro, &entries)).map_err(io_err(&path))?;
    Ok(())
}
