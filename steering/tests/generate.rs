//! Steering inside KV-cached generation: an SAE on the MLP neurons (`mlp.hook_post`, the main
//! job's neuron SAEs) and one on the residual stream, clamps and additions, over the whole
//! sequence and on generated positions only — the cached tokens must be the recompute path's,
//! and the edits must change what is generated.

use candle_core::Device;
mod common;

use common::random_topk;
use steering::{FeatureEdit, Scope, Steering};
use transformer_hooks::{GenerateOptions, HookPoint, Hooks, Model};

fn tiny(key: &str) -> Model {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../transformer-hooks/tests/fixtures/tiny")
        .join(key);
    Model::load(&dir, &Device::Cpu).unwrap()
}

#[test]
fn steering_through_the_kv_cache_gives_the_recompute_tokens() {
    let prompts = vec![vec![3u32, 17, 42, 5, 9], vec![7, 1], vec![11, 12, 13]];
    let padded = 5;
    for key in ["llama", "gpt2"] {
        let model = tiny(key);
        let cfg = model.config().clone();
        for (hook, width) in [
            (HookPoint::mlp_post(1), cfg.d_mlp),
            (HookPoint::resid_post(1), cfg.d_model),
        ] {
            let sae = random_topk(width, 4 * width, 4, 3);
            let opts = GenerateOptions::greedy(10);
            let plain = model
                .generate_batch(&prompts, &opts, &mut Hooks::new())
                .unwrap();
            for (edits, scope) in [
                (vec![FeatureEdit::clamp(0, 40.0)], Scope::All),
                (
                    vec![FeatureEdit::clamp(1, 40.0), FeatureEdit::add(5, -30.0)],
                    Scope::From(padded),
                ),
            ] {
                let s = Steering::new(&sae, hook, edits.clone())
                    .unwrap()
                    .with_scope(scope);
                let cached = model
                    .generate_batch(&prompts, &opts, &mut s.hooks())
                    .unwrap();
                let recomputed = model
                    .generate_batch(&prompts, &opts.clone().without_kv_cache(), &mut s.hooks())
                    .unwrap();
                assert_eq!(cached, recomputed, "{key} {hook} {edits:?} {scope:?}");
                assert_ne!(
                    cached, plain,
                    "{key} {hook} {edits:?}: the edit changed nothing"
                );
            }
        }
    }
}
