//! Shared helpers: the tiny HF checkpoints of `tests/fixtures/tiny`, and writing a model back out
//! as a GGUF file the way llama.cpp lays it out.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use transformer_hooks::{Architecture, Model};

pub fn tiny_dir(key: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(key)
}

/// A tiny random model of family `key` (gpt2, llama, qwen2, gemma3), loaded from its HF folder.
pub fn tiny(key: &str) -> Model {
    Model::load(&tiny_dir(key), &Device::Cpu).unwrap()
}

/// `[rows, len]` u32 tokens.
pub fn tokens(rows: &[&[u32]]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

/// A deterministic `[batch, len]` token tensor below `vocab`.
pub fn some_tokens(batch: usize, len: usize, vocab: usize) -> Tensor {
    let flat: Vec<u32> = (0..batch * len)
        .map(|i| ((i * 37 + 11) % vocab) as u32)
        .collect();
    Tensor::from_vec(flat, (batch, len), &Device::Cpu).unwrap()
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// llama.cpp's `permute` of q/k rows for its interleaved rotary.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let dh = dims[0] / heads;
    let mut split = vec![heads, 2, dh / 2];
    split.extend(&dims[1..]);
    w.reshape(split)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

/// The GGUF tensor name and data of one canonical parameter (llama.cpp's layout), or `None` when
/// llama.cpp stores it differently (GPT-2's fused q/k/v).
fn gguf_name(canonical: &str) -> String {
    let map = [
        ("embed.weight", "token_embd.weight"),
        ("pos_embed.weight", "position_embd.weight"),
        ("unembed.weight", "output.weight"),
        ("ln_final.weight", "output_norm.weight"),
        ("ln_final.bias", "output_norm.bias"),
    ];
    if let Some((_, g)) = map.iter().find(|(c, _)| *c == canonical) {
        return g.to_string();
    }
    let rest = canonical.strip_prefix("blocks.").unwrap();
    let (layer, local) = rest.split_once('.').unwrap();
    let local = match local {
        "ln1.weight" => "attn_norm.weight",
        "ln1.bias" => "attn_norm.bias",
        "attn.q.weight" => "attn_q.weight",
        "attn.q.bias" => "attn_q.bias",
        "attn.k.weight" => "attn_k.weight",
        "attn.k.bias" => "attn_k.bias",
        "attn.v.weight" => "attn_v.weight",
        "attn.v.bias" => "attn_v.bias",
        "attn.o.weight" => "attn_output.weight",
        "attn.o.bias" => "attn_output.bias",
        "attn.q_norm.weight" => "attn_q_norm.weight",
        "attn.k_norm.weight" => "attn_k_norm.weight",
        "ln1_post.weight" => "post_attention_norm.weight",
        "ln2.weight" => "ffn_norm.weight",
        "ln2.bias" => "ffn_norm.bias",
        "mlp.gate.weight" => "ffn_gate.weight",
        "mlp.up.weight" => "ffn_up.weight",
        "mlp.up.bias" => "ffn_up.bias",
        "mlp.down.weight" => "ffn_down.weight",
        "mlp.down.bias" => "ffn_down.bias",
        "ln2_post.weight" => "post_ffw_norm.weight",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{local}")
}

/// Writes `model` as llama.cpp would: its names, Llama's permuted q/k, GPT-2's fused q/k/v,
/// weights stored as `dtype` (F32, or a quantized type for matrices whose rows allow it).
/// `edit` may drop or change entries before writing (for bad-input tests).
pub fn write_gguf(
    model: &Model,
    path: &Path,
    dtype: GgmlDType,
    edit: impl FnOnce(&mut Vec<(String, gguf_file::Value)>, &mut Vec<(String, Tensor)>),
) {
    let cfg = model.config();
    let arch = cfg.arch.as_str();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in model.params() {
        let mut t = t.clone();
        if cfg.arch == Architecture::Llama {
            if name.ends_with("attn.q.weight") {
                t = permute(&t, cfg.n_heads);
            } else if name.ends_with("attn.k.weight") {
                t = permute(&t, cfg.n_kv_heads);
            }
        }
        if cfg.arch == Architecture::Gpt2
            && (name.contains("attn.q.") || name.contains("attn.k.") || name.contains("attn.v."))
        {
            continue;
        }
        tensors.push((gguf_name(name), t));
    }
    if cfg.arch == Architecture::Gpt2 {
        for l in 0..cfg.n_layers {
            for part in ["weight", "bias"] {
                let get = |w: &str| model.params()[&format!("blocks.{l}.attn.{w}.{part}")].clone();
                let qkv = Tensor::cat(&[get("q"), get("k"), get("v")], 0).unwrap();
                tensors.push((format!("blk.{l}.attn_qkv.{part}"), qkv));
            }
        }
    }
    use gguf_file::Value as V;
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.name".into(), V::String(format!("tiny-{arch}"))),
        (key("block_count"), V::U32(cfg.n_layers as u32)),
        (key("embedding_length"), V::U32(cfg.d_model as u32)),
        (key("feed_forward_length"), V::U32(cfg.d_mlp as u32)),
        (key("attention.head_count"), V::U32(cfg.n_heads as u32)),
        (
            key("attention.head_count_kv"),
            V::U32(cfg.n_kv_heads as u32),
        ),
        (key("context_length"), V::U32(cfg.n_ctx as u32)),
        (key("rope.freq_base"), V::F32(cfg.rope_theta as f32)),
    ];
    if cfg.arch == Architecture::Gpt2 {
        meta.push((
            key("attention.layer_norm_epsilon"),
            V::F32(cfg.norm_eps as f32),
        ));
    } else {
        meta.push((
            key("attention.layer_norm_rms_epsilon"),
            V::F32(cfg.norm_eps as f32),
        ));
    }
    if cfg.arch == Architecture::Gemma3 {
        meta.push((key("attention.key_length"), V::U32(cfg.d_head as u32)));
        meta.push((key("attention.value_length"), V::U32(cfg.d_head as u32)));
        meta.push((
            key("attention.sliding_window"),
            V::U32(cfg.sliding_window.unwrap() as u32),
        ));
    }
    edit(&mut meta, &mut tensors);
    let qtensors: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let cols = *t.dims().last().unwrap();
            let ty = if t.rank() == 2 && cols % dtype.block_size() == 0 {
                dtype
            } else {
                GgmlDType::F32
            };
            (n.clone(), QTensor::quantize(t, ty).unwrap())
        })
        .collect();
    let mut f = std::fs::File::create(path).unwrap();
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
}
