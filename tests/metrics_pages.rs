//! Feature pages end to end on the real SmolLM2-135M-Instruct: examples collected from hook
//! activations with provenance, contexts re-run with and without the feature, HTML written.
//! The activation a page shows at an example's focus token must equal the activation the
//! collector recorded for that (window, position): the re-run reproduces the cached forward pass.
//! Skips when the model is not fetched.

use candle_core::Device;
use metrics::html::render_feature_page;
use metrics::{
    ExampleCollector, HookedSplice, PageConfig, RowSource, TokenSource, build_feature_page,
    write_pages,
};
use sae_core::config::StandardConfig;
use sae_core::{
    CommonConfig, DecoderNorm, Param, Params, SaeConfig, SaeModel, StandardSae, StandardTraining,
};
use transformer_hooks::{Model, assets};

const TEXTS: [&str; 3] = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse.",
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer <the slings & arrows>.",
];

/// ReLU features ±e_j over the neurons (a perfect, fully interpretable "SAE").
fn pm_identity_sae(d: usize) -> SaeModel {
    let mut w = vec![0.0; 2 * d * d];
    for j in 0..d {
        w[j * d + j] = 1.0;
        w[(d + j) * d + j] = -1.0;
    }
    let params = Params::new(vec![
        Param::new("W_enc", &[2 * d, d], true, w.clone()),
        Param::zeros("b_enc", &[2 * d], true),
        Param::new("W_dec", &[2 * d, d], true, w),
        Param::zeros("b_dec", &[d], false),
    ]);
    let cfg = StandardTraining {
        decoder_norm: DecoderNorm::Free,
        ..StandardTraining::default()
    };
    let sae = StandardSae::from_params(d, 2 * d, cfg, params).unwrap();
    SaeModel::from_parts(
        SaeConfig::Standard(StandardConfig {
            common: CommonConfig::new(d, 2 * d),
        }),
        Box::new(sae),
        None,
    )
}

#[test]
fn feature_pages_reproduce_cached_activations_and_escape_tokens() {
    let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
        return;
    };
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let hook = "blocks.15.mlp.hook_post";
    let hp = model.hook_point(hook).unwrap();
    let tok = model.tokenizer().unwrap();
    let bos = tok.bos_id().or(model.config().bos_token_id).unwrap();
    let windows: Vec<Vec<u32>> = TEXTS
        .iter()
        .map(|t| {
            let mut w = vec![bos];
            w.extend(tok.encode(t, false).unwrap());
            w
        })
        .collect();
    let sae = pm_identity_sae(model.config().d_mlp);

    // "Harvest": activations of each window, positions >= 1, with provenance.
    let mut collector = ExampleCollector::new(sae.d_sae(), 5, 64, 0);
    for (wi, w) in windows.iter().enumerate() {
        let cache = model
            .run_with_cache(&model.tokens(w).unwrap(), &[hp])
            .unwrap();
        let acts = cache.require(hp).unwrap().squeeze(0).unwrap();
        let rows = acts.narrow(0, 1, w.len() - 1).unwrap();
        let codes = sae.encode_sparse(&rows).unwrap();
        let sources: Vec<RowSource> = (1..w.len())
            .map(|p| RowSource {
                window: wi as u32,
                position: p as u32,
                token: w[p],
            })
            .collect();
        collector.observe(&codes, &sources).unwrap();
    }
    // The feature with the most firings: pages for it and for one rarer feature.
    let counts = &collector.density().fire_counts;
    let busiest = (0..counts.len()).max_by_key(|&f| counts[f]).unwrap();
    let rare = (0..counts.len()).find(|&f| counts[f] == 1).unwrap();

    let mut target = HookedSplice::new(&model, hook).unwrap();
    let window_tokens = |w: u32| windows.get(w as usize).cloned();
    let decode = |id: u32| tok.decode(&[id]).unwrap();
    let source = TokenSource {
        window_tokens: &window_tokens,
        decode: &decode,
    };
    let cfg = PageConfig {
        top_examples: 3,
        per_interval: 1,
        ..PageConfig::default()
    };
    let mut pages = Vec::new();
    for f in [busiest, rare] {
        let le = target.logit_effects(&sae, f, 6).unwrap();
        let page = build_feature_page(
            &mut target,
            &sae,
            "pm-identity",
            &collector,
            f,
            &source,
            Some(le),
            &cfg,
        )
        .unwrap();
        let top = collector.top_examples(f).unwrap();
        assert_eq!(page.top_examples.len(), top.len().min(3));
        for (ex, want) in page.top_examples.iter().zip(&top) {
            let got = ex.activations[ex.focus];
            assert!(
                (got - want.activation).abs() <= 1e-3 * want.activation.max(1.0),
                "feature {f}: page shows {got}, collector recorded {}",
                want.activation
            );
            assert!(ex.logprob_delta.iter().skip(1).all(Option::is_some));
        }
        if f == busiest {
            assert!(!page.interval_examples.is_empty());
        }
        assert!(
            (page.density - counts[f] as f64 / collector.density().n_tokens as f64).abs() < 1e-12
        );
        pages.push(page);
    }
    let dir = tempfile::tempdir().unwrap();
    write_pages(dir.path(), "pm-identity", "test pages", &pages).unwrap();
    let index = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
    assert!(index.contains(&format!("feature_{busiest:05}.html")));
    // Token text with markup is escaped wherever it appears.
    let html = render_feature_page(&pages[0]);
    assert!(!html.contains("<the slings"), "unescaped token text");
    let all: String = pages.iter().map(render_feature_page).collect();
    assert!(!all.contains("<the"));
}
