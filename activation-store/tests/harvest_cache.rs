//! Harvest into a cache and read it back: every row is where its provenance says, and bad
//! input of every kind is an error that names it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use activation_store::{
    ActivationSource, ActivationStore, Error, HarvestConfig, Result, StoreDtype, SyntheticSource,
    harvest,
};
use candle_core::{Device, Tensor};
use common::*;

#[test]
fn rows_match_their_provenance_and_cover_every_text_token_once() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan(40, 16);
    let s = run(tmp.path(), &plan, &config(100));
    assert_eq!(
        s.tokens,
        plan.text_tokens(),
        "BOS excluded, every text token kept"
    );
    assert!(s.shards > 3, "{s:?}");
    assert!(s.plan_exhausted && !s.resumed);

    let cache = ActivationStore::open(tmp.path()).unwrap();
    let report = cache.verify(None).unwrap();
    assert_eq!(report.rows, plan.text_tokens());
    assert_eq!(report.files, 3 * s.shards);
    let mut seen = BTreeSet::new();
    for (h, (&name, &width)) in HOOKS.iter().zip(&WIDTHS).enumerate() {
        let acts = cache.hook(name).unwrap();
        assert_eq!(acts.width(), width);
        let all = acts.read_rows(0, cache.rows() as usize).unwrap();
        let mut norm_sum = 0.0;
        for r in 0..cache.rows() {
            let p = cache.provenance(r).unwrap();
            assert_eq!(p.token, plan.tokens(p.window as usize)[p.position as usize]);
            let want = SyntheticSource::row(h, width, p.token, p.position);
            assert_eq!(
                &all[r as usize * width..(r as usize + 1) * width],
                &want[..]
            );
            norm_sum += want.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
            if h == 0 {
                assert!(p.position > 0);
                assert!(seen.insert((p.window, p.position)), "row {r} duplicated");
            }
        }
        assert!((acts.mean_norm() - norm_sum / cache.rows() as f64).abs() < 1e-4);
    }
    // Shards close at batch boundaries once they reach shard_rows.
    let m = cache.manifest();
    for sh in &m.shards[..m.shards.len() - 1] {
        assert!(sh.rows >= 100 && sh.windows[1] % 4 == 0, "{sh:?}");
    }
    // plan.json traces a window back to its document.
    let p = cache.provenance(7).unwrap();
    let info = cache.plan().unwrap();
    let span = info.windows[p.window as usize];
    assert_eq!(
        info.documents[span.doc as usize],
        plan.document_of(p.window as usize)
    );
}

#[test]
fn a_token_budget_stops_at_a_batch_and_a_larger_one_extends() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan(40, 16);
    let mut cfg = config(50);
    cfg.max_rows = 200;
    let a = run(tmp.path(), &plan, &cfg);
    assert!(a.tokens >= 200 && a.tokens < 200 + 4 * 15, "{a:?}");
    assert!(!a.plan_exhausted);
    cfg.max_rows = u64::MAX;
    let b = run(tmp.path(), &plan, &cfg);
    assert!(b.resumed && b.plan_exhausted);
    assert_eq!(b.tokens, plan.text_tokens());
    // Identical to a single uninterrupted run.
    let fresh = tempfile::tempdir().unwrap();
    run(fresh.path(), &plan, &cfg);
    assert_eq!(snapshot(tmp.path()), snapshot(fresh.path()));
}

#[test]
fn half_precision_and_excluded_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan(20, 16);
    let mut cfg = config(1000);
    cfg.dtype = StoreDtype::Bf16;
    let excluded = plan.tokens(0)[1];
    cfg.exclude_token_ids = vec![excluded];
    run(tmp.path(), &plan, &cfg);
    let cache = ActivationStore::open(tmp.path()).unwrap();
    let acts = cache.hook(HOOKS[1]).unwrap();
    let all = acts.read_rows(0, cache.rows() as usize).unwrap();
    let n_excluded = (0..plan.len())
        .flat_map(|w| plan.tokens(w)[1..].to_vec())
        .filter(|&t| t == excluded)
        .count() as u64;
    assert!(n_excluded > 0);
    assert_eq!(cache.rows(), plan.text_tokens() - n_excluded);
    for r in 0..cache.rows() as usize {
        let p = cache.provenance(r as u64).unwrap();
        assert_ne!(p.token, excluded);
        let want = SyntheticSource::row(1, WIDTHS[1], p.token, p.position);
        for (a, b) in all[r * 12..(r + 1) * 12].iter().zip(&want) {
            assert!((a - b).abs() <= b.abs() / 128.0 + 1e-6);
        }
    }
}

/// Scales the rows of one token id by 50: a planted high-norm outlier.
struct Planted {
    inner: SyntheticSource,
    token: u32,
}

impl ActivationSource for Planted {
    fn forward(&mut self, tokens: &Tensor, hooks: &[String]) -> Result<Vec<Tensor>> {
        let outs = self.inner.forward(tokens, hooks)?;
        let mask = tokens
            .eq(self.token)?
            .to_dtype(candle_core::DType::F32)?
            .affine(49.0, 1.0)?
            .unsqueeze(2)?;
        Ok(outs
            .into_iter()
            .map(|t| t.broadcast_mul(&mask))
            .collect::<candle_core::Result<_>>()?)
    }
}

#[test]
fn outlier_filter_drops_exactly_the_planted_rows_and_says_how_many() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan(30, 16);
    let token = plan.tokens(3)[2];
    let planted = (0..plan.len())
        .flat_map(|w| plan.tokens(w)[1..].to_vec())
        .filter(|&t| t == token)
        .count() as u64;
    let mut cfg = config(100);
    cfg.outlier_factor = Some(10.0);
    let mut src = Planted {
        inner: source(Duration::ZERO),
        token,
    };
    let s = harvest(tmp.path(), &plan, &model(), &mut src, &cfg, None).unwrap();
    assert!(planted > 0);
    assert_eq!(s.dropped_outliers, planted);
    assert_eq!(s.tokens, plan.text_tokens() - planted);
    let cache = ActivationStore::open(tmp.path()).unwrap();
    assert!(cache.manifest().hooks[0].outlier_threshold.is_some());
    for r in 0..cache.rows() {
        assert_ne!(cache.provenance(r).unwrap().token, token);
    }
}

struct Nan;
impl ActivationSource for Nan {
    fn forward(&mut self, tokens: &Tensor, hooks: &[String]) -> Result<Vec<Tensor>> {
        let (b, s) = tokens.dims2()?;
        let mut v = vec![0f32; b * s * 4];
        v[4 * (s + 2)] = f32::NAN; // window 1, position 2
        Ok(hooks
            .iter()
            .map(|_| Tensor::from_vec(v.clone(), (b, s, 4), &Device::Cpu))
            .collect::<candle_core::Result<_>>()?)
    }
}

#[test]
fn nan_activations_are_an_error_naming_where() {
    let tmp = tempfile::tempdir().unwrap();
    let err = harvest(
        tmp.path(),
        &plan(10, 16),
        &model(),
        &mut Nan,
        &config(100),
        None,
    )
    .unwrap_err();
    match err {
        Error::NonFinite {
            window, position, ..
        } => assert_eq!((window, position), (1, 2)),
        e => panic!("{e}"),
    }
}

#[test]
fn resuming_with_other_settings_or_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan(10, 16);
    run(tmp.path(), &plan, &config(100));
    // A second harvest into the same folder, which must be refused.
    let refused = |plan: &activation_store::WindowPlan,
                   model: &activation_store::ModelIdentity,
                   cfg: &HarvestConfig| {
        harvest(
            tmp.path(),
            plan,
            model,
            &mut source(Duration::ZERO),
            cfg,
            None,
        )
        .unwrap_err()
    };
    let mut cfg = config(100);
    cfg.dtype = StoreDtype::F16;
    let e = refused(&plan, &model(), &cfg);
    assert!(
        matches!(e, Error::ManifestMismatch { field: "dtype", .. }),
        "{e}"
    );
    // The message names the one setting that differs, with both values.
    let msg = e.to_string();
    assert!(msg.contains("dtype = F32, but F16 was asked for"), "{msg}");
    let mut cfg = config(100);
    cfg.exclude_bos = !cfg.exclude_bos;
    let e = refused(&plan, &model(), &cfg);
    assert!(
        matches!(
            e,
            Error::ManifestMismatch {
                field: "exclude_bos",
                ..
            }
        ),
        "{e}"
    );
    let mut other = model();
    other.model_sha256 = "11".repeat(32);
    let e = refused(&plan, &other, &config(100));
    assert!(e.to_string().contains(&"11".repeat(32)), "{e}");
    let other_plan = common::plan(11, 16);
    let e = refused(&other_plan, &model(), &config(100));
    assert!(e.to_string().contains("plan_sha256"), "{e}");
    let mut one_hook = config(100);
    one_hook.hooks.pop();
    let e = refused(&plan, &model(), &one_hook);
    assert!(
        matches!(e, Error::ManifestMismatch { field: "hooks", .. }),
        "{e}"
    );
}

#[test]
fn reader_refuses_other_model_and_unknown_hook() {
    let tmp = tempfile::tempdir().unwrap();
    run(tmp.path(), &plan(10, 16), &config(100));
    let cache = ActivationStore::open(tmp.path()).unwrap();
    cache.expect_model(&"00".repeat(32)).unwrap();
    let e = cache.expect_model(&"ab".repeat(32)).unwrap_err();
    assert!(e.to_string().contains("model_sha256"), "{e}");
    let e = cache.hook("blocks.3.mlp.hook_post").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("blocks.3.mlp.hook_post") && msg.contains(HOOKS[0]),
        "{msg}"
    );
    let e = ActivationStore::open(tmp.path().join("nope")).unwrap_err();
    assert!(matches!(e, Error::Manifest { .. }), "{e}");
}

#[test]
fn truncated_shard_is_named_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    run(tmp.path(), &plan(20, 16), &config(100));
    let path = tmp.path().join(HOOKS[1]).join("shard-000001.bin");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    match ActivationStore::open(tmp.path()).unwrap_err() {
        Error::ShardSize {
            path: p,
            expected,
            found,
        } => {
            assert_eq!(p, path);
            assert_eq!((expected, found), (len, len - 7));
        }
        e => panic!("{e}"),
    }
}

#[test]
fn corrupt_shard_is_named_by_verify_and_by_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    run(tmp.path(), &plan(20, 16), &config(100));
    let path = tmp.path().join(HOOKS[0]).join("shard-000002.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let cache = ActivationStore::open(tmp.path()).unwrap();
    match cache.verify(None).unwrap_err() {
        Error::ChecksumMismatch { path: p, .. } => assert_eq!(p, path),
        e => panic!("{e}"),
    }
    for shuffle in [
        activation_store::Shuffle::Sequential,
        activation_store::Shuffle::buffer(),
        activation_store::Shuffle::external(),
    ] {
        let cfg = activation_store::StreamConfig {
            epochs: Some(1),
            shuffle,
            ..activation_store::StreamConfig::new(16)
        };
        let results: Vec<_> = cache
            .hook(HOOKS[0])
            .unwrap()
            .batches(cfg)
            .unwrap()
            .collect();
        let err = results.into_iter().find_map(|r| r.err()).expect("an error");
        assert!(err.to_string().contains("shard-000002.bin"), "{err}");
    }
}

#[test]
fn full_disk_is_an_error_naming_the_shard() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("skipping: no /dev/full on this system");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan(20, 16);
    // Commit shard 0, then resume with shard 1's temporary file linked to /dev/full, where
    // every write fails with ENOSPC.
    let mut cfg = config(50);
    cfg.max_rows = 10;
    run(tmp.path(), &plan, &cfg);
    let tmp_file = tmp.path().join(HOOKS[1]).join("shard-000001.bin.tmp");
    cfg.max_rows = u64::MAX;
    let e = harvest_with_full_disk(tmp.path(), &plan, &cfg, &tmp_file);
    match e {
        Error::DiskFull { path } => assert_eq!(path, tmp_file),
        e => panic!("expected DiskFull, got {e}"),
    }
    // Nothing half-written was committed: the cache still verifies, with shard 0 only.
    let cache = ActivationStore::open(tmp.path()).unwrap();
    assert_eq!(cache.manifest().shards.len(), 1);
    cache.verify(None).unwrap();
}

/// Runs the harvest with a source that re-plants the /dev/full link on its first forward pass,
/// i.e. after the resume's cleanup of stale temporary files and before the shard is written.
fn harvest_with_full_disk(
    dir: &std::path::Path,
    plan: &activation_store::WindowPlan,
    cfg: &HarvestConfig,
    link: &std::path::Path,
) -> Error {
    struct Replant<'a> {
        inner: SyntheticSource,
        link: &'a std::path::Path,
        done: bool,
    }
    impl ActivationSource for Replant<'_> {
        fn forward(&mut self, tokens: &Tensor, hooks: &[String]) -> Result<Vec<Tensor>> {
            if !self.done {
                self.done = true;
                let _ = std::fs::remove_file(self.link);
                std::os::unix::fs::symlink("/dev/full", self.link).unwrap();
            }
            self.inner.forward(tokens, hooks)
        }
    }
    let mut src = Replant {
        inner: source(Duration::ZERO),
        link,
        done: false,
    };
    harvest(dir, plan, &model(), &mut src, cfg, None).unwrap_err()
}

/// A manifest edited into nonsense (no hooks, a zero or absurd width, an absurd row count) is an
/// error naming the manifest and the field, never an overflow or a division by zero later.
#[test]
fn absurd_manifests_are_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    run(tmp.path(), &plan(6, 16), &config(100));
    let path = tmp.path().join("manifest.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    type Corrupt = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Corrupt)> = vec![
        ("no hook", Box::new(|m| m["hooks"] = serde_json::json!([]))),
        ("width 0", Box::new(|m| m["hooks"][0]["width"] = 0.into())),
        (
            "absurd width",
            Box::new(|m| m["hooks"][0]["width"] = serde_json::json!(u64::MAX / 2)),
        ),
        (
            "provenance size disagrees",
            Box::new(|m| m["shards"][0]["rows"] = serde_json::json!(u64::MAX - 1)),
        ),
    ];
    for (want, edit) in cases {
        let mut m = original.clone();
        edit(&mut m);
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        match ActivationStore::open(tmp.path()) {
            Err(Error::Manifest { what, .. }) => assert!(what.contains(want), "{want}: {what}"),
            other => panic!(
                "{want}: expected a manifest error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}

/// A synthetic model that fails at one forward batch, or puts a NaN into it, counting the
/// batches it was asked for.
struct FailsAt {
    inner: SyntheticSource,
    batch: usize,
    nan: bool,
    calls: usize,
}

impl FailsAt {
    /// The synthetic model, failing at forward batch `batch` (with NaN activations if `nan`).
    fn new(batch: usize, nan: bool) -> Self {
        FailsAt {
            inner: source(Duration::ZERO),
            batch,
            nan,
            calls: 0,
        }
    }
}

impl ActivationSource for FailsAt {
    fn forward(&mut self, tokens: &Tensor, hooks: &[String]) -> Result<Vec<Tensor>> {
        let call = self.calls;
        self.calls += 1;
        if call == self.batch && !self.nan {
            return Err(Error::Config {
                field: "model",
                message: "the model failed".into(),
            });
        }
        let outs = self.inner.forward(tokens, hooks)?;
        if call != self.batch {
            return Ok(outs);
        }
        let (b, s, w) = outs[0].dims3()?;
        let mut v = outs[0].flatten_all()?.to_vec1::<f32>()?;
        v[w] = f32::NAN; // window 0 of the batch, position 1
        let mut outs = outs;
        outs[0] = Tensor::from_vec(v, (b, s, w), &Device::Cpu)?;
        Ok(outs)
    }
}

/// The forward passes run one batch ahead of the writes: a model that fails mid-run leaves no
/// half-written shard (the next run redoes it and the cache is the uninterrupted one's), and a
/// batch that fails its checks stops the forward passes within the pipeline's depth.
#[test]
fn a_failure_on_either_side_of_the_pipeline_stops_the_run_and_loses_nothing() {
    let plan = plan(40, 16);
    let cfg = config(30);
    let n_batches = plan.len().div_ceil(cfg.batch_windows);
    assert!(n_batches > 12, "{n_batches} batches");

    let tmp = tempfile::tempdir().unwrap();
    let mut failing = FailsAt::new(7, false);
    let e = harvest(tmp.path(), &plan, &model(), &mut failing, &cfg, None).unwrap_err();
    assert!(e.to_string().contains("the model failed"), "{e}");
    let again = run(tmp.path(), &plan, &cfg);
    assert!(again.resumed && again.plan_exhausted);
    let fresh = tempfile::tempdir().unwrap();
    run(fresh.path(), &plan, &cfg);
    assert_eq!(snapshot(tmp.path()), snapshot(fresh.path()));

    let tmp = tempfile::tempdir().unwrap();
    let mut nan = FailsAt::new(5, true);
    match harvest(tmp.path(), &plan, &model(), &mut nan, &cfg, None).unwrap_err() {
        Error::NonFinite {
            window, position, ..
        } => assert_eq!((window, position), (5 * cfg.batch_windows as u64, 1)),
        e => panic!("{e}"),
    }
    // Batch 5 failed on the writing side; at most the one waiting in the channel and the one
    // being sent were computed after it.
    assert!(nan.calls <= 5 + 3, "{} forward passes", nan.calls);
}
