//! The forward pass is differentiable through candle autograd: gradients of the next-token loss
//! with respect to weights (and to a parameter inside an intervention) match central finite
//! differences, in f64, for each family's distinctive pieces.

mod common;

use candle_core::{DType, Var};
use common::*;
use transformer_hooks::{HookPoint, Hooks, Intervention, Model, Weights};

fn f64_copy(key: &str) -> Model {
    let m = tiny(key);
    let params: Weights = m
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F64).unwrap()))
        .collect();
    Model::from_params(m.config().clone(), params, None).unwrap()
}

fn loss(model: &Model, toks: &candle_core::Tensor, hooks: &mut Hooks) -> candle_core::Tensor {
    model
        .logprobs_with_hooks(toks, None, hooks)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
}

fn scalar(t: &candle_core::Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Central difference of the loss in element `idx` of `var`.
fn finite_difference(var: &Var, idx: usize, eval: &dyn Fn() -> f64) -> f64 {
    let eps = 1e-5;
    let orig = var.as_tensor().copy().unwrap();
    let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
    let at = |delta: f64| {
        let mut v = flat.clone();
        v[idx] += delta;
        var.set(&candle_core::Tensor::from_vec(v, orig.shape(), orig.device()).unwrap())
            .unwrap();
        eval()
    };
    let (plus, minus) = (at(eps), at(-eps));
    var.set(&orig).unwrap();
    (plus - minus) / (2.0 * eps)
}

fn check_family(key: &str, names: &[&str]) {
    let mut model = f64_copy(key);
    let toks = some_tokens(2, 7, model.config().vocab_size);
    let vars = model.trainable_params().unwrap();
    let l = loss(&model, &toks, &mut Hooks::new());
    let grads = l.backward().unwrap();
    for name in names {
        let (_, var) = vars
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{key}: no {name}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{key}: no gradient for {name}"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        // The element with the largest gradient, and one other.
        let big = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for idx in [big, g.len() / 3] {
            let fd = finite_difference(var, idx, &|| {
                scalar(&loss(&model, &toks, &mut Hooks::new()))
            });
            let err = (g[idx] - fd).abs() / fd.abs().max(1e-6);
            assert!(
                err < 1e-4 || (g[idx] - fd).abs() < 1e-9,
                "{key} {name}[{idx}]: autograd {} vs finite difference {fd}",
                g[idx]
            );
        }
        assert!(
            g.iter().any(|x| x.abs() > 1e-8),
            "{key} {name}: gradient is all zero"
        );
    }
}

#[test]
fn llama_gradients_match_finite_differences() {
    check_family(
        "llama",
        &[
            "embed.weight",
            "blocks.0.attn.q.weight",
            "blocks.1.attn.k.weight",
            "blocks.2.mlp.gate.weight",
            "blocks.0.ln1.weight",
            "ln_final.weight",
        ],
    );
}

#[test]
fn gemma3_gradients_match_finite_differences() {
    check_family(
        "gemma3",
        &[
            "blocks.0.attn.q_norm.weight",
            "blocks.1.ln1_post.weight",
            "blocks.2.ln2_post.weight",
            "blocks.0.mlp.up.weight",
            "blocks.1.attn.v.weight",
        ],
    );
}

#[test]
fn gpt2_gradients_match_finite_differences() {
    check_family(
        "gpt2",
        &[
            "pos_embed.weight",
            "blocks.0.ln1.bias",
            "blocks.1.attn.q.bias",
            "blocks.2.mlp.down.bias",
            "ln_final.weight",
        ],
    );
}

/// A parameter used inside an intervention (as an SAE's weights would be) gets its gradient
/// through the rest of the network.
#[test]
fn gradients_flow_through_interventions() {
    let model = f64_copy("qwen2");
    let toks = some_tokens(1, 6, model.config().vocab_size);
    let scale = Var::from_vec(
        vec![0.7f64; model.config().d_mlp],
        model.config().d_mlp,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let eval = |s: &Var| {
        let s = s.as_tensor().clone();
        let mut hooks = Hooks::new().intervene(
            HookPoint::mlp_post(1),
            Intervention::map(move |x| Ok(x.broadcast_mul(&s)?)),
        );
        loss(&model, &toks, &mut hooks)
    };
    let l = eval(&scale);
    let g: Vec<f64> = l
        .backward()
        .unwrap()
        .get(scale.as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    for idx in [0, 5, 17] {
        let fd = finite_difference(&scale, idx, &|| scalar(&eval(&scale)));
        assert!(
            (g[idx] - fd).abs() <= 1e-4 * fd.abs().max(1e-6),
            "scale[{idx}]: {} vs {fd}",
            g[idx]
        );
    }
}

/// Making the weights trainable switches kernels, not results.
#[test]
fn trainable_and_inference_passes_agree() {
    for key in ["llama", "gemma3", "gpt2"] {
        let mut model = tiny(key);
        let toks = some_tokens(2, 6, model.config().vocab_size);
        let a = model
            .forward(&toks, &mut Hooks::new())
            .unwrap()
            .logits
            .unwrap();
        model.trainable_params().unwrap();
        let b = model
            .forward(&toks, &mut Hooks::new())
            .unwrap()
            .logits
            .unwrap();
        assert!(max_abs(&a, &b) < 1e-4, "{key}");
        assert!(b.track_op(), "{key}: logits are not on the autograd graph");
    }
}

/// A trained model saves and loads back to the same function.
#[test]
fn save_and_load_round_trip() {
    let model = tiny("gemma3");
    let tmp = tempfile::tempdir().unwrap();
    model.save(tmp.path()).unwrap();
    let back = Model::load(tmp.path(), &candle_core::Device::Cpu).unwrap();
    assert_eq!(back.config(), model.config());
    let toks = some_tokens(1, 5, model.config().vocab_size);
    let a = model
        .forward(&toks, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let b = back
        .forward(&toks, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
}
