//! The one config every family fills in: the shared forward pass reads only this.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A model family this crate implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Architecture {
    /// Llama (SmolLM2): RMSNorm, SwiGLU, rotary.
    Llama,
    /// Gemma 3: sandwich norms, q/k norms, GeGLU, local/global attention.
    Gemma3,
    /// Qwen2 (Qwen2.5): Llama with q/k/v biases.
    Qwen2,
    /// GPT-2: LayerNorm, GELU MLP, learned positions.
    Gpt2,
}

impl Architecture {
    /// The names in GGUF's `general.architecture` and HF's `model_type`.
    pub const SUPPORTED: &'static str = "llama, gemma3, qwen2, gpt2";

    /// The name as GGUF's `general.architecture` spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Gemma3 => "gemma3",
            Architecture::Qwen2 => "qwen2",
            Architecture::Gpt2 => "gpt2",
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The MLP's non-linearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Activation {
    /// `x * sigmoid(x)` (Llama, Qwen2).
    Silu,
    /// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`, GPT-2's `gelu_new`).
    GeluTanh,
    /// GELU, exact (erf).
    GeluErf,
}

/// Which normalisation the blocks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NormKind {
    /// `x / rms(x) * w`.
    RmsNorm,
    /// `(x - mean) / std * w + b`.
    LayerNorm,
}

/// How rotary embedding pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RopeLayout {
    /// Dimension `i` pairs with `i + d_head/2` (HF's `rotate_half`, GPT-NeoX). All families use
    /// this here: Llama GGUF weights are un-permuted on load so that `attn.hook_q` matches HF.
    Half,
    /// Dimension `2i` pairs with `2i + 1` (GPT-J, llama.cpp's layout of Llama q/k weights).
    Interleaved,
}

/// The attention span of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AttentionType {
    /// Every earlier position, rotary base `rope_theta`.
    Full,
    /// The last `sliding_window` positions, rotary base `local_rope_theta` (Gemma 3).
    Sliding,
}

/// Everything the shared forward pass needs to know about a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ModelConfig {
    /// Model family.
    pub arch: Architecture,
    /// Human-readable name from the checkpoint, if any.
    pub name: Option<String>,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub d_model: usize,
    /// MLP hidden width (number of neurons at `mlp.hook_post`).
    pub d_mlp: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub d_head: usize,
    /// Rows of the embedding and of the unembedding.
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub n_ctx: usize,
    /// Normalisation kind.
    pub norm: NormKind,
    /// Normalisation epsilon.
    pub norm_eps: f64,
    /// MLP non-linearity.
    pub act: Activation,
    /// `act(x W_gate) * (x W_up)` rather than `act(x W_in)`.
    pub gated_mlp: bool,
    /// Learned absolute position embeddings (GPT-2) instead of rotary.
    pub learned_positions: bool,
    /// Rotary pairing of head dimensions.
    pub rope_layout: RopeLayout,
    /// Rotary base of full-attention layers.
    pub rope_theta: f64,
    /// Rotary base of sliding-window layers.
    pub local_rope_theta: f64,
    /// Window of sliding-window layers (query attends to keys with `q - k < window`).
    pub sliding_window: Option<usize>,
    /// Attention span per layer (`n_layers` entries).
    pub layer_types: Vec<AttentionType>,
    /// Multiplier of the attention scores (`1/sqrt(d_head)`, Gemma: `1/sqrt(query_pre_attn_scalar)`).
    pub attn_scale: f64,
    /// RMS norms on each query and key head (Gemma 3).
    pub qk_norm: bool,
    /// Norms on the attention and MLP outputs before they join the residual (Gemma 2/3).
    pub sandwich_norms: bool,
    /// Multiplier of the token embedding (Gemma: `sqrt(d_model)`).
    pub embed_scale: Option<f64>,
    /// The unembedding is the token embedding.
    pub tied_embeddings: bool,
    /// `final_logit_softcapping`: logits become `cap * tanh(logits / cap)`.
    pub final_logit_softcap: Option<f64>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token (generation stops on it).
    pub eos_token_id: Option<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
    /// Whether the model was trained with BOS prepended to every document.
    pub add_bos: bool,
}

impl ModelConfig {
    /// Query heads per key/value head.
    pub fn n_rep(&self) -> usize {
        self.n_heads / self.n_kv_heads.max(1)
    }

    /// Checks the numbers are consistent; every loader calls this.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the inconsistent field.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |what: &str, reason: String| Err(Error::invalid(format!("config {what}"), reason));
        for (what, v) in [
            ("n_layers", self.n_layers),
            ("d_model", self.d_model),
            ("d_mlp", self.d_mlp),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("d_head", self.d_head),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(what, "must be positive".into());
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(
                "n_kv_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.n_heads, self.n_kv_heads
                ),
            );
        }
        if !self.learned_positions && !self.d_head.is_multiple_of(2) {
            return bad(
                "d_head",
                format!("rotary needs an even head width, got {}", self.d_head),
            );
        }
        if self.layer_types.len() != self.n_layers {
            return bad(
                "layer_types",
                format!(
                    "{} entries for {} layers",
                    self.layer_types.len(),
                    self.n_layers
                ),
            );
        }
        if self.layer_types.contains(&AttentionType::Sliding) && self.sliding_window.is_none() {
            return bad(
                "sliding_window",
                "sliding layers without a window size".into(),
            );
        }
        if !(self.norm_eps >= 0.0 && self.norm_eps.is_finite()) {
            return bad(
                "norm_eps",
                format!("{} is not a finite epsilon", self.norm_eps),
            );
        }
        Ok(())
    }
}
