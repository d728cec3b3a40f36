//! GPT-2 ([Radford et al. 2019](https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf)):
//! pre-norm LayerNorm blocks, a GELU (tanh) MLP, learned absolute positions, biases everywhere,
//! tied unembedding. The model most public SAEs were trained on.
//!
//! HF stores its linear layers as `Conv1D`, `[in, out]`, with q/k/v fused into `c_attn`; llama.cpp
//! fuses them into `attn_qkv` as `[out, in]`. Both are split and laid out as `[out, in]` on load.

use candle_core::Tensor;

use super::{embedding_rows, has_unembed};
use crate::config::{Activation, Architecture, AttentionType, ModelConfig, NormKind, RopeLayout};
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Format, GgufMeta, HfConfig, Weights};

fn base(
    n_layers: usize,
    d_model: usize,
    d_mlp: usize,
    n_heads: usize,
    vocab_size: usize,
    n_ctx: usize,
) -> ModelConfig {
    let d_head = d_model / n_heads.max(1);
    ModelConfig {
        arch: Architecture::Gpt2,
        name: None,
        n_layers,
        d_model,
        d_mlp,
        n_heads,
        n_kv_heads: n_heads,
        d_head,
        vocab_size,
        n_ctx,
        norm: NormKind::LayerNorm,
        norm_eps: 1e-5,
        act: Activation::GeluTanh,
        gated_mlp: false,
        learned_positions: true,
        rope_layout: RopeLayout::Half,
        rope_theta: 10_000.0,
        local_rope_theta: 10_000.0,
        sliding_window: None,
        layer_types: vec![AttentionType::Full; n_layers],
        attn_scale: 1.0 / (d_head as f64).sqrt(),
        qk_norm: false,
        sandwich_norms: false,
        embed_scale: None,
        tied_embeddings: true,
        final_logit_softcap: None,
        bos_token_id: Some(50256),
        eos_token_id: Some(50256),
        pad_token_id: None,
        add_bos: false,
    }
}

pub(crate) fn config_from_gguf(meta: &GgufMeta, ckpt: &Checkpoint) -> Result<ModelConfig> {
    let d_model = meta.usize("gpt2.embedding_length")?;
    let (n_layers, n_heads) = (
        meta.usize("gpt2.block_count")?,
        meta.usize("gpt2.attention.head_count")?,
    );
    super::check_sizes(
        ckpt,
        ("gpt2.block_count", n_layers),
        ("gpt2.attention.head_count", n_heads),
    )?;
    let mut cfg = base(
        n_layers,
        d_model,
        meta.opt_usize("gpt2.feed_forward_length")?
            .unwrap_or(d_model.saturating_mul(4)),
        n_heads,
        embedding_rows(ckpt, "token_embd.weight")?,
        embedding_rows(ckpt, "position_embd.weight")?,
    );
    cfg.name = meta.opt_str("general.name").map(str::to_string);
    cfg.norm_eps = meta
        .opt_f64("gpt2.attention.layer_norm_epsilon")?
        .unwrap_or(1e-5);
    cfg.tied_embeddings = !has_unembed(ckpt, Format::Gguf);
    cfg.bos_token_id = meta
        .opt_u32("tokenizer.ggml.bos_token_id")?
        .or(cfg.bos_token_id);
    cfg.eos_token_id = meta
        .opt_u32("tokenizer.ggml.eos_token_id")?
        .or(cfg.eos_token_id);
    cfg.add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(false);
    Ok(cfg)
}

fn hf_prefix(ckpt: &Checkpoint) -> Result<String> {
    super::hf_prefix(ckpt, "wte.weight")
}

pub(crate) fn config_from_hf(hf: &HfConfig, ckpt: &Checkpoint) -> Result<ModelConfig> {
    let d_model = hf.usize("n_embd")?;
    let prefix = hf_prefix(ckpt)?;
    let (n_layers, n_heads) = (hf.usize("n_layer")?, hf.usize("n_head")?);
    super::check_sizes(ckpt, ("n_layer", n_layers), ("n_head", n_heads))?;
    let mut cfg = base(
        n_layers,
        d_model,
        hf.opt_usize("n_inner")?
            .unwrap_or(d_model.saturating_mul(4)),
        n_heads,
        embedding_rows(ckpt, &format!("{prefix}wte.weight"))?,
        embedding_rows(ckpt, &format!("{prefix}wpe.weight"))?,
    );
    cfg.name = hf.opt_str("_name_or_path").map(str::to_string);
    cfg.norm_eps = hf.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5);
    cfg.act = match hf.opt_str("activation_function").unwrap_or("gelu_new") {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "gelu" => Activation::GeluErf,
        other => {
            return Err(Error::metadata(
                &hf.path,
                "activation_function",
                format!("`{other}` is not implemented (gelu_new, gelu)"),
            ));
        }
    };
    if hf.opt_bool("scale_attn_by_inverse_layer_idx") == Some(true) {
        return Err(Error::metadata(
            &hf.path,
            "scale_attn_by_inverse_layer_idx",
            "not implemented",
        ));
    }
    if hf.opt_bool("scale_attn_weights") == Some(false) {
        cfg.attn_scale = 1.0;
    }
    cfg.tied_embeddings = !has_unembed(ckpt, Format::Hf);
    cfg.bos_token_id = hf.opt_token("bos_token_id").or(cfg.bos_token_id);
    cfg.eos_token_id = hf.opt_token("eos_token_id").or(cfg.eos_token_id);
    Ok(cfg)
}

/// (canonical name, name in the file, shape in the file).
type FileTensor = (&'static str, String, Vec<usize>);

pub(crate) fn load_params(
    cfg: &ModelConfig,
    ckpt: &mut Checkpoint,
    fmt: Format,
) -> Result<Weights> {
    let d = cfg.d_model;
    let f = cfg.d_mlp;
    let mut p = Weights::new();
    // (canonical, file name, file shape, stored as [in, out] (HF Conv1D))
    let (globals, prefix) = match fmt {
        Format::Gguf => (
            vec![
                ("embed.weight", "token_embd.weight".to_string()),
                ("pos_embed.weight", "position_embd.weight".to_string()),
                ("ln_final.weight", "output_norm.weight".to_string()),
                ("ln_final.bias", "output_norm.bias".to_string()),
            ],
            String::new(),
        ),
        Format::Hf => {
            let pre = hf_prefix(ckpt)?;
            (
                vec![
                    ("embed.weight", format!("{pre}wte.weight")),
                    ("pos_embed.weight", format!("{pre}wpe.weight")),
                    ("ln_final.weight", format!("{pre}ln_f.weight")),
                    ("ln_final.bias", format!("{pre}ln_f.bias")),
                ],
                pre,
            )
        }
    };
    for (canonical, file) in globals {
        let shape = super::expected_shape(cfg, canonical);
        p.insert(canonical.to_string(), ckpt.load_shaped(&file, &shape)?);
    }
    if !cfg.tied_embeddings {
        let file = match fmt {
            Format::Gguf => "output.weight".to_string(),
            Format::Hf => "lm_head.weight".to_string(),
        };
        p.insert(
            "unembed.weight".into(),
            ckpt.load_shaped(&file, &[cfg.vocab_size, d])?,
        );
    }
    for l in 0..cfg.n_layers {
        let (names, conv1d): (Vec<FileTensor>, bool) = match fmt {
            Format::Gguf => {
                let b = |s: &str| format!("blk.{l}.{s}");
                (
                    vec![
                        ("ln1.weight", b("attn_norm.weight"), vec![d]),
                        ("ln1.bias", b("attn_norm.bias"), vec![d]),
                        ("qkv.weight", b("attn_qkv.weight"), vec![3 * d, d]),
                        ("qkv.bias", b("attn_qkv.bias"), vec![3 * d]),
                        ("attn.o.weight", b("attn_output.weight"), vec![d, d]),
                        ("attn.o.bias", b("attn_output.bias"), vec![d]),
                        ("ln2.weight", b("ffn_norm.weight"), vec![d]),
                        ("ln2.bias", b("ffn_norm.bias"), vec![d]),
                        ("mlp.up.weight", b("ffn_up.weight"), vec![f, d]),
                        ("mlp.up.bias", b("ffn_up.bias"), vec![f]),
                        ("mlp.down.weight", b("ffn_down.weight"), vec![d, f]),
                        ("mlp.down.bias", b("ffn_down.bias"), vec![d]),
                    ],
                    false,
                )
            }
            Format::Hf => {
                let b = |s: &str| format!("{prefix}h.{l}.{s}");
                (
                    vec![
                        ("ln1.weight", b("ln_1.weight"), vec![d]),
                        ("ln1.bias", b("ln_1.bias"), vec![d]),
                        ("qkv.weight", b("attn.c_attn.weight"), vec![d, 3 * d]),
                        ("qkv.bias", b("attn.c_attn.bias"), vec![3 * d]),
                        ("attn.o.weight", b("attn.c_proj.weight"), vec![d, d]),
                        ("attn.o.bias", b("attn.c_proj.bias"), vec![d]),
                        ("ln2.weight", b("ln_2.weight"), vec![d]),
                        ("ln2.bias", b("ln_2.bias"), vec![d]),
                        ("mlp.up.weight", b("mlp.c_fc.weight"), vec![d, f]),
                        ("mlp.up.bias", b("mlp.c_fc.bias"), vec![f]),
                        ("mlp.down.weight", b("mlp.c_proj.weight"), vec![f, d]),
                        ("mlp.down.bias", b("mlp.c_proj.bias"), vec![d]),
                    ],
                    true,
                )
            }
        };
        for (canonical, file, shape) in names {
            let mut t = ckpt.load_shaped(&file, &shape)?;
            if conv1d && canonical.ends_with(".weight") && t.rank() == 2 {
                t = t.t()?.contiguous()?;
            }
            if let Some(part) = canonical.strip_prefix("qkv.") {
                for (i, which) in ["q", "k", "v"].iter().enumerate() {
                    let piece: Tensor = t.narrow(0, i * d, d)?.contiguous()?;
                    p.insert(format!("blocks.{l}.attn.{which}.{part}"), piece);
                }
            } else {
                p.insert(format!("blocks.{l}.{canonical}"), t);
            }
        }
    }
    Ok(p)
}
