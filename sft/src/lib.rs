//! Supervised chat fine-tuning (SFT) of a [`transformer_hooks::Model`] through the same forward
//! pass that the rest of the workspace hooks and measures.
//!
//! It lives in a crate of its own, not inside `transformer-hooks`, because it has one job that the
//! forward pass does not need: turning a base model into a chat model (data, optimizer, schedule,
//! checkpoints). `transformer-hooks` stays the model; this crate only asks it for differentiable
//! parameters ([`transformer_hooks::Model::trainable_params`]).

pub mod conversations;
pub mod error;
pub mod train;

pub use error::{Error, Result};
pub use train::{Example, SftConfig, StepLog, Trainer, chat_loss, encode_conversation};
