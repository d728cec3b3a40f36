//! Activation scale, changed on purpose and corrected.
//!
//! [`scaled_residual_copy`] builds the failure Kissane et al. saw on Gemma v1 (a chat model whose
//! residual norms differ several-fold from its base model's) without a second pretrained model:
//! the same function with a residual stream `c` times larger. [`normalized_for`] is the fix, as
//! SAELens's `normalize_activations` applies it: an SAE meets each model's activations at the
//! mean norm it was trained on.

use sae_core::SaeModel;
use transformer_hooks::{Architecture, Model};

use crate::error::{Error, Result};

/// A copy of `model` whose residual stream is `c` times larger at every position and layer,
/// with the same logits (up to the norms' epsilon).
///
/// Every read of the residual stream goes through an RMS norm, which ignores scale, so scaling
/// everything written to it scales the stream and nothing else: the embedding (through its
/// multiplier, which leaves the tied unembedding alone) and each block's output (Gemma's
/// post-attention and post-MLP norm weights; elsewhere the attention output and MLP down
/// projections).
///
/// # Errors
/// A non-positive factor, or a family whose norms do not ignore scale this way (GPT-2's
/// LayerNorm does, but its learned position embeddings and biases would need scaling too).
pub fn scaled_residual_copy(model: &Model, c: f64) -> Result<Model> {
    if !(c.is_finite() && c > 0.0) {
        return Err(Error::invalid(
            "residual scale",
            format!("{c}; must be positive"),
        ));
    }
    let mut cfg = model.config().clone();
    if cfg.arch == Architecture::Gpt2 {
        return Err(Error::invalid(
            "residual scale",
            "gpt2 is not supported (learned position embeddings and biases)",
        ));
    }
    cfg.embed_scale = Some(cfg.embed_scale.unwrap_or(1.0) * c);
    let outputs: &[&str] = if cfg.sandwich_norms {
        &["ln1_post.weight", "ln2_post.weight"]
    } else {
        &[
            "attn.o.weight",
            "mlp.down.weight",
            "attn.o.bias",
            "mlp.down.bias",
        ]
    };
    let mut params = transformer_hooks::Weights::new();
    for (name, t) in model.params() {
        let t = t.detach();
        let scaled = name.starts_with("blocks.") && outputs.iter().any(|s| name.ends_with(s));
        params.insert(name.clone(), if scaled { (t * c)? } else { t });
    }
    Ok(Model::from_params(
        cfg,
        params,
        model.tokenizer().ok().cloned(),
    )?)
}

/// `sae`, trained on activations of mean norm `trained_norm`, made to read activations of mean
/// norm `target_norm` as if they had its training scale (input divided by the ratio, output
/// multiplied back).
///
/// # Errors
/// A non-positive norm.
pub fn normalized_for(sae: SaeModel, trained_norm: f64, target_norm: f64) -> Result<SaeModel> {
    if !(trained_norm > 0.0 && target_norm > 0.0) {
        return Err(Error::invalid(
            "mean norms",
            format!("{trained_norm} and {target_norm}; both must be positive"),
        ));
    }
    Ok(sae.for_input_scale((target_norm / trained_norm) as f32)?)
}
