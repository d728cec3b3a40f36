//! Steering a language model with SAE features (Anthropic, *Scaling Monosemanticity*, 2024):
//! switch a feature on or off while the model generates, and measure what changes.
//!
//! * [`Steering`]: clamp a feature to a value (keeping the SAE's error term, so that only that
//!   feature changes), add its decoder direction, or ablate it; several at once; at every
//!   position or at generated ones only. It becomes a `transformer_hooks::Intervention`, so it
//!   runs inside `Model::generate_batch` (KV-cached) and any other forward pass.
//! * Features: find the feature to steer with, by its top contexts ([`FeatureStats`]), by
//!   contrasting two sets of texts ([`contrast`]), or by what fires on a prompt ([`features_in`]).
//! * [`traits()`]: the features most characteristic of a response (TF-IDF over SAE features).
//! * [`cue`]: a prompt that triggers an unwanted feature, edited (words deleted, replaced by
//!   synonyms, rephrased) until the feature stays quiet, with a score of the meaning kept.
//! * Measures: topic mentions by word list, agreement by keyword rule, response perplexity,
//!   KL on corpus text, bootstrap intervals over prompts.
//!
//! ```no_run
//! use steering::{FeatureEdit, FeatureStats, Steering, sae_hook};
//! use transformer_hooks::{GenerateOptions, Model, assets, candle_core::Device};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Model::load(&assets::asset_path(assets::SMOLLM2), &Device::Cpu)?;
//! let dir = std::path::Path::new("runs/steer_sae/saes/topk_9216");
//! let sae = sae_core::SaeModel::load(dir)?;
//! let stats = FeatureStats::load(dir)?;
//! let feature = 123;
//! // Clamp to 10x the feature's maximum activation on the cache, at every position.
//! let edit = FeatureEdit::clamp(feature, 10.0 * stats.max_of(feature)?);
//! let steer = Steering::new(&sae, sae_hook(&sae)?, vec![edit])?;
//! let tok = model.tokenizer()?;
//! let prompt = tok.encode_chat(&[transformer_hooks::ChatMessage::user("Describe your ideal morning.")], true)?;
//! let out = model.generate_batch(&[prompt], &GenerateOptions::greedy(64), &mut steer.hooks())?;
//! println!("{}", tok.decode(&out[0].tokens)?);
//! # Ok(()) }
//! ```

pub mod cue;
mod error;
mod features;
mod intervene;
mod measure;
mod traits;

pub use error::{Result, SteeringError};
pub use features::{
    ContrastHit, ContrastText, FeatureStats, PromptHit, STATS_FILE, SearchHit, TopContext,
    activations, contrast, features_in,
};
pub use intervene::{Edit, FeatureEdit, Scope, Steering, sae_hook, sae_hook_in};
pub use measure::{
    WordList, agrees, bootstrap_mean, bootstrap_paired_diff, log_mass, mean_kl, response_nll,
};
pub use traits::{RelatedFeature, Trait, TraitOptions, TraitToken, traits};
