//! The main job: Towards Monosemanticity's neuron-SAE experiment on a real model, end to end.
//!
//! 1. Read the pinned corpora, split them by whole documents, cut `BOS + text` windows.
//! 2. Harvest the MLP neurons (`blocks.L.mlp.hook_post`) of the training split into a crash-safe
//!    cache, and a smaller cache of the held-out test split (for feature examples).
//! 3. Train the SAEs (TopK and ReLU-L1 by default) on one shuffled stream of the training cache.
//! 4. Evaluate each on held-out test documents: reconstruction metrics, spliced NLL, loss
//!    recovered against zero- and mean-ablation, KL.
//! 5. Feature pages (activations, the ablation study, top and interval examples, logit effects)
//!    for a sample of the first SAE's features; plots; `report.json` and `index.html`.
//!
//! Every stage resumes: the caches and SAEs already in `--out` are reused, so a killed run picks
//! up where it stopped. Prints the headline table at the end.

mod chat;
mod memory;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use sae_workbench::activation_store::{
    self as store, ActivationStore, CorpusName, HarvestConfig, HookedModel, Split, SplitSpec,
    StreamConfig, WindowPlan,
};
use sae_workbench::metrics::{
    self, HookedSplice, MeanActivation, PageConfig, SplicedConfig, SplicedEvaluation, TokenSource,
    build_feature_page, collect_examples, evaluate_spliced_many, write_pages,
};
use sae_workbench::sae_core::{
    ArchitectureConfig, DeviceOptions, IterSource, Progress, SaeModel, StandardTraining,
    TopKTraining, TrainMetrics, Trainer, TrainerConfig, available_memory_bytes, train_many,
    training_bytes,
};
use sae_workbench::transformer_hooks::candle_core::{DType, Device};
use sae_workbench::transformer_hooks::{HookPoint, LoadOptions, Model, assets};
use serde::Serialize;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Neuron SAEs on a real model: harvest, train, evaluate, feature pages, report")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Layer whose MLP neurons (`blocks.L.mlp.hook_post`) are harvested.
    #[arg(long, default_value_t = 15)]
    layer: usize,
    /// The hook of that layer to train on (TransformerLens name after `blocks.L.`):
    /// `mlp.hook_post` (the neurons, default) or e.g. `hook_resid_post` (the residual stream,
    /// where steering acts).
    #[arg(long, default_value = DEFAULT_SITE)]
    #[serde(skip_serializing_if = "is_default_site")]
    site: String,
    /// Chat conversations to add to the training split (and an eighth as many to the test
    /// split): prompts built from the documents of that split, answered by the model itself,
    /// in its chat template. 0 (default): corpus text only.
    #[arg(long, default_value_t = 0)]
    #[serde(skip_serializing_if = "is_zero")]
    chat: usize,
    /// Training activations (tokens) to harvest.
    #[arg(long, default_value_t = 400_000)]
    train_tokens: u64,
    /// Passes over the training cache.
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// Held-out test tokens for the spliced evaluation.
    #[arg(long, default_value_t = 16_384)]
    eval_tokens: usize,
    /// Held-out test activations scanned for feature examples.
    #[arg(long, default_value_t = 100_000)]
    example_tokens: u64,
    /// Dictionary size as a multiple of the hook's width (8: 12,288 features for 1,536 neurons).
    #[arg(long, default_value_t = 8)]
    expansion: usize,
    /// Architectures to train, comma separated: topk, standard.
    #[arg(long, value_delimiter = ',', default_value = "topk,standard")]
    archs: Vec<String>,
    /// Active features per token of the TopK SAE.
    #[arg(long, default_value_t = 32)]
    k: usize,
    /// L1 coefficient of the ReLU-L1 SAE (on activations normalised to mean norm sqrt(d_in)).
    #[arg(long, default_value_t = 5.0)]
    l1_coefficient: f32,
    /// Initial L0 of the ReLU-L1 SAE: its encoder bias starts where each feature fires on this
    /// many / d_sae of the first batch (0: the usual zero bias). A CPU-sized run is too short
    /// for the L1 penalty alone to leave the dense start; see `TrainerConfig::encoder_bias_init_l0`.
    #[arg(long, default_value_t = 48)]
    standard_init_l0: usize,
    /// Training batch (tokens per step).
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Peak learning rate. Higher than the papers' (1e-4 to 4e-4 over 10^5+ steps) because a
    /// CPU-sized run has ~200 steps: at 4e-4 the TopK SAE recovered 73.9% of the loss, at 2e-3
    /// 81.5% (README).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Window length including BOS.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Feature pages written for the first SAE (about 20 s each on 2 cores).
    #[arg(long, default_value_t = 8)]
    pages: usize,
    /// Output folder (caches, SAEs, report).
    #[arg(long, default_value = "runs/main")]
    out: PathBuf,
    /// Seed of the window order, shuffling, SAE init and page sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu`, or `cuda` (build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Device path only (`--device cuda`): tokens per forward/backward pass of a training step,
    /// which bounds its `[batch, d_sae]` temporaries (see docs/gpu.md). Default: the whole batch.
    #[arg(long)]
    token_chunk: Option<usize>,
    /// Device path only: Adam's moments in `f32` or `bf16` (half the optimiser's memory).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    moments: String,
    /// Device path only: operands of the matrix products, `f32`, `bf16` or `f16` (f32
    /// accumulation).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    compute: String,
    /// Device path only: `W_enc` and `W_dec` in `f32` or `bf16` (half their memory; updates
    /// rounded stochastically; needs `--compute bf16`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    weights: String,
}

const DEFAULT_SITE: &str = "mlp.hook_post";

fn is_default_site(s: &str) -> bool {
    s == DEFAULT_SITE
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One trained SAE's results.
#[derive(Serialize)]
struct SaeResult {
    name: String,
    architecture: String,
    d_sae: usize,
    folder: PathBuf,
    train_seconds: f64,
    train_log: Vec<TrainMetrics>,
    eval: SplicedEvaluation,
    density_png: String,
}

fn main() -> Result<()> {
    // Freed tensors stay in the process for the next operation (transformer-hooks' alloc.rs).
    sae_workbench::transformer_hooks::retain_freed_memory();
    run(&Args::parse())
}

/// The five stages; each resumes from what `--out` already holds.
fn run(args: &Args) -> Result<()> {
    let args = args.clone();
    let t_start = Instant::now();
    let device = check_args(&args)?;
    let report_dir = args.out.join("report");
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    let hook = format!("blocks.{}.{}", args.layer, args.site);
    let first_run = check_run_folder(&args)?;
    let memory = memory::MemoryLog::start(&report_dir.join("memory.csv"), MEMORY_EVERY)?;

    let mut prepared = prepare(&args, &device, &hook)?;
    check_sae_sizes(&args, &hook, prepared.hooked.model())?;
    if let Some(record) = first_run {
        record.write()?;
    }
    let harvested = harvest_caches(&args, &mut prepared, &hook)?;
    let trained = train_saes(&args, &device, &hook, &prepared, &harvested)?;
    let evaluated = evaluate(&args, &device, &hook, &prepared, &trained, &report_dir)?;
    let t_pages = Instant::now();
    feature_pages(&args, &hook, &prepared, &harvested, &evaluated, &report_dir)?;
    let pages_seconds = t_pages.elapsed().as_secs_f64();
    let memory = memory.finish();
    write_report(
        &args,
        &hook,
        &prepared,
        &harvested,
        &trained,
        &evaluated,
        &memory,
        &report_dir,
        pages_seconds,
        t_start.elapsed().as_secs_f64(),
    )
}

/// How often the memory log samples the process (`report/memory.csv`).
const MEMORY_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Every argument checked before an hour of harvesting, not after; the device to run on.
fn check_args(args: &Args) -> Result<Device> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            Device::new_cuda(0).context("--device cuda (was it built with --features cuda?)")?
        }
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    for a in &args.archs {
        if a != "topk" && a != "standard" {
            bail!("--archs {a}: expected topk or standard");
        }
    }
    for (flag, v) in [
        ("--train-tokens", args.train_tokens),
        ("--epochs", args.epochs),
        ("--eval-tokens", args.eval_tokens as u64),
        ("--expansion", args.expansion as u64),
        ("--k", args.k as u64),
        ("--batch", args.batch as u64),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr {}: expected a positive learning rate", args.lr);
    }
    if !(args.l1_coefficient.is_finite() && args.l1_coefficient >= 0.0) {
        bail!(
            "--l1-coefficient {}: expected a finite number >= 0",
            args.l1_coefficient
        );
    }
    if args.token_chunk == Some(0) {
        bail!("--token-chunk must be at least 1");
    }
    let opts = device_options(args)?;
    if device.is_cpu() && opts != DeviceOptions::default() {
        bail!(
            "--token-chunk, --moments, --compute and --weights set the device path's memory and \
             precision; the CPU trains on the host path, so they need --device cuda"
        );
    }
    Ok(device)
}

/// The device path's options from `--token-chunk`, `--moments`, `--compute` and `--weights`.
fn device_options(args: &Args) -> Result<DeviceOptions> {
    let dtype = |flag: &str, v: &str| -> Result<DType> {
        Ok(match v {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => bail!("{flag} {other}: expected f32, bf16 or f16"),
        })
    };
    Ok(DeviceOptions {
        compute: dtype("--compute", &args.compute)?,
        token_chunk: args.token_chunk,
        moments: dtype("--moments", &args.moments)?,
        weights: dtype("--weights", &args.weights)?,
    })
}

/// The SAEs asked for train side by side, so together they must fit in memory: checked once the
/// model is loaded and the hook's width known, before an hour of harvesting, not after.
fn check_sae_sizes(args: &Args, hook: &str, model: &Model) -> Result<()> {
    let point: HookPoint = hook.parse()?;
    let d_in = point
        .width(model.config())
        .with_context(|| format!("--site {}: not a per-token activation", args.site))?;
    let d_sae = d_in
        .checked_mul(args.expansion)
        .with_context(|| format!("--expansion {}: d_sae overflows", args.expansion))?;
    let need = training_bytes(d_in, d_sae)
        .and_then(|b| b.checked_mul(args.archs.len() as u64))
        .with_context(|| format!("--expansion {}: the byte count overflows", args.expansion))?;
    if let Some(avail) = available_memory_bytes()
        && need > avail
    {
        bail!(
            "--expansion {}: {} SAE(s) of {d_sae} features on {hook} ({d_in} wide) need about \
             {:.1} GiB to train side by side, and {:.1} GiB of memory is available",
            args.expansion,
            args.archs.len(),
            need as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

/// The model, the corpora cut into training and held-out windows.
struct Prepared {
    model_path: PathBuf,
    hooked: HookedModel,
    identity: store::ModelIdentity,
    corpus_report: store::CorpusReport,
    train_plan: WindowPlan,
    test_plan: WindowPlan,
}

/// Stage 1: model, corpora, windows.
fn prepare(args: &Args, device: &Device, hook: &str) -> Result<Prepared> {
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    stage(&format!("loading {}", model_path.display()));
    let model = Model::load_with(&model_path, device, &LoadOptions::default())
        .with_context(|| format!("loading model {}", model_path.display()))?;
    let mut hooked = HookedModel::new(model);
    hooked.check_hooks(&[hook.to_string()])?;
    hooked.check_context(args.context)?;
    let bos = hooked.bos()?;
    let identity = hooked.identity()?;
    stage("reading and tokenizing the corpora");
    let docs = store::load_corpora(&store::default_corpora_root(), &CorpusName::ALL)?;
    let encode = |t: &str| hooked.encode(t);
    let mut tokenized = store::tokenize_documents(&docs, &encode, &SplitSpec::default())?;
    if args.chat > 0 {
        let chats_path = args.out.join("chats.jsonl");
        let chats = chat::conversations(hooked.model(), &docs, args.chat, args.seed, &chats_path)?;
        tokenized.extend(chats);
    }
    let corpus_report = store::corpus_report(&tokenized, args.context, SplitSpec::default());
    let train_plan = WindowPlan::build(&tokenized, Split::Train, args.context, bos, args.seed)?;
    let test_plan = WindowPlan::build(&tokenized, Split::Test, args.context, bos, args.seed)?;
    drop(tokenized);

    Ok(Prepared {
        model_path,
        hooked,
        identity,
        corpus_report,
        train_plan,
        test_plan,
    })
}

/// The two caches: training activations, and held-out ones for feature examples.
struct Harvested {
    train: store::HarvestSummary,
    test: store::HarvestSummary,
    test_dir: PathBuf,
    train_cache: ActivationStore,
}

/// Stage 2: harvest (or resume) both caches.
fn harvest_caches(args: &Args, p: &mut Prepared, hook: &str) -> Result<Harvested> {
    let mut harvest_cfg = HarvestConfig::new(vec![hook.to_string()]);
    harvest_cfg.exclude_token_ids = p.hooked.special_token_ids()?;
    harvest_cfg.max_rows = args.train_tokens;
    stage(&format!(
        "harvesting {hook} on {} training tokens",
        args.train_tokens
    ));
    let train_dir = args.out.join("cache_train");
    let pb = bar("harvest train", "tokens");
    let harvest_train = store::harvest(
        &train_dir,
        &p.train_plan,
        &p.identity,
        &mut p.hooked,
        &harvest_cfg,
        Some(&pb),
    )?;
    pb.finish_and_clear();
    eprintln!("{}", serde_json::to_string(&harvest_train)?);
    harvest_cfg.max_rows = args.example_tokens;
    stage(&format!(
        "harvesting {} held-out test tokens for feature examples",
        args.example_tokens
    ));
    let test_dir = args.out.join("cache_test");
    let pb = bar("harvest test", "tokens");
    let harvest_test = store::harvest(
        &test_dir,
        &p.test_plan,
        &p.identity,
        &mut p.hooked,
        &harvest_cfg,
        Some(&pb),
    )?;
    pb.finish_and_clear();
    eprintln!("{}", serde_json::to_string(&harvest_test)?);
    let train_cache = ActivationStore::open(&train_dir)?;
    Ok(Harvested {
        train: harvest_train,
        test: harvest_test,
        test_dir,
        train_cache,
    })
}

/// The SAEs: `(name, folder, index into logs)`; the index is `None` for one reused as saved.
struct Trained {
    names: Vec<(String, PathBuf, Option<usize>)>,
    logs: Vec<Vec<TrainMetrics>>,
    train_seconds: f64,
}

/// Stage 3: train (or reuse) the SAEs, all from one shuffled stream.
fn train_saes(
    args: &Args,
    device: &Device,
    hook: &str,
    p: &Prepared,
    h: &Harvested,
) -> Result<Trained> {
    let train_acts = h.train_cache.hook(hook)?;
    let d_in = train_acts.width();
    let d_sae = d_in * args.expansion;
    let rows = train_acts.rows();
    let steps = (rows * args.epochs) / args.batch as u64;
    if steps == 0 {
        bail!(
            "--train-tokens {} x --epochs {} gives no full batch of {}",
            rows,
            args.epochs,
            args.batch
        );
    }
    let mut trainers = Vec::new();
    let mut names = Vec::new();
    for arch in &args.archs {
        let name = format!("{arch}_{d_sae}");
        let folder = args.out.join("saes").join(&name);
        if folder.join("cfg.json").exists() {
            eprintln!("reusing the trained SAE in {}", folder.display());
            names.push((name, folder, None));
            continue;
        }
        let sae_cfg = match arch.as_str() {
            "topk" => ArchitectureConfig::TopK(TopKTraining::new(args.k)),
            _ => ArchitectureConfig::Standard(StandardTraining {
                l1_coefficient: args.l1_coefficient,
                ..StandardTraining::default()
            }),
        };
        let mut cfg = TrainerConfig::new(d_in, d_sae, sae_cfg, steps);
        cfg.lr = args.lr;
        cfg.lr_warm_up_steps = (steps / 20).max(1);
        cfg.lr_decay_steps = steps / 5;
        if arch == "standard" {
            cfg.sparsity_warm_up_steps = steps / 10;
            // Towards Monosemanticity resamples dead features a few times early in training.
            cfg.resample_at_steps = vec![steps / 5, 2 * steps / 5];
            cfg.encoder_bias_init_l0 = (args.standard_init_l0 > 0).then_some(args.standard_init_l0);
        }
        cfg.log_every = (steps / 50).max(1);
        cfg.dead_window_tokens = rows.min(1_000_000);
        cfg.seed = args.seed;
        cfg.checkpoint_every = Some((steps / 4).max(1));
        cfg.checkpoint_dir = Some(args.out.join("checkpoints").join(&name));
        cfg.metadata.hook_name = Some(hook.to_string());
        cfg.metadata.model_name = Some(identity_name(&p.model_path));
        let trainer = match Trainer::latest_checkpoint(args.out.join("checkpoints").join(&name)) {
            Some(ck) => {
                eprintln!("resuming {name} from {}", ck.display());
                Trainer::resume(&ck)?
            }
            None => Trainer::new(cfg)?,
        };
        trainers.push(
            trainer
                .with_device(device.clone())
                .with_device_options(device_options(args)?)
                .with_context(|| {
                    format!("{name}: --token-chunk, --moments, --compute or --weights")
                })?,
        );
        names.push((name, folder, Some(trainers.len() - 1)));
    }
    let mut logs: Vec<Vec<TrainMetrics>> = vec![Vec::new(); trainers.len()];
    let mut train_seconds = 0.0;
    if !trainers.is_empty() {
        stage(&format!(
            "training {} SAE(s) of {d_sae} features: {steps} steps of {} tokens",
            trainers.len(),
            args.batch
        ));
        let done = trainers.iter().map(|t| t.step_count()).min().unwrap_or(0);
        let stream = train_acts.batches(StreamConfig {
            seed: args.seed,
            epochs: None,
            device: device.clone(),
            ..StreamConfig::new(args.batch)
        })?;
        let mut source = IterSource(stream);
        // Resumed trainers continue the same stream: skip the batches they already saw.
        sae_workbench::sae_core::BatchSource::skip_batches(&mut source, done)?;
        let t0 = Instant::now();
        logs = train_many(&mut trainers, &mut source, Progress::Bar)?;
        train_seconds = t0.elapsed().as_secs_f64();
        for (name, folder, idx) in &names {
            if let Some(i) = idx {
                trainers[*i].save(folder)?;
                eprintln!("saved {name} to {}", folder.display());
            }
        }
    }

    Ok(Trained {
        names,
        logs,
        train_seconds,
    })
}

/// The evaluated SAEs, in `Trained::names` order.
struct Evaluated {
    saes: Vec<(String, SaeModel)>,
    results: Vec<SaeResult>,
    eval_tokens: usize,
    eval_seconds: f64,
}

/// Stage 4: spliced evaluation on held-out test documents; a density plot per SAE and the
/// loss-recovered bars.
fn evaluate(
    args: &Args,
    device: &Device,
    hook: &str,
    p: &Prepared,
    t: &Trained,
    report_dir: &Path,
) -> Result<Evaluated> {
    let model = p.hooked.model();
    let eval_batches = p
        .test_plan
        .full_window_batches(args.eval_tokens, 8, device)?;
    let eval_tokens: usize = eval_batches.iter().map(|b| b.elem_count()).sum();
    let mut saes = Vec::new();
    for (name, folder, _) in &t.names {
        let sae =
            SaeModel::load(folder).with_context(|| format!("loading {}", folder.display()))?;
        saes.push((name.clone(), sae));
    }
    stage(&format!(
        "evaluating {} SAE(s) on {eval_tokens} held-out tokens ({} forward passes per batch: \
         clean, zero- and mean-ablated once, spliced and spliced + error per SAE)",
        saes.len(),
        3 + 2 * saes.len()
    ));
    let mut target = HookedSplice::new(model, hook)?;
    for (_, sae) in &saes {
        target.check_sae(sae)?;
    }
    let pb = bar("spliced eval", "passes");
    let cfg = SplicedConfig {
        mean: MeanActivation::EvalTokens,
        ..SplicedConfig::default()
    };
    let sae_refs: Vec<&SaeModel> = saes.iter().map(|(_, sae)| sae).collect();
    let t_eval = Instant::now();
    let evals = evaluate_spliced_many(&mut target, &sae_refs, &eval_batches, &cfg, Some(&pb))?;
    let eval_seconds = t_eval.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let mut results = Vec::new();
    for (((name, folder, idx), (_, sae)), eval) in t.names.iter().zip(&saes).zip(evals) {
        let hist = eval.reconstruction.density_histogram.clone();
        let density_png = format!("density_{name}.png");
        metrics::plots::plot_density_histogram(
            &hist,
            &format!("{name}: feature density (log10 firing rate, held-out)"),
            &report_dir.join(&density_png),
        )?;
        results.push(SaeResult {
            name: name.clone(),
            architecture: sae.config().architecture().to_string(),
            d_sae: sae.d_sae(),
            folder: folder.clone(),
            train_seconds: if idx.is_some() { t.train_seconds } else { 0.0 },
            train_log: idx.map(|i| t.logs[i].clone()).unwrap_or_default(),
            eval,
            density_png,
        });
    }
    let bars: Vec<(&str, f64)> = results
        .iter()
        .map(|r| (r.name.as_str(), r.eval.spliced.loss_recovered_zero))
        .collect();
    metrics::plots::plot_bars(
        &bars,
        "Loss recovered vs zero-ablation (held-out)",
        "loss recovered",
        &report_dir.join("loss_recovered.png"),
    )?;

    Ok(Evaluated {
        saes,
        results,
        eval_tokens,
        eval_seconds,
    })
}

/// Stage 5: feature pages for a sample of the first SAE's live features.
fn feature_pages(
    args: &Args,
    hook: &str,
    p: &Prepared,
    h: &Harvested,
    e: &Evaluated,
    report_dir: &Path,
) -> Result<()> {
    let model = p.hooked.model();
    if let Some((sae_name, sae)) = e.saes.first()
        && args.pages > 0
    {
        stage(&format!("feature pages for {sae_name}"));
        let test_cache = ActivationStore::open(&h.test_dir)?;
        let test_acts = test_cache.hook(hook)?;
        let pb = bar("collect examples", "rows");
        let collector = collect_examples(
            &test_acts,
            sae,
            args.example_tokens,
            4096,
            16,
            512,
            args.seed,
            Some(&pb),
        )?;
        pb.finish_and_clear();
        let density = collector.density().firing_rates();
        let mut alive: Vec<usize> = (0..density.len()).filter(|&f| density[f] > 0.0).collect();
        alive.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(args.seed));
        alive.truncate(args.pages);
        alive.sort_unstable();
        let tok = model.tokenizer()?;
        let window_tokens =
            |w: u32| -> Option<Vec<u32>> { test_plan_tokens(&p.test_plan, w as usize) };
        let decode =
            |id: u32| -> String { tok.decode(&[id]).unwrap_or_else(|_| format!("<{id}>")) };
        let source = TokenSource {
            window_tokens: &window_tokens,
            decode: &decode,
        };
        let mut target = HookedSplice::new(model, hook)?;
        let page_cfg = PageConfig {
            seed: args.seed,
            ..PageConfig::default()
        };
        let pb = bar("feature pages", "pages");
        pb.set_length(alive.len() as u64);
        let mut pages = Vec::new();
        for &f in &alive {
            let effects = target.logit_effects(sae, f, 10).ok();
            pages.push(build_feature_page(
                &mut target,
                sae,
                sae_name,
                &collector,
                f,
                &source,
                effects,
                &page_cfg,
            )?);
            pb.inc(1);
        }
        pb.finish_and_clear();
        write_pages(
            &report_dir.join("features"),
            &format!("{sae_name} features ({hook})"),
            &format!(
                "A random sample of {} live features of {sae_name}, trained on {} activations of \
                 {hook}; examples come from held-out test documents.",
                alive.len(),
                h.train_cache.rows()
            ),
            &pages,
        )?;
    }

    Ok(())
}

/// `report.json`, `index.html` and the headline table.
#[allow(clippy::too_many_arguments)]
fn write_report(
    args: &Args,
    hook: &str,
    p: &Prepared,
    h: &Harvested,
    t: &Trained,
    e: &Evaluated,
    memory: &[memory::Sample],
    report_dir: &Path,
    pages_seconds: f64,
    total_seconds: f64,
) -> Result<()> {
    if !memory.is_empty() {
        let line = |name: &str, y: fn(&memory::Sample) -> f64| metrics::plots::Series {
            name: name.into(),
            points: memory
                .iter()
                .map(|s| (s.seconds / 60.0, y(s), y(s), y(s)))
                .collect(),
        };
        metrics::plots::plot_lines(
            &[
                line("anonymous (heap)", |s| s.rss_anon_mib),
                line("file-backed (mapped cache, binary)", |s| s.rss_file_mib),
            ],
            "resident memory of the main job",
            "minutes",
            "MiB",
            false,
            &report_dir.join("memory.png"),
        )?;
    }
    let report = serde_json::json!({
        "memory": {
            "every_seconds": MEMORY_EVERY.as_secs_f64(),
            "csv": "memory.csv",
            "stages": memory::by_stage(memory),
        },
        "args": args,
        "model": p.model_path,
        "hook": hook,
        "corpus": p.corpus_report,
        "harvest_train": h.train,
        "harvest_test": h.test,
        "eval_tokens": e.eval_tokens,
        "saes": e.results,
        "seconds": {
            "harvest_train": h.train.seconds,
            "harvest_test": h.test.seconds,
            "train": t.train_seconds,
            "spliced_eval": e.eval_seconds,
            "feature_pages": pages_seconds,
            "total": total_seconds,
        },
        "matmul": sae_workbench::transformer_hooks::blas_library().unwrap_or("candle gemm"),
        "blas_core": sae_workbench::transformer_hooks::blas_core(),
        "total_seconds": total_seconds,
    });
    let json_path = report_dir.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let table = headline_table(&e.results);
    std::fs::write(
        report_dir.join("index.html"),
        index_html(hook, &p.model_path, h.train_cache.rows(), &e.results),
    )
    .context("writing index.html")?;
    println!("\n{table}");
    println!(
        "report: {} ({:.1} min in all)",
        report_dir.join("index.html").display(),
        total_seconds / 60.0
    );
    Ok(())
}

/// The flags that decide what the output folder's caches, checkpoints and SAEs hold.
const STATE_FLAGS: [&str; 13] = [
    "model",
    "layer",
    "site",
    "chat",
    "train_tokens",
    "context",
    "seed",
    "epochs",
    "batch",
    "expansion",
    "k",
    "l1_coefficient",
    "lr",
];

/// A rerun into the same `--out` resumes and reuses what is there, which is only right if it asks
/// for the same run: otherwise a `--k 128` run would silently report the `k = 32` SAE it found.
/// The first run records its flags in `run_args.json` (once the model has taken them: a run
/// refused for a layer the model lacks leaves no record to refuse the corrected one); a later
/// one with different values for any of [`STATE_FLAGS`] is refused, naming them.
fn check_run_folder(args: &Args) -> Result<Option<RunRecord>> {
    let path = args.out.join("run_args.json");
    let now = serde_json::to_value(args)?;
    if let Ok(text) = std::fs::read_to_string(&path) {
        let before: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let differ: Vec<String> = STATE_FLAGS
            .iter()
            .filter(|f| before.get(**f) != now.get(**f))
            .map(|f| {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or_else(|| "unset".to_string(), |v| v.to_string())
                };
                format!(
                    "--{} {} there, {} now",
                    f.replace('_', "-"),
                    show(before.get(*f)),
                    show(now.get(*f))
                )
            })
            .collect();
        if !differ.is_empty() {
            bail!(
                "{} holds a run with other settings ({}); its caches, checkpoints and SAEs belong \
                 to that run. Pass another --out, or delete the folder.",
                args.out.display(),
                differ.join("; ")
            );
        }
        return Ok(None);
    }
    Ok(Some(RunRecord {
        text: serde_json::to_string_pretty(&now)?,
        path,
    }))
}

/// The flags of a first run into `--out`, to be written once they are known to work.
#[derive(Debug)]
struct RunRecord {
    path: PathBuf,
    text: String,
}

impl RunRecord {
    fn write(self) -> Result<()> {
        std::fs::write(&self.path, self.text)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

fn stage(msg: &str) {
    memory::set_stage(msg);
    eprintln!("== {msg}");
}

fn bar(prefix: &str, unit: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(&format!(
        "{prefix} {{wide_bar}} {{human_pos}}/{{human_len}} {unit} {{per_sec}} eta {{eta}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(0).with_style(style)
}

fn identity_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn test_plan_tokens(plan: &WindowPlan, w: usize) -> Option<Vec<u32>> {
    (w < plan.len()).then(|| plan.tokens(w).to_vec())
}

fn headline_table(results: &[SaeResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| SAE | L0 | FVU | loss recovered (zero) | loss recovered (mean) | KL | dead | clean NLL | spliced NLL |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let (n, m) = (&r.eval.spliced, &r.eval.reconstruction);
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.3} | {:.1}% | {:.1}% | {:.4} | {:.1}% | {:.4} | {:.4} |",
            r.name,
            m.l0,
            m.fvu,
            100.0 * n.loss_recovered_zero,
            100.0 * n.loss_recovered_mean,
            n.kl_clean_spliced,
            100.0 * m.dead_fraction,
            n.clean,
            n.spliced
        );
    }
    s
}

fn index_html(hook: &str, model: &Path, train_rows: u64, results: &[SaeResult]) -> String {
    let esc = metrics::html::escape_html;
    let mut rows = String::new();
    for r in results {
        let (n, m) = (&r.eval.spliced, &r.eval.reconstruction);
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{:.1}</td><td>{:.3}</td><td>{:.1}%</td><td>{:.1}%</td>\
             <td>{:.4}</td><td>{:.1}%</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td>\
             <td>{:.2e}</td></tr>",
            esc(&r.name),
            m.l0,
            m.fvu,
            100.0 * n.loss_recovered_zero,
            100.0 * n.loss_recovered_mean,
            n.kl_clean_spliced,
            100.0 * m.dead_fraction,
            n.clean,
            n.spliced,
            n.zero_ablated,
            n.mean_ablated,
            n.spliced_with_error_max_abs_diff,
        );
    }
    let mut imgs = String::from(
        "<img src=\"loss_recovered.png\" alt=\"loss recovered\">\
         <img src=\"memory.png\" alt=\"resident memory over the run\">",
    );
    for r in results {
        let _ = write!(
            imgs,
            "<img src=\"{}\" alt=\"feature density of {}\">",
            esc(&r.density_png),
            esc(&r.name)
        );
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>SAEs: {hook}</title>\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         img{{max-width:520px;margin:8px}}</style></head><body>\
         <h1>SAEs on {model}</h1>\
         <p>SAEs trained on {train_rows} activations of <code>{hook}</code>; every number below is \
         measured on held-out test documents. Loss recovered = (L_ablated - L_spliced) / \
         (L_ablated - L_clean). The last column is the largest per-token change in NLL when the \
         reconstruction plus the SAE's error term is spliced in: it must be ~0.</p>\
         <table><tr><th>SAE</th><th>L0</th><th>FVU</th><th>loss rec. (zero)</th>\
         <th>loss rec. (mean)</th><th>KL</th><th>dead</th><th>clean NLL</th><th>spliced NLL</th>\
         <th>zero-abl. NLL</th><th>mean-abl. NLL</th><th>with-error max |Δ|</th></tr>{rows}</table>\
         <p><a href=\"features/index.html\">Feature pages</a> · <a href=\"report.json\">report.json</a></p>\
         {imgs}</body></html>",
        hook = esc(hook),
        model = esc(&model.display().to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A main job small enough for a test: 8,192 training tokens, 64 steps of 256 for a TopK
    /// and a ReLU-L1 SAE of 2x, a checkpoint every 16 steps, no feature pages.
    fn small(out: &Path) -> Args {
        Args::parse_from([
            "main_job",
            "--train-tokens",
            "8192",
            "--epochs",
            "2",
            "--batch",
            "256",
            "--expansion",
            "2",
            "--eval-tokens",
            "512",
            "--example-tokens",
            "2048",
            "--pages",
            "0",
            "--out",
            out.to_str().expect("a UTF-8 temporary path"),
        ])
    }

    fn assets_present() -> bool {
        let model = assets::asset_or_skip(assets::SMOLLM2).is_some();
        let corpora = store::default_corpora_root()
            .join("moby-dick/data.txt")
            .exists();
        if model && !corpora {
            eprintln!("skipping: corpora not fetched (python3 scripts/fetch_assets.py corpora)");
        }
        model && corpora
    }

    /// Every file of each trained SAE folder, by name.
    fn sae_files(out: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        let saes = out.join("saes");
        let mut names: Vec<_> = std::fs::read_dir(&saes)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for dir in names {
            let mut inner: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            inner.sort();
            for f in inner {
                let name = f.strip_prefix(&saes).unwrap().display().to_string();
                files.push((name, std::fs::read(&f).unwrap()));
            }
        }
        files
    }

    const CHILD: &str = "MAIN_JOB_KILL_CHILD_DIR";

    /// SIGKILL of the main job itself while it trains, then the same command again: the SAEs it
    /// writes must equal, byte for byte, those of a run that was never killed. The killed run
    /// is this test binary started again with `MAIN_JOB_KILL_CHILD_DIR` set; it is killed as soon
    /// as its first training checkpoint appears (step 16 of 64).
    #[test]
    fn killed_while_training_then_rerun_gives_the_same_saes() {
        if let Ok(dir) = std::env::var(CHILD) {
            run(&small(Path::new(&dir))).unwrap();
            return;
        }
        if !assets_present() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (reference, killed) = (tmp.path().join("reference"), tmp.path().join("killed"));
        run(&small(&reference)).unwrap();

        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::killed_while_training_then_rerun_gives_the_same_saes",
                "--nocapture",
            ])
            .env(CHILD, &killed)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let checkpoints = killed.join("checkpoints");
        let has_checkpoint = || {
            std::fs::read_dir(&checkpoints).ok().is_some_and(|arches| {
                arches.flatten().any(|a| {
                    std::fs::read_dir(a.path()).ok().is_some_and(|steps| {
                        steps
                            .flatten()
                            .any(|s| s.file_name().to_string_lossy().starts_with("step_"))
                    })
                })
            })
        };
        let t0 = Instant::now();
        while !has_checkpoint() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the child ended ({status}) before its first training checkpoint");
            }
            assert!(t0.elapsed().as_secs() < 600, "no checkpoint within 600 s");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child finished before the kill");
        let saved = ["topk_3072", "standard_3072"]
            .iter()
            .filter(|n| killed.join("saes").join(n).join("cfg.json").exists())
            .count();
        assert!(
            saved < 2,
            "both SAEs were saved before the kill: nothing was interrupted"
        );

        run(&small(&killed)).unwrap();
        let (a, b) = (sae_files(&reference), sae_files(&killed));
        assert_eq!(
            a.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            b.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        assert!(a.iter().any(|(n, _)| n.ends_with(".safetensors")));
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert!(x == y, "{name} differs after the kill and rerun");
        }
        let report = |out: &Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(out.join("report/report.json")).unwrap()).unwrap()
        };
        let (ra, rb) = (report(&reference), report(&killed));
        for sae in 0..2 {
            let key = |r: &serde_json::Value| {
                r["saes"][sae]["eval"]["spliced"]["loss_recovered_zero"].clone()
            };
            assert!(key(&ra).is_number(), "no loss recovered in the report");
            assert_eq!(key(&ra), key(&rb), "loss recovered of SAE {sae}");
        }
    }

    /// An `--expansion` whose SAEs cannot fit in memory is refused once the model is loaded,
    /// before the harvest; one whose size overflows likewise. (A tiny random Llama: 32 wide.)
    #[test]
    fn saes_too_large_for_memory_are_refused_before_the_harvest() {
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("transformer-hooks/tests/fixtures/tiny/llama");
        let model = Model::load(&tiny, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let args = |expansion: usize, site: &str| Args {
            expansion,
            layer: 0,
            site: site.into(),
            ..small(dir.path())
        };
        let hook = |a: &Args| format!("blocks.{}.{}", a.layer, a.site);
        let ok = args(2, "mlp.hook_post");
        check_sae_sizes(&ok, &hook(&ok), &model).unwrap();
        if available_memory_bytes().is_some() {
            let huge = args(1 << 40, "hook_resid_post");
            let msg = format!(
                "{:#}",
                check_sae_sizes(&huge, &hook(&huge), &model).unwrap_err()
            );
            assert!(
                msg.contains("--expansion 1099511627776") && msg.contains("GiB"),
                "{msg}"
            );
        }
        let overflow = args(usize::MAX / 4, "hook_resid_post");
        let msg = format!(
            "{:#}",
            check_sae_sizes(&overflow, &hook(&overflow), &model).unwrap_err()
        );
        assert!(msg.contains("overflows"), "{msg}");
        let scores = args(2, "attn.hook_pattern");
        let msg = format!(
            "{:#}",
            check_sae_sizes(&scores, &hook(&scores), &model).unwrap_err()
        );
        assert!(msg.contains("not a per-token activation"), "{msg}");
    }

    /// A rerun with other state flags is refused once a run has recorded its own; a run that
    /// failed before the model took its flags records none, so its corrected rerun goes ahead.
    #[test]
    fn only_a_run_that_started_claims_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let first = small(dir.path());
        let other = Args {
            k: 64,
            ..first.clone()
        };
        let record = check_run_folder(&first)
            .unwrap()
            .expect("a first run records");
        assert!(
            check_run_folder(&other).unwrap().is_some(),
            "nothing written yet"
        );
        record.write().unwrap();
        let msg = format!("{:#}", check_run_folder(&other).unwrap_err());
        assert!(msg.contains("--k 32 there, 64 now"), "{msg}");
        assert!(check_run_folder(&first).unwrap().is_none());

        if assets_present() {
            let dir = tempfile::tempdir().unwrap();
            let typo = Args {
                layer: 99,
                ..small(dir.path())
            };
            let msg = format!("{:#}", run(&typo).unwrap_err());
            assert!(msg.contains("blocks.99"), "{msg}");
            assert!(!dir.path().join("run_args.json").exists());
            assert!(check_run_folder(&small(dir.path())).unwrap().is_some());
        }
    }

    /// Arguments that would waste an hour before failing, or divide by zero, are refused first,
    /// each naming the flag.
    #[test]
    fn bad_arguments_are_refused_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let base = small(dir.path());
        let cases: Vec<(Args, &str)> = vec![
            (
                Args {
                    train_tokens: 0,
                    ..base.clone()
                },
                "--train-tokens",
            ),
            (
                Args {
                    epochs: 0,
                    ..base.clone()
                },
                "--epochs",
            ),
            (
                Args {
                    eval_tokens: 0,
                    ..base.clone()
                },
                "--eval-tokens",
            ),
            (
                Args {
                    expansion: 0,
                    ..base.clone()
                },
                "--expansion",
            ),
            (
                Args {
                    k: 0,
                    ..base.clone()
                },
                "--k",
            ),
            (
                Args {
                    batch: 0,
                    ..base.clone()
                },
                "--batch",
            ),
            (
                Args {
                    lr: f64::NAN,
                    ..base.clone()
                },
                "--lr",
            ),
            (
                Args {
                    lr: -1.0,
                    ..base.clone()
                },
                "--lr",
            ),
            (
                Args {
                    l1_coefficient: f32::INFINITY,
                    ..base.clone()
                },
                "--l1-coefficient",
            ),
            (
                Args {
                    archs: vec!["gated".into()],
                    ..base.clone()
                },
                "--archs gated",
            ),
            (
                Args {
                    device: "tpu".into(),
                    ..base.clone()
                },
                "--device tpu",
            ),
            (
                Args {
                    token_chunk: Some(0),
                    ..base.clone()
                },
                "--token-chunk",
            ),
            (
                Args {
                    moments: "bf16".into(),
                    ..base.clone()
                },
                "need --device cuda",
            ),
            (
                Args {
                    token_chunk: Some(512),
                    ..base.clone()
                },
                "need --device cuda",
            ),
            (
                Args {
                    weights: "bf16".into(),
                    ..base.clone()
                },
                "need --device cuda",
            ),
        ];
        for (args, flag) in cases {
            let msg = format!("{:#}", check_args(&args).unwrap_err());
            assert!(msg.contains(flag), "{flag}: {msg}");
        }
        assert!(check_args(&base).is_ok());
    }
}
