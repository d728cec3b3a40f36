//! Reconstruction metrics, spliced NLL and loss recovered, KL, and the feature-ablation study.
//!
//! - [`reconstruction`]: L0, MSE, FVU / explained variance, cosine, dead and dense fractions and
//!   the feature-density histogram, streamed over batches of held-out activations.
//! - [`spliced`]: the model's loss with the SAE spliced in at its hook, against the clean loss and
//!   zero- and mean-ablation; loss recovered; KL(clean ‖ spliced).
//! - [`ablation`]: the feature-ablation study (per-token Δ log p when one feature is removed).
//! - [`examples`]: top-activating and decile-sampled contexts from an activation cache.
//! - [`pages`] and [`html`]: self-contained feature pages in the style of Towards Monosemanticity.
//! - [`plots`]: PNG plots (plotters with a bundled font).
//! - [`hooked`]: the adapter to `transformer-hooks` models and token windows from text.
//! - [`nll`]: next-token log-probabilities and KL from logits.

pub mod ablation;
pub mod error;
pub mod examples;
pub mod hooked;
pub mod html;
pub mod nll;
pub mod pages;
pub mod plots;
pub mod reconstruction;
pub mod sae_ops;
pub mod spliced;
#[cfg(test)]
mod testutil;

pub use ablation::{ContextAblation, ablate_feature, top_logit_effects};
pub use error::{MetricsError, Result};
pub use examples::{Example, ExampleCollector, IntervalExamples, RowSource, collect_examples};
pub use hooked::{HookedSplice, token_batches};
pub use pages::{PageConfig, TokenSource, build_feature_page, write_pages};
pub use reconstruction::{
    DEFAULT_DENSE_THRESHOLD, DensityHistogram, FeatureDensity, ReconstructionAccumulator,
    ReconstructionMetrics,
};
pub use spliced::{
    GroupEvaluation, MeanActivation, SpliceTarget, SplicedConfig, SplicedEvaluation, SplicedNll,
    TokenGroups, evaluate_spliced, evaluate_spliced_grouped, evaluate_spliced_many, loss_recovered,
};
