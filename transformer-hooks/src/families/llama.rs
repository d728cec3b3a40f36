//! Llama (SmolLM2): pre-norm RMSNorm blocks, SwiGLU MLP, rotary, grouped-query attention
//! ([Touvron et al. 2023](https://arxiv.org/abs/2302.13971)).
//!
//! llama.cpp's converter permutes the rows of `attn_q`/`attn_k` so that its interleaved rotary
//! (pairs `2i, 2i+1`) reproduces HF's rotate-half rotary (pairs `i, i + d_head/2`). We undo the
//! permutation on load and use rotate-half, so `attn.hook_q`/`hook_k` hold the same numbers
//! whether the model came from a GGUF file or an HF folder.

use candle_core::Tensor;

use super::{
    Name, check_no_gguf_rope_scaling, check_no_rope_scaling, gguf_base, hf_add_bos, hf_base,
    load_table, name,
};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;
use crate::weights::{Checkpoint, Format, GgufMeta, HfConfig, Weights};

pub(super) const GLOBAL: &[Name] = &[
    name("embed.weight", "token_embd.weight", "embed_tokens.weight"),
    name("ln_final.weight", "output_norm.weight", "norm.weight"),
    name("unembed.weight", "output.weight", "lm_head.weight"),
];

pub(super) const BLOCK: &[Name] = &[
    name("ln1.weight", "attn_norm.weight", "input_layernorm.weight"),
    name("attn.q.weight", "attn_q.weight", "self_attn.q_proj.weight"),
    name("attn.q.bias", "attn_q.bias", "self_attn.q_proj.bias"),
    name("attn.k.weight", "attn_k.weight", "self_attn.k_proj.weight"),
    name("attn.k.bias", "attn_k.bias", "self_attn.k_proj.bias"),
    name("attn.v.weight", "attn_v.weight", "self_attn.v_proj.weight"),
    name("attn.v.bias", "attn_v.bias", "self_attn.v_proj.bias"),
    name(
        "attn.o.weight",
        "attn_output.weight",
        "self_attn.o_proj.weight",
    ),
    name(
        "ln2.weight",
        "ffn_norm.weight",
        "post_attention_layernorm.weight",
    ),
    name("mlp.gate.weight", "ffn_gate.weight", "mlp.gate_proj.weight"),
    name("mlp.up.weight", "ffn_up.weight", "mlp.up_proj.weight"),
    name("mlp.down.weight", "ffn_down.weight", "mlp.down_proj.weight"),
];

const OPTIONAL: &[&str] = &[
    "unembed.weight",
    "attn.q.bias",
    "attn.k.bias",
    "attn.v.bias",
];

pub(crate) fn config_from_gguf(meta: &GgufMeta, ckpt: &Checkpoint) -> Result<ModelConfig> {
    check_no_gguf_rope_scaling(meta, "llama")?;
    gguf_base(meta, ckpt, Architecture::Llama)
}

pub(crate) fn config_from_hf(hf: &HfConfig, ckpt: &Checkpoint) -> Result<ModelConfig> {
    check_no_rope_scaling(hf)?;
    let mut cfg = hf_base(hf, ckpt, Architecture::Llama)?;
    cfg.norm_eps = hf.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
    cfg.add_bos = hf_add_bos(&ckpt.path).unwrap_or(true);
    Ok(cfg)
}

pub(crate) fn load_params(
    cfg: &ModelConfig,
    ckpt: &mut Checkpoint,
    fmt: Format,
) -> Result<Weights> {
    let mut p = load_table(cfg, ckpt, fmt, GLOBAL, BLOCK, OPTIONAL)?;
    if fmt == Format::Gguf {
        for l in 0..cfg.n_layers {
            for (which, heads) in [("q", cfg.n_heads), ("k", cfg.n_kv_heads)] {
                for part in ["weight", "bias"] {
                    let key = format!("blocks.{l}.attn.{which}.{part}");
                    if let Some(t) = p.get(&key) {
                        let t = unpermute(t, heads)?;
                        p.insert(key, t);
                    }
                }
            }
        }
    }
    Ok(p)
}

/// Inverse of llama.cpp's `permute`: within each head, rows `(j, t)` (j < d_head/2, t < 2) go
/// back to `(t, j)`.
pub(crate) fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let d_head = dims[0] / heads;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut split = vec![heads, d_head / 2, 2];
    split.extend(&rest);
    Ok(w.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}
