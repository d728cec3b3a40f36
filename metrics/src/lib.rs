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
//! - Sparse probing (SAEBench's): how well k latents, against k neurons, tell a class of texts
//!   from the rest ([`sparse_probing`], on features from [`pooled_window_features`]).
//! - Targeted probe perturbation (SAEBench's TPP): ablating the latents that matter to one
//!   class's probe should blind that probe and spare the others ([`targeted_probe_perturbation`]).
//! - Spurious correlation removal (SAEBench's SCR): ablating the latents of a spurious attribute
//!   should let a probe trained where it went with the concept read the concept alone
//!   ([`spurious_correlation_removal`]).
//! - Next-token log-probabilities and KL from logits ([`next_token_log_probs`], [`HostLogits`]).
//!
//! Loss recovered for an SAE on its own hook (`examples/eval_sae` is this with flags):
//!
//! ```no_run
//! use candle_core::Device;
//! use metrics::{HookedSplice, SplicedConfig, evaluate_spliced, token_batches};
//! use sae_core::SaeModel;
//! use transformer_hooks::Model;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Model::load("assets/models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), &Device::Cpu)?;
//! let sae = SaeModel::load("runs/main/saes/topk_12288")?;
//! let mut target = HookedSplice::new(&model, sae.hook_name().ok_or("no hook_name")?)?;
//! target.check_sae(&sae)?; // the hook's width is the SAE's d_in
//!
//! let tok = model.tokenizer()?;
//! let ids = tok.encode("It is a truth universally acknowledged, ...", false)?;
//! // Windows of 128 tokens, each starting with BOS, 8 to a forward pass.
//! let batches = token_batches(&ids, tok.bos_id(), 128, 8, &Device::Cpu)?;
//! let eval = evaluate_spliced(&mut target, &sae, &batches, &SplicedConfig::default(), None)?;
//! println!(
//!     "loss recovered {:.1}% (zero ablation), FVU {:.3}, L0 {:.1}",
//!     100.0 * eval.spliced.loss_recovered_zero,
//!     eval.reconstruction.fvu,
//!     eval.reconstruction.l0
//! );
//! # Ok(())
//! # }
//! ```

mod ablation;
mod absorption;
mod error;
mod examples;
mod hooked;
pub mod html;
mod nll;
mod pages;
pub mod plots;
mod probing;
mod reconstruction;
mod sae_ops;
mod scr;
mod spliced;
#[cfg(test)]
mod testutil;
mod tpp;

pub use ablation::{ContextAblation, TokenEffects, ablate_feature, top_logit_effects};
pub use absorption::{
    Absorption, AbsorptionConfig, AbsorptionProbes, AbsorptionSummary, BinaryScores,
    ClassAbsorption, KSparseProbe, WordAbsorption, feature_absorption,
};
pub use error::{MetricsError, Result};
pub use examples::{Example, ExampleCollector, IntervalExamples, RowSource, collect_examples};
pub use hooked::{HookedSplice, token_batches};
pub use nll::{HostLogits, kl_per_position, log_softmax, next_token_log_probs};
pub use pages::{
    PageConfig, TokenSource, auto_label, build_feature_page, feature_file_name, write_pages,
};
pub use probing::{
    ClassProbing, LabelledFeatures, LogisticProbe, MAX_PROBE_ITERATIONS, PooledFeatures,
    ProbingConfig, TopKProbe, balanced_one_vs_rest, pooled_window_features, sparse_probing,
    token_activations, top_k_by_mean_difference,
};
pub use reconstruction::{
    DEFAULT_DENSE_THRESHOLD, DensityHistogram, FeatureDensity, ReconstructionAccumulator,
    ReconstructionMetrics,
};
pub use sae_ops::{decoder_row, feature_column, reconstruct};
pub use scr::{ScrAblation, ScrConfig, ScrProbes, TwoAttributes, spurious_correlation_removal};
pub use spliced::{
    GroupEvaluation, HookEdit, MeanActivation, SpliceTarget, SplicedConfig, SplicedEvaluation,
    SplicedNll, TokenGroups, evaluate_spliced, evaluate_spliced_grouped, evaluate_spliced_many,
    loss_recovered, splice_positions,
};
pub use tpp::{
    ClassProbes, FeatureSource, TppAblation, TppClass, TppConfig, targeted_probe_perturbation,
    tpp_mean,
};
