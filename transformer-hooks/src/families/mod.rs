//! One file per model family. Each only reads its config, names its tensors in each file format
//! and fixes up layouts; the forward pass they all share is in [`crate::layers`].
//!
//! Canonical parameter names (what [`crate::Model::params`] holds), linear weights as
//! `[out, in]`:
//!
//! | name | shape |
//! |---|---|
//! | `embed.weight` | `[vocab, d_model]` |
//! | `pos_embed.weight` | `[n_ctx, d_model]` (GPT-2) |
//! | `blocks.{L}.ln1.weight` / `.bias` | `[d_model]` |
//! | `blocks.{L}.attn.q.weight` / `.bias` | `[n_heads * d_head, d_model]` / `[n_heads * d_head]` |
//! | `blocks.{L}.attn.k.weight`, `attn.v.weight` / `.bias` | `[n_kv_heads * d_head, d_model]` |
//! | `blocks.{L}.attn.o.weight` / `.bias` | `[d_model, n_heads * d_head]` |
//! | `blocks.{L}.attn.q_norm.weight`, `attn.k_norm.weight` | `[d_head]` (Gemma 3) |
//! | `blocks.{L}.ln1_post.weight`, `ln2_post.weight` | `[d_model]` (Gemma 3) |
//! | `blocks.{L}.ln2.weight` / `.bias` | `[d_model]` |
//! | `blocks.{L}.mlp.gate.weight` | `[d_mlp, d_model]` (gated MLPs) |
//! | `blocks.{L}.mlp.up.weight` / `.bias` | `[d_mlp, d_model]` |
//! | `blocks.{L}.mlp.down.weight` / `.bias` | `[d_model, d_mlp]` |
//! | `ln_final.weight` / `.bias` | `[d_model]` |
//! | `unembed.weight` | `[vocab, d_model]` (absent when tied to `embed.weight`) |
//!
//! Norm weights are the factor actually applied (Gemma's HF `w` is stored as `1 + w`).

pub(crate) mod gemma3;
pub(crate) mod gpt2;
pub(crate) mod llama;
pub(crate) mod qwen2;

use crate::config::{Activation, Architecture, AttentionType, ModelConfig, NormKind, RopeLayout};
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Format, GgufMeta, HfConfig, Weights};

/// A tensor's canonical name (relative to `blocks.{L}.` for block tensors) and its names in GGUF
/// (relative to `blk.{L}.`) and in HF files (relative to the text model's prefix, `model.` or
/// `model.language_model.`, and `layers.{L}.`).
pub(crate) struct Name {
    pub canonical: &'static str,
    pub gguf: &'static str,
    pub hf: &'static str,
}

pub(crate) const fn name(canonical: &'static str, gguf: &'static str, hf: &'static str) -> Name {
    Name {
        canonical,
        gguf,
        hf,
    }
}

/// The architecture named in a GGUF file, with its config.
pub(crate) fn config_from_gguf(meta: &GgufMeta, ckpt: &Checkpoint) -> Result<ModelConfig> {
    let cfg = match ckpt.arch.as_str() {
        "llama" => llama::config_from_gguf(meta, ckpt)?,
        "gemma3" => gemma3::config_from_gguf(meta, ckpt)?,
        "qwen2" => qwen2::config_from_gguf(meta, ckpt)?,
        "gpt2" => gpt2::config_from_gguf(meta, ckpt)?,
        other => {
            return Err(Error::UnsupportedArchitecture {
                path: ckpt.path.clone(),
                arch: other.to_string(),
                supported: Architecture::SUPPORTED,
            });
        }
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The architecture named by an HF `config.json` (`model_type`, else `architectures[0]`).
pub(crate) fn hf_architecture(hf: &HfConfig) -> Result<(Architecture, String)> {
    let text = hf.text();
    let model_type = text
        .opt_str("model_type")
        .or_else(|| hf.opt_str("model_type"))
        .map(str::to_string)
        .or_else(|| {
            hf.value("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
                .map(str::to_string)
        })
        .ok_or_else(|| Error::metadata(&hf.path, "model_type", "missing"))?;
    let arch = match model_type.as_str() {
        "llama" | "LlamaForCausalLM" => Architecture::Llama,
        "gemma3" | "gemma3_text" | "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => {
            Architecture::Gemma3
        }
        "qwen2" | "Qwen2ForCausalLM" => Architecture::Qwen2,
        "gpt2" | "GPT2LMHeadModel" | "GPT2Model" => Architecture::Gpt2,
        _ => {
            return Err(Error::UnsupportedArchitecture {
                path: hf.path.clone(),
                arch: model_type,
                supported: Architecture::SUPPORTED,
            });
        }
    };
    Ok((arch, model_type))
}

pub(crate) fn config_from_hf(
    arch: Architecture,
    hf: &HfConfig,
    ckpt: &Checkpoint,
) -> Result<ModelConfig> {
    let text = hf.text();
    let cfg = match arch {
        Architecture::Llama => llama::config_from_hf(&text, ckpt)?,
        Architecture::Gemma3 => gemma3::config_from_hf(&text, ckpt)?,
        Architecture::Qwen2 => qwen2::config_from_hf(&text, ckpt)?,
        Architecture::Gpt2 => gpt2::config_from_hf(&text, ckpt)?,
    };
    cfg.validate()?;
    Ok(cfg)
}

pub(crate) fn load_params(
    cfg: &ModelConfig,
    ckpt: &mut Checkpoint,
    fmt: Format,
) -> Result<Weights> {
    match cfg.arch {
        Architecture::Llama => llama::load_params(cfg, ckpt, fmt),
        Architecture::Gemma3 => gemma3::load_params(cfg, ckpt, fmt),
        Architecture::Qwen2 => qwen2::load_params(cfg, ckpt, fmt),
        Architecture::Gpt2 => gpt2::load_params(cfg, ckpt, fmt),
    }
}

/// The shape a canonical parameter must have.
pub(crate) fn expected_shape(cfg: &ModelConfig, canonical: &str) -> Vec<usize> {
    let d = cfg.d_model;
    let q = cfg.n_heads * cfg.d_head;
    let kv = cfg.n_kv_heads * cfg.d_head;
    let local = canonical
        .strip_prefix("blocks.")
        .and_then(|r| r.split_once('.'))
        .map_or(canonical, |(_, rest)| rest);
    match local {
        "embed.weight" | "unembed.weight" => vec![cfg.vocab_size, d],
        "pos_embed.weight" => vec![cfg.n_ctx, d],
        "attn.q.weight" => vec![q, d],
        "attn.q.bias" => vec![q],
        "attn.k.weight" | "attn.v.weight" => vec![kv, d],
        "attn.k.bias" | "attn.v.bias" => vec![kv],
        "attn.o.weight" => vec![d, q],
        "attn.q_norm.weight" | "attn.k_norm.weight" => vec![cfg.d_head],
        "mlp.gate.weight" | "mlp.up.weight" => vec![cfg.d_mlp, d],
        "mlp.up.bias" => vec![cfg.d_mlp],
        "mlp.down.weight" => vec![d, cfg.d_mlp],
        // norms, output biases
        _ => vec![d],
    }
}

/// The prefix of the text model's tensors in an HF checkpoint (`model.`, `model.language_model.`,
/// `language_model.model.`, or none), found from where `embed_tokens.weight` is.
pub(crate) fn hf_prefix(ckpt: &Checkpoint, embed: &str) -> Result<String> {
    let mut names = ckpt.names();
    names.sort();
    names
        .iter()
        .find_map(|n| n.strip_suffix(embed).map(str::to_string))
        .ok_or_else(|| Error::MissingTensor {
            path: ckpt.path.clone(),
            name: format!("model.{embed}"),
            arch: ckpt.arch.clone(),
        })
}

/// Loads the tensors of a table-driven family: `global` names once, `block` names per layer.
/// `optional` canonical names may be absent.
pub(crate) fn load_table(
    cfg: &ModelConfig,
    ckpt: &mut Checkpoint,
    fmt: Format,
    global: &[Name],
    block: &[Name],
    optional: &[&str],
) -> Result<Weights> {
    let prefix = match fmt {
        Format::Gguf => String::new(),
        Format::Hf => hf_prefix(ckpt, "embed_tokens.weight")?,
    };
    let file_name = |n: &Name, layer: Option<usize>| -> String {
        match (fmt, layer) {
            (Format::Gguf, None) => n.gguf.to_string(),
            (Format::Gguf, Some(l)) => format!("blk.{l}.{}", n.gguf),
            // `lm_head` sits beside the text model, not inside it.
            (Format::Hf, None) if n.hf == "lm_head.weight" => {
                let outer = prefix.strip_suffix("model.").unwrap_or("");
                format!("{outer}{}", n.hf)
            }
            (Format::Hf, None) => format!("{prefix}{}", n.hf),
            (Format::Hf, Some(l)) => format!("{prefix}layers.{l}.{}", n.hf),
        }
    };
    let mut params = Weights::new();
    let mut take = |n: &Name, layer: Option<usize>, params: &mut Weights| -> Result<()> {
        let canonical = match layer {
            Some(l) => format!("blocks.{l}.{}", n.canonical),
            None => n.canonical.to_string(),
        };
        let file = file_name(n, layer);
        if !ckpt.has(&file) && optional.contains(&n.canonical) {
            return Ok(());
        }
        let t = ckpt.load_shaped(&file, &expected_shape(cfg, &canonical))?;
        params.insert(canonical, t);
        Ok(())
    };
    for n in global {
        take(n, None, &mut params)?;
    }
    for l in 0..cfg.n_layers {
        for n in block {
            take(n, Some(l), &mut params)?;
        }
    }
    Ok(params)
}

/// Whether the checkpoint has a separate unembedding (else it is tied to the embedding).
pub(crate) fn has_unembed(ckpt: &Checkpoint, fmt: Format) -> bool {
    match fmt {
        Format::Gguf => ckpt.has("output.weight"),
        Format::Hf => ckpt.names().iter().any(|n| n.ends_with("lm_head.weight")),
    }
}

/// Rows of the token embedding, the most reliable vocabulary size.
pub(crate) fn embedding_rows(ckpt: &Checkpoint, name: &str) -> Result<usize> {
    ckpt.shape(name)
        .and_then(|s| s.first().copied())
        .ok_or_else(|| Error::MissingTensor {
            path: ckpt.path.clone(),
            name: name.to_string(),
            arch: ckpt.arch.clone(),
        })
}

/// HF's `rope_theta`, which transformers 5 moved into `rope_parameters`.
pub(crate) fn hf_rope_theta(hf: &HfConfig, section: Option<&str>) -> Result<Option<f64>> {
    if let Some(t) = hf.opt_f64("rope_theta")? {
        return Ok(Some(t));
    }
    let params = match (hf.value("rope_parameters"), section) {
        (Some(p), Some(s)) => p.get(s),
        (Some(p), None) => Some(p),
        _ => None,
    };
    Ok(params
        .and_then(|p| p.get("rope_theta"))
        .and_then(|v| v.as_f64()))
}

/// Refuses rotary scaling schemes this crate does not implement, rather than running them wrong.
pub(crate) fn check_no_rope_scaling(hf: &HfConfig) -> Result<()> {
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(v) = hf.value(key) else { continue };
        let mut kinds = Vec::new();
        let mut collect = |o: &serde_json::Value| {
            if let Some(t) = o
                .get("rope_type")
                .or_else(|| o.get("type"))
                .and_then(|t| t.as_str())
            {
                kinds.push(t.to_string());
            }
        };
        collect(v);
        if let Some(o) = v.as_object() {
            o.values().for_each(&mut collect);
        }
        if let Some(k) = kinds.iter().find(|k| k.as_str() != "default") {
            return Err(Error::metadata(
                &hf.path,
                key,
                format!("rotary scaling `{k}` is not implemented (only plain rotary is)"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn check_no_gguf_rope_scaling(meta: &GgufMeta, arch: &str) -> Result<()> {
    let key = format!("{arch}.rope.scaling.type");
    match meta.opt_str(&key) {
        None | Some("none") => Ok(()),
        Some(k) => Err(Error::metadata(
            &meta.path,
            key,
            format!("rotary scaling `{k}` is not implemented (only plain rotary is)"),
        )),
    }
}

/// The keys every llama.cpp architecture shares (`{arch}.block_count`, ...), with tokens and
/// defaults filled in; families then set what is their own.
pub(crate) fn gguf_base(
    meta: &GgufMeta,
    ckpt: &Checkpoint,
    arch: Architecture,
) -> Result<ModelConfig> {
    let a = arch.as_str();
    let key = |k: &str| format!("{a}.{k}");
    let n_heads = meta.usize(&key("attention.head_count"))?;
    let d_model = meta.usize(&key("embedding_length"))?;
    let d_head = match meta.opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None => d_model / n_heads.max(1),
    };
    let n_layers = meta.usize(&key("block_count"))?;
    check_sizes(
        ckpt,
        (&key("block_count"), n_layers),
        (&key("attention.head_count"), n_heads),
    )?;
    let eps = match meta.opt_f64(&key("attention.layer_norm_rms_epsilon"))? {
        Some(e) => e,
        None => meta
            .opt_f64(&key("attention.layer_norm_epsilon"))?
            .unwrap_or(1e-5),
    };
    let tokenizer_model = meta.opt_str("tokenizer.ggml.model").unwrap_or("");
    let rope_theta = meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    Ok(ModelConfig {
        arch,
        name: meta.opt_str("general.name").map(str::to_string),
        n_layers,
        d_model,
        d_mlp: meta.usize(&key("feed_forward_length"))?,
        n_heads,
        n_kv_heads: meta
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(n_heads),
        d_head,
        vocab_size: embedding_rows(ckpt, "token_embd.weight")?,
        n_ctx: meta.opt_usize(&key("context_length"))?.unwrap_or(2048),
        norm: NormKind::RmsNorm,
        norm_eps: eps,
        act: Activation::Silu,
        gated_mlp: true,
        learned_positions: false,
        rope_layout: RopeLayout::Half,
        rope_theta,
        local_rope_theta: rope_theta,
        sliding_window: None,
        layer_types: vec![AttentionType::Full; n_layers],
        attn_scale: 1.0 / (d_head as f64).sqrt(),
        qk_norm: false,
        sandwich_norms: false,
        embed_scale: None,
        tied_embeddings: !has_unembed(ckpt, Format::Gguf),
        final_logit_softcap: None,
        bos_token_id: meta.opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_token_id: meta.opt_u32("tokenizer.ggml.eos_token_id")?,
        pad_token_id: meta.opt_u32("tokenizer.ggml.padding_token_id")?,
        // llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        add_bos: meta
            .opt_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(tokenizer_model == "llama"),
    })
}

/// Sizes read from a file, checked before anything is allocated or divided by them: a layer
/// count can be no larger than the checkpoint's tensor count (every layer has weights), and a
/// head count must be positive. An HF folder whose config asks for 10^12 layers is then an error
/// naming the key instead of a 1 TB allocation.
pub(crate) fn check_sizes(
    ckpt: &Checkpoint,
    (layers_key, n_layers): (&str, usize),
    (heads_key, n_heads): (&str, usize),
) -> Result<()> {
    let tensors = ckpt.names().len();
    if n_layers == 0 || n_layers > tensors {
        return Err(Error::metadata(
            &ckpt.path,
            layers_key,
            format!("{n_layers} layers, but the checkpoint holds {tensors} tensors"),
        ));
    }
    if n_heads == 0 {
        return Err(Error::metadata(&ckpt.path, heads_key, "0 attention heads"));
    }
    Ok(())
}

/// The keys HF's Llama-like configs share, with defaults; families then set what is their own.
pub(crate) fn hf_base(hf: &HfConfig, ckpt: &Checkpoint, arch: Architecture) -> Result<ModelConfig> {
    let n_heads = hf.usize("num_attention_heads")?;
    let d_model = hf.usize("hidden_size")?;
    let d_head = hf
        .opt_usize("head_dim")?
        .unwrap_or(d_model / n_heads.max(1));
    let n_layers = hf.usize("num_hidden_layers")?;
    check_sizes(
        ckpt,
        ("num_hidden_layers", n_layers),
        ("num_attention_heads", n_heads),
    )?;
    let rope_theta = hf_rope_theta(hf, None)?.unwrap_or(10_000.0);
    let prefix = hf_prefix(ckpt, "embed_tokens.weight")?;
    let vocab_size = embedding_rows(ckpt, &format!("{prefix}embed_tokens.weight"))?;
    Ok(ModelConfig {
        arch,
        name: hf.opt_str("_name_or_path").map(str::to_string),
        n_layers,
        d_model,
        d_mlp: hf.usize("intermediate_size")?,
        n_heads,
        n_kv_heads: hf.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
        d_head,
        vocab_size,
        n_ctx: hf.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        norm: NormKind::RmsNorm,
        norm_eps: hf.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        act: Activation::Silu,
        gated_mlp: true,
        learned_positions: false,
        rope_layout: RopeLayout::Half,
        rope_theta,
        local_rope_theta: rope_theta,
        sliding_window: None,
        layer_types: vec![AttentionType::Full; n_layers],
        attn_scale: 1.0 / (d_head as f64).sqrt(),
        qk_norm: false,
        sandwich_norms: false,
        embed_scale: None,
        tied_embeddings: !has_unembed(ckpt, Format::Hf),
        final_logit_softcap: None,
        bos_token_id: hf.opt_token("bos_token_id"),
        eos_token_id: hf.opt_token("eos_token_id"),
        pad_token_id: hf.opt_token("pad_token_id"),
        add_bos: false,
    })
}

/// Reads `add_bos_token` from the `tokenizer_config.json` beside an HF checkpoint, if any.
pub(crate) fn hf_add_bos(dir: &std::path::Path) -> Option<bool> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("add_bos_token")?.as_bool()
}
