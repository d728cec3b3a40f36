//! Spurious correlation removal on the real model and real text: SmolLM2's layer-15 neurons
//! tell a window printed with its line breaks from the same text flattened, and ablating the
//! neurons that the layout probe reads most takes that away and leaves the corpus readable.

mod common;

use sae_workbench::activation_store::{CorpusName, chunk_ranges, load_corpora};
use sae_workbench::metrics::{
    FeatureSource, ScrConfig, ScrProbes, TwoAttributes, pooled_window_features,
    spurious_correlation_removal,
};
use sae_workbench::transformer_hooks::Model;
use sae_workbench::transformer_hooks::candle_core::Device;

#[test]
fn layout_neurons_are_found_and_ablated() {
    let Some((model_path, root)) = common::smollm2_and_corpora() else {
        return;
    };
    let model = Model::load(&model_path, &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let bos = tok.bos_id().or(model.config().bos_token_id).unwrap();
    let docs = load_corpora(&root, &[CorpusName::Shakespeare, CorpusName::Austen]).unwrap();
    let context = 48;
    // From each of the first 8 documents of each corpus, four windows of the printed text and four
    // of the flattened text; documents 0-5 train, 6-7 test.
    let (mut windows, mut concept, mut printed, mut is_test) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (shakespeare, corpus) in [(true, "shakespeare/"), (false, "austen/")] {
        for (i, d) in docs
            .iter()
            .filter(|d| d.id.starts_with(corpus))
            .take(8)
            .enumerate()
        {
            let text = &d.text[..d.text.floor_char_boundary(20_000)];
            let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
            for (layout, t) in [(true, text), (false, flat.as_str())] {
                let ids = tok.encode(t, false).unwrap();
                for r in chunk_ranges(ids.len(), context, true).skip(3).take(4) {
                    let mut w = vec![bos];
                    w.extend_from_slice(&ids[r]);
                    windows.push(w);
                    concept.push(shakespeare);
                    printed.push(layout);
                    is_test.push(i >= 6);
                }
            }
        }
    }
    let (acts, _) =
        pooled_window_features(&model, "blocks.15.mlp.hook_post", &[], &windows, 8, 1, None)
            .unwrap();
    let split = |test: bool| {
        let rows: Vec<usize> = (0..windows.len()).filter(|&i| is_test[i] == test).collect();
        let x: Vec<f32> = rows
            .iter()
            .flat_map(|&i| acts.rows[i * acts.d..(i + 1) * acts.d].to_vec())
            .collect();
        let c: Vec<bool> = rows.iter().map(|&i| concept[i]).collect();
        let p: Vec<bool> = rows.iter().map(|&i| printed[i]).collect();
        (x, c, p)
    };
    let ((xtr, ctr, ptr), (xte, cte, pte)) = (split(false), split(true));
    assert_eq!((ctr.len(), cte.len()), (96, 32));
    let train = TwoAttributes {
        x: &xtr,
        d: acts.d,
        concept: &ctr,
        spurious: &ptr,
    };
    let test = TwoAttributes {
        x: &xte,
        d: acts.d,
        concept: &cte,
        spurious: &pte,
    };
    let probes = ScrProbes::fit(train, test, 1.0).unwrap();
    eprintln!(
        "biased {:.3} (on layout {:.3}), concept {:.3}, layout {:.3}",
        probes.biased_accuracy,
        probes.biased_on_spurious_accuracy,
        probes.concept_accuracy,
        probes.spurious_accuracy
    );
    // The model's neurons carry both the corpus and the layout, on unseen documents.
    assert!(probes.concept_accuracy >= 0.8);
    assert!(probes.spurious_accuracy >= 0.85);
    let cfg = ScrConfig {
        n_values: vec![20, 200],
        ..ScrConfig::default()
    };
    let res =
        spurious_correlation_removal(&probes, train, test, FeatureSource::Neurons, &cfg).unwrap();
    for a in &res {
        eprintln!(
            "N = {}: biased {:.3}, concept {:.3}, layout {:.3}",
            a.n, a.biased_accuracy, a.concept_accuracy, a.spurious_accuracy
        );
        assert_eq!(a.features.len(), a.n);
    }
    // Zeroing the 20 (200) neurons the layout probe reads most leaves it near chance, and the
    // corpus can still be read.
    for a in &res {
        assert!(a.spurious_accuracy <= 0.75, "N = {}", a.n);
        assert!(a.concept_accuracy >= 0.8, "N = {}", a.n);
    }
}
