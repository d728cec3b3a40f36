//! Qwen2 (Qwen2.5-Coder): the Llama block with biases on the q/k/v projections, rotate-half
//! rotary (llama.cpp does not permute its q/k) and, for the larger sizes, a separate unembedding.

use super::{
    Name, check_no_gguf_rope_scaling, check_no_rope_scaling, gguf_base, hf_add_bos, hf_base,
    load_table, name,
};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Format, GgufMeta, HfConfig, Weights};

const GLOBAL: &[Name] = &[
    name("embed.weight", "token_embd.weight", "embed_tokens.weight"),
    name("ln_final.weight", "output_norm.weight", "norm.weight"),
    name("unembed.weight", "output.weight", "lm_head.weight"),
];

const BLOCK: &[Name] = &[
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

pub(crate) fn config_from_gguf(meta: &GgufMeta, ckpt: &Checkpoint) -> Result<ModelConfig> {
    check_no_gguf_rope_scaling(meta, "qwen2")?;
    let mut cfg = gguf_base(meta, ckpt, Architecture::Qwen2)?;
    cfg.add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(false);
    Ok(cfg)
}

pub(crate) fn config_from_hf(hf: &HfConfig, ckpt: &Checkpoint) -> Result<ModelConfig> {
    check_no_rope_scaling(hf)?;
    if hf.opt_bool("use_sliding_window") == Some(true) {
        return Err(Error::metadata(
            &hf.path,
            "use_sliding_window",
            "Qwen2's per-layer sliding window is not implemented",
        ));
    }
    let mut cfg = hf_base(hf, ckpt, Architecture::Qwen2)?;
    cfg.add_bos = hf_add_bos(&ckpt.path).unwrap_or(false);
    Ok(cfg)
}

pub(crate) fn load_params(
    cfg: &ModelConfig,
    ckpt: &mut Checkpoint,
    fmt: Format,
) -> Result<Weights> {
    load_table(cfg, ckpt, fmt, GLOBAL, BLOCK, &["unembed.weight"])
}
