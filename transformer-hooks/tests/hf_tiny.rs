//! Tiny random checkpoints of every family, saved by HF transformers in its own layout
//! (`config.json` + `model.safetensors`), against HF's own forward pass on them
//! (`scripts/hf_tiny_reference.py`). This is where GPT-2 and Qwen2 are checked without real
//! weights, and where the HF-folder loaders (Gemma's `1 + w` norms, GPT-2's Conv1D layout,
//! untied unembeddings, Gemma's sliding window) are checked for every family.

mod common;

use candle_core::{Device, Tensor};
use serde::Deserialize;
use transformer_hooks::{Architecture, HookPoint, Hooks, Model};

#[derive(Deserialize)]
struct Reference {
    ids: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f32>>>,
    resid_pre: Vec<Vec<Vec<Vec<f32>>>>,
    padded_ids: Vec<Vec<u32>>,
    padded_mask: Vec<Vec<u32>>,
    padded_logits: Vec<Vec<Vec<f32>>>,
}

fn dir(key: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(key)
}

fn reference(key: &str) -> Reference {
    let text = std::fs::read_to_string(dir(key).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tensor2(rows: &[Vec<u32>]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn max_abs_diff(ours: &Tensor, theirs: &[Vec<Vec<f32>>]) -> f32 {
    let ours: Vec<Vec<Vec<f32>>> = ours.to_vec3().unwrap();
    let mut m = 0f32;
    for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
        for (x, y) in a.iter().zip(b) {
            m = m.max((x - y).abs());
        }
    }
    m
}

fn check(key: &str, arch: Architecture) {
    let r = reference(key);
    let model = Model::load(&dir(key), &Device::Cpu).unwrap();
    assert_eq!(model.config().arch, arch);
    let n_layers = model.config().n_layers;

    // Logits at every position and the residual stream entering every block.
    let pts: Vec<HookPoint> = (0..n_layers).map(HookPoint::resid_pre).collect();
    let mut hooks = Hooks::new().capture_all(pts.clone());
    let out = model.forward(&tensor2(&r.ids), &mut hooks).unwrap();
    let d = max_abs_diff(out.logits.as_ref().unwrap(), &r.logits);
    assert!(d < 1e-4, "{key}: logits differ from HF by {d}");
    for (l, h) in pts.iter().enumerate() {
        let d = max_abs_diff(out.cache.require(*h).unwrap(), &r.resid_pre[l]);
        assert!(
            d < 1e-4,
            "{key}: {h} differs from HF hidden_states[{l}] by {d}"
        );
    }

    // Left-padded batch with a mask: HF was given the same positions (counting real tokens).
    let out = model
        .forward_masked(
            &tensor2(&r.padded_ids),
            &tensor2(&r.padded_mask),
            &mut Hooks::new(),
        )
        .unwrap();
    let logits: Vec<Vec<Vec<f32>>> = out.logits.unwrap().to_vec3().unwrap();
    let mut m = 0f32;
    for (row, mask) in r.padded_mask.iter().enumerate() {
        for (pos, &real) in mask.iter().enumerate() {
            if real == 1 {
                for (x, y) in logits[row][pos].iter().zip(&r.padded_logits[row][pos]) {
                    m = m.max((x - y).abs());
                }
            }
        }
    }
    assert!(m < 1e-4, "{key}: padded logits differ from HF by {m}");
}

#[test]
fn gpt2_matches_hf() {
    check("gpt2", Architecture::Gpt2);
}

#[test]
fn llama_matches_hf() {
    check("llama", Architecture::Llama);
}

#[test]
fn qwen2_matches_hf() {
    check("qwen2", Architecture::Qwen2);
}

#[test]
fn gemma3_matches_hf_including_sliding_window() {
    check("gemma3", Architecture::Gemma3);
}

/// Half precision on the CPU: the same checkpoints loaded as BF16 and F16 stay close to HF's f32
/// logits (within the formats' ~3 and ~4 significant digits) and pick the same next token almost
/// everywhere.
#[test]
fn half_precision_stays_close_to_f32() {
    use candle_core::DType;
    use transformer_hooks::LoadOptions;
    for key in ["llama", "gpt2", "gemma3", "qwen2"] {
        let r = reference(key);
        for dtype in [DType::BF16, DType::F16] {
            let mut opts = LoadOptions::default();
            opts.dtype = dtype;
            let model = Model::load_with(&dir(key), &Device::Cpu, &opts).unwrap();
            let out = model.forward(&tensor2(&r.ids), &mut Hooks::new()).unwrap();
            let logits = out.logits.unwrap();
            assert_eq!(
                logits.dtype(),
                dtype,
                "{key}: activations stay in {dtype:?}"
            );
            let logits = logits.to_dtype(DType::F32).unwrap();
            let scale = r
                .logits
                .iter()
                .flatten()
                .flatten()
                .fold(0f32, |m, x| m.max(x.abs()));
            let d = max_abs_diff(&logits, &r.logits);
            let tol = if dtype == DType::BF16 { 0.05 } else { 0.01 };
            assert!(
                d < tol * scale.max(1.0),
                "{key} {dtype:?}: logits differ from f32 by {d} (scale {scale})"
            );
            let ours: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
            let argmax = |v: &[f32]| {
                (0..v.len())
                    .max_by(|&a, &b| v[a].total_cmp(&v[b]))
                    .unwrap_or(0)
            };
            let (mut same, mut n) = (0, 0);
            for (a, b) in ours.iter().flatten().zip(r.logits.iter().flatten()) {
                same += usize::from(argmax(a) == argmax(b));
                n += 1;
            }
            assert!(
                same * 10 >= n * 9,
                "{key} {dtype:?}: argmax agrees at {same}/{n}"
            );
        }
    }
}

/// `save_hf` writes what HF itself wrote: the same tensor names and values as the fixture's
/// `model.safetensors` (saved by transformers), the config values transformers reads, and a
/// folder that loads back to the same logits.
#[test]
fn gemma3_save_hf_matches_transformers_own_folder() {
    let model = Model::load(&dir("gemma3"), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save_hf(out.path()).unwrap();

    let theirs =
        candle_core::safetensors::load(dir("gemma3").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let ours =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = theirs
        .keys()
        .filter(|k| !k.ends_with("lm_head.weight"))
        .collect();
    names.sort();
    let mut our_names: Vec<&String> = ours.keys().collect();
    our_names.sort();
    assert_eq!(names, our_names);
    for name in names {
        let a = theirs[name].to_dtype(candle_core::DType::F32).unwrap();
        assert!(common::max_abs(&a, &ours[name]) < 1e-6, "{name} differs");
    }

    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
    };
    let (a, b) = (read(&dir("gemma3")), read(out.path()));
    for key in [
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "layer_types",
        "sliding_window",
        "hidden_activation",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "rope_parameters",
    ] {
        assert_eq!(a[key], b[key], "config key {key}");
    }
    assert_eq!(
        a["query_pre_attn_scalar"].as_f64(),
        b["query_pre_attn_scalar"].as_f64()
    );
    assert_eq!(a["rms_norm_eps"].as_f64(), b["rms_norm_eps"].as_f64());

    let back = Model::load(out.path(), &Device::Cpu).unwrap();
    let r = reference("gemma3");
    let toks = tensor2(&r.ids);
    let l0 = model
        .forward(&toks, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let l1 = back
        .forward(&toks, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert!(common::max_abs(&l0, &l1) < 1e-5);
}
