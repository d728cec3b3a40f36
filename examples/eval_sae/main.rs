//! Spliced evaluation of one SAE on one text: the clean next-token loss, the loss with the SAE's
//! reconstruction spliced in at its hook, with reconstruction + error (a sanity check that must
//! equal clean), zero- and mean-ablated; loss recovered against both ablations; KL(clean ‖
//! spliced); and the reconstruction metrics on the same activations. Prints one JSON object.
//!
//! ```text
//! cargo run --release --example eval_sae -- --model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --sae runs/sae --text-file assets/corpora/moby-dick/data.txt --max-tokens 4096
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use metrics::{HookedSplice, MeanActivation, SplicedConfig, evaluate_spliced, token_batches};
use sae_core::SaeModel;
use transformer_hooks::Model;

#[derive(Parser, Debug)]
#[command(about = "Spliced NLL, loss recovered, KL and reconstruction metrics of an SAE on a text")]
struct Args {
    /// Model file (GGUF) or folder (HF safetensors, or one saved by transformer-hooks).
    #[arg(long)]
    model: PathBuf,
    /// SAE folder (SAELens v6 or older, or sparsify).
    #[arg(long)]
    sae: PathBuf,
    /// Plain UTF-8 text to evaluate on.
    #[arg(long)]
    text_file: PathBuf,
    /// Use at most this many text tokens (from the start of the file).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 4096)]
    max_tokens: usize,
    /// Hook to splice into; defaults to the SAE config's `hook_name`.
    #[arg(long)]
    hook: Option<String>,
    /// Window length including BOS.
    #[arg(long, default_value_t = 256)]
    context_len: usize,
    /// Windows per forward pass.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 8)]
    batch_size: usize,
    /// Positions before this keep their clean activations (1: BOS stays clean).
    #[arg(long, default_value_t = 1)]
    first_spliced_position: usize,
    /// `cpu`, or `cuda` (build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also write the JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    // Freed tensors stay in the process for the next operation (transformer-hooks' alloc.rs).
    sae_workbench::transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)
            .context("--device cuda (was the binary built with --features cuda?)")?,
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    let sae =
        SaeModel::load(&args.sae).with_context(|| format!("loading SAE {}", args.sae.display()))?;
    let hook = match (&args.hook, sae.hook_name()) {
        (Some(h), _) => h.clone(),
        (None, Some(h)) => h.to_string(),
        (None, None) => bail!(
            "SAE {} names no hook (cfg.json metadata.hook_name): pass --hook",
            args.sae.display()
        ),
    };
    let text = std::fs::read_to_string(&args.text_file)
        .with_context(|| format!("reading --text-file {}", args.text_file.display()))?;
    if text.trim().is_empty() {
        bail!(
            "--text-file {} is empty: nothing to evaluate",
            args.text_file.display()
        );
    }
    let model = Model::load(&args.model, &device)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let mut target = HookedSplice::new(&model, &hook)?;
    target.check_sae(&sae)?;

    let tok = model.tokenizer()?;
    let mut ids = tok.encode(&text, false)?;
    ids.truncate(args.max_tokens);
    let bos = tok.bos_id().or(model.config().bos_token_id);
    let batches = token_batches(&ids, bos, args.context_len, args.batch_size, &device)
        .with_context(|| {
            format!(
                "--text-file {} ({} tokens)",
                args.text_file.display(),
                ids.len()
            )
        })?;
    let first = if bos.is_some() {
        args.first_spliced_position
    } else {
        0
    };
    let cfg = SplicedConfig {
        first_spliced_position: first,
        mean: MeanActivation::EvalTokens,
        ..SplicedConfig::default()
    };

    let pb = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} passes, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message("spliced evaluation");
    let t0 = Instant::now();
    let eval = evaluate_spliced(&mut target, &sae, &batches, &cfg, Some(&pb))?;
    let seconds = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();

    let out = serde_json::json!({
        "model": args.model,
        "sae": args.sae,
        "sae_architecture": sae.config().architecture(),
        "hook": hook,
        "text_file": args.text_file,
        "text_tokens": ids.len(),
        "windows": batches.iter().map(|b| b.dims()[0]).sum::<usize>(),
        "context_len": args.context_len,
        "spliced": eval.spliced,
        "reconstruction": eval.reconstruction,
        "seconds": seconds,
        "predicted_tokens_per_s": eval.spliced.n_tokens as f64 / seconds,
    });
    let s = serde_json::to_string_pretty(&out)?;
    println!("{s}");
    if let Some(p) = &args.out {
        std::fs::write(p, &s).with_context(|| format!("writing --out {}", p.display()))?;
    }
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
            &["eval_sae", "--model", "x", "--sae", "x", "--text-file", "x"],
            &[("--max-tokens", "0"), ("--batch-size", "0")],
        );
    }
}
