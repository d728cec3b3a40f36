//! Supervised chat fine-tuning (SFT) of a [`transformer_hooks::Model`] through the same forward
//! pass that the rest of the workspace hooks and measures.
//!
//! It lives in a crate of its own, not inside `transformer-hooks`, because it has one job that the
//! forward pass does not need: turning a base model into a chat model (data, optimizer, schedule,
//! checkpoints). `transformer-hooks` stays the model; this crate only asks it for differentiable
//! parameters ([`transformer_hooks::Model::trainable_params_where`]) and for the log-probabilities
//! of chosen positions ([`transformer_hooks::Model::next_token_logprobs`]).
//!
//! # Full fine-tuning, not LoRA
//!
//! Measured on Gemma-3-270M, batch 4 x 256 tokens, half of them scored, 2 cores (`bench_sft`,
//! all three in one period of load from another run): every weight but the embedding, 33.2 s per
//! step; the embedding too, 46.7 s; no weight at all, only the backward pass through the
//! activations, 46.7 s. That last mode is the part of a step LoRA cannot skip, and here it is
//! not cheaper, because candle's matmul backward computes the gradient of both operands whether
//! or not a weight is trained. LoRA would therefore cost the full backward plus its adapters and
//! save only the optimizer's 0.2 s per step and 1.2 GB of AdamW state, which fits easily; a
//! merged LoRA model is also one more step before the HF folder. So: full fine-tuning, with the
//! tied 262k x 640 embedding frozen by default (training it adds the two vocabulary-sized
//! products; `SftConfig::train_embeddings` turns it on). The one product whose gradient is
//! provably unwanted, the frozen unembedding's, is computed by its own op that skips it (the
//! step above went from 33 to 24 s with it).

pub mod conversations;
mod error;
mod train;

pub use error::{Error, Result};
pub use train::{
    Example, SftConfig, StepLog, TokenKind, Trainer, batch_logprobs, chat_loss, checkpoint_dir,
    encode_conversation, encode_conversation_kinds,
};
