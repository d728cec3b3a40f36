//! Throughput of spliced evaluation: tokens per second of (1) the clean forward pass, (2) one
//! forward pass with the SAE spliced in at its hook, and (3) the whole spliced evaluation of
//! `metrics::evaluate_spliced` (clean, spliced, spliced + error, zero- and mean-ablated passes,
//! log-softmaxes and KL), next to HF transformers' full forward of the same model measured on
//! the same kind of machine (423 tokens/s for SmolLM2-135M, batch 8 x 256, 2 CPU cores).
//!
//! Prints one JSON line per measurement. Without `--sae`, a randomly initialised TopK SAE of the
//! given size stands in: throughput does not depend on what the SAE learned.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use clap::Parser;
use metrics::reconstruct;
use metrics::splice_positions;
use metrics::{HookedSplice, SpliceTarget, SplicedConfig, evaluate_spliced, token_batches};
use sae_core::{ArchitectureConfig, SaeModel, TopKTraining, Trainer, TrainerConfig};
use transformer_hooks::{Model, assets};

/// HF transformers' full forward of SmolLM2-135M-Instruct (batch 8 x 256) on this project's
/// 2-core machines.
const HF_REFERENCE_TOKENS_PER_S: f64 = 423.0;

#[derive(Parser, Debug)]
#[command(about = "Tokens/s of spliced SAE evaluation next to a plain forward pass")]
struct Args {
    /// Model (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// SAE folder; default: a random TopK SAE with --d-sae features.
    #[arg(long)]
    sae: Option<PathBuf>,
    /// Hook (default: the SAE's hook_name, else blocks.15.mlp.hook_post).
    #[arg(long)]
    hook: Option<String>,
    /// Features of the random SAE.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 12288)]
    d_sae: usize,
    /// k of the random TopK SAE.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 32)]
    k: usize,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 8)]
    batch: usize,
    /// Sequence length including BOS.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Text to take tokens from (default: Moby-Dick from the assets folder).
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// Timed repetitions (the best is reported).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 1)]
    repeat: usize,
    /// `cpu`, or `cuda` (build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn sync(dev: &Device) -> anyhow::Result<()> {
    dev.synchronize()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Freed tensors stay in the process for the next operation (transformer-hooks' alloc.rs).
    sae_workbench::transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    if args.seq < 2 {
        bail!("--seq must be at least 2 (BOS and a token)");
    }
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("--device cuda (built with --features cuda?)")?,
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let model = Model::load(&model_path, &device).with_context(|| {
        format!(
            "loading {} (fetch with scripts/fetch_assets.py)",
            model_path.display()
        )
    })?;
    let sae = match &args.sae {
        Some(dir) => {
            SaeModel::load(dir).with_context(|| format!("loading SAE {}", dir.display()))?
        }
        None => {
            let d_in = model.config().d_mlp;
            let cfg = TrainerConfig::new(
                d_in,
                args.d_sae,
                ArchitectureConfig::TopK(TopKTraining::new(args.k)),
                1,
            );
            Trainer::new(cfg)?.to_model()?
        }
    };
    let hook = args
        .hook
        .clone()
        .or_else(|| sae.hook_name().map(str::to_string))
        .unwrap_or_else(|| "blocks.15.mlp.hook_post".into());
    let mut target = HookedSplice::new(&model, &hook)?;
    target.check_sae(&sae)?;

    let text_path = args
        .text_file
        .clone()
        .unwrap_or_else(|| assets::asset_path("corpora/moby-dick/data.txt"));
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("reading {}", text_path.display()))?;
    let tok = model.tokenizer()?;
    let mut ids = tok.encode(&text, false)?;
    let bos = tok.bos_id().or(model.config().bos_token_id);
    let per_window = args.seq - usize::from(bos.is_some());
    let need = args.batch * per_window;
    if ids.len() < need {
        bail!(
            "{} has {} tokens, need {need} for {} x {}",
            text_path.display(),
            ids.len(),
            args.batch,
            args.seq
        );
    }
    ids.truncate(need);
    let batches = token_batches(&ids, bos, args.seq, args.batch, &device)?;
    let tokens = batches[0].clone();
    let n_tokens = (args.batch * args.seq) as f64;

    // Warm-up (allocations, lazy init) on a small slice.
    let small = tokens.narrow(0, 0, 1)?.narrow(1, 0, 16.min(args.seq))?;
    target.forward(&small, None)?;

    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..args.repeat.max(1) {
            let t0 = Instant::now();
            f()?;
            sync(&device)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let device_name = if device.is_cpu() { "cpu" } else { "cuda" };
    let emit = |bench: &str, seconds: f64, passes: usize| {
        let line = serde_json::json!({
            "bench": bench,
            "model": model_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "hook": hook,
            "d_sae": sae.d_sae(),
            "device": device_name,
            "dtype": "f32",
            "batch": args.batch,
            "seq": args.seq,
            "forward_passes": passes,
            "seconds": seconds,
            "tokens_per_s": n_tokens / seconds,
            "hf_transformers_forward_tokens_per_s": HF_REFERENCE_TOKENS_PER_S,
        });
        println!("{line}");
    };

    let s = time(&mut || {
        target.forward(&tokens, None)?;
        Ok(())
    })?;
    emit("forward_clean", s, 1);

    let s = time(&mut || {
        let mut splice = |x: &Tensor| -> metrics::Result<Tensor> {
            let (x_hat, _) = reconstruct(&sae, x)?;
            splice_positions(x, &x_hat, 1)
        };
        target.forward(&tokens, Some(&mut splice))?;
        Ok(())
    })?;
    emit("forward_spliced", s, 1);

    let s = time(&mut || {
        evaluate_spliced(&mut target, &sae, &batches, &SplicedConfig::default(), None)?;
        Ok(())
    })?;
    emit("spliced_evaluation", s, 5);
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
            &["bench_spliced"],
            &[
                ("--batch", "0"),
                ("--repeat", "0"),
                ("--d-sae", "0"),
                ("--k", "0"),
            ],
        );
    }
}
