//! Forward-pass throughput: (a) a full pass with logits at every position, (b) a pass that stops
//! after `blocks.L.mlp.hook_post` and captures it (what harvesting activations for an SAE costs).
//! One JSON line per measurement; `bench/forward_side_by_side.py` runs HF transformers beside it.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sae_workbench::transformer_hooks::candle_core::{DType, Tensor};
use sae_workbench::transformer_hooks::{
    self as transformer_hooks, HookPoint, Hooks, LoadOptions, Model, assets,
};

#[derive(Parser)]
#[command(about = "Tokens per second of the forward pass, full and stopped at a layer's MLP")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Layer whose `mlp.hook_post` the stopped pass captures.
    #[arg(long, default_value_t = 15)]
    layer: usize,
    /// Sequences per batch.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Timed repetitions of each measurement (after one warm-up); the median is reported.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 3)]
    reps: usize,
    /// Weights and activations dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// `cpu` or `cuda` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    // Freed tensors stay in the process for the next operation (transformer-hooks' alloc.rs).
    transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => anyhow::bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {}", args.device))?;
    let t0 = Instant::now();
    let model = Model::load_with(&path, &device, &LoadOptions::default().with_dtype(dtype))
        .with_context(|| format!("loading {}", path.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let hook = HookPoint::mlp_post(args.layer);
    hook.check(model.config())?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..args.batch * args.ctx)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let tokens = Tensor::from_vec(ids, (args.batch, args.ctx), &device)?;
    let n_tokens = (args.batch * args.ctx) as f64;
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    let cases: [(&str, Option<HookPoint>); 2] = [
        ("forward_full_logits", None),
        ("forward_stop_at_mlp_post", Some(hook)),
    ];
    for (bench, stop) in cases {
        let run = || -> Result<()> {
            let mut hooks = match stop {
                None => Hooks::new(),
                Some(h) => Hooks::new().capture(h).stop_at_deepest_capture(),
            };
            let out = model.forward(&tokens, &mut hooks)?;
            // Touch the result so nothing is left lazy.
            match stop {
                None => out.logits.context("no logits")?.dims().len(),
                Some(h) => out.cache.require(h)?.dims().len(),
            };
            // Kernels are queued on a GPU: the time is the work's only once it is done.
            device.synchronize()?;
            Ok(())
        };
        run()?;
        let mut secs = Vec::with_capacity(args.reps);
        for _ in 0..args.reps.max(1) {
            let t = Instant::now();
            run()?;
            secs.push(t.elapsed().as_secs_f64());
        }
        let s = median(secs.clone());
        println!(
            "{}",
            serde_json::json!({
                "bench": bench,
                "impl": "transformer-hooks (candle)",
                "matmul": if device.is_cuda() {
                    "cuBLAS"
                } else {
                    transformer_hooks::blas_library().unwrap_or("candle gemm")
                },
                "model": name,
                "arch": model.config().arch.as_str(),
                "hook": stop.map(|h| h.to_string()),
                "device": args.device,
                "threads": threads,
                "dtype": args.dtype,
                "batch": args.batch,
                "ctx": args.ctx,
                "reps": secs.len(),
                "seconds_median": s,
                "seconds_all": secs,
                "tokens_per_s": n_tokens / s,
                "load_s": load_s,
            })
        );
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
            &["bench_forward"],
            &[("--device", "tpu"), ("--batch", "0"), ("--reps", "0")],
        );
    }
}
