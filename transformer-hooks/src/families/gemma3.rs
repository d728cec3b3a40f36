//! Gemma 3 ([Gemma Team 2025](https://arxiv.org/abs/2503.19786)): sandwich RMS norms (before and
//! after attention and MLP), RMS norms on each query and key head, GeGLU MLP with tanh GELU,
//! embeddings scaled by `sqrt(d_model)`, and five local (sliding window, rotary base 1e4) layers per
//! global (rotary base 1e6) one.
//!
//! HF stores each norm's weight `w` and applies `1 + w`; llama.cpp stores `1 + w`. Both load to the
//! factor actually applied.

use super::{
    Name, check_no_gguf_rope_scaling, check_no_rope_scaling, gguf_base, hf_add_bos, hf_base,
    hf_rope_theta, load_table, name,
};
use crate::config::{Activation, Architecture, AttentionType, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Format, GgufMeta, HfConfig, Weights};
use candle_core::Tensor;

const GLOBAL: &[Name] = &[
    name("embed.weight", "token_embd.weight", "embed_tokens.weight"),
    name("ln_final.weight", "output_norm.weight", "norm.weight"),
];

const BLOCK: &[Name] = &[
    name("ln1.weight", "attn_norm.weight", "input_layernorm.weight"),
    name("attn.q.weight", "attn_q.weight", "self_attn.q_proj.weight"),
    name("attn.k.weight", "attn_k.weight", "self_attn.k_proj.weight"),
    name("attn.v.weight", "attn_v.weight", "self_attn.v_proj.weight"),
    name(
        "attn.q_norm.weight",
        "attn_q_norm.weight",
        "self_attn.q_norm.weight",
    ),
    name(
        "attn.k_norm.weight",
        "attn_k_norm.weight",
        "self_attn.k_norm.weight",
    ),
    name(
        "attn.o.weight",
        "attn_output.weight",
        "self_attn.o_proj.weight",
    ),
    name(
        "ln1_post.weight",
        "post_attention_norm.weight",
        "post_attention_layernorm.weight",
    ),
    name(
        "ln2.weight",
        "ffn_norm.weight",
        "pre_feedforward_layernorm.weight",
    ),
    name("mlp.gate.weight", "ffn_gate.weight", "mlp.gate_proj.weight"),
    name("mlp.up.weight", "ffn_up.weight", "mlp.up_proj.weight"),
    name("mlp.down.weight", "ffn_down.weight", "mlp.down_proj.weight"),
    name(
        "ln2_post.weight",
        "post_ffw_norm.weight",
        "post_feedforward_layernorm.weight",
    ),
];

/// Gemma 3 makes every sixth layer global.
const SLIDING_WINDOW_PATTERN: usize = 6;

fn gemma_defaults(cfg: &mut ModelConfig) {
    cfg.act = Activation::GeluTanh;
    cfg.qk_norm = true;
    cfg.sandwich_norms = true;
    cfg.embed_scale = Some((cfg.d_model as f64).sqrt());
    cfg.tied_embeddings = true;
}

fn pattern_layers(n_layers: usize, pattern: usize) -> Vec<AttentionType> {
    (0..n_layers)
        .map(|i| {
            if pattern > 0 && (i + 1) % pattern == 0 {
                AttentionType::Full
            } else {
                AttentionType::Sliding
            }
        })
        .collect()
}

pub(crate) fn config_from_gguf(meta: &GgufMeta, ckpt: &Checkpoint) -> Result<ModelConfig> {
    check_no_gguf_rope_scaling(meta, "gemma3")?;
    let mut cfg = gguf_base(meta, ckpt, Architecture::Gemma3)?;
    gemma_defaults(&mut cfg);
    cfg.rope_theta = meta
        .opt_f64("gemma3.rope.freq_base")?
        .unwrap_or(1_000_000.0);
    cfg.local_rope_theta = 10_000.0;
    cfg.sliding_window = Some(
        meta.opt_usize("gemma3.attention.sliding_window")?
            .unwrap_or(512),
    );
    cfg.layer_types = pattern_layers(cfg.n_layers, SLIDING_WINDOW_PATTERN);
    // llama.cpp: 1/sqrt(d_head) except for the 27B model, which GGUF marks by its width.
    cfg.attn_scale = if cfg.n_layers == 62 {
        1.0 / ((cfg.d_model / cfg.n_heads) as f64).sqrt()
    } else {
        1.0 / (cfg.d_head as f64).sqrt()
    };
    Ok(cfg)
}

pub(crate) fn config_from_hf(hf: &HfConfig, ckpt: &Checkpoint) -> Result<ModelConfig> {
    check_no_rope_scaling(hf)?;
    let mut cfg = hf_base(hf, ckpt, Architecture::Gemma3)?;
    gemma_defaults(&mut cfg);
    cfg.rope_theta = hf_rope_theta(hf, Some("full_attention"))?.unwrap_or(1_000_000.0);
    cfg.local_rope_theta = match hf.opt_f64("rope_local_base_freq")? {
        Some(t) => t,
        None => hf
            .value("rope_parameters")
            .and_then(|p| p.get("sliding_attention"))
            .and_then(|p| p.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .unwrap_or(10_000.0),
    };
    cfg.sliding_window = Some(hf.opt_usize("sliding_window")?.unwrap_or(4096));
    cfg.layer_types = match hf.value("layer_types").and_then(|v| v.as_array()) {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(AttentionType::Sliding),
                Some("full_attention") => Ok(AttentionType::Full),
                _ => Err(Error::metadata(
                    &hf.path,
                    "layer_types",
                    format!("unknown layer type {t}"),
                )),
            })
            .collect::<Result<_>>()?,
        None => pattern_layers(
            cfg.n_layers,
            hf.opt_usize("sliding_window_pattern")?
                .unwrap_or(SLIDING_WINDOW_PATTERN),
        ),
    };
    let scalar = hf.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
    cfg.attn_scale = 1.0 / scalar.sqrt();
    cfg.final_logit_softcap = hf.opt_f64("final_logit_softcapping")?;
    if hf.opt_f64("attn_logit_softcapping")?.is_some() {
        return Err(Error::metadata(
            &hf.path,
            "attn_logit_softcapping",
            "attention softcapping (Gemma 2) is not implemented",
        ));
    }
    match hf
        .opt_str("hidden_activation")
        .or_else(|| hf.opt_str("hidden_act"))
    {
        None | Some("gelu_pytorch_tanh") => {}
        Some(other) => {
            return Err(Error::metadata(
                &hf.path,
                "hidden_activation",
                format!("`{other}` is not Gemma 3's gelu_pytorch_tanh"),
            ));
        }
    }
    cfg.add_bos = hf_add_bos(&ckpt.path).unwrap_or(true);
    Ok(cfg)
}

pub(crate) fn load_params(
    cfg: &ModelConfig,
    ckpt: &mut Checkpoint,
    fmt: Format,
) -> Result<Weights> {
    let mut p = load_table(cfg, ckpt, fmt, GLOBAL, BLOCK, &[])?;
    if fmt == Format::Hf {
        for (k, t) in p.iter_mut() {
            if k.contains("norm") || k.contains("ln") {
                *t = (t.clone() + 1.0)?;
            }
        }
    }
    Ok(p)
}

/// The HF names and tensors of a Gemma 3 model's canonical `params` (norm factors back to HF's
/// `w` of `1 + w`), as `Gemma3ForCausalLM` loads them (`model.` prefix, tied `lm_head`).
pub(crate) fn hf_tensors(cfg: &ModelConfig, params: &Weights) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut put = |n: &Name, layer: Option<usize>| -> Result<()> {
        let (canonical, hf) = match layer {
            Some(l) => (
                format!("blocks.{l}.{}", n.canonical),
                format!("model.layers.{l}.{}", n.hf),
            ),
            None => (n.canonical.to_string(), format!("model.{}", n.hf)),
        };
        let t = params
            .get(&canonical)
            .ok_or_else(|| Error::invalid("params", format!("no `{canonical}`")))?
            .detach();
        let t = if canonical.contains("norm") || canonical.contains("ln") {
            (t - 1.0)?
        } else {
            t
        };
        out.push((hf, t.contiguous()?));
        Ok(())
    };
    for n in GLOBAL {
        put(n, None)?;
    }
    for l in 0..cfg.n_layers {
        for n in BLOCK {
            put(n, Some(l))?;
        }
    }
    Ok(out)
}

/// The `config.json` HF transformers reads as `Gemma3ForCausalLM` (`model_type` `gemma3_text`).
pub(crate) fn hf_config(cfg: &ModelConfig) -> serde_json::Value {
    let layer_types: Vec<&str> = cfg
        .layer_types
        .iter()
        .map(|t| match t {
            AttentionType::Full => "full_attention",
            AttentionType::Sliding => "sliding_attention",
        })
        .collect();
    serde_json::json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "torch_dtype": "float32",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh",
        // transformers 5 validates it as an integer.
        "query_pre_attn_scalar": (1.0 / (cfg.attn_scale * cfg.attn_scale)).round() as u64,
        // transformers 5 reads `rope_parameters`; 4.x reads the two flat keys.
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta},
        },
        "rope_theta": cfg.rope_theta,
        "rope_local_base_freq": cfg.local_rope_theta,
        "sliding_window": cfg.sliding_window,
        "layer_types": layer_types,
        "final_logit_softcapping": cfg.final_logit_softcap,
        "attn_logit_softcapping": null,
        "attention_bias": false,
        "tie_word_embeddings": true,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    })
}
