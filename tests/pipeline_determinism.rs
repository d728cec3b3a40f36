//! The main job's pipeline, small, run twice in one process on SmolLM2 and real text: harvest
//! (layer-15 MLP neurons), train a TopK and a ReLU-L1 SAE from one shuffled stream, evaluate
//! them spliced into the model. Every number must come out bit for bit the same: a run-to-run
//! difference at a fixed thread count means a reduction whose order depends on timing (a rayon
//! `sum` over work-stolen splits), a hash map's iteration order or the clock, and this test
//! fails on it. Skipped when the model or corpora have not been fetched.

mod common;

use std::path::Path;

use sae_workbench::activation_store::{
    ActivationStore, CorpusName, HarvestConfig, HookedModel, Split, SplitSpec, StreamConfig,
    WindowPlan, harvest, load_corpus, tokenize_documents,
};
use sae_workbench::metrics::{
    HookedSplice, MeanActivation, SplicedConfig, SplicedEvaluation, evaluate_spliced_many,
};
use sae_workbench::sae_core::{
    ArchitectureConfig, IterSource, Progress, SaeModel, StandardTraining, TopKTraining, Trainer,
    TrainerConfig, train_many,
};
use sae_workbench::transformer_hooks::Model;
use sae_workbench::transformer_hooks::candle_core::Device;

const HOOK: &str = "blocks.15.mlp.hook_post";

struct Outcome {
    shard_hashes: Vec<String>,
    weights: Vec<Vec<u8>>,
    evals: Vec<SplicedEvaluation>,
}

fn run_pipeline(model_path: &Path, root: &Path, dir: &Path) -> Outcome {
    let model = Model::load(model_path, &Device::Cpu).unwrap();
    let mut source = HookedModel::new(model);
    let docs: Vec<_> = load_corpus(root, CorpusName::MobyDick)
        .unwrap()
        .into_iter()
        .take(8)
        .collect();
    let encode = |t: &str| source.encode(t);
    let tokenized = tokenize_documents(&docs, &encode, &SplitSpec::default()).unwrap();
    let bos = source.bos().unwrap();
    let mut train_docs = tokenized.clone();
    train_docs.iter_mut().for_each(|d| d.split = Split::Train);
    let plan = WindowPlan::build(&train_docs, Split::Train, 64, bos, 7).unwrap();

    let mut cfg = HarvestConfig::new(vec![HOOK.to_string()]);
    cfg.max_rows = 2048;
    cfg.shard_rows = 512;
    cfg.exclude_token_ids = source.special_token_ids().unwrap();
    let identity = source.identity().unwrap();
    let cache_dir = dir.join("cache");
    harvest(&cache_dir, &plan, &identity, &mut source, &cfg, None).unwrap();
    let cache = ActivationStore::open(&cache_dir).unwrap();
    let shard_hashes = cache
        .manifest()
        .shards
        .iter()
        .flat_map(|s| s.hooks.iter().map(|h| h.file.sha256.clone()))
        .collect();

    let acts = cache.hook(HOOK).unwrap();
    let d_in = acts.width();
    let steps = 24;
    let configs = [
        ArchitectureConfig::TopK(TopKTraining::new(16)),
        ArchitectureConfig::Standard(StandardTraining::default()),
    ];
    let mut trainers: Vec<Trainer> = configs
        .into_iter()
        .map(|a| {
            let mut c = TrainerConfig::new(d_in, 2 * d_in, a, steps);
            c.lr = 2e-3;
            c.lr_warm_up_steps = 2;
            c.lr_decay_steps = 5;
            c.log_every = 4;
            c.seed = 3;
            Trainer::new(c).unwrap()
        })
        .collect();
    let stream = acts
        .batches(StreamConfig {
            seed: 5,
            epochs: None,
            device: Device::Cpu,
            ..StreamConfig::new(128)
        })
        .unwrap();
    train_many(&mut trainers, &mut IterSource(stream), Progress::Hidden).unwrap();
    let mut saes = Vec::new();
    let mut weights = Vec::new();
    for (i, t) in trainers.iter().enumerate() {
        let folder = dir.join(format!("sae_{i}"));
        t.save(&folder).unwrap();
        weights.push(std::fs::read(folder.join("sae_weights.safetensors")).unwrap());
        saes.push(SaeModel::load(&folder).unwrap());
    }

    let mut test_docs = tokenized;
    test_docs.iter_mut().for_each(|d| d.split = Split::Test);
    let test_plan = WindowPlan::build(&test_docs, Split::Test, 64, bos, 11).unwrap();
    let batches = test_plan.full_window_batches(256, 2, &Device::Cpu).unwrap();
    let mut target = HookedSplice::new(source.model(), HOOK).unwrap();
    let refs: Vec<&SaeModel> = saes.iter().collect();
    let eval_cfg = SplicedConfig {
        mean: MeanActivation::EvalTokens,
        ..SplicedConfig::default()
    };
    let evals = evaluate_spliced_many(&mut target, &refs, &batches, &eval_cfg, None).unwrap();
    Outcome {
        shard_hashes,
        weights,
        evals,
    }
}

#[test]
fn the_pipeline_gives_identical_numbers_twice() {
    let Some((path, root)) = common::smollm2_and_corpora() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a = run_pipeline(&path, &root, &tmp.path().join("a"));
    let b = run_pipeline(&path, &root, &tmp.path().join("b"));
    // A digest of each stage, to compare runs at other thread counts by hand
    // (`RAYON_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 cargo test --test pipeline_determinism --
    // --nocapture`; docs/reliability.md has what it showed).
    let fnv = |bytes: &[u8]| {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    };
    eprintln!(
        "digest harvest {:016x}",
        fnv(a.shard_hashes.concat().as_bytes())
    );
    for (i, (w, e)) in a.weights.iter().zip(&a.evals).enumerate() {
        eprintln!(
            "digest sae {i} weights {:016x} loss_recovered {:.9} fvu {:.9}",
            fnv(w),
            e.spliced.loss_recovered_zero,
            e.reconstruction.fvu
        );
    }
    assert_eq!(
        a.shard_hashes, b.shard_hashes,
        "harvested activations differ"
    );
    for (i, (wa, wb)) in a.weights.iter().zip(&b.weights).enumerate() {
        assert!(wa == wb, "SAE {i}: trained weights differ");
    }
    for (i, (ea, eb)) in a.evals.iter().zip(&b.evals).enumerate() {
        let (ja, jb) = (
            serde_json::to_string(ea).unwrap(),
            serde_json::to_string(eb).unwrap(),
        );
        assert_eq!(ja, jb, "SAE {i}: evaluation differs");
        assert!(ea.spliced.loss_recovered_zero.is_finite());
    }
}
