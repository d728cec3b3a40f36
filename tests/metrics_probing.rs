//! Sparse probing on the real model and real text: one MLP neuron of SmolLM2, mean-pooled over a
//! window, tells Shakespeare from the State of the Union on held-out documents.

mod common;

use sae_workbench::activation_store::{CorpusName, chunk_ranges, load_corpora};
use sae_workbench::metrics::{
    LabelledFeatures, ProbingConfig, pooled_window_features, sparse_probing,
};
use sae_workbench::transformer_hooks::Model;
use sae_workbench::transformer_hooks::candle_core::Device;

#[test]
fn a_neuron_tells_shakespeare_from_the_state_of_the_union() {
    let Some((model_path, root)) = common::smollm2_and_corpora() else {
        return;
    };
    let model = Model::load(&model_path, &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let bos = tok.bos_id().or(model.config().bos_token_id).unwrap();
    let docs = load_corpora(&root, &[CorpusName::Shakespeare, CorpusName::Sotu]).unwrap();
    let context = 48;
    // Two windows from each of the first 12 documents of each corpus; documents 0-7 train,
    // 8-11 test, so no test window comes from a document seen in training.
    let (mut windows, mut labels, mut is_test) = (Vec::new(), Vec::new(), Vec::new());
    for (class, corpus) in ["shakespeare/", "sotu/"].iter().enumerate() {
        for (i, d) in docs
            .iter()
            .filter(|d| d.id.starts_with(corpus))
            .take(12)
            .enumerate()
        {
            let ids = tok
                .encode(&d.text[..d.text.floor_char_boundary(20_000)], false)
                .unwrap();
            for r in chunk_ranges(ids.len(), context, true).skip(3).take(2) {
                let mut w = vec![bos];
                w.extend_from_slice(&ids[r]);
                assert_eq!(w.len(), context);
                windows.push(w);
                labels.push(class);
                is_test.push(i >= 8);
            }
        }
    }
    let (acts, codes) =
        pooled_window_features(&model, "blocks.15.mlp.hook_post", &[], &windows, 8, 1, None)
            .unwrap();
    assert!(codes.is_empty());
    assert_eq!(acts.d, model.config().d_mlp);
    let split = |test: bool| {
        let rows: Vec<usize> = (0..windows.len()).filter(|&i| is_test[i] == test).collect();
        let x: Vec<f32> = rows
            .iter()
            .flat_map(|&i| acts.rows[i * acts.d..(i + 1) * acts.d].to_vec())
            .collect();
        let l: Vec<usize> = rows.iter().map(|&i| labels[i]).collect();
        (x, l)
    };
    let ((xtr, ltr), (xte, lte)) = (split(false), split(true));
    assert_eq!((ltr.len(), lte.len()), (32, 16));
    let classes = vec!["shakespeare".to_string(), "sotu".to_string()];
    let res = sparse_probing(
        LabelledFeatures {
            x: &xtr,
            d: acts.d,
            labels: &ltr,
        },
        LabelledFeatures {
            x: &xte,
            d: acts.d,
            labels: &lte,
        },
        &classes,
        &ProbingConfig::default(),
    )
    .unwrap();
    for r in &res {
        assert_eq!((r.n_train, r.n_test), (32, 16));
        // Verse against speeches: the full probe and five neurons separate them on unseen texts.
        assert!(r.full_test_accuracy.unwrap() >= 0.9, "{r:?}");
        assert!(r.top_k_accuracy(5).unwrap() >= 0.9, "{r:?}");
    }
}
