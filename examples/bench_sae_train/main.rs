//! Times sae-core's training step (forward, hand-written backward, gradient-norm clip, Adam) and
//! prints one JSON line.
//!
//! Inputs are Gaussian. TopK/BatchTopK are sparse by construction. For the ReLU family
//! (standard, jumprelu, gated) a fresh SAE fires on about half of its features, which is not the
//! regime anyone trains in for long; with `--target-l0 N` (default 32 for those architectures) the
//! encoder bias (gate bias for gated) is set after one warm-up step so that every feature fires on
//! N/d_sae of the tokens, i.e. L0 ≈ N, as a trained SAE would. The measured L0 is reported.
//!
//! `--path device` times `DeviceTrainer` instead (any architecture): the whole step as tensor
//! ops on `--device`, with the batches already there (`scripts/gpu_check.sh` reads the peak
//! device memory from nvidia-smi while this runs). `--path encoder` times the dense encoder
//! product alone.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sae_workbench::sae_core::{
    ArchitectureConfig, BatchTopKTraining, DeviceOptions, DeviceTrainer, GatedTraining, HostBatch,
    JumpReluTraining, StandardTraining, TopKTraining, Trainer, TrainerConfig,
};
use sae_workbench::transformer_hooks::candle_core::{DType, Tensor};

#[derive(Parser, Debug)]
struct Args {
    /// standard | topk | batchtopk | jumprelu | gated
    #[arg(long, default_value = "topk")]
    arch: String,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 1536)]
    d_in: usize,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 12288)]
    d_sae: usize,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 4096)]
    batch: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 3)]
    steps: usize,
    /// k for topk / batchtopk.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 32)]
    k: usize,
    /// L1 (standard, gated) or L0 (jumprelu) coefficient.
    #[arg(long, default_value_t = 5.0)]
    l1_coefficient: f32,
    /// Target L0 for the ReLU family (0 keeps the fresh, dense initialisation).
    #[arg(long, default_value_t = 32)]
    target_l0: usize,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one)]
    threads: Option<usize>,
    /// `host`: the trainer's hand-written kernels (the CPU path; with `--device cuda` only the
    /// encoder product runs on the GPU). `device`: `DeviceTrainer`, the whole step as tensor ops on
    /// `--device`.
    /// `encoder`: only the dense encoder product `x W_encᵀ + b_enc` on `--device`, the largest
    /// matrix product of a step, whose FLOP rate is the one to hold against the chip's peak.
    #[arg(long, default_value = "host", value_parser = ["host", "device", "encoder"])]
    path: String,
    /// `cpu` or `cuda` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Tokens without firing before a feature counts as dead (TopK's AuxK trains the dead ones);
    /// 0 makes every feature dead, so AuxK runs at every step, the costliest case. Default: the
    /// trainer's.
    #[arg(long)]
    dead_tokens: Option<u64>,
    /// Let f32 matrix products on CUDA use TF32 tensor cores (off by default in candle, as in
    /// PyTorch).
    #[arg(long)]
    tf32: bool,
    /// Operands of the matrix products on the device and encoder paths: f32, or bf16 / f16 with
    /// f32 accumulation (weights stay f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    compute: String,
    /// The device path's tokens per pass (`DeviceTrainer::with_token_chunk`): the step's
    /// `[batch, d_sae]` temporaries become `[rows, d_sae]`. Default: the whole batch.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one)]
    token_chunk: Option<usize>,
    /// Adam's moments on the device path: f32, or bf16 (`DeviceTrainer::with_moment_dtype`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    moments: String,
    /// `W_enc` and `W_dec` on the device path: f32, or bf16 (`DeviceTrainer::with_weight_dtype`:
    /// updates rounded stochastically; needs `--compute bf16`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    weights: String,
    /// How the device path's TopK pairs reach the gradients: `scatter` (each pair's row added in
    /// place: a loop on the CPU, an atomic-add kernel on CUDA; the CPU's default) or `dense`
    /// (code matrices through dense products, CUDA's default); see
    /// `DeviceTrainer::with_dense_pairs`.
    #[arg(long, value_parser = ["dense", "scatter"])]
    pairs: Option<String>,
    /// Device path: also time each phase of the step (`DeviceTrainer::with_phase_timing`, the
    /// device synchronised at each phase's end) and print the seconds per step of each as
    /// `phase_seconds_per_step`; the tokens/s are then those of the synchronised steps.
    #[arg(long)]
    phases: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("building the thread pool")?;
    }
    let arch = match args.arch.as_str() {
        "standard" => ArchitectureConfig::Standard(StandardTraining {
            l1_coefficient: args.l1_coefficient,
            ..StandardTraining::default()
        }),
        "topk" => ArchitectureConfig::TopK(TopKTraining::new(args.k)),
        "batchtopk" => ArchitectureConfig::BatchTopK(BatchTopKTraining::new(args.k as f32)),
        "jumprelu" => ArchitectureConfig::JumpRelu(JumpReluTraining {
            l0_coefficient: args.l1_coefficient,
            ..JumpReluTraining::default()
        }),
        "gated" => ArchitectureConfig::Gated(GatedTraining {
            l1_coefficient: args.l1_coefficient,
            ..GatedTraining::default()
        }),
        other => anyhow::bail!(
            "unknown --arch {other}; expected standard, topk, batchtopk, jumprelu or gated"
        ),
    };
    let relu_family = matches!(args.arch.as_str(), "standard" | "jumprelu" | "gated");
    sae_workbench::transformer_hooks::candle_core::cuda::set_gemm_reduced_precision_f32(args.tf32);
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    let mut cfg = TrainerConfig::new(args.d_in, args.d_sae, arch, (args.steps + 1) as u64);
    cfg.log_every = 1;
    if let Some(t) = args.dead_tokens {
        cfg.dead_window_tokens = t;
    }
    let cfg_dead_tokens = cfg.dead_window_tokens;
    let mut trainer = Trainer::new(cfg)?.with_device(device.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let make_batch = |rng: &mut ChaCha8Rng| -> Result<HostBatch> {
        use rand_distr::{Distribution, StandardNormal};
        let x: Vec<f32> = (0..args.batch * args.d_in)
            .map(|_| StandardNormal.sample(rng))
            .collect();
        Ok(HostBatch::from_vec(x, args.d_in)?)
    };
    let batches: Vec<HostBatch> = (0..2)
        .map(|_| make_batch(&mut rng))
        .collect::<Result<_>>()?;
    let compute = match args.compute.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let mut rss_before = f64::NAN;
    let mut phase_seconds = None;
    let mut own_kernels = None;
    let (warm_l0, l0, secs) = if args.path == "encoder" {
        let w = Tensor::randn(0f32, 0.02, (args.d_sae, args.d_in), &device)?.to_dtype(compute)?;
        let b = Tensor::zeros(args.d_sae, compute, &device)?;
        let on_device = batches
            .iter()
            .map(|b| Ok(Tensor::from_slice(&b.x, (b.n, b.d_in), &device)?.to_dtype(compute)?))
            .collect::<Result<Vec<_>>>()?;
        let product = |x: &Tensor| -> Result<Tensor> { Ok(x.matmul(&w.t()?)?.broadcast_add(&b)?) };
        product(&on_device[0])?;
        device.synchronize()?;
        let t0 = Instant::now();
        for s in 0..args.steps {
            product(&on_device[(s + 1) % 2])?;
        }
        device.synchronize()?;
        (0.0, 0.0, t0.elapsed().as_secs_f64())
    } else if args.path == "device" {
        // The batches go to the device once, as a store feeding the device would leave them.
        let on_device = batches
            .iter()
            .map(|b| Ok(Tensor::from_slice(&b.x, (b.n, b.d_in), &device)?))
            .collect::<Result<Vec<_>>>()?;
        if relu_family && args.target_l0 > 0 {
            trainer.step_host(&batches[0])?;
            trainer.set_encoder_bias_for_l0(&batches[1], args.target_l0)?;
        }
        // What the device trainer adds to the process's memory at its peak (on the CPU: its
        // training state and a step's largest set of temporaries) is the peak from here on less
        // what is resident now.
        sae_workbench::cli::reset_peak_rss();
        rss_before = sae_workbench::cli::peak_rss_mb();
        let opts = DeviceOptions {
            compute,
            token_chunk: args.token_chunk,
            moments: if args.moments == "bf16" {
                DType::BF16
            } else {
                DType::F32
            },
            weights: if args.weights == "bf16" {
                DType::BF16
            } else {
                DType::F32
            },
        };
        let mut dev = DeviceTrainer::from_trainer(&trainer, &device)?.with_options(&opts)?;
        if let Some(p) = &args.pairs {
            dev = dev.with_dense_pairs(p == "dense");
        }
        let warm = dev.step(&on_device[0])?.host()?;
        // The warm-up step is not timed: phases from the timed steps only.
        if args.phases {
            dev = dev.with_phase_timing(true);
        }
        let t0 = Instant::now();
        let mut steps = Vec::with_capacity(args.steps);
        for s in 0..args.steps {
            steps.push(dev.step(&on_device[(s + 1) % 2])?);
        }
        // Reading the last step's scalars waits for the device to finish.
        if let Some(last) = steps.last() {
            last.host()?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let mut l0 = 0.0;
        for s in &steps {
            l0 += s.host()?.l0;
        }
        if args.phases {
            phase_seconds = Some(
                dev.phase_times()
                    .into_iter()
                    .map(|(name, s)| (name.to_string(), (s / args.steps as f64).into()))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
            );
        }
        own_kernels = Some(dev.own_kernels());
        (warm.l0, l0, secs)
    } else {
        let warm = trainer.step_host(&batches[0])?;
        if relu_family && args.target_l0 > 0 {
            trainer.set_encoder_bias_for_l0(&batches[1], args.target_l0)?;
        }
        let mut l0 = 0.0;
        let t0 = Instant::now();
        for s in 0..args.steps {
            let m = trainer.step_host(&batches[(s + 1) % 2])?;
            l0 += m.l0;
        }
        (warm.l0, l0, t0.elapsed().as_secs_f64())
    };
    let tokens_per_s = (args.batch * args.steps) as f64 / secs;
    let line = serde_json::json!({
        "bench": "sae_train_step",
        "impl": "sae-core",
        "path": args.path,
        "device": args.device,
        "dtype": match (args.compute.as_str(), args.tf32) {
            ("f32", true) => "f32 (tf32 products)",
            ("f32", false) => "f32",
            ("bf16", _) => "f32 (bf16 products)",
            _ => "f32 (f16 products)",
        },
        "arch": args.arch,
        "d_in": args.d_in,
        "d_sae": args.d_sae,
        "batch": args.batch,
        "k": if relu_family { serde_json::Value::Null } else { args.k.into() },
        "target_l0": if relu_family { args.target_l0.into() } else { serde_json::Value::Null },
        "threads": rayon::current_num_threads(),
        "steps": args.steps,
        "dead_tokens": cfg_dead_tokens,
        "seconds_per_step": secs / args.steps as f64,
        "tokens_per_s": tokens_per_s,
        // The encoder product alone is 2·d_in·d_sae a token; a step's dense equivalent 12·d_in·d_sae
        // (encoder and decoder, forward and backward), whatever the path does.
        "gflops": if args.path == "encoder" { 2.0 } else { 12.0 } * args.d_in as f64 * args.d_sae as f64 * tokens_per_s / 1e9,
        "l0": l0 / args.steps as f64,
        "l0_first_step": warm_l0,
        "token_chunk": args.token_chunk,
        "moments": args.moments,
        "weights": args.weights,
        "pairs": args.pairs,
        "phase_seconds_per_step": phase_seconds,
        // Whether our own ops ran (false: NVRTC could not compile their kernels, and candle's
        // tensor ops stood in).
        "own_kernels": own_kernels,
        // The device path on the CPU: the memory its state and steps took at their peak.
        "device_peak_mib": if args.path == "device" && args.device == "cpu" {
            (sae_workbench::cli::peak_rss_mb() - rss_before).into()
        } else {
            serde_json::Value::Null
        },
    });
    println!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read; `--target-l0 0` (keep the dense initialisation) is accepted.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["bench_sae_train", "--target-l0", "0"],
            &[
                ("--d-in", "0"),
                ("--d-sae", "0"),
                ("--batch", "0"),
                ("--steps", "0"),
                ("--k", "0"),
                ("--threads", "0"),
                ("--token-chunk", "0"),
            ],
        );
    }
}
