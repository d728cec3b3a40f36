//! Harvest SmolLM2 activations over real text and check every stored row against an
//! independent single-window forward pass (no batching, no padding), through its provenance.
//! Skipped when the model or corpora have not been fetched.

mod common;

use sae_workbench::activation_store::{
    ActivationStore, CorpusName, HarvestConfig, HookedModel, Split, SplitSpec, StreamConfig,
    WindowPlan, harvest, load_corpus, tokenize_documents,
};
use sae_workbench::transformer_hooks::Model;
use sae_workbench::transformer_hooks::candle_core::{Device, IndexOp, Tensor};

#[test]
fn harvested_rows_equal_a_direct_forward_pass_at_their_provenance() {
    let Some((path, root)) = common::smollm2_and_corpora() else {
        return;
    };
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let mut source = HookedModel::new(model);
    // SmolLM2's GGUF says 8,192 positions; windows past them are refused up front.
    assert_eq!(source.model().config().n_ctx, 8192);
    source.check_context(8192).unwrap();
    let e = source.check_context(8193).unwrap_err().to_string();
    assert!(e.contains("8193") && e.contains("8192"), "{e}");
    let docs: Vec<_> = load_corpus(&root, CorpusName::MobyDick)
        .unwrap()
        .into_iter()
        .take(6)
        .collect();
    let encode = |t: &str| source.encode(t);
    let mut tokenized = tokenize_documents(&docs, &encode, &SplitSpec::default()).unwrap();
    // Use these chapters whatever their split: this test is about the harvest, not the split.
    tokenized.iter_mut().for_each(|d| d.split = Split::Train);
    let plan = WindowPlan::build(&tokenized, Split::Train, 24, source.bos().unwrap(), 3).unwrap();

    let hooks = vec![
        "blocks.3.mlp.hook_post".to_string(),
        "blocks.2.hook_resid_post".to_string(),
    ];
    let mut cfg = HarvestConfig::new(hooks.clone());
    cfg.batch_windows = 5;
    cfg.shard_rows = 100;
    cfg.max_rows = 250;
    cfg.exclude_token_ids = source.special_token_ids().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let identity = source.identity().unwrap();
    let s = harvest(tmp.path(), &plan, &identity, &mut source, &cfg, None).unwrap();
    assert!(s.tokens >= 250 && s.shards >= 2, "{s:?}");

    let cache = ActivationStore::open(tmp.path()).unwrap();
    cache.verify(None).unwrap();
    cache
        .expect_model("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
        .unwrap();
    let model = source.model();
    for (h, name) in hooks.iter().enumerate() {
        let acts = cache.hook(name).unwrap();
        assert_eq!(acts.width(), [1536, 576][h]);
        let rows = acts.read_rows(0, cache.rows() as usize).unwrap();
        let point = model.hook_point(name).unwrap();
        for r in (0..cache.rows()).step_by(13) {
            let p = cache.provenance(r).unwrap();
            let window = plan.tokens(p.window as usize);
            assert_eq!(window[p.position as usize], p.token);
            let t = Tensor::new(window, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let direct = model.run_with_cache(&t, &[point]).unwrap();
            let want: Vec<f32> = direct
                .require(point)
                .unwrap()
                .i((0, p.position as usize))
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = &rows[r as usize * acts.width()..(r as usize + 1) * acts.width()];
            let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err <= 1e-4 * scale.max(1.0),
                "{name} row {r} ({p:?}): max err {err}"
            );
        }
    }
    // And a batch from the stream is on the requested device with the right shape.
    let batch = cache
        .hook(&hooks[0])
        .unwrap()
        .batches(StreamConfig {
            epochs: Some(1),
            ..StreamConfig::new(64)
        })
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(batch.dims(), &[64, 1536]);
}
