//! Forward parity of a device against the CPU: the same random token ids through the same
//! checkpoint loaded twice, once on the CPU in f32 (the reference) and once on `--device` in
//! `--dtype`, and the largest difference in the log-probability of each next token. This is how
//! a GPU build is checked on a machine that has no model of ours: `scripts/gpu_models.py` makes
//! randomly initialised checkpoints of SmolLM2's and Gemma-3's shapes there, and this compares.
//!
//! Prints one JSON line and exits with status 1 when the difference passes `--tolerance`.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sae_workbench::transformer_hooks::candle_core::{DType, Device, Tensor};
use sae_workbench::transformer_hooks::{LoadOptions, Model};

#[derive(Parser)]
#[command(about = "Log-probabilities on --device against the CPU, on random token ids")]
struct Args {
    /// GGUF file or HF folder.
    #[arg(long)]
    model: std::path::PathBuf,
    /// `cpu` or `cuda` (a build with `--features cuda`).
    #[arg(long, default_value = "cuda", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Weights and activations on the device: f32, bf16 or f16 (the CPU reference is f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 2)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 128)]
    ctx: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest accepted difference of a log-probability (nats).
    #[arg(long, value_parser = sae_workbench::cli::positive, default_value_t = 1e-3)]
    tolerance: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {}", args.device))?;
    let load = |device: &Device, dtype: DType| {
        Model::load_with(
            &args.model,
            device,
            &LoadOptions::default().with_dtype(dtype),
        )
        .with_context(|| format!("loading {} on {device:?}", args.model.display()))
    };
    let reference = load(&Device::Cpu, DType::F32)?;
    let t = Instant::now();
    let model = load(&device, dtype)?;
    let load_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(args.ctx >= 2, "--ctx {}: need at least 2 tokens", args.ctx);
    let vocab = reference.config().vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let ids: Vec<u32> = (0..args.batch * args.ctx)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let on_cpu = Tensor::from_vec(ids, (args.batch, args.ctx), &Device::Cpu)?;
    let want: Vec<Vec<f32>> = reference.logprobs(&on_cpu)?.to_vec2()?;
    // Once to warm up (kernels load on first use), once timed.
    let tokens = on_cpu.to_device(&device)?;
    model.logprobs(&tokens)?;
    device.synchronize()?;
    let t = Instant::now();
    let got = model.logprobs(&tokens)?;
    device.synchronize()?;
    let forward_s = t.elapsed().as_secs_f64();
    let got: Vec<Vec<f32>> = got
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec2()?;
    let (mut worst, mut sum, mut count) = (0f64, 0f64, 0usize);
    for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
        let d = (f64::from(*a) - f64::from(*b)).abs();
        worst = if d.is_nan() {
            f64::INFINITY
        } else {
            worst.max(d)
        };
        sum += d;
        count += 1;
    }
    let mean_nll = -want.iter().flatten().map(|&v| f64::from(v)).sum::<f64>() / count as f64;
    let pass = worst <= args.tolerance;
    println!(
        "{}",
        serde_json::json!({
            "check": "forward_parity",
            "model": args.model.file_name().map(|n| n.to_string_lossy().into_owned()),
            "arch": reference.config().arch.as_str(),
            "device": args.device,
            "dtype": args.dtype,
            "batch": args.batch,
            "ctx": args.ctx,
            "logprobs_compared": count,
            "max_abs_diff": worst,
            "mean_abs_diff": sum / count as f64,
            "reference_mean_nll": mean_nll,
            "tolerance": args.tolerance,
            "pass": pass,
            "device_forward_s": forward_s,
            "device_load_s": load_s,
        })
    );
    if !pass {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts and tolerances this program cannot use are refused while parsing, naming the flag.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["parity", "--model", "m"],
            &[
                ("--batch", "0"),
                ("--ctx", "0"),
                ("--tolerance", "0"),
                ("--tolerance", "nan"),
                ("--device", "tpu"),
                ("--dtype", "f8"),
            ],
        );
    }
}
