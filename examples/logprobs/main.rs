//! The log-probability a model gives each actual next token of a text, optionally with one
//! layer's MLP output zero-ablated. Prints one JSON object: `model`, `ids`, `logprobs`, `nll`.

use anyhow::{Context, Result};
use clap::Parser;
use sae_workbench::transformer_hooks::{HookPoint, Hooks, Intervention, Model};

#[derive(Parser)]
#[command(about = "Per-token log-probabilities of a text under a model (GGUF file or HF folder)")]
struct Args {
    /// GGUF file or HF folder.
    #[arg(long)]
    model: std::path::PathBuf,
    /// UTF-8 text to score.
    #[arg(long)]
    text_file: std::path::PathBuf,
    /// Keep at most this many tokens (BOS included, if the model uses one).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 512)]
    max_tokens: usize,
    /// Zero the MLP output (`blocks.L.hook_mlp_out`) of this layer.
    #[arg(long)]
    zero_ablate_mlp: Option<usize>,
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
    let model = Model::load(&args.model, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let text = std::fs::read_to_string(&args.text_file)
        .with_context(|| format!("reading {}", args.text_file.display()))?;
    let mut ids = model.tokenizer()?.encode_document(&text)?;
    ids.truncate(args.max_tokens);
    anyhow::ensure!(
        ids.len() >= 2,
        "need at least 2 tokens, the text gives {}",
        ids.len()
    );
    let mut hooks = Hooks::new();
    if let Some(layer) = args.zero_ablate_mlp {
        let hook = HookPoint::mlp_out(layer);
        hook.check(model.config())?;
        hooks = hooks.intervene(hook, Intervention::Zero);
    }
    let logprobs: Vec<f32> = model
        .logprobs_with_hooks(&model.tokens(&ids)?, None, &mut hooks)?
        .squeeze(0)?
        .to_vec1()?;
    let nll = -logprobs.iter().map(|&x| x as f64).sum::<f64>() / logprobs.len() as f64;
    let name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({
            "model": name,
            "arch": model.config().arch.as_str(),
            "zero_ablated_mlp": args.zero_ablate_mlp,
            "n_tokens": ids.len(),
            "ids": ids,
            "logprobs": logprobs,
            "nll": nll,
        })
    );
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
            &["logprobs", "--model", "x", "--text-file", "x"],
            &[("--device", "tpu"), ("--max-tokens", "0")],
        );
    }
}
