//! Each family's GGUF loader, checked by writing a model out the way llama.cpp lays it out
//! (Llama's permuted q/k, Gemma's `1 + w` norms, GPT-2's fused q/k/v, Qwen2's biases) and reading
//! it back: the logits must equal those of the same weights loaded from the HF folder, which
//! `hf_tiny.rs` checks against HF transformers.

mod common;

use candle_core::quantized::GgmlDType;
use common::*;
use transformer_hooks::{AttentionType, Hooks, Model};

fn roundtrip(key: &str) {
    let hf = tiny(key);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(format!("{key}.gguf"));
    write_gguf(&hf, &path, GgmlDType::F32, |_, _| {});
    let gguf = Model::load(&path, &candle_core::Device::Cpu).unwrap();
    let cfg = gguf.config();
    assert_eq!(cfg.arch, hf.config().arch);
    assert_eq!(
        (
            cfg.n_layers,
            cfg.d_model,
            cfg.d_mlp,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.d_head
        ),
        (
            hf.config().n_layers,
            hf.config().d_model,
            hf.config().d_mlp,
            hf.config().n_heads,
            hf.config().n_kv_heads,
            hf.config().d_head
        )
    );
    assert_eq!(cfg.tied_embeddings, hf.config().tied_embeddings);
    // llama.cpp fixes Gemma 3's local/global pattern (every sixth layer global); compare against
    // the HF weights run with that pattern.
    let reference = if key == "gemma3" {
        assert!(cfg.layer_types.iter().all(|t| *t == AttentionType::Sliding));
        let mut c = hf.config().clone();
        c.layer_types = cfg.layer_types.clone();
        Model::from_params(c, hf.params().clone(), None).unwrap()
    } else {
        hf
    };
    let toks = some_tokens(2, 9, cfg.vocab_size);
    let a = gguf
        .forward(&toks, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let b = reference
        .forward(&toks, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let d = max_abs(&a, &b);
    assert!(d < 1e-5, "{key}: GGUF and HF loads differ by {d}");
    // Same hook values too (Llama's un-permuted q must equal HF's q).
    let h = gguf.hook_point("blocks.1.attn.hook_q").unwrap();
    let qa = gguf.run_with_cache(&toks, &[h]).unwrap();
    let qb = reference.run_with_cache(&toks, &[h]).unwrap();
    assert!(
        max_abs(qa.require(h).unwrap(), qb.require(h).unwrap()) < 1e-5,
        "{key}: hook_q differs"
    );
}

#[test]
fn llama_gguf_unpermutes_q_k() {
    roundtrip("llama");
}

#[test]
fn gemma3_gguf_norms_already_include_one() {
    roundtrip("gemma3");
}

#[test]
fn qwen2_gguf_with_biases_and_untied_unembedding() {
    roundtrip("qwen2");
}

#[test]
fn gpt2_gguf_splits_fused_qkv() {
    roundtrip("gpt2");
}

/// A quantized file dequantizes to what candle's own quantizer round-trips to.
#[test]
fn q8_0_weights_dequantize() {
    let hf = tiny("llama");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q8.gguf");
    write_gguf(&hf, &path, GgmlDType::Q8_0, |_, _| {});
    let q = Model::load(&path, &candle_core::Device::Cpu).unwrap();
    let w = &q.params()["blocks.0.mlp.up.weight"];
    let orig = &hf.params()["blocks.0.mlp.up.weight"];
    let d = max_abs(w, orig);
    // Q8_0 keeps ~8 bits per weight: close, but not equal.
    assert!(d > 0.0 && d < 0.05, "Q8_0 round trip error {d}");
}
