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
use sae_core::StandardConfig;
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

    renders_in_headless_chromium(&pages[0]);
}

/// Headless Chromium (Debian's `chromium`; `.ci/run` installs it) or `$CHROMIUM`.
fn chromium() -> Option<std::path::PathBuf> {
    let p = std::env::var_os("CHROMIUM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    p.exists().then_some(p)
}

/// Screenshot of an HTML file as RGB pixels.
fn screenshot(chromium: &std::path::Path, html: &str, dir: &std::path::Path) -> Vec<[u8; 3]> {
    let page = dir.join("page.html");
    let shot = dir.join("shot.png");
    std::fs::write(&page, html).unwrap();
    let _ = std::fs::remove_file(&shot);
    // The flags this sandbox needs: no network, no GPU, root.
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1100,2400",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        shot.exists(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = info.color_type.samples();
    assert!(step >= 3, "{:?}", info.color_type);
    buf[..info.buffer_size()]
        .chunks_exact(step)
        .map(|c| [c[0], c[1], c[2]])
        .collect()
}

/// The page renders, and what it shows comes from the data: the orange token backgrounds vanish
/// when the activations are zeroed, the blue/red underlines when the ablation deltas are removed
/// (the legend, drawn in the same colours, stays in both).
fn renders_in_headless_chromium(page: &metrics::html::FeaturePage) {
    let Some(chromium) = chromium() else {
        eprintln!(
            "skipping the Chromium render check: install Debian's chromium (or set CHROMIUM)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let orange =
        |p: &[u8; 3]| p[0] > 235 && p[1] > 120 && p[1] < 235 && (p[2] as i32) < p[1] as i32 - 50;
    let blue_or_red = |p: &[u8; 3]| {
        let [r, g, b] = p.map(i32::from);
        (b > r + 60 && b > g + 40) || (r > g + 80 && r > b + 80 && g < 120)
    };
    let full = screenshot(&chromium, &render_feature_page(page), dir.path());
    let non_white = full.iter().filter(|p| p.iter().any(|&c| c < 200)).count();
    assert!(
        non_white > 5_000,
        "the screenshot is blank ({non_white} dark pixels)"
    );

    let mut no_acts = page.clone();
    for ex in examples_mut(&mut no_acts) {
        ex.activations.iter_mut().for_each(|a| *a = 0.0);
    }
    let mut no_deltas = page.clone();
    for ex in examples_mut(&mut no_deltas) {
        ex.logprob_delta.iter_mut().for_each(|d| *d = None);
    }
    let count = |px: &[[u8; 3]], f: &dyn Fn(&[u8; 3]) -> bool| px.iter().filter(|p| f(p)).count();
    let (o_full, o_none) = (
        count(&full, &orange),
        count(
            &screenshot(&chromium, &render_feature_page(&no_acts), dir.path()),
            &orange,
        ),
    );
    let (u_full, u_none) = (
        count(&full, &blue_or_red),
        count(
            &screenshot(&chromium, &render_feature_page(&no_deltas), dir.path()),
            &blue_or_red,
        ),
    );
    eprintln!(
        "orange pixels {o_full} (without activations {o_none}); underline pixels {u_full} (without deltas {u_none})"
    );
    assert!(
        o_full > o_none + 100,
        "activations drew no orange: {o_full} vs {o_none}"
    );
    assert!(
        u_full > u_none + 30,
        "ablation deltas drew no underlines: {u_full} vs {u_none}"
    );
}

/// Every context a page shows: the top examples, then each interval's samples.
fn examples_mut(
    page: &mut metrics::html::FeaturePage,
) -> impl Iterator<Item = &mut metrics::html::ContextExample> {
    page.top_examples.iter_mut().chain(
        page.interval_examples
            .iter_mut()
            .flat_map(|i| i.examples.iter_mut()),
    )
}
