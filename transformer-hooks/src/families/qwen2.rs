//! Qwen2 (Qwen2.5-Coder): the Llama block with biases on the q/k/v projections, rotate-half
//! rotary (llama.cpp does not permute its q/k) and, for the larger sizes, a separate unembedding.

// The Llama block's tensors, under the same names (q/k/v biases, optional there, are
// required here).
use super::llama::{BLOCK, GLOBAL};
use super::{
    check_no_gguf_rope_scaling, check_no_rope_scaling, gguf_base, hf_add_bos, hf_base, load_table,
};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Format, GgufMeta, HfConfig, Weights};

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
