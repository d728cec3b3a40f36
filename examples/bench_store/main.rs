//! Activation-store benchmarks, one JSON line per measurement:
//!
//! * `make`: write a synthetic cache of a given size through the crash-safe writer.
//! * `read`: read one epoch of a cache's hook, either as a plain sequential read of the shard
//!   files (`--mode plain`, the disk's ceiling) or as batches from a stream (`sequential`,
//!   `buffer`, `external`), reporting GB/s of stored activations and the process's peak resident
//!   memory (VmHWM, reset before the measurement), which must not grow with the cache.
//! * `harvest`: harvest a synthetic model into a fresh cache twice, once with forward passes
//!   that take no time and once with each pass held for `--forward-ms` (a GPU's forward pass,
//!   which leaves the host idle), and report whether the writes hid behind the passes: without
//!   overlap the second run's batch would take the first's plus the hold.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sae_workbench::activation_store::{
    ActivationStore, CacheSettings, CacheWriter, HookInfo, Provenance, Shuffle, SourceInfo,
    StoreDtype, StreamConfig,
};

#[derive(Parser)]
#[command(about = "Write a synthetic activation cache, or time reading one")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a synthetic cache (random rows) of about `--gb` gigabytes.
    Make {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        gb: f64,
        /// Row width (1536 = SmolLM2's d_mlp).
        #[arg(long, default_value_t = 1536)]
        width: usize,
        #[arg(long, default_value = "f32")]
        dtype: StoreDtype,
        /// Shard size in MiB.
        #[arg(long, default_value_t = 256)]
        shard_mb: usize,
    },
    /// Time a harvest from a synthetic model, with and without a held forward pass.
    Harvest {
        /// Where the two caches go (emptied first).
        #[arg(long)]
        out: PathBuf,
        /// Activation width (2048: a 1-2B model's residual stream).
        #[arg(long, default_value_t = 2048, value_parser = sae_workbench::cli::at_least_one)]
        width: usize,
        /// Windows per forward pass, each `--context` tokens.
        #[arg(long, default_value_t = 8, value_parser = sae_workbench::cli::at_least_one)]
        batch_windows: usize,
        #[arg(long, default_value_t = 1024, value_parser = sae_workbench::cli::at_least_one)]
        context: usize,
        #[arg(long, default_value_t = 12, value_parser = sae_workbench::cli::at_least_one)]
        batches: usize,
        /// How long each held forward pass takes, ms.
        #[arg(long, default_value_t = 100)]
        forward_ms: u64,
    },
    /// Read one epoch of the cache's first hook.
    Read {
        #[arg(long)]
        cache: PathBuf,
        /// plain, sequential, buffer or external.
        #[arg(long)]
        mode: String,
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Mixing buffer of `buffer` mode, MiB.
        #[arg(long, default_value_t = 256)]
        buffer_mb: usize,
        /// Rows read contiguously in `buffer` mode.
        #[arg(long, default_value_t = 512)]
        chunk_rows: usize,
        /// Memory budget of `external` mode, MiB.
        #[arg(long, default_value_t = 512)]
        memory_mb: usize,
        /// Check sha256 while reading.
        #[arg(long)]
        verify: bool,
    },
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Harvest {
            out,
            width,
            batch_windows,
            context,
            batches,
            forward_ms,
        } => bench_harvest(&out, width, batch_windows, context, batches, forward_ms),
        Cmd::Make {
            out,
            gb,
            width,
            dtype,
            shard_mb,
        } => make(out, gb, width, dtype, shard_mb),
        Cmd::Read {
            cache,
            mode,
            batch,
            buffer_mb,
            chunk_rows,
            memory_mb,
            verify,
        } => read(
            cache, &mode, batch, buffer_mb, chunk_rows, memory_mb, verify,
        ),
    }
}

fn make(out: PathBuf, gb: f64, width: usize, dtype: StoreDtype, shard_mb: usize) -> Result<()> {
    let row_bytes = width * dtype.size();
    let rows = (gb * 1e9 / row_bytes as f64) as u64;
    let shard_rows = ((shard_mb << 20) / row_bytes).max(1) as u64;
    let source = SourceInfo {
        model: "synthetic".into(),
        model_sha256: "0".repeat(64),
        tokenizer: "none".into(),
        context_len: 128,
        split: "synthetic".into(),
        plan_sha256: "0".repeat(64),
    };
    let settings = CacheSettings {
        dtype,
        shard_rows,
        batch_windows: 1,
        exclude_bos: true,
        exclude_token_ids: vec![],
        outlier_factor: None,
    };
    let hooks = vec![HookInfo {
        name: "blocks.15.mlp.hook_post".into(),
        width,
        outlier_threshold: None,
    }];
    let mut w = CacheWriter::create(&out, source, settings, hooks)?;
    let pb = ProgressBar::new(rows).with_style(ProgressStyle::with_template(
        "make {wide_bar} {human_pos}/{human_len} rows eta {eta}",
    )?);
    sae_workbench::cli::reset_peak_rss();
    let t0 = Instant::now();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut row = vec![0f32; width];
    let mut done = 0u64;
    while done < rows {
        let n = shard_rows.min(rows - done);
        let mut shard = w.begin_shard()?;
        for r in 0..n {
            for v in row.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            let g = done + r;
            let prov = Provenance {
                window: (g / 127) as u32,
                position: (g % 127) as u32 + 1,
                token: (x % 49_152) as u32,
            };
            shard.push(prov, &[&row])?;
        }
        done += n;
        w.commit(shard, done, done, 0)?;
        pb.set_position(done);
    }
    pb.finish_and_clear();
    let s = t0.elapsed().as_secs_f64();
    let bytes = rows * row_bytes as u64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "make_synthetic_cache", "rows": rows, "width": width, "dtype": dtype.as_str(),
            "bytes": bytes, "shards": w.manifest().shards.len(), "seconds": s,
            "gb_per_s": bytes as f64 / s / 1e9, "peak_rss_mb": sae_workbench::cli::peak_rss_mb(),
        })
    );
    Ok(())
}

fn read(
    dir: PathBuf,
    mode: &str,
    batch: usize,
    buffer_mb: usize,
    chunk_rows: usize,
    memory_mb: usize,
    verify: bool,
) -> Result<()> {
    let cache = ActivationStore::open(&dir)?;
    let hook = cache.manifest().hooks[0].name.clone();
    let acts = cache.hook(&hook)?;
    let bytes: u64 = cache
        .manifest()
        .shards
        .iter()
        .map(|s| s.hooks[0].file.bytes)
        .sum();
    sae_workbench::cli::reset_peak_rss();
    let t0 = Instant::now();
    let mut rows = 0u64;
    let mut checksum = 0f64;
    let shuffle = match mode {
        "plain" => None,
        "sequential" => Some(Shuffle::Sequential),
        "buffer" => Some(Shuffle::Buffer {
            buffer_bytes: buffer_mb << 20,
            chunk_rows,
        }),
        "external" => Some(Shuffle::External {
            memory_bytes: memory_mb << 20,
            scratch_dir: None,
        }),
        other => bail!("--mode {other}: expected plain, sequential, buffer or external"),
    };
    match shuffle {
        None => {
            let mut buf = vec![0u8; 8 << 20];
            for s in &cache.manifest().shards {
                let path = dir.join(&s.hooks[0].file.path);
                let mut f =
                    std::fs::File::open(&path).with_context(|| path.display().to_string())?;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    checksum += buf[n / 2] as f64;
                }
                rows += s.rows;
            }
        }
        Some(shuffle) => {
            let cfg = StreamConfig {
                epochs: Some(1),
                shuffle,
                verify_checksums: verify,
                ..StreamConfig::new(batch)
            };
            for b in acts.batches(cfg)? {
                let b = b?;
                rows += b.dims()[0] as u64;
                // Touch one value so the batch is really consumed.
                checksum += b.get(0)?.get(0)?.to_scalar::<f32>()? as f64;
            }
        }
    }
    let s = t0.elapsed().as_secs_f64();
    anyhow::ensure!(rows == cache.rows(), "read {rows} rows of {}", cache.rows());
    println!(
        "{}",
        serde_json::json!({
            "bench": "read_epoch", "mode": mode, "rows": rows, "bytes": bytes, "seconds": s,
            "gb_per_s": bytes as f64 / s / 1e9, "peak_rss_mb": sae_workbench::cli::peak_rss_mb(),
            "batch": batch, "buffer_mb": buffer_mb, "chunk_rows": chunk_rows, "memory_mb": memory_mb, "verify": verify,
            "checksum": checksum,
        })
    );
    Ok(())
}

/// See `Cmd::Harvest`. Documents are exactly one window long, so every batch holds
/// `batch_windows x context` positions.
fn bench_harvest(
    out: &std::path::Path,
    width: usize,
    batch_windows: usize,
    context: usize,
    batches: usize,
    forward_ms: u64,
) -> Result<()> {
    use sae_workbench::activation_store::{
        HarvestConfig, ModelIdentity, Split, SyntheticSource, TokenizedDocument, WindowPlan,
        harvest,
    };
    let docs: Vec<TokenizedDocument> = (0..batches * batch_windows)
        .map(|i| TokenizedDocument {
            id: format!("bench/{i}"),
            split: Split::Train,
            tokens: (0..context - 1)
                .map(|j| 2 + ((i * 7919 + j * 104_729) % 30_000) as u32)
                .collect(),
        })
        .collect();
    let plan = WindowPlan::build(&docs, Split::Train, context, 1, 0)?;
    let hook = "blocks.12.hook_resid_post".to_string();
    let mut cfg = HarvestConfig::new(vec![hook.clone()]);
    cfg.batch_windows = batch_windows;
    let model = ModelIdentity {
        model: "synthetic".into(),
        model_sha256: "00".repeat(32),
        tokenizer: "synthetic".into(),
    };
    for (name, hold) in [("instant", 0), ("held", forward_ms)] {
        let dir = out.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
        let mut source = SyntheticSource {
            widths: vec![(hook.clone(), width)],
            delay: std::time::Duration::from_millis(hold),
        };
        let s = harvest(&dir, &plan, &model, &mut source, &cfg, None)?;
        let n = plan.len().div_ceil(batch_windows) as f64;
        let ms = |secs: f64| secs / n * 1e3;
        println!(
            "{}",
            serde_json::json!({
                "bench": "harvest", "forward": name, "forward_hold_ms": hold,
                "width": width, "batch_rows": batch_windows * context, "batches": n,
                "rows": s.tokens, "bytes": s.bytes, "seconds": s.seconds,
                "tokens_per_s": s.tokens_per_s,
                // Per batch: the forward stage (synthetic activations, the hold, the copy) and
                // the writing stage (checks, rows, shard writes); serial would be their sum.
                "ms_per_batch": ms(s.seconds),
                "forward_ms_per_batch": ms(s.forward_seconds),
                "write_ms_per_batch": ms(s.write_seconds),
                "overlap": (s.forward_seconds + s.write_seconds) / s.seconds,
            })
        );
    }
    Ok(())
}
