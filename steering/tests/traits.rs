//! `traits` against scores recomputed from the dense SAE encoding of a real model's activations
//! (SmolLM2-135M; skipped when the asset is absent).

use approx::assert_relative_eq;
use candle_core::Device;
mod common;

use common::random_topk;
use steering::{FeatureStats, TraitOptions, traits};
use transformer_hooks::{HookPoint, Model, assets};

const D_SAE: usize = 256;

fn opts(top: usize) -> TraitOptions {
    TraitOptions {
        top,
        max_firing_rate: 0.01,
    }
}

#[test]
fn traits_rank_by_relative_activation_times_log_inverse_rate() {
    let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
        return;
    };
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let hook = HookPoint::resid_post(3);
    let d_in = model.config().d_model;
    let sae = random_topk(d_in, D_SAE, 16, 7);
    let tok = model.tokenizer().unwrap();
    let tokens = tok
        .encode(
            "The whale rose from the sea, and the sailors cheered on the deck.",
            true,
        )
        .unwrap();
    let span = 4..tokens.len();

    // Independent figures: the dense encoding of the captured activations.
    let cache = model
        .run_with_cache(&model.tokens(&tokens).unwrap(), &[hook])
        .unwrap();
    let x = cache.require(hook).unwrap().squeeze(0).unwrap();
    let dense: Vec<Vec<f32>> = sae.encode(&x).unwrap().to_vec2().unwrap();
    // Maxima from the whole text (so relative activations are at most 1); firing rates spread
    // from 0.0005 to 0.02, so that features above the 0.01 cut exist and must be left out.
    let max: Vec<f32> = (0..D_SAE)
        .map(|f| dense.iter().map(|r| r[f]).fold(0.0, f32::max))
        .collect();
    let rate: Vec<f64> = (0..D_SAE).map(|f| 0.0005 * (1 + f % 40) as f64).collect();
    let stats = FeatureStats {
        hook: hook.to_string(),
        rows: 100_000,
        max_activation: max.clone(),
        firing_rate: rate.clone(),
        labels: (0..D_SAE).map(|f| format!("f{f}")).collect(),
        top_contexts: vec![Vec::new(); D_SAE],
    };
    let mut want: Vec<(usize, f64)> = (0..D_SAE)
        .filter(|&f| max[f] > 0.0 && rate[f] <= 0.01)
        .map(|f| {
            let s: f64 = dense[span.clone()]
                .iter()
                .map(|r| f64::from(r[f] / max[f]))
                .sum();
            (f, s * (1.0 / rate[f]).ln())
        })
        .filter(|(_, s)| *s > 0.0)
        .collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1));

    let got = traits(&model, &sae, hook, &stats, &tokens, span.clone(), opts(8)).unwrap();
    assert_eq!(got.len(), 8);
    for (g, (f, s)) in got.iter().zip(&want) {
        assert_eq!(g.feature, *f);
        assert_relative_eq!(g.score, *s, max_relative = 1e-4);
        assert_eq!(g.label, format!("f{f}"));
        assert!(rate[g.feature] <= 0.01);
        // Its listed tokens are inside the response, strongest first, with their activations.
        assert!(!g.tokens.is_empty() && g.tokens.len() <= 3);
        for w in g.tokens.windows(2) {
            assert!(w[0].relative >= w[1].relative);
        }
        for t in &g.tokens {
            let a = dense[span.start + t.position][g.feature] / max[g.feature];
            assert_relative_eq!(t.relative, a, max_relative = 1e-4);
            assert_eq!(
                t.token,
                tok.decode(&[tokens[span.start + t.position]]).unwrap()
            );
        }
    }
    // A dense feature that would otherwise rank first is not a trait.
    let top = got[0].feature;
    let mut dense_stats = stats.clone();
    dense_stats.firing_rate[top] = 0.2;
    let again = traits(&model, &sae, hook, &dense_stats, &tokens, span, opts(8)).unwrap();
    assert!(again.iter().all(|t| t.feature != top));
    assert_eq!(again[0].feature, got[1].feature);

    // Bad spans and mismatched stats are refused.
    assert!(traits(&model, &sae, hook, &stats, &tokens, 3..3, opts(5)).is_err());
    assert!(
        traits(
            &model,
            &sae,
            hook,
            &stats,
            &tokens,
            0..tokens.len() + 1,
            opts(5)
        )
        .is_err()
    );
    let mut short = stats.clone();
    short.max_activation.pop();
    let err = traits(&model, &sae, hook, &short, &tokens, 4..6, opts(5)).unwrap_err();
    assert!(err.to_string().contains("255 features"), "{err}");
}
