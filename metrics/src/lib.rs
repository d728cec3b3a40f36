//! Reconstruction metrics, spliced NLL and loss recovered, KL, and the feature-ablation study.
//!
//! Every item has one path: `metrics::Item` for the measures, and two namespaces of output
//! helpers, [`plots`] (PNG plots, plotters with a bundled font) and [`html`] (self-contained
//! feature pages in the style of Towards Monosemanticity).
//!
//! - Reconstruction: L0, MSE, FVU / explained variance, cosine, dead and dense fractions and the
//!   feature-density histogram, streamed over batches of held-out activations
//!   ([`ReconstructionAccumulator`]).
//! - Spliced: the model's loss with the SAE spliced in at its hook, against the clean loss and
//!   zero- and mean-ablation; loss recovered; KL(clean ‖ spliced) ([`evaluate_spliced`]).
//! - The feature-ablation study: per-token Δ log p when one feature is removed
//!   ([`ablate_feature`]).
//! - Top-activating and decile-sampled contexts from an activation cache ([`collect_examples`]),
//!   and the feature pages built from them ([`build_feature_page`]).
//! - The adapter to `transformer-hooks` models ([`HookedSplice`]) and token windows from text
//!   ([`token_batches`]).
//! - Next-token log-probabilities and KL from logits ([`next_token_log_probs`], [`HostLogits`]).

mod ablation;
mod error;
mod examples;
mod hooked;
pub mod html;
mod nll;
mod pages;
pub mod plots;
mod reconstruction;
mod sae_ops;
mod spliced;
#[cfg(test)]
mod testutil;

pub use ablation::{ContextAblation, TokenEffects, ablate_feature, top_logit_effects};
pub use error::{MetricsError, Result};
pub use examples::{Example, ExampleCollector, IntervalExamples, RowSource, collect_examples};
pub use hooked::{HookedSplice, token_batches};
pub use nll::{HostLogits, kl_per_position, log_softmax, next_token_log_probs};
pub use pages::{
    PageConfig, TokenSource, auto_label, build_feature_page, feature_file_name, write_pages,
};
pub use reconstruction::{
    DEFAULT_DENSE_THRESHOLD, DensityHistogram, FeatureDensity, ReconstructionAccumulator,
    ReconstructionMetrics,
};
pub use sae_ops::{decoder_row, feature_column, reconstruct};
pub use spliced::{
    GroupEvaluation, HookEdit, MeanActivation, SpliceTarget, SplicedConfig, SplicedEvaluation,
    SplicedNll, TokenGroups, evaluate_spliced, evaluate_spliced_grouped, evaluate_spliced_many,
    loss_recovered, splice_positions,
};
