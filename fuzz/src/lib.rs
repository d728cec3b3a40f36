//! Entry points of the fuzz targets: each takes bytes from outside (a file a user could pass)
//! and drives the workspace's loader for that format as far as it goes. A loader may refuse the
//! bytes with an error; it must not panic, abort, hang or allocate without bound.
//!
//! The loaders read paths, so each entry writes the bytes to a file in a scratch folder next to
//! valid companions (weights for a fuzzed config, a manifest for a fuzzed shard). The same
//! functions run under libFuzzer (`fuzz_targets/`) and, on the seed corpora and their
//! mutations, in the stable test `tests/fuzz_smoke.rs`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sae_workbench::activation_store::{
    self as store, ActivationStore, CacheSettings, CacheWriter, HookInfo, Provenance, SourceInfo,
    StoreDtype,
};
use sae_workbench::sae_core::{SaeModel, Trainer, TrainerConfig};
use sae_workbench::transformer_hooks::candle_core::{DType, Device, Tensor};
use sae_workbench::transformer_hooks::{GenerateOptions, Hooks, Model, Sampling, Tokenizer};

/// The repository root (fixtures are read from it): the parent of the fuzz crate, or the root
/// package itself when this file is compiled into `tests/fuzz_smoke.rs`.
fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("fuzz/src/lib.rs").exists() {
        here.to_path_buf()
    } else {
        here.join("..")
    }
}

/// A scratch folder for this process, made once.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("saew-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch folder");
        d
    })
}

/// A folder `name` in the scratch folder holding copies of `files` (relative to the root).
fn folder_with(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let d = scratch().join(name);
    std::fs::create_dir_all(&d).expect("scratch subfolder");
    for (from, to) in files {
        std::fs::copy(root().join(from), d.join(to)).expect("fixture copy");
    }
    d
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("scratch write");
}

/// A GGUF file: its header, metadata, tensor table, tokenizer and weights.
pub fn gguf(data: &[u8]) {
    let p = scratch().join("model.gguf");
    write(&p, data);
    let _ = Tokenizer::load(&p);
    let _ = Model::load(&p, &Device::Cpu);
}

/// An HF folder's `config.json`, beside a tiny Gemma 3's real weights.
pub fn hf_config(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        folder_with(
            "hf",
            &[(
                "transformer-hooks/tests/fixtures/tiny/gemma3/model.safetensors",
                "model.safetensors",
            )],
        )
    });
    write(&dir.join("config.json"), data);
    let _ = Tokenizer::load(dir);
    let _ = Model::load(dir, &Device::Cpu);
}

/// A `tokenizer.json`, then encoding and decoding a fixed text with it.
pub fn tokenizer_json(data: &[u8]) {
    let p = scratch().join("tokenizer.json");
    write(&p, data);
    if let Ok(t) = Tokenizer::from_file(&p, None, None, false)
        && let Ok(ids) = t.encode("<start_of_turn>user\nWhat is a cat?", false)
    {
        let _ = t.decode(&ids);
    }
}

/// An SAE's `cfg.json` in each dialect (SAELens, legacy flat, sparsify), beside real weights;
/// the first byte picks the dialect.
pub fn sae_cfg(data: &[u8]) {
    static DIRS: OnceLock<[PathBuf; 2]> = OnceLock::new();
    let dirs = DIRS.get_or_init(|| {
        [
            folder_with(
                "sae_saelens",
                &[(
                    "tests/fixtures/saelens/topk/sae_weights.safetensors",
                    "sae_weights.safetensors",
                )],
            ),
            folder_with(
                "sae_sparsify",
                &[(
                    "tests/fixtures/saelens/sparsify_topk/sae.safetensors",
                    "sae.safetensors",
                )],
            ),
        ]
    });
    load_sae_with(dirs, "cfg.json", data);
}

/// Writes `data` after its first byte as `file` in the folder that byte's low bit chooses, and
/// loads the SAE there.
fn load_sae_with(dirs: &[PathBuf; 2], file: &str, data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let dir = &dirs[usize::from(first & 1)];
    write(&dir.join(file), rest);
    if let Ok(sae) = SaeModel::load(dir) {
        let _ = sae.config().d_sae();
    }
}

/// An SAE's `sae_weights.safetensors` beside a valid `cfg.json`.
pub fn sae_weights(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        folder_with(
            "sae_w",
            &[("tests/fixtures/saelens/topk/cfg.json", "cfg.json")],
        )
    });
    write(&dir.join("sae_weights.safetensors"), data);
    let _ = SaeModel::load(dir);
}

/// A dictionary_learning SAE's `ae.pt` (a torch state dict: a zip holding a pickle) beside a
/// valid `config.json`, the first byte choosing an AutoEncoderTopK's or a GatedAutoEncoder's.
pub fn sae_torch_state(data: &[u8]) {
    static DIRS: OnceLock<[PathBuf; 2]> = OnceLock::new();
    let dirs = DIRS.get_or_init(|| {
        ["topk", "gated"].map(|class| {
            folder_with(
                &format!("sae_pt_{class}"),
                &[(
                    &format!("tests/fixtures/dictionary_learning/{class}/config.json"),
                    "config.json",
                )],
            )
        })
    });
    load_sae_with(dirs, "ae.pt", data);
}

/// The first shard's files of the fixture cache: each hook's rows, then the provenance.
pub fn shard_files() -> [String; 3] {
    [
        "blocks.0.hook_resid_post",
        "blocks.0.mlp.hook_post",
        "provenance",
    ]
    .map(|sub| store::shard_path(sub, 0))
}

/// A small valid activation cache (two hooks of widths 3 and 5, two shards), written once.
pub fn fixture_cache() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch().join("cache");
        let source = SourceInfo {
            model: "fuzz".into(),
            model_sha256: "0".repeat(64),
            tokenizer: "none".into(),
            context_len: 8,
            split: "train".into(),
            plan_sha256: "0".repeat(64),
        };
        let settings = CacheSettings {
            dtype: StoreDtype::F16,
            shard_rows: 4,
            batch_windows: 1,
            exclude_bos: true,
            exclude_token_ids: vec![],
            outlier_factor: None,
        };
        let hooks = vec![
            HookInfo {
                name: "blocks.0.hook_resid_post".into(),
                width: 3,
                outlier_threshold: None,
            },
            HookInfo {
                name: "blocks.0.mlp.hook_post".into(),
                width: 5,
                outlier_threshold: None,
            },
        ];
        let mut w = CacheWriter::create(&dir, source, settings, hooks).expect("fuzz cache");
        for s in 0..2u32 {
            let mut shard = w.begin_shard().expect("shard");
            for r in 0..4u32 {
                let a: Vec<f32> = (0..3).map(|j| (s * 4 + r + j) as f32 * 0.25).collect();
                let b: Vec<f32> = (0..5).map(|j| (r + j) as f32 - 2.0).collect();
                let prov = Provenance {
                    window: s,
                    position: r + 1,
                    token: r + 7,
                };
                shard.push(prov, &[&a, &b]).expect("push");
            }
            w.commit(shard, u64::from(s) + 1, u64::from(s) + 1, 0)
                .expect("commit");
        }
        dir
    })
}

/// Opens a cache and reads what a user of it would: every hook's rows, provenance, the plan,
/// a stream of batches, and a full verification.
fn use_cache(dir: &Path) {
    let Ok(cache) = ActivationStore::open(dir) else {
        return;
    };
    let rows = cache.rows();
    let names: Vec<String> = cache
        .manifest()
        .hooks
        .iter()
        .map(|h| h.name.clone())
        .collect();
    for name in names {
        if let Ok(h) = cache.hook(&name) {
            let n = rows.min(6) as usize;
            let _ = h.read_rows(0, n);
            let _ = h.read_rows(rows.saturating_sub(1), 1);
            let _ = h.mean_norm();
            if let Ok(s) = h.batches(store::StreamConfig {
                epochs: Some(1),
                ..store::StreamConfig::new(3)
            }) {
                for b in s.take(4) {
                    if b.is_err() {
                        break;
                    }
                }
            }
        }
    }
    let _ = cache.provenance(0);
    let _ = cache.provenance(rows.saturating_sub(1));
    let _ = cache.plan();
    let _ = cache.verify(None);
}

/// A cache's `manifest.json`, beside valid shards.
pub fn cache_manifest(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| cache_copy("cache_m"));
    write(&dir.join("manifest.json"), data);
    use_cache(dir);
}

/// A cache's shard file (the first byte picks which: a hook's rows or the provenance), beside
/// a valid manifest.
pub fn cache_shard(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| cache_copy("cache_s"));
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let shard = dir.join(&shard_files()[usize::from(first % 3)]);
    let before = std::fs::read(&shard).expect("shard");
    write(&shard, rest);
    use_cache(dir);
    write(&shard, &before);
}

/// An R serialization (the corpora's `.rdb` objects and `.rdx` index).
pub fn rdata(data: &[u8]) {
    let _ = store::rdata::unserialize(data, "fuzz input");
}

/// The architectures of [`checkpoint`]'s folders, each with non-default options so that the
/// seeds carry every kind of field.
/// (the architecture, trainer options only some architectures take)
const CHECKPOINT_ARCHS: [(&str, &str); 6] = [
    (
        r#"{"architecture":"standard","l1_coefficient":2.0}"#,
        r#""resample_at_steps":[20],"encoder_bias_init_l0":2,"#,
    ),
    (r#"{"architecture":"topk","k":2,"aux_k":4}"#, ""),
    (r#"{"architecture":"batchtopk","k":2.0}"#, ""),
    (
        r#"{"architecture":"matryoshka_batchtopk","k":2.0,"matryoshka_widths":[4,8]}"#,
        "",
    ),
    (r#"{"architecture":"jumprelu","l0_coefficient":0.5}"#, ""),
    (
        r#"{"architecture":"gated","l1_coefficient":1.5}"#,
        r#""encoder_bias_init_l0":3,"#,
    ),
];

/// A trainer checkpoint per architecture (3 inputs, 8 features, three steps on the fixture
/// cache's rows), made once; returns each checkpoint folder.
pub fn checkpoint_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let batch = fixture_batch();
        CHECKPOINT_ARCHS
            .iter()
            .enumerate()
            .map(|(i, (arch, extra))| {
                let cfg = format!(
                    r#"{{"d_in":3,"d_sae":8,"sae":{arch},"total_steps":40,"lr":0.001,{extra}
                        "lr_warm_up_steps":2,"lr_decay_steps":10,"sparsity_warm_up_steps":3,
                        "log_every":2,"seed":{i}}}"#
                );
                let cfg: TrainerConfig = serde_json::from_str(&cfg).expect("trainer config");
                let mut t = Trainer::new(cfg).expect("trainer");
                for _ in 0..3 {
                    t.step(&batch).expect("step");
                }
                t.checkpoint(scratch().join(format!("ck{i}")))
                    .expect("checkpoint")
            })
            .collect()
    })
}

/// The fixture cache's first hook's rows, `[8, 3]`: the batch every checkpoint trains on.
fn fixture_batch() -> Tensor {
    let cache = ActivationStore::open(fixture_cache()).expect("fixture cache");
    let rows = cache.rows() as usize;
    let h = cache.hook("blocks.0.hook_resid_post").expect("hook");
    let v = h.read_rows(0, rows).expect("rows");
    Tensor::from_vec(v, (rows, 3), &Device::Cpu).expect("batch")
}

/// A trainer checkpoint's `trainer.json` (the first byte picks the architecture's folder)
/// beside that checkpoint's valid `state.safetensors`, then resuming and training two steps.
///
/// `trainer.json` holds every training option the examples take from their arguments (sizes,
/// learning rate and its schedule, sparsity, resampling, clipping, normalisation, the
/// architecture's own settings), so this is also where their combinations meet the allocating
/// code, from a file a user can hand to `--resume`.
pub fn checkpoint(data: &[u8]) {
    let dirs = checkpoint_dirs();
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let dir = &dirs[usize::from(first) % dirs.len()];
    let path = dir.join("trainer.json");
    let before = std::fs::read(&path).expect("trainer.json");
    write(&path, rest);
    if let Ok(mut t) = Trainer::resume(dir) {
        let d_in = t.config().d_in;
        if let Ok(batch) = Tensor::ones((4, d_in), DType::F32, &Device::Cpu) {
            for _ in 0..2 {
                if t.step(&batch).is_err() {
                    break;
                }
            }
        }
    }
    write(&path, &before);
}

/// A copy of the fixture cache in the scratch folder, for one target to damage.
fn cache_copy(name: &str) -> PathBuf {
    let d = scratch().join(name);
    copy_tree(fixture_cache(), &d);
    d
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("copy folder");
    for e in std::fs::read_dir(from).expect("read folder") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy file");
        }
    }
}

/// Bytes read in order as option values; zeros once they run out.
struct Draw<'a>(&'a [u8]);

impl Draw<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    /// Any f64, NaN and the infinities included.
    fn f64(&mut self) -> f64 {
        f64::from_bits(self.u64())
    }
    fn yes(&mut self) -> bool {
        self.u8() & 1 == 1
    }
}

/// The tiny Gemma 3 of the fixtures (vocabulary 128, context 64), loaded once.
fn tiny_model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        Model::load(
            &root().join("transformer-hooks/tests/fixtures/tiny/gemma3"),
            &Device::Cpu,
        )
        .expect("tiny model")
    })
}

/// Combinations of the options that the examples take from their arguments besides the
/// trainer's (those are the `checkpoint` target's): a stream over the fixture cache (batch size,
/// seed, epochs, shuffle and its sizes, prefetch, checksums, batches skipped to resume) and
/// generation on a tiny model (new tokens, temperature, top-k, top-p, seed, stop tokens, KV
/// cache, pad token, and a batch of prompts of any token ids), then a harvest
/// ([`harvest_options`]). Each value comes from the bytes as they are: zero, huge, NaN or out of
/// the vocabulary. The stream always has a number of
/// epochs, since an endless one with a batch larger than the cache is endless by request.
pub fn options(data: &[u8]) {
    let mut d = Draw(data);
    let hook = if d.yes() {
        "blocks.0.hook_resid_post"
    } else {
        "blocks.0.mlp.hook_post"
    };
    let shuffle = match d.u8() % 3 {
        0 => store::Shuffle::Sequential,
        1 => store::Shuffle::Buffer {
            buffer_bytes: d.u32() as usize,
            chunk_rows: d.u32() as usize,
        },
        _ => store::Shuffle::External {
            memory_bytes: d.u32() as usize,
            scratch_dir: Some(scratch().join("external")),
        },
    };
    let stream = store::StreamConfig {
        batch_size: d.u32() as usize,
        seed: d.u64(),
        epochs: Some(u64::from(d.u8() % 4)),
        shuffle,
        prefetch: usize::from(d.u8()),
        device: Device::Cpu,
        verify_checksums: d.yes(),
        skip_batches: u64::from(d.u32()),
    };
    if let Ok(cache) = ActivationStore::open(fixture_cache())
        && let Ok(h) = cache.hook(hook)
        && let Ok(batches) = h.batches(stream)
    {
        for b in batches.take(6) {
            if b.is_err() {
                break;
            }
        }
    }

    let sampling = if d.yes() {
        Sampling::Greedy
    } else {
        Sampling::Sample {
            temperature: d.f64(),
            top_k: d.yes().then(|| d.u32() as usize),
            top_p: d.yes().then(|| d.f64()),
            seed: d.u64(),
        }
    };
    let max_new_tokens = usize::from(d.u8());
    let stop_tokens = (0..d.u8() % 4).map(|_| d.u32()).collect();
    let kv_cache = d.yes();
    let pad_token = d.yes().then(|| d.u32());
    let opts = GenerateOptions {
        max_new_tokens,
        sampling,
        stop_tokens,
        kv_cache,
        pad_token,
    };
    // Token ids mostly in the vocabulary (128), sometimes past it.
    let prompts: Vec<Vec<u32>> = (0..1 + d.u8() % 3)
        .map(|_| (0..d.u8() % 6).map(|_| d.u32() % 160).collect())
        .collect();
    let _ = tiny_model().generate_batch(&prompts, &opts, &mut Hooks::new());

    harvest_options(&mut d);
}

/// The harvest's settings in combination (what `harvest` and `main_job` take from `--seq`,
/// `--hooks`, `--shard-rows`, `--dtype`, `--max-tokens` ...): a window plan of a few short
/// documents at any context length, hooks known, unknown or repeated, every setting of
/// [`store::HarvestConfig`], harvested with the tiny model into a fresh folder and then harvested
/// again into the same folder with settings that may differ (a resume, or a cache from other
/// settings that must be refused). Bytes of zero draw a valid harvest (24 tokens, context 8,
/// one known hook, 8 windows a batch), so that mutations start from settings that get through.
fn harvest_options(d: &mut Draw<'_>) {
    const HOOKS: [&str; 6] = [
        "blocks.0.hook_resid_post",
        "blocks.1.mlp.hook_post",
        "blocks.0.attn.hook_z",
        "blocks.9.hook_resid_post",
        "blocks.0.hook_nonsense",
        "",
    ];
    let docs: Vec<store::TokenizedDocument> = (0..1 + d.u8() % 4)
        .map(|i| store::TokenizedDocument {
            id: format!("doc{i}"),
            split: if d.u8() % 4 == 3 {
                store::Split::Test
            } else {
                store::Split::Train
            },
            tokens: (0..24 - d.u8() % 25).map(|_| d.u32() % 130).collect(),
        })
        .collect();
    let Ok(plan) = store::WindowPlan::build(
        &docs,
        store::Split::Train,
        usize::from(8 ^ (d.u8() % 16)),
        d.u32() % 160,
        d.u64(),
    ) else {
        return;
    };
    let dir = scratch().join("harvest");
    let _ = std::fs::remove_dir_all(&dir);
    let mut source = harvest_model().lock().unwrap_or_else(|p| p.into_inner());
    // The tiny model has no tokenizer, which `HookedModel::identity` asks for.
    let identity = store::ModelIdentity {
        model: "tiny-gemma3".into(),
        model_sha256: "0".repeat(64),
        tokenizer: "none".into(),
    };
    for _ in 0..2 {
        let hooks = (0..d.u8().wrapping_add(1) % 4)
            .map(|_| HOOKS[usize::from(d.u8()) % HOOKS.len()].to_string())
            .collect();
        let mut cfg = store::HarvestConfig::new(hooks);
        cfg.dtype = match d.u8() % 3 {
            0 => StoreDtype::F32,
            1 => StoreDtype::Bf16,
            _ => StoreDtype::F16,
        };
        cfg.batch_windows = usize::from(8 ^ (d.u8() % 12));
        cfg.shard_rows = u64::from((d.u32() % 200) ^ 64);
        cfg.exclude_bos = d.yes();
        cfg.exclude_token_ids = (0..d.u8() % 3).map(|_| d.u32() % 160).collect();
        cfg.outlier_factor = d.yes().then(|| d.f64() as f32);
        cfg.max_rows = if d.yes() { d.u64() % 300 } else { u64::MAX };
        let _ = store::harvest(&dir, &plan, &identity, &mut *source, &cfg, None);
    }
}

/// A second copy of the tiny model, owned by the harvest's source.
fn harvest_model() -> &'static std::sync::Mutex<store::HookedModel> {
    static MODEL: OnceLock<std::sync::Mutex<store::HookedModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let model = Model::load(
            &root().join("transformer-hooks/tests/fixtures/tiny/gemma3"),
            &Device::Cpu,
        )
        .expect("tiny model");
        std::sync::Mutex::new(store::HookedModel::new(model))
    })
}
