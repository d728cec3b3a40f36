//! Running a model over the windows of a plan and storing its activations.
//!
//! The model sits behind [`ActivationSource`], so the harvest loop (batching, exclusion,
//! outlier filter, sharding, crash-safe commits, resumption) is the same for a real checkpoint
//! ([`crate::HookedModel`]) and for the [`SyntheticSource`] that tests and benchmarks use.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::manifest::{CacheSettings, HookInfo, Provenance, SourceInfo, StoreDtype};
use crate::pinned::{Downloader, Fetched};
use crate::windows::WindowPlan;
use crate::writer::{CacheWriter, PLAN, ShardBuilder, write_atomic};

/// Something that turns token windows into activations at named hook points.
pub trait ActivationSource {
    /// One forward pass.
    ///
    /// # Shapes
    /// `tokens`: `[batch, seq]` u32, right-padded. Returns one `[batch, seq, width]` tensor per
    /// entry of `hooks`, in that order, of any float dtype, on any device.
    fn forward(&mut self, tokens: &Tensor, hooks: &[String]) -> Result<Vec<Tensor>>;
}

/// What identifies the model in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// File name, for people.
    pub model: String,
    /// sha256 of the model file, for programs.
    pub model_sha256: String,
    /// Tokenizer description.
    pub tokenizer: String,
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).at("open", path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at("read", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl ModelIdentity {
    /// Hashes the model file; `tokenizer` describes the tokenizer used with it.
    pub fn from_file(path: &Path, tokenizer: impl Into<String>) -> Result<Self> {
        Ok(ModelIdentity {
            model: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            model_sha256: sha256_file(path)?,
            tokenizer: tokenizer.into(),
        })
    }
}

/// Harvest settings. Everything except `max_rows` and `device` is recorded in the manifest and
/// must match when a harvest resumes.
#[derive(Debug, Clone)]
pub struct HarvestConfig {
    /// Hook names (TransformerLens spelling); one forward pass serves them all.
    pub hooks: Vec<String>,
    /// Storage dtype (default f32).
    pub dtype: StoreDtype,
    /// Windows per forward pass (default 8).
    pub batch_windows: usize,
    /// Rows per shard, rounded up to whole forward batches (default 32,768).
    pub shard_rows: u64,
    /// Leave out position 0, the BOS token (default true).
    pub exclude_bos: bool,
    /// Token ids whose rows are left out (default: none; pass the tokenizer's special tokens).
    pub exclude_token_ids: Vec<u32>,
    /// Drop rows whose norm exceeds this multiple of the first batch's median norm (default off).
    pub outlier_factor: Option<f32>,
    /// Stop after the forward batch that brings the cache to this many rows (default: the whole
    /// plan). A later run with a larger value extends the cache.
    pub max_rows: u64,
    /// Where the token tensor is put.
    pub device: Device,
}

impl HarvestConfig {
    pub fn new(hooks: Vec<String>) -> Self {
        HarvestConfig {
            hooks,
            dtype: StoreDtype::F32,
            batch_windows: 8,
            shard_rows: 32_768,
            exclude_bos: true,
            exclude_token_ids: Vec::new(),
            outlier_factor: None,
            max_rows: u64::MAX,
            device: Device::Cpu,
        }
    }

    /// # Errors
    /// [`Error::Config`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, message: String| Err(Error::Config { field, message });
        if self.hooks.is_empty() {
            return bad("hooks", "at least one hook is needed".into());
        }
        let unique: HashSet<_> = self.hooks.iter().collect();
        if unique.len() != self.hooks.len() {
            return bad("hooks", format!("{:?} lists a hook twice", self.hooks));
        }
        if self.batch_windows == 0 {
            return bad("batch_windows", "must be at least 1".into());
        }
        if self.shard_rows == 0 {
            return bad("shard_rows", "must be at least 1".into());
        }
        if let Some(f) = self.outlier_factor
            && !(f.is_finite() && f > 1.0)
        {
            return bad("outlier_factor", format!("{f} must be a finite number > 1"));
        }
        Ok(())
    }

    fn settings(&self) -> CacheSettings {
        let mut ex = self.exclude_token_ids.clone();
        ex.sort_unstable();
        ex.dedup();
        CacheSettings {
            dtype: self.dtype,
            shard_rows: self.shard_rows,
            batch_windows: self.batch_windows,
            exclude_bos: self.exclude_bos,
            exclude_token_ids: ex,
            outlier_factor: self.outlier_factor,
        }
    }
}

/// The result of a harvest run, as the `harvest` example prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarvestSummary {
    /// Rows (tokens) in the cache now.
    pub tokens: u64,
    /// Rows added by this run.
    pub tokens_added: u64,
    /// Positions this run passed through the model (BOS included, padding not).
    pub forward_tokens: u64,
    pub seconds: f64,
    /// `forward_tokens / seconds`, writes included.
    pub tokens_per_s: f64,
    /// Time in the forward passes and their copies to the host (from a CUDA device, in queueing
    /// them: the copies' end is waited for by the writing stage, outside both figures).
    pub forward_seconds: f64,
    /// Time in checking and writing the rows, which overlaps the forward passes: `seconds` is
    /// about the larger of the two, not their sum.
    pub write_seconds: f64,
    /// Bytes of all shard files (activations and provenance).
    pub bytes: u64,
    pub shards: u64,
    pub dropped_outliers: u64,
    /// Whether this run continued an existing cache.
    pub resumed: bool,
    /// Whether every window of the plan has been harvested.
    pub plan_exhausted: bool,
}

/// Harvests `plan` into the cache folder `dir`, resuming it when it exists.
///
/// Shards are committed at forward-batch boundaries, so a run killed at any moment and started
/// again with the same arguments produces exactly the rows of an uninterrupted run.
///
/// # Errors
/// [`Error::ManifestMismatch`] when `dir` holds a cache from another model/plan/settings;
/// [`Error::Shape`] when the source returns unexpected shapes; [`Error::NonFinite`] on NaN/inf;
/// [`Error::DiskFull`] naming the shard being written.
pub fn harvest(
    dir: &Path,
    plan: &WindowPlan,
    model: &ModelIdentity,
    source: &mut dyn ActivationSource,
    cfg: &HarvestConfig,
    progress: Option<&ProgressBar>,
) -> Result<HarvestSummary> {
    cfg.validate()?;
    let t0 = Instant::now();
    let source_info = SourceInfo {
        model: model.model.clone(),
        model_sha256: model.model_sha256.clone(),
        tokenizer: model.tokenizer.clone(),
        context_len: plan.context_len,
        split: plan.split.to_string(),
        plan_sha256: plan.sha256(),
    };
    let settings = cfg.settings();
    let writer = CacheWriter::resume(dir, &source_info, &settings)?;
    let resumed = writer.is_some();
    if let Some(w) = &writer {
        let names: Vec<&str> = w.manifest().hooks.iter().map(|h| h.name.as_str()).collect();
        if names != cfg.hooks.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(Error::ManifestMismatch {
                path: dir.join("manifest.json"),
                field: "hooks",
                expected: format!("{:?}", cfg.hooks),
                found: format!("{names:?}"),
            });
        }
    }
    let excluded: HashSet<u32> = settings.exclude_token_ids.iter().copied().collect();
    let b = cfg.batch_windows;
    let n_batches = plan.len().div_ceil(b) as u64;
    let start = writer.as_ref().map_or(0, |w| w.manifest().batches_done);
    let rows_at_start = writer.as_ref().map_or(0, |w| w.manifest().rows);
    let target = cfg.max_rows.min(plan.text_tokens());
    if let Some(pb) = progress {
        pb.set_length(target);
        pb.set_position(rows_at_start.min(target));
    }

    // Two stages: this thread runs the forward passes and copies each batch's activations to
    // the host; a second thread checks them, picks the rows and writes and commits the shards,
    // one batch behind. On a GPU the next forward pass runs while the last batch is written; on
    // the CPU the disk writes overlap the model. The copy stays on this thread, in the device's
    // stream order right after its forward pass.
    // A cache already at the row limit takes no forward pass.
    let stop = AtomicBool::new(rows_at_start >= cfg.max_rows);
    let (tx, rx) = std::sync::mpsc::sync_channel::<ForwardBatch>(1);
    let mut store = Store {
        dir,
        plan,
        cfg,
        source_info: &source_info,
        settings: &settings,
        excluded: &excluded,
        writer,
        shard: None,
        dropped_in_shard: 0,
        rows_total: rows_at_start,
        forward_tokens: 0,
        busy: 0.0,
        n_batches,
        target,
        progress,
    };
    let (forwarded, stored) = std::thread::scope(|scope| {
        let writing = scope.spawn(|| {
            let r = store.take_all(&rx);
            // Whatever ended the writing (the row limit, an error) ends the forward passes.
            stop.store(true, Ordering::Relaxed);
            drop(rx);
            r
        });
        let forwarded = forward_batches(plan, source, cfg, start, n_batches, &stop, &tx);
        drop(tx);
        let stored = writing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (forwarded, stored)
    });
    // A writing error is the first thing that went wrong (the forward passes stop after it).
    stored?;
    let seconds = t0.elapsed().as_secs_f64();
    let forward_tokens = store.forward_tokens;
    let m = store.writer.as_ref().map(|w| w.manifest());
    let bytes = m.map_or(0, |m| {
        m.shards
            .iter()
            .map(|s| s.provenance.bytes + s.hooks.iter().map(|h| h.file.bytes).sum::<u64>())
            .sum()
    });
    Ok(HarvestSummary {
        tokens: m.map_or(0, |m| m.rows),
        tokens_added: m.map_or(0, |m| m.rows) - rows_at_start,
        forward_tokens,
        seconds,
        tokens_per_s: forward_tokens as f64 / seconds.max(1e-9),
        forward_seconds: forwarded?,
        write_seconds: store.busy,
        bytes,
        shards: m.map_or(0, |m| m.shards.len() as u64),
        dropped_outliers: m.map_or(0, |m| m.dropped_outliers),
        resumed,
        plan_exhausted: m.is_some_and(|m| m.batches_done >= n_batches),
    })
}

/// One forward batch: windows `w0..w1` right-padded to `seq`, and per hook its width and its
/// `[windows, seq, width]` values on their way to the host (a copy from a CUDA device may still
/// be running, see `pinned.rs`).
struct ForwardBatch {
    batch: u64,
    w0: usize,
    w1: usize,
    seq: usize,
    acts: Vec<(usize, Fetched)>,
}

/// The forward stage: batches `start..n_batches` through the model, each copied to the host and
/// sent on, until the plan ends, `stop` is set or the writing stage hangs up. Returns the
/// seconds spent in the passes and copies (not waiting to send).
fn forward_batches(
    plan: &WindowPlan,
    source: &mut dyn ActivationSource,
    cfg: &HarvestConfig,
    start: u64,
    n_batches: u64,
    stop: &AtomicBool,
    tx: &SyncSender<ForwardBatch>,
) -> Result<f64> {
    let b = cfg.batch_windows;
    let mut busy = 0.0;
    let download = Downloader::new(&cfg.device);
    for batch in start..n_batches {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let t0 = Instant::now();
        let w0 = batch as usize * b;
        let w1 = (w0 + b).min(plan.len());
        let seq = (w0..w1).map(|w| plan.tokens(w).len()).max().unwrap_or(0);
        let mut ids = vec![plan.bos; (w1 - w0) * seq];
        for (i, w) in (w0..w1).enumerate() {
            let t = plan.tokens(w);
            ids[i * seq..i * seq + t.len()].copy_from_slice(t);
        }
        let tokens = Tensor::from_vec(ids, (w1 - w0, seq), &cfg.device)?;
        let outs = source.forward(&tokens, &cfg.hooks)?;
        if outs.len() != cfg.hooks.len() {
            return Err(Error::Shape {
                what: "activation source output".into(),
                expected: format!("{} tensors (one per hook)", cfg.hooks.len()),
                got: outs.len().to_string(),
            });
        }
        let mut acts = Vec::with_capacity(outs.len());
        for (hook, t) in cfg.hooks.iter().zip(&outs) {
            let dims = t.dims();
            if dims.len() != 3 || dims[0] != w1 - w0 || dims[1] != seq {
                return Err(Error::Shape {
                    what: format!("activations at {hook}"),
                    expected: format!("[{}, {seq}, width]", w1 - w0),
                    got: format!("{dims:?}"),
                });
            }
            acts.push((dims[2], download.start(t)?));
        }
        busy += t0.elapsed().as_secs_f64();
        let sent = ForwardBatch {
            batch,
            w0,
            w1,
            seq,
            acts,
        };
        if tx.send(sent).is_err() {
            break; // the writing stage stopped; it says why
        }
    }
    Ok(busy)
}

/// The writing stage's state: the cache (created at the first batch of a fresh run), the open
/// shard and the counts.
struct Store<'a> {
    dir: &'a Path,
    plan: &'a WindowPlan,
    cfg: &'a HarvestConfig,
    source_info: &'a SourceInfo,
    settings: &'a CacheSettings,
    excluded: &'a HashSet<u32>,
    writer: Option<CacheWriter>,
    shard: Option<ShardBuilder>,
    dropped_in_shard: u64,
    rows_total: u64,
    /// Positions of the batches taken (BOS included, padding not).
    forward_tokens: u64,
    /// Seconds spent on the batches taken.
    busy: f64,
    n_batches: u64,
    target: u64,
    progress: Option<&'a ProgressBar>,
}

impl Store<'_> {
    /// Takes batches in order until the plan or the row limit ends. A shard still open when
    /// the forward stage hangs up early (it failed) is not committed, as in a crash: the
    /// next run redoes it.
    fn take_all(&mut self, rx: &Receiver<ForwardBatch>) -> Result<()> {
        while self.rows_total < self.cfg.max_rows {
            let Ok(fb) = rx.recv() else {
                break;
            };
            // The wait for a device's copies is the device's time, not the writing's.
            let acts = fb
                .acts
                .into_iter()
                .map(|(width, f)| Ok((width, f.finish()?)))
                .collect::<Result<Vec<_>>>()?;
            let t0 = Instant::now();
            let last = self.take(fb.batch, fb.w0..fb.w1, fb.seq, &acts)?;
            self.busy += t0.elapsed().as_secs_f64();
            if last {
                break;
            }
        }
        Ok(())
    }

    /// Checks one batch, writes its rows and commits the shard when it is full or the run ends;
    /// true when this was the run's last batch.
    fn take(
        &mut self,
        batch: u64,
        windows: std::ops::Range<usize>,
        seq: usize,
        acts: &[(usize, Vec<f32>)],
    ) -> Result<bool> {
        let (w0, w1) = (windows.start, windows.end);
        let (plan, cfg, dir) = (self.plan, self.cfg, self.dir);
        self.forward_tokens += (w0..w1).map(|w| plan.tokens(w).len() as u64).sum::<u64>();

        // Which positions become rows, and their norms.
        let mut keep: Vec<(usize, usize)> = Vec::new();
        for (i, w) in (w0..w1).enumerate() {
            let t = plan.tokens(w);
            for (p, &tok) in t.iter().enumerate() {
                for ((width, v), hook) in acts.iter().zip(&cfg.hooks) {
                    let off = (i * seq + p) * width;
                    if v[off..off + width].iter().any(|x| !x.is_finite()) {
                        return Err(Error::NonFinite {
                            hook: hook.clone(),
                            window: w as u64,
                            position: p as u32,
                        });
                    }
                }
                if (p == 0 && cfg.exclude_bos) || self.excluded.contains(&tok) {
                    continue;
                }
                keep.push((i, p));
            }
        }
        let norm = |h: usize, i: usize, p: usize| {
            let (width, v) = &acts[h];
            let off = (i * seq + p) * width;
            v[off..off + width]
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt()
        };

        if self.writer.is_none() {
            let hooks = cfg
                .hooks
                .iter()
                .enumerate()
                .map(|(h, name)| {
                    let outlier_threshold = cfg.outlier_factor.map(|f| {
                        let mut n: Vec<f32> = keep.iter().map(|&(i, p)| norm(h, i, p)).collect();
                        n.sort_by(f32::total_cmp);
                        f * n.get(n.len() / 2).copied().unwrap_or(f32::INFINITY)
                    });
                    HookInfo {
                        name: name.clone(),
                        width: acts[h].0,
                        outlier_threshold,
                    }
                })
                .collect();
            let plan_json = serde_json::to_vec(plan).map_err(|e| Error::Manifest {
                path: dir.join(PLAN),
                what: e.to_string(),
            })?;
            std::fs::create_dir_all(dir).at("create folder", dir)?;
            write_atomic(&dir.join(PLAN), &plan_json)?;
            self.writer = Some(CacheWriter::create(
                dir,
                self.source_info.clone(),
                self.settings.clone(),
                hooks,
            )?);
        }
        let Some(w) = self.writer.as_mut() else {
            unreachable!("created above")
        };
        for (h, info) in w.manifest().hooks.iter().enumerate() {
            if info.width != acts[h].0 {
                return Err(Error::ManifestMismatch {
                    path: dir.join("manifest.json"),
                    field: "width",
                    expected: format!("{} = {}", info.name, acts[h].0),
                    found: info.width.to_string(),
                });
            }
        }
        let thresholds: Vec<Option<f32>> = w
            .manifest()
            .hooks
            .iter()
            .map(|h| h.outlier_threshold)
            .collect();
        if self.shard.is_none() {
            self.shard = Some(w.begin_shard()?);
            self.dropped_in_shard = 0;
        }
        let Some(s) = self.shard.as_mut() else {
            unreachable!("opened above")
        };
        let mut rows: Vec<&[f32]> = Vec::with_capacity(acts.len());
        for &(i, p) in &keep {
            let outlier = thresholds
                .iter()
                .enumerate()
                .any(|(h, t)| t.is_some_and(|t| norm(h, i, p) > t));
            if outlier {
                self.dropped_in_shard += 1;
                continue;
            }
            rows.clear();
            for (width, v) in acts {
                let off = (i * seq + p) * width;
                rows.push(&v[off..off + width]);
            }
            let window = w0 + i;
            s.push(
                Provenance {
                    window: window as u32,
                    position: p as u32,
                    token: plan.tokens(window)[p],
                },
                &rows,
            )?;
            self.rows_total += 1;
        }
        let done = batch + 1;
        if let Some(pb) = self.progress {
            pb.set_position(self.rows_total.min(self.target));
        }
        let last = done == self.n_batches || self.rows_total >= cfg.max_rows;
        if (s.rows() >= cfg.shard_rows || (last && s.rows() > 0))
            && let Some(s) = self.shard.take()
        {
            let windows_end = (done as usize * cfg.batch_windows).min(plan.len()) as u64;
            w.commit(s, done, windows_end, self.dropped_in_shard)?;
        }
        Ok(last)
    }
}

/// A stand-in model for tests and benchmarks: the activation at each position is a fixed
/// function of (hook, token, position), so any two runs agree bit for bit, and a row can be
/// recomputed from its provenance with [`SyntheticSource::row`].
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    /// Width per hook name; unknown hooks are an error.
    pub widths: Vec<(String, usize)>,
    /// Sleep per forward pass, to give crash tests time to kill mid-run.
    pub delay: Duration,
}

impl SyntheticSource {
    /// The row this source produces for `hook` at one position.
    pub fn row(hook_index: usize, width: usize, token: u32, position: u32) -> Vec<f32> {
        let mut x = (hook_index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (token as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
            ^ (position as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
        (0..width)
            .map(|_| {
                x ^= x >> 31;
                x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                x ^= x >> 29;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}

impl ActivationSource for SyntheticSource {
    fn forward(&mut self, tokens: &Tensor, hooks: &[String]) -> Result<Vec<Tensor>> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let (b, s) = tokens.dims2()?;
        let ids = tokens.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        hooks
            .iter()
            .map(|hook| {
                let (h, width) = self
                    .widths
                    .iter()
                    .enumerate()
                    .find(|(_, (n, _))| n == hook)
                    .map(|(h, (_, w))| (h, *w))
                    .ok_or_else(|| Error::Config {
                        field: "hooks",
                        message: format!("synthetic source has no hook {hook}"),
                    })?;
                let mut v = Vec::with_capacity(b * s * width);
                for row in &ids {
                    for (p, &t) in row.iter().enumerate() {
                        v.extend(Self::row(h, width, t, p as u32));
                    }
                }
                Ok(Tensor::from_vec(v, (b, s, width), tokens.device())?)
            })
            .collect()
    }
}
