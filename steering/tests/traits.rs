//! `traits` against scores recomputed from the dense SAE encoding of a real model's activations
//! (SmolLM2-135M; skipped when the asset is absent).

use std::collections::HashSet;

use approx::assert_relative_eq;
use candle_core::Device;
mod common;

use common::random_topk;
use steering::{FeatureStats, TraitOptions, traits};
use transformer_hooks::{HookPoint, Model, assets};

const D_SAE: usize = 256;

/// Every feature its own trait: the ranking alone.
fn opts(top: usize) -> TraitOptions {
    TraitOptions {
        top,
        max_firing_rate: 0.01,
        merge_overlap: 2.0,
    }
}

/// Blank lines in the middle and at the end: their tokens must not count.
const TEXT: &str = "The whale rose from the sea,\n\n\nand the sailors cheered on the deck.\n\n";

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
    let tokens = tok.encode(TEXT, true).unwrap();
    let blank: Vec<bool> = tokens
        .iter()
        .map(|&t| tok.decode(&[t]).unwrap().trim().is_empty())
        .collect();
    assert!(
        blank[4..].iter().filter(|&&b| b).count() >= 2,
        "the text should have blank-line tokens in the response"
    );
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
            let s: f64 = span
                .clone()
                .filter(|&p| !blank[p])
                .map(|p| f64::from(dense[p][f] / max[f]))
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
        assert!(g.also.is_empty());
        assert!(rate[g.feature] <= 0.01);
        // Its listed tokens are inside the response, strongest first, with their activations.
        assert!(!g.tokens.is_empty() && g.tokens.len() <= 3);
        for w in g.tokens.windows(2) {
            assert!(w[0].relative >= w[1].relative);
        }
        for t in &g.tokens {
            assert!(!blank[span.start + t.position], "a blank token listed");
            let a = dense[span.start + t.position][g.feature] / max[g.feature];
            assert_relative_eq!(t.relative, a, max_relative = 1e-4);
            assert_eq!(
                t.token,
                tok.decode(&[tokens[span.start + t.position]]).unwrap()
            );
        }
    }
    // Merged: a feature firing on nearly the same (non-blank) positions as a stronger trait's
    // leading feature is folded into that trait. Recomputed here greedily over the ranking
    // above, with position sets.
    let fires = |f: usize| -> HashSet<usize> {
        span.clone()
            .filter(|&p| !blank[p] && dense[p][f] > 0.0)
            .collect()
    };
    let jaccard = |a: &HashSet<usize>, b: &HashSet<usize>| {
        a.intersection(b).count() as f64 / a.union(b).count() as f64
    };
    let mut folded = 0;
    for theta in [1.0, 0.8, 0.5] {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for &(f, _) in &want {
            let set = fires(f);
            let room = groups.len() < 5;
            match groups
                .iter_mut()
                .find(|(lead, _)| jaccard(&fires(*lead), &set) >= theta)
            {
                Some((_, also)) => also.push(f),
                None if room => groups.push((f, Vec::new())),
                None => {}
            }
        }
        let merged = traits(
            &model,
            &sae,
            hook,
            &stats,
            &tokens,
            span.clone(),
            TraitOptions {
                merge_overlap: theta,
                ..opts(5)
            },
        )
        .unwrap();
        let got: Vec<(usize, Vec<usize>)> = merged
            .iter()
            .map(|t| (t.feature, t.also.iter().map(|a| a.feature).collect()))
            .collect();
        assert_eq!(got, groups, "merge_overlap {theta}");
        for a in merged.iter().flat_map(|t| &t.also) {
            let (_, s) = want.iter().find(|(f, _)| *f == a.feature).unwrap();
            assert_relative_eq!(a.score, *s, max_relative = 1e-4);
            assert_eq!(a.label, format!("f{}", a.feature));
        }
        folded += groups.iter().map(|g| g.1.len()).sum::<usize>();
    }
    assert!(
        folded > 0,
        "no feature was folded into another: the merge went untested"
    );

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
