//! Real transformer checkpoints with TransformerLens hook points.
//!
//! Load a GGUF file (dequantized to f32) or an HF folder, run it over tokens, and read or rewrite
//! any activation in the middle of the forward pass by its TransformerLens name:
//!
//! ```no_run
//! use candle_core::Device;
//! use transformer_hooks::{HookPoint, Hooks, Intervention, Model, assets};
//!
//! # fn main() -> transformer_hooks::Result<()> {
//! let model = Model::load(&assets::asset_path(assets::SMOLLM2), &Device::Cpu)?;
//! let ids = model.tokenizer()?.encode("Call me Ishmael.", model.config().add_bos)?;
//! let tokens = model.tokens(&ids)?;
//!
//! // Neurons of layer 15, without computing layers 16.. or the logits.
//! let cache = model.run_with_cache(&tokens, &[HookPoint::mlp_post(15)])?;
//!
//! // Zero-ablate layer 15's MLP and score every next token.
//! let mut hooks = Hooks::new().intervene(HookPoint::mlp_out(15), Intervention::Zero);
//! let logprobs = model.logprobs_with_hooks(&tokens, None, &mut hooks)?; // [1, n - 1]
//! # Ok(()) }
//! ```
//!
//! * Families: Llama (SmolLM2), Gemma 3, Qwen2, GPT-2; each is one small file in `families/`
//!   wiring the shared components of `layers.rs` (attention with grouped keys/values, gated or
//!   plain MLP, RMSNorm/LayerNorm, rotary of either layout).
//! * Correctness: log-probabilities match HF transformers reading the same GGUF files
//!   (`scripts/hf_reference.py`, checked by `tests/hf_parity.rs`).
//! * The forward pass is plain candle ops, so it is differentiable: see
//!   [`Model::trainable_params`].
//! * Hook names, shapes and what each holds: see [`HookPoint`].
//! * Speed on the CPU: weight products through OpenBLAS when installed ([`blas_library`] says
//!   which), causal attention over the unmasked half only, and [`retain_freed_memory`] for
//!   programs; level with HF transformers on SmolLM2 (`bench/forward_side_by_side.py`).

mod alloc;
pub mod assets;
mod causal_attention;
mod config;
mod error;
mod families;
mod generate;
mod hook_point;
mod hooks;
mod layers;
mod model;
mod ops;
mod tokenizer;
mod weights;

pub use alloc::retain_freed_memory;
pub use config::{Activation, Architecture, AttentionType, ModelConfig, NormKind, RopeLayout};
pub use cpu_blas::{BLAS_ENV, blas_core, blas_library};
pub use error::{BoxError, Error, Result};
pub use generate::{GenerateOptions, Generation, Sampling, StopReason};
pub use hook_point::{HookPoint, Site};
pub use hooks::{ActivationCache, Hooks, Intervention};
pub use model::{KvCache, LoadOptions, Model, Output};
pub use ops::log_sum_exp;
pub use tokenizer::{ChatMessage, ChatTemplate, Role, Tokenizer};
pub use weights::Weights;

/// Re-exported so that callers build tensors with the same candle version.
pub use candle_core;
