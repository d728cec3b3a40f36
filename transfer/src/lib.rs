//! Base-to-chat SAE transfer (Kissane, Krzyzanowski, Conmy and Nanda, *SAEs (usually) transfer
//! between base and chat models*, 2024): does an SAE trained on a base model's activations still
//! explain its chat fine-tune's?
//!
//! - [`pair`]: checks that two models can be compared at all (same architecture, widths, layers,
//!   vocabulary), naming the first difference;
//! - [`norms`]: mean activation norms per layer and hook of both models, and their ratio: the
//!   diagnosis for the one failure the paper found (Gemma v1 2B, whose chat model's norms differ
//!   about 8x);
//! - [`rescale`]: a copy of a model whose residual stream is `c` times larger with the same
//!   outputs (that failure, made on purpose), and an SAE carried to inputs of another scale
//!   (the fix: normalising to each model's fitted mean norm);
//! - [`capture`] and [`train`]: activations of both models on the same tokens, and SAEs trained
//!   on them or fine-tuned from one model's to the other's;
//! - [`matrix`]: every SAE on every model and text, as a table and a heatmap.

pub mod capture;
mod error;
pub mod matrix;
pub mod norms;
pub mod pair;
pub mod rescale;
pub mod train;

pub use error::{Error, Result};
