//! One chat fine-tuning optimizer step (forward, backward, AdamW), timed: tokens/s and GFLOP/s.
//! `bench/sft_side_by_side.py` runs the same step in PyTorch with HF transformers on the same
//! dequantized weights, batch and sequence length, and prints the ratio.
//!
//! The batch is `--batch` windows of `--seq` tokens of corpus text; the loss scores the second
//! half of each window (a chat model's turns are about that share of a conversation). Modes:
//! `full` trains every weight but the embedding (the `chat_sft` default), `embeddings` trains
//! the embedding too, and `activations` trains nothing, keeping only the backward pass through
//! the activations: the part of a step that LoRA cannot skip, so a lower bound on its cost.
//!
//!     cargo run --release --example bench_sft -- --batch 4 --seq 256 --steps 3

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use sae_workbench::activation_store::{self as store, CorpusName};
use sae_workbench::sft::{Example, SftConfig, Trainer};
use sae_workbench::transformer_hooks::candle_core::Var;
use sae_workbench::transformer_hooks::{Model, assets};

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Mode {
    Full,
    Embeddings,
    Activations,
}

#[derive(Parser)]
#[command(about = "Time one chat fine-tuning step: tokens/s and GFLOP/s")]
struct Args {
    /// GGUF file or HF folder (default: Gemma-3-270M from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 3)]
    steps: usize,
    #[arg(long, value_enum, default_value = "full")]
    mode: Mode,
    /// Write the batch's token ids here (JSON), for the Python side to use the same ones.
    #[arg(long)]
    dump_tokens: Option<PathBuf>,
    /// Write the model, dequantized, as an HF folder here first (what the Python side loads).
    #[arg(long)]
    save_hf: Option<PathBuf>,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    sae_workbench::transformer_hooks::retain_freed_memory();
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path("models/gemma-3-270m-q4_k_m.gguf"));
    let mut model =
        Model::load(&path, &device).with_context(|| format!("loading {}", path.display()))?;
    if let Some(dir) = &args.save_hf {
        model.save_hf(dir)?;
    }
    let tok = model.tokenizer()?.clone();
    let docs = store::load_corpus(&store::default_corpora_root(), CorpusName::Austen)?;
    let mut ids = Vec::new();
    for d in &docs {
        ids.extend(tok.encode_document(&d.text)?);
        if ids.len() > args.batch * args.seq {
            break;
        }
    }
    let data: Vec<Example> = ids
        .chunks_exact(args.seq)
        .take(args.batch)
        .map(|w| Example {
            tokens: w.to_vec(),
            trained: (0..args.seq).map(|i| i >= args.seq / 2).collect(),
        })
        .collect();
    if let Some(p) = &args.dump_tokens {
        let rows: Vec<&Vec<u32>> = data.iter().map(|e| &e.tokens).collect();
        std::fs::write(p, serde_json::to_string(&rows)?)?;
    }
    let cfg = model.config().clone();
    let cfg_sft = SftConfig {
        micro_batch: args.batch,
        grad_accum: 1,
        max_len: args.seq,
        warmup_steps: 1,
        total_steps: args.steps + 1,
        train_embeddings: args.mode == Mode::Embeddings,
        ..SftConfig::default()
    };
    let n_trained_tokens = data.iter().map(Example::n_trained).sum::<usize>();
    let n_tokens = args.batch * args.seq;
    let mut times = Vec::new();
    let mut trainable = 0;
    let mut first_loss = f64::NAN;
    if args.mode == Mode::Activations {
        // Nothing trainable: a Var on the embedding output is the only leaf, so backward runs
        // through every layer's activations and computes no weight gradient.
        use sae_workbench::transformer_hooks::{HookPoint, Hooks, Intervention};
        let hook: HookPoint = "hook_embed".parse()?;
        let seqs: Vec<Vec<u32>> = data.iter().map(|e| e.tokens.clone()).collect();
        let (tokens, _) = model.pad_batch(&seqs, 0, false)?;
        let positions: Vec<(usize, usize)> = (0..args.batch)
            .flat_map(|r| (args.seq / 2 - 1..args.seq - 1).map(move |p| (r, p)))
            .collect();
        for s in 0..=args.steps {
            let t0 = Instant::now();
            let delta = Var::zeros(
                (args.batch, args.seq, cfg.d_model),
                model.dtype(),
                model.device(),
            )?;
            let mut hooks =
                Hooks::new().intervene(hook, Intervention::Add(delta.as_tensor().clone()));
            let lp = model.next_token_logprobs(&tokens, None, &mut hooks, &positions)?;
            let loss = lp.mean_all()?.neg()?;
            if s == 0 {
                first_loss = f64::from(loss.to_scalar::<f32>()?);
            }
            let g = loss.backward()?;
            anyhow::ensure!(
                g.get(delta.as_tensor()).is_some(),
                "no gradient reached the embedding output"
            );
            if s > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
    } else {
        let mut trainer = Trainer::new(&mut model, cfg_sft)?;
        trainable = trainer.n_trainable();
        for s in 0..=args.steps {
            let log = trainer.train_step(&model, &data)?;
            eprintln!("step {s}: loss {:.4} in {:.2} s", log.loss, log.seconds);
            if s == 0 {
                first_loss = log.loss;
            }
            if s > 0 {
                times.push(log.seconds);
            }
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // Matmul FLOPs: 2 per multiply-add; forward, backward through activations, and backward to
    // the weights for the trained ones. The unembedding runs on the scored positions only.
    let body: usize = model
        .params()
        .iter()
        .filter(|(n, t)| n.starts_with("blocks.") && t.rank() == 2)
        .map(|(_, t)| t.elem_count())
        .sum();
    let head = cfg.vocab_size * cfg.d_model;
    let weight_grads = args.mode != Mode::Activations;
    let fwd = 2.0 * (body * n_tokens + head * n_trained_tokens) as f64;
    let bwd_act = fwd;
    let bwd_w = if weight_grads {
        2.0 * (body * n_tokens) as f64
            + if args.mode == Mode::Embeddings {
                2.0 * (head * n_trained_tokens) as f64
            } else {
                0.0
            }
    } else {
        0.0
    };
    let gflop = (fwd + bwd_act + bwd_w) / 1e9;
    let mode = match args.mode {
        Mode::Full => "full",
        Mode::Embeddings => "embeddings",
        Mode::Activations => "activations",
    };
    println!(
        "{}",
        serde_json::json!({
            "bench": "sft_step", "impl": "rust", "model": path.display().to_string(), "mode": mode,
            "batch": args.batch, "seq": args.seq, "trainable_params": trainable,
            "scored_tokens": n_trained_tokens, "first_loss": first_loss, "step_s": median,
            "tokens_per_s": n_tokens as f64 / median, "gflop_per_step": gflop,
            "gflop_per_s": gflop / median, "threads": rayon_threads(),
        })
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["bench_sft"],
            &[("--device", "tpu"), ("--batch", "0"), ("--steps", "0")],
        );
    }
}
