//! Harvests a model's activations at one or more hook points over a corpus split into a
//! crash-safe cache (shards + manifest), resuming the cache in `--out` if it exists; or, with
//! `--verify`, checks every shard of an existing cache against its manifest.
//!
//! Ends with one JSON line: tokens, tokens_per_s, bytes, shards (and a few more fields).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sae_workbench::activation_store::{
    self as store, ActivationStore, CorpusName, HarvestConfig, HookedModel, Split, SplitSpec,
    StoreDtype, WindowPlan,
};
use sae_workbench::transformer_hooks::{LoadOptions, Model, assets};

#[derive(Parser)]
#[command(about = "Harvest activations at hook points into a crash-safe cache (or --verify one)")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A tokenizer.json to use instead of the model's own (Gemma 3 needs the official one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Hook points, comma separated, TransformerLens names; one forward pass serves them all.
    #[arg(long, value_delimiter = ',', default_value = "blocks.15.mlp.hook_post")]
    hooks: Vec<String>,
    /// Corpus split: train, validation or test.
    #[arg(long, default_value = "train")]
    split: Split,
    /// Stop after the forward batch that brings the cache to this many rows (tokens).
    #[arg(long)]
    tokens: Option<u64>,
    /// Cache folder; an existing cache there is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Window length including BOS.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Windows per forward pass.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 8)]
    batch: usize,
    /// Storage dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: StoreDtype,
    /// Rows per shard (rounded up to whole forward batches).
    #[arg(long, default_value_t = 32_768)]
    shard_rows: u64,
    /// Drop rows whose norm exceeds this multiple of the first batch's median norm.
    #[arg(long)]
    outlier_factor: Option<f32>,
    /// Keep the rows of special tokens (excluded by default).
    #[arg(long)]
    keep_special: bool,
    /// Corpora, comma separated (default: all four).
    #[arg(long, value_delimiter = ',')]
    corpora: Vec<CorpusName>,
    /// Seed of the window order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only verify the cache in --out against its manifest.
    #[arg(long)]
    verify: bool,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

fn main() -> Result<()> {
    // Freed tensors stay in the process for the next operation (transformer-hooks' alloc.rs).
    sae_workbench::transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    if args.verify {
        let cache = ActivationStore::open(&args.out)?;
        let pb = ProgressBar::new(0).with_style(ProgressStyle::with_template(
            "verify {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )?);
        let t0 = std::time::Instant::now();
        let report = cache.verify(Some(&pb))?;
        pb.finish_and_clear();
        let s = t0.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "verified": true, "shards": report.shards, "files": report.files,
                "bytes": report.bytes, "rows": report.rows, "seconds": s,
                "gb_per_s": report.bytes as f64 / s / 1e9,
            })
        );
        return Ok(());
    }

    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let mut opts = LoadOptions::default();
    if let Some(t) = &args.tokenizer {
        opts = opts.with_tokenizer(t);
    }
    let model = Model::load_with(&path, &device, &opts)
        .with_context(|| format!("loading {}", path.display()))?;
    let mut model = HookedModel::new(model);
    model.check_hooks(&args.hooks)?;
    model.check_context(args.context)?;
    let identity = model.identity()?;
    let bos = model.bos()?;

    let corpora = if args.corpora.is_empty() {
        CorpusName::ALL.to_vec()
    } else {
        args.corpora.clone()
    };
    let t0 = std::time::Instant::now();
    let docs = store::load_corpora(&store::default_corpora_root(), &corpora)?;
    let encode = |t: &str| model.encode(t);
    let tokenized = store::tokenize_documents(&docs, &encode, &SplitSpec::default())?;
    let report = store::corpus_report(&tokenized, args.context, SplitSpec::default());
    eprintln!("corpus: {}", serde_json::to_string(&report)?);
    let plan = WindowPlan::build(&tokenized, args.split, args.context, bos, args.seed)?;
    drop(tokenized);
    eprintln!(
        "plan: {} windows, {} text tokens of {} ({:.1} s to read and tokenize)",
        plan.len(),
        plan.text_tokens(),
        args.split,
        t0.elapsed().as_secs_f64()
    );

    let mut cfg = HarvestConfig::new(args.hooks.clone());
    cfg.dtype = args.dtype;
    cfg.batch_windows = args.batch;
    cfg.shard_rows = args.shard_rows;
    cfg.outlier_factor = args.outlier_factor;
    if !args.keep_special {
        cfg.exclude_token_ids = model.special_token_ids()?;
    }
    if let Some(t) = args.tokens {
        cfg.max_rows = t;
    }
    let pb = ProgressBar::new(0).with_style(ProgressStyle::with_template(
        "harvest {wide_bar} {human_pos}/{human_len} tokens {per_sec} eta {eta}",
    )?);
    let summary = store::harvest(&args.out, &plan, &identity, &mut model, &cfg, Some(&pb))?;
    pb.finish_and_clear();
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["harvest", "--out", "x"],
            &[("--device", "tpu"), ("--batch", "0")],
        );
    }
}
