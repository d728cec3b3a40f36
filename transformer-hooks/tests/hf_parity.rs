//! Our forward pass against HF transformers (PyTorch, f32) reading the same GGUF files.
//!
//! The reference is `tests/fixtures/hf_reference.json`, written by `scripts/hf_reference.py`: for
//! three public-domain passages, HF's token ids, the log-probability of every next token, the
//! argmax at every position, clean and with one layer's MLP output zero-ablated. Each test skips
//! (with a message) when its model file has not been fetched; CI fetches all three. Gemma's ids
//! come from our tokenizer built from its GGUF alone and must equal those of HF's `tokenizer.json`.

use candle_core::{D, Device, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use transformer_hooks::{HookPoint, Hooks, Intervention, Model, assets};

#[derive(Deserialize)]
struct Fixture {
    passages: Vec<Passage>,
    models: HashMap<String, ModelRef>,
}

#[derive(Deserialize)]
struct Passage {
    name: String,
    text: String,
}

#[derive(Deserialize)]
struct ModelRef {
    add_bos: bool,
    ablate_layer: usize,
    passages: Vec<PassageRef>,
}

#[derive(Deserialize)]
struct PassageRef {
    name: String,
    ids: Vec<u32>,
    clean: Scored,
    mlp_zero_ablated: Scored,
}

#[derive(Deserialize)]
struct Scored {
    logprobs: Vec<f32>,
    argmax: Vec<u32>,
    nll: f64,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf_reference.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture is committed");
    serde_json::from_str(&text).expect("fixture parses")
}

/// Log-probabilities of each next token and the argmax at every position, from one pass.
fn score(model: &Model, ids: &[u32], hooks: &mut Hooks) -> (Vec<f32>, Vec<u32>) {
    let tokens = model.tokens(ids).unwrap();
    let logits = model
        .forward(&tokens, hooks)
        .unwrap()
        .logits
        .unwrap()
        .squeeze(0)
        .unwrap();
    let argmax: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let n = ids.len();
    let targets = Tensor::new(&ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let lp: Vec<f32> = lsm
        .narrow(0, 0, n - 1)
        .unwrap()
        .gather(&targets, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    (lp, argmax)
}

struct Agreement {
    mean_abs: f64,
    max_abs: f64,
    argmax_agree: f64,
    nll: f64,
}

fn compare(ours: &(Vec<f32>, Vec<u32>), theirs: &Scored) -> Agreement {
    let (lp, am) = ours;
    assert_eq!(lp.len(), theirs.logprobs.len());
    let diffs: Vec<f64> = lp
        .iter()
        .zip(&theirs.logprobs)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .collect();
    let agree = am
        .iter()
        .zip(&theirs.argmax)
        .filter(|(a, b)| a == b)
        .count();
    Agreement {
        mean_abs: diffs.iter().sum::<f64>() / diffs.len() as f64,
        max_abs: diffs.iter().cloned().fold(0.0, f64::max),
        argmax_agree: agree as f64 / am.len() as f64,
        nll: -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64,
    }
}

fn check(key: &str, asset: &str) {
    let Some(path) = assets::asset_or_skip(asset) else {
        return;
    };
    let fx = fixture();
    let reference = &fx.models[key];
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    assert_eq!(tok.adds_bos(), reference.add_bos, "BOS convention");
    let mut total = 0usize;
    let mut agree_total = 0.0;
    for p in &reference.passages {
        let text = &fx.passages.iter().find(|q| q.name == p.name).unwrap().text;
        let mut ids = tok.encode_document(text).unwrap();
        ids.truncate(p.ids.len());
        assert_eq!(
            ids, p.ids,
            "{key} {}: token ids differ from HF's tokenizer",
            p.name
        );

        let clean = compare(&score(&model, &ids, &mut Hooks::new()), &p.clean);
        let mut hooks = Hooks::new().intervene(
            HookPoint::mlp_out(reference.ablate_layer),
            Intervention::Zero,
        );
        let ablated = compare(&score(&model, &ids, &mut hooks), &p.mlp_zero_ablated);
        eprintln!(
            "{key} {:<20} clean: mean|d| {:.2e} max|d| {:.2e} argmax {:.4} nll {:.4} (HF {:.4}) | L{} MLP zeroed: mean|d| {:.2e} argmax {:.4} nll {:.4} (HF {:.4})",
            p.name,
            clean.mean_abs,
            clean.max_abs,
            clean.argmax_agree,
            clean.nll,
            p.clean.nll,
            reference.ablate_layer,
            ablated.mean_abs,
            ablated.argmax_agree,
            ablated.nll,
            p.mlp_zero_ablated.nll
        );
        for (what, a, r) in [
            ("clean", &clean, &p.clean),
            ("ablated", &ablated, &p.mlp_zero_ablated),
        ] {
            assert!(
                a.mean_abs <= 1e-3,
                "{key} {} {what}: mean |logprob diff| {}",
                p.name,
                a.mean_abs
            );
            assert!(
                (a.nll - r.nll).abs() <= 1e-3,
                "{key} {} {what}: nll {} vs HF {}",
                p.name,
                a.nll,
                r.nll
            );
            total += ids.len();
            agree_total += a.argmax_agree * ids.len() as f64;
        }
        // The ablation must matter, or the hook was not applied.
        assert!(
            ablated.nll - clean.nll > 0.01,
            "{key} {}: zero-ablation changed nothing",
            p.name
        );
    }
    let agree = agree_total / total as f64;
    assert!(
        agree >= 0.999,
        "{key}: argmax agrees at {agree} of positions"
    );
}

#[test]
fn smollm2_matches_hf_transformers() {
    check("smollm2", assets::SMOLLM2);
}

#[test]
fn gemma3_matches_hf_transformers() {
    check("gemma3", assets::GEMMA3);
}

/// Qwen2.5-Coder-0.5B (`fetch_assets.py qwen2`; CI fetches it).
#[test]
fn qwen2_matches_hf_transformers() {
    check("qwen2", assets::QWEN2);
}
