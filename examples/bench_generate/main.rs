//! Generation throughput with one SAE feature clamped at every step: new tokens per second of
//! greedy decoding, `--batch` prompts of `--prompt` tokens, `--new` tokens each. One JSON line.
//! `bench/generate_side_by_side.py` runs HF transformers' `generate` beside it with a forward
//! hook doing the same arithmetic.
//!
//! The clamp is `x + (v - a_i(x)) W_dec[i]` at the SAE's hook, as `steering::Steering` applies it.
//! Without `--sae`, a randomly initialised TopK SAE of the model's width (8x, k = 32) is written to
//! `--random-sae-dir` and used, so that the Python side can load the same one.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use rand::{Rng, SeedableRng};
use sae_workbench::activation_store::{self as store, CorpusName, Split, SplitSpec, WindowPlan};
use sae_workbench::sae_core::{ArchitectureConfig, SaeModel, TopKTraining, Trainer, TrainerConfig};
use sae_workbench::steering::{FeatureEdit, Steering, sae_hook_in};
use sae_workbench::transformer_hooks::candle_core::Tensor;
use sae_workbench::transformer_hooks::candle_core::quantized::GgmlDType;
use sae_workbench::transformer_hooks::{
    self as transformer_hooks, GenerateOptions, HookPoint, Hooks, LoadOptions, Model, assets,
};

#[derive(Parser)]
#[command(about = "New tokens per second of greedy generation with an SAE feature clamped")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompts per batch.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 1)]
    batch: usize,
    /// Tokens per prompt (random ids, seeded).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 64)]
    prompt: usize,
    /// New tokens per prompt (no stop token: always this many).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 128)]
    new: usize,
    /// SAE folder; without it a random TopK SAE at `blocks.15.hook_resid_post` is made.
    #[arg(long)]
    sae: Option<PathBuf>,
    /// Where the random SAE is written.
    #[arg(long, default_value = "target/bench_generate_sae")]
    random_sae_dir: PathBuf,
    /// Feature clamped.
    #[arg(long, default_value_t = 0)]
    feature: usize,
    /// Value it is clamped to (the SAE's units).
    #[arg(long, value_parser = sae_workbench::cli::finite_f32, default_value_t = 10.0)]
    value: f32,
    /// No clamp: plain generation.
    #[arg(long)]
    no_clamp: bool,
    /// Rerun the whole sequence at every step instead of using the KV cache (the reference path).
    #[arg(long)]
    recompute: bool,
    /// Run the weight products on block-quantized weights through candle's quantized matmul, and
    /// report the log-probability difference from the f32 path on held-out corpus text. `q8_0`
    /// is the one worth trying, at batch 1 only: it measured 41.4 new tokens/s against 33-39
    /// for f32 (mean |Δ log p| 0.088); at batch 8 it is far slower (64 against 150-220).
    /// `q4_1` (the GGUF's own format) runs on candle's scalar kernel, with no AVX2 path:
    /// 9.6 tokens/s. `q4k` needs widths that are multiples of 256 (not SmolLM2's 576).
    #[arg(long)]
    quantized: Option<String>,
    /// Timed repetitions (after a short warm-up); the median is reported.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 1)]
    reps: usize,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

fn main() -> Result<()> {
    transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let mut model = Model::load_with(&path, &device, &LoadOptions::default())
        .with_context(|| format!("loading {}", path.display()))?;
    let quant_report = match &args.quantized {
        None => None,
        Some(q) => {
            let dtype = match q.as_str() {
                "q4_1" => GgmlDType::Q4_1,
                "q8_0" => GgmlDType::Q8_0,
                "q4k" => GgmlDType::Q4K,
                other => anyhow::bail!("--quantized {other}: expected q4_1, q8_0 or q4k"),
            };
            let text = held_out_text(&model)?;
            let f32_lp = model.logprobs(&text)?;
            model.quantize(dtype)?;
            let q_lp = model.logprobs(&text)?;
            let diff = (&q_lp - &f32_lp)?.abs()?;
            let mean =
                |t: &Tensor| -> Result<f64> { Ok(f64::from(t.mean_all()?.to_scalar::<f32>()?)) };
            Some(serde_json::json!({
                "format": q,
                "held_out_tokens": text.elem_count(),
                "nll_f32": -mean(&f32_lp)?,
                "nll_quantized": -mean(&q_lp)?,
                "mean_abs_logprob_diff": mean(&diff)?,
                "max_abs_logprob_diff": f64::from(diff.flatten_all()?.max(0)?.to_scalar::<f32>()?),
            }))
        }
    };
    let sae_dir = match &args.sae {
        Some(d) => d.clone(),
        None => {
            let d_model = model.config().d_model;
            let mut cfg = TrainerConfig::new(
                d_model,
                8 * d_model,
                ArchitectureConfig::TopK(TopKTraining::new(32)),
                1,
            );
            cfg.metadata.hook_name = Some(HookPoint::resid_post(15).to_string());
            cfg.seed = 0;
            Trainer::new(cfg)?.save(&args.random_sae_dir)?;
            args.random_sae_dir.clone()
        }
    };
    let sae = SaeModel::load(&sae_dir).with_context(|| format!("loading {}", sae_dir.display()))?;
    let hook = sae_hook_in(&sae, &model)?;
    let steer = Steering::new(
        &sae,
        hook,
        vec![FeatureEdit::clamp(args.feature, args.value)],
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = model.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| {
            (0..args.prompt)
                .map(|_| rng.random_range(0..vocab))
                .collect()
        })
        .collect();
    let mut opts = GenerateOptions::greedy(args.new);
    opts.kv_cache = !args.recompute;
    let hooks = || {
        if args.no_clamp {
            Hooks::new()
        } else {
            steer.hooks()
        }
    };
    // Warm-up: a few steps, so that the timed run does not pay for first-touch allocations.
    let warm = GenerateOptions {
        max_new_tokens: 4.min(args.new),
        ..opts.clone()
    };
    model.generate_batch(&prompts, &warm, &mut hooks())?;
    let mut secs = Vec::new();
    let mut first = None;
    for _ in 0..args.reps.max(1) {
        let t = Instant::now();
        let out = model.generate_batch(&prompts, &opts, &mut hooks())?;
        secs.push(t.elapsed().as_secs_f64());
        first.get_or_insert(out[0].tokens.clone());
    }
    secs.sort_by(f64::total_cmp);
    let s = secs[secs.len() / 2];
    let new_tokens = args.batch * args.new;
    println!(
        "{}",
        serde_json::json!({
            "bench": "generate",
            "impl": "transformer-hooks",
            "model": path,
            "batch": args.batch,
            "prompt": args.prompt,
            "new": args.new,
            "kv_cache": !args.recompute,
            "clamp": (!args.no_clamp).then(|| serde_json::json!({
                "sae": sae_dir, "hook": hook.to_string(), "feature": args.feature, "value": args.value,
            })),
            "seconds": s,
            "new_tokens_per_s": new_tokens as f64 / s,
            "matmul": transformer_hooks::blas_library().unwrap_or("candle gemm"),
            "quantized": quant_report,
            "first_row_tokens": first.unwrap_or_default().into_iter().take(16).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

/// `[4, 256]` windows of held-out (test split) corpus text.
fn held_out_text(model: &Model) -> Result<Tensor> {
    let tok = model.tokenizer()?;
    let docs = store::load_corpora(
        &store::default_corpora_root(),
        &[CorpusName::MobyDick, CorpusName::Austen],
    )?;
    let encode = |t: &str| -> store::Result<Vec<u32>> {
        tok.encode(t, false).map_err(|e| store::Error::Config {
            field: "tokenizer",
            message: e.to_string(),
        })
    };
    let tokenized = store::tokenize_documents(&docs, &encode, &SplitSpec::default())?;
    let bos = model.config().bos_token_id.unwrap_or(0);
    let plan = WindowPlan::build(&tokenized, Split::Test, 256, bos, 0)?;
    let rows: Vec<u32> = (0..plan.len())
        .map(|i| plan.tokens(i))
        .filter(|t| t.len() == 256)
        .take(4)
        .flatten()
        .copied()
        .collect();
    anyhow::ensure!(!rows.is_empty(), "no held-out window of 256 tokens");
    let n = rows.len() / 256;
    Ok(Tensor::from_vec(rows, (n, 256), model.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["bench_generate"],
            &[
                ("--device", "tpu"),
                ("--batch", "0"),
                ("--prompt", "0"),
                ("--new", "0"),
                ("--reps", "0"),
                ("--value", "nan"),
            ],
        );
    }
}
