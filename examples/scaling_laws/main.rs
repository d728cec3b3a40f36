//! Scaling laws for SAEs: a sweep over the number of features, training tokens and k (plus
//! ReLU-L1 at several L1 coefficients, Matryoshka BatchTopK and a learning-rate sweep), trained
//! from one harvested cache on one shuffled stream, every run evaluated on held-out documents,
//! then the laws fitted (`scaling` crate) and plotted.
//!
//! ```text
//! cargo run --release --example scaling_laws -- --grid quick     # about 30 min on 2 cores
//! cargo run --release --example scaling_laws -- --grid full      # hours; resumes when rerun
//! ```
//!
//! Writes `OUT/runs.jsonl` (one line per run), `OUT/fits.json` and `OUT/*.png`.
//!
//! **One pass for all runs.** Every SAE reads the same batches: the stream is cut into phases
//! that end where some run's token budget ends; at the end of a phase the runs that are done are
//! saved and the others checkpointed, then `progress.json` records the phase. A killed sweep
//! resumes from the last recorded phase; the sweep costs about as much as its largest runs.
//! When the runs do not fit in memory together (`--memory-gb`), they are packed into groups and
//! each group makes its own pass over the same stream from its first batch: a run sees the same
//! batches whichever group it is in, and only the cheap stream reading is repeated.
//! Each run's learning-rate schedule (5% warm-up, linear decay over the last 20%) ends at its
//! own budget.
//!
//! **Compute** per training token, counted analytically (the hot step is a dense encoder GEMM
//! and sparse work over the active (token, feature) pairs, `sae-core`'s kernels):
//!
//! ```text
//! C_token = 2·d_in·n                 encoder pre-activations (dense)
//!         + 8·L0·d_in·(1 + inner)    decode, and gradients of W_dec, W_enc and the codes over
//!                                    active pairs (Matryoshka repeats them per inner prefix)
//!         + 24·n·d_in / batch        Adam over 2·n·d_in parameters, once per batch
//! ```
//!
//! with L0 = k for TopK and Matryoshka, the measured training L0 for ReLU-L1. `fits.json` puts
//! the formula beside a timed step of each width.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use sae_workbench::activation_store::{
    self as store, ActivationStore, CorpusName, HarvestConfig, HookedModel, Split, SplitSpec,
    StreamConfig, WindowPlan,
};
use sae_workbench::metrics::plots::{Mark, Scatter, plot_scatter};
use sae_workbench::metrics::{HookedSplice, MeanActivation, SplicedConfig, evaluate_spliced_many};
use sae_workbench::sae_core::io::write_atomic;
use sae_workbench::sae_core::{
    ArchitectureConfig, BatchSource, HostBatch, IterSource, MatryoshkaTraining, Progress, SaeModel,
    StandardTraining, TopKTraining, TrainMetrics, Trainer, TrainerConfig, available_memory_bytes,
    train_many, training_bytes,
};
use sae_workbench::scaling::{
    Law, assess, best_per_bin, bootstrap, doubling_convergence, extrapolate, fit_offset_power_law,
    fit_power_law, frontier, tokens_to_convergence,
};
use sae_workbench::transformer_hooks::candle_core::{Device, Tensor};
use sae_workbench::transformer_hooks::{LoadOptions, Model, assets};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
enum Grid {
    /// 1-32x features, 25k-410k tokens, k 16/32/64: about 30 minutes on 2 cores.
    Quick,
    /// 1-32x features, 128k-4.1M tokens, k 16-128: hours.
    Full,
}

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Scaling laws for SAEs: the sweep, the fits and the plots")]
struct Args {
    #[arg(long, value_enum, default_value = "quick")]
    grid: Grid,
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 15)]
    layer: usize,
    /// Hook of that layer (after `blocks.L.`): `hook_resid_post` (default) or `mlp.hook_post`.
    #[arg(long, default_value = "hook_resid_post")]
    site: String,
    /// Held-out tokens for the spliced evaluation of every run (default: 2,048 quick, 8,192 full).
    #[arg(long)]
    eval_tokens: Option<usize>,
    /// Tokens per training step.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Peak learning rate of the grid (the learning-rate sweep brackets it).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 128)]
    context: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (default: runs/scaling_quick or runs/scaling_full).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Memory for the runs that train together (GB); runs beyond it train in further groups,
    /// each another pass over the stream (default: 60% of the memory available at start).
    #[arg(long)]
    memory_gb: Option<f64>,
    /// Leave out every run wider than this many times d_in (a wide hook such as `mlp.hook_post`
    /// within a session's time); the fits use what remains.
    #[arg(long)]
    max_expansion: Option<usize>,
    /// Train and evaluate only the runs of these roles (comma-separated: `grid` the features x
    /// tokens grid, `k`, `l1`, `matryoshka`, `lr`; default all). A later run without it trains
    /// what was left out, from the same cache.
    #[arg(long, value_delimiter = ',', value_parser = ["grid", "k", "l1", "matryoshka", "lr"])]
    roles: Vec<String>,
    /// Only fit and plot again from the `runs.jsonl` already in the output folder: no model,
    /// no training, seconds instead of the sweep (after a change to the fits, or on a sweep
    /// copied from another machine). The rest of `fits.json` is kept.
    #[arg(long)]
    refit: bool,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

/// One SAE of the sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RunSpec {
    name: String,
    /// `topk`, `standard` or `matryoshka_batchtopk`.
    arch: String,
    /// Why it is in the sweep: `grid` (features x tokens at the grid's k), `k` (the k sweep at
    /// full tokens), `l1`, `matryoshka`, `lr`.
    role: String,
    n: usize,
    expansion: usize,
    k: Option<usize>,
    l1_coefficient: Option<f32>,
    matryoshka_widths: Vec<usize>,
    tokens: u64,
    steps: u64,
    lr: f64,
}

struct GridDef {
    mults: Vec<usize>,
    /// Largest budget in steps, and the number of halvings below it.
    max_steps: u64,
    halvings: u32,
    grid_k: usize,
    ks: Vec<usize>,
    l1s: Vec<f32>,
    l1_mult: usize,
    matryoshka_mults: Vec<usize>,
    lr_points: Vec<usize>,
}

fn grid_def(g: Grid) -> GridDef {
    match g {
        Grid::Quick => GridDef {
            mults: vec![1, 2, 4, 8, 16, 32],
            max_steps: 400,
            halvings: 4,
            grid_k: 32,
            ks: vec![16, 64],
            l1s: vec![2.0, 5.0, 10.0],
            l1_mult: 4,
            matryoshka_mults: vec![4, 16],
            lr_points: vec![4, 16],
        },
        Grid::Full => GridDef {
            mults: vec![1, 2, 4, 8, 16, 32],
            max_steps: 4000,
            halvings: 5,
            grid_k: 32,
            ks: vec![16, 64, 128],
            l1s: vec![2.0, 5.0, 10.0, 20.0],
            l1_mult: 8,
            matryoshka_mults: vec![4, 8, 16, 32],
            lr_points: vec![2, 16],
        },
    }
}

fn specs(def: &GridDef, d_in: usize, batch: usize, lr: f64) -> Vec<RunSpec> {
    let mut out: Vec<RunSpec> = Vec::new();
    let mut push = |mut s: RunSpec| {
        s.tokens = s.steps * batch as u64;
        s.name = format!(
            "{}_n{}_{}t{}_lr{}",
            s.arch,
            s.n,
            match (s.k, s.l1_coefficient) {
                (Some(k), _) => format!("k{k}_"),
                (_, Some(l)) => format!("l1{l}_"),
                _ => String::new(),
            },
            s.tokens,
            s.lr
        );
        if !out.iter().any(|o| o.name == s.name) {
            out.push(s);
        }
    };
    let base = |arch: &str, role: &str, mult: usize, steps: u64| RunSpec {
        name: String::new(),
        arch: arch.into(),
        role: role.into(),
        n: d_in * mult,
        expansion: mult,
        k: None,
        l1_coefficient: None,
        matryoshka_widths: Vec::new(),
        tokens: 0,
        steps,
        lr,
    };
    for &m in &def.mults {
        for h in 0..=def.halvings {
            push(RunSpec {
                k: Some(def.grid_k),
                ..base("topk", "grid", m, def.max_steps >> h)
            });
        }
        for &k in &def.ks {
            push(RunSpec {
                k: Some(k),
                ..base("topk", "k", m, def.max_steps)
            });
        }
    }
    for &l1 in &def.l1s {
        push(RunSpec {
            l1_coefficient: Some(l1),
            ..base("standard", "l1", def.l1_mult, def.max_steps)
        });
    }
    for &m in &def.matryoshka_mults {
        let n = d_in * m;
        push(RunSpec {
            k: Some(def.grid_k),
            // Prefixes of 1/16, 1/4 and all of the dictionary.
            matryoshka_widths: vec![n / 16, n / 4],
            ..base("matryoshka_batchtopk", "matryoshka", m, def.max_steps)
        });
    }
    for &m in &def.lr_points {
        for f in [1.0 / 3.0, 3.0] {
            push(RunSpec {
                k: Some(def.grid_k),
                lr: lr * f,
                ..base("topk", "lr", m, def.max_steps)
            });
        }
    }
    out
}

/// The runs of the given roles (all when none is given).
fn with_roles(mut runs: Vec<RunSpec>, roles: &[String]) -> Vec<RunSpec> {
    if !roles.is_empty() {
        runs.retain(|s| roles.contains(&s.role));
    }
    runs
}

fn trainer_config(s: &RunSpec, d_in: usize, hook: &str, seed: u64) -> TrainerConfig {
    let arch = match s.arch.as_str() {
        "standard" => ArchitectureConfig::Standard(StandardTraining {
            l1_coefficient: s.l1_coefficient.unwrap_or(5.0),
            ..StandardTraining::default()
        }),
        "matryoshka_batchtopk" => ArchitectureConfig::Matryoshka(MatryoshkaTraining::new(
            s.k.unwrap_or(32) as f32,
            s.matryoshka_widths.clone(),
        )),
        _ => ArchitectureConfig::TopK(TopKTraining::new(s.k.unwrap_or(32))),
    };
    let mut cfg = TrainerConfig::new(d_in, s.n, arch, s.steps);
    cfg.lr = s.lr;
    cfg.lr_warm_up_steps = (s.steps / 20).max(1);
    cfg.lr_decay_steps = s.steps / 5;
    if s.arch == "standard" {
        cfg.sparsity_warm_up_steps = s.steps / 10;
        cfg.encoder_bias_init_l0 = Some(48);
    }
    cfg.log_every = (s.steps / 10).max(1);
    cfg.dead_window_tokens = 200_000;
    cfg.seed = seed;
    cfg.metadata.hook_name = Some(hook.to_string());
    cfg
}

/// Analytic training FLOPs per token (module docs).
fn flops_per_token(s: &RunSpec, d_in: usize, batch: usize, l0: f64) -> f64 {
    let (d, n) = (d_in as f64, s.n as f64);
    let inner = s.matryoshka_widths.len() as f64;
    2.0 * d * n + 8.0 * l0 * d * (1.0 + inner) + 24.0 * n * d / batch as f64
}

/// One line of `runs.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RunResult {
    #[serde(flatten)]
    spec: RunSpec,
    compute: f64,
    flops_per_token: f64,
    train_l0: f64,
    train_fvu: f64,
    l0: f64,
    fvu: f64,
    dead_fraction: f64,
    loss_recovered_zero: f64,
    loss_recovered_mean: f64,
    delta_nll: f64,
    kl: f64,
}

fn main() -> Result<()> {
    sae_workbench::transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    if args.batch == 0 || args.context < 2 || !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--batch must be at least 1, --context at least 2, --lr positive");
    }
    if let Some(gb) = args.memory_gb
        && !(gb.is_finite() && gb > 0.0)
    {
        bail!("--memory-gb must be a positive number of gigabytes, not {gb}");
    }
    let mut def = grid_def(args.grid);
    if let Some(cap) = args.max_expansion {
        for list in [
            &mut def.mults,
            &mut def.matryoshka_mults,
            &mut def.lr_points,
        ] {
            list.retain(|&m| m <= cap);
        }
        def.l1_mult = def.l1_mult.min(cap);
        if def.mults.len() < 3 {
            bail!("--max-expansion {cap} leaves fewer than three widths of the grid");
        }
    }
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(match args.grid {
            Grid::Quick => "runs/scaling_quick",
            Grid::Full => "runs/scaling_full",
        })
    });
    let eval_tokens = args.eval_tokens.unwrap_or(match args.grid {
        Grid::Quick => 2048,
        Grid::Full => 8192,
    });
    if args.refit {
        return refit(&def, &out);
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let hook = format!("blocks.{}.{}", args.layer, args.site);
    let t_start = Instant::now();

    // 1. One cache of training activations, enough for the largest budget.
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let model = Model::load_with(&model_path, &device, &LoadOptions::default())
        .with_context(|| format!("loading {}", model_path.display()))?;
    // Runs train in groups that fit in memory, each group on its own pass over the same
    // stream: say now, before an hour of harvesting, if one run alone cannot fit.
    let budget = memory_budget(args.memory_gb);
    let width_guess = match args.site.as_str() {
        s if s.starts_with("mlp.") => Some(model.config().d_mlp),
        s if s.starts_with("hook_resid") => Some(model.config().d_model),
        _ => None,
    };
    if let Some(w) = width_guess {
        let all = with_roles(specs(&def, w, args.batch, args.lr), &args.roles);
        let groups = plan_groups(&all.iter().collect::<Vec<_>>(), w, budget)?;
        eprintln!(
            "== {} runs in {} group(s) of at most {:.1} GB",
            all.len(),
            groups.len(),
            budget / 1e9
        );
    }
    let mut hooked = HookedModel::new(model);
    hooked.check_hooks(std::slice::from_ref(&hook))?;
    hooked.check_context(args.context)?;
    let bos = hooked.bos()?;
    let identity = hooked.identity()?;
    let docs = store::load_corpora(&store::default_corpora_root(), &CorpusName::ALL)?;
    let encode = |t: &str| hooked.encode(t);
    let tokenized = store::tokenize_documents(&docs, &encode, &SplitSpec::default())?;
    let train_plan = WindowPlan::build(&tokenized, Split::Train, args.context, bos, args.seed)?;
    let test_plan = WindowPlan::build(&tokenized, Split::Test, args.context, bos, args.seed)?;
    drop(tokenized);
    let max_tokens = def.max_steps * args.batch as u64;
    // The stream makes one pass (no epochs): a corpus shorter than the largest budget would
    // leave the longest runs without batches after an hour of harvesting. Say so now.
    if train_plan.text_tokens() < max_tokens {
        bail!(
            "the training split has {} text tokens, fewer than the {max_tokens} the grid's largest \
             run needs ({} steps x --batch {}): lower --batch or add corpora",
            train_plan.text_tokens(),
            def.max_steps,
            args.batch
        );
    }
    eprintln!(
        "== training split: {} text tokens in {} windows",
        train_plan.text_tokens(),
        train_plan.len()
    );
    let mut harvest_cfg = HarvestConfig::new(vec![hook.clone()]);
    harvest_cfg.exclude_token_ids = hooked.special_token_ids()?;
    harvest_cfg.max_rows = max_tokens;
    eprintln!("== harvesting {max_tokens} tokens of {hook}");
    let cache_dir = out.join("cache_train");
    let pb = indicatif::ProgressBar::new(0);
    let harvest = store::harvest(
        &cache_dir,
        &train_plan,
        &identity,
        &mut hooked,
        &harvest_cfg,
        Some(&pb),
    )?;
    pb.finish_and_clear();
    eprintln!(
        "harvest: {} rows in {:.0} s",
        harvest.tokens, harvest.seconds
    );
    let cache = ActivationStore::open(&cache_dir)?;
    let acts = cache.hook(&hook)?;
    let d_in = acts.width();
    let runs = with_roles(specs(&def, d_in, args.batch, args.lr), &args.roles);
    eprintln!("== {} runs", runs.len());
    let sae_dir = |s: &RunSpec| out.join("saes").join(&s.name);
    let pending: Vec<&RunSpec> = runs
        .iter()
        .filter(|s| !sae_dir(s).join("cfg.json").exists())
        .collect();

    // 2. Train every run not yet saved: group by group, phase by phase, every group on the same
    // stream from its first batch (so grouping changes nothing in what a run sees).
    let progress_path = out.join("progress.json");
    let mut plan = resume_plan(&progress_path, &pending, d_in, budget)?;
    let t_train = Instant::now();
    while plan.group < plan.groups.len() {
        let members: Vec<&RunSpec> = plan.groups[plan.group]
            .iter()
            .filter_map(|name| pending.iter().find(|s| &s.name == name).copied())
            .collect();
        eprintln!(
            "== group {}/{}: {} runs",
            plan.group + 1,
            plan.groups.len(),
            members.len()
        );
        let stream = acts.batches(StreamConfig {
            seed: args.seed,
            epochs: None,
            // On a GPU the prefetch thread makes each batch there while the trainers step.
            device: device.clone(),
            ..StreamConfig::new(args.batch)
        })?;
        let mut source = IterSource(stream);
        source.skip_batches(plan.step)?;
        let make = |s: &RunSpec| trainer_config(s, d_in, &hook, args.seed);
        train_group(
            &members,
            &plan,
            &make,
            &mut source,
            &out,
            &progress_path,
            &device,
        )?;
        plan.group += 1;
        plan.step = 0;
        write_atomic(&progress_path, &serde_json::to_vec(&plan)?)?;
    }
    let train_seconds = t_train.elapsed().as_secs_f64();

    // 3. Evaluate every saved run not yet in runs.jsonl, a few at a time.
    let runs_path = out.join("runs.jsonl");
    let mut results: Vec<RunResult> = std::fs::read_to_string(&runs_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let eval_batches = test_plan.full_window_batches(eval_tokens, 8, &Device::Cpu)?;
    let model = hooked.model();
    let mut target = HookedSplice::new(model, &hook)?;
    let todo: Vec<&RunSpec> = runs
        .iter()
        .filter(|s| !results.iter().any(|r| r.spec.name == s.name))
        .collect();
    let t_eval = Instant::now();
    let mut runs_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&runs_path)
        .with_context(|| format!("opening {}", runs_path.display()))?;
    for chunk in todo.chunks(8) {
        let saes: Vec<SaeModel> = chunk
            .iter()
            .map(|s| SaeModel::load(sae_dir(s)).with_context(|| s.name.clone()))
            .collect::<Result<_>>()?;
        let refs: Vec<&SaeModel> = saes.iter().collect();
        eprintln!(
            "== evaluating {} runs on {eval_tokens} held-out tokens",
            refs.len()
        );
        let pb = indicatif::ProgressBar::new(0);
        let cfg = SplicedConfig {
            mean: MeanActivation::EvalTokens,
            ..SplicedConfig::default()
        };
        let evals = evaluate_spliced_many(&mut target, &refs, &eval_batches, &cfg, Some(&pb))?;
        pb.finish_and_clear();
        for (s, e) in chunk.iter().zip(evals) {
            let train: Option<TrainMetrics> = std::fs::read(sae_dir(s).join("train_final.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let train_l0 = train.as_ref().map_or(f64::NAN, |m| m.l0);
            let l0_for_flops = match s.k {
                Some(k) => k as f64,
                None => train_l0,
            };
            let fpt = flops_per_token(s, d_in, args.batch, l0_for_flops);
            let r = RunResult {
                spec: (*s).clone(),
                compute: fpt * s.tokens as f64,
                flops_per_token: fpt,
                train_l0,
                train_fvu: train.as_ref().map_or(f64::NAN, |m| m.fvu),
                l0: e.reconstruction.l0,
                fvu: e.reconstruction.fvu,
                dead_fraction: e.reconstruction.dead_fraction,
                loss_recovered_zero: e.spliced.loss_recovered_zero,
                loss_recovered_mean: e.spliced.loss_recovered_mean,
                delta_nll: e.spliced.spliced - e.spliced.clean,
                kl: e.spliced.kl_clean_spliced,
            };
            writeln!(runs_file, "{}", serde_json::to_string(&r)?)?;
            results.push(r);
        }
    }
    let eval_seconds = t_eval.elapsed().as_secs_f64();

    // 4. Fits and plots. A resumed or extended sweep adds its seconds to those already recorded,
    // so `fits.json` holds the sweep's whole cost however many invocations it took.
    let before: serde_json::Value = std::fs::read(out.join("fits.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| v["seconds_all_invocations"].clone())
        .unwrap_or_default();
    let add = |key: &str, now: f64| before[key].as_f64().unwrap_or(0.0) + now;
    let all_invocations = serde_json::json!({
        "harvest": add("harvest", harvest.seconds),
        "train": add("train", train_seconds),
        "eval": add("eval", eval_seconds),
        "total": add("total", t_start.elapsed().as_secs_f64()),
    });
    let timed = timed_steps(&def, d_in, args.batch, &acts)?;
    let fits = fit_and_plot(&results, &def, &out)?;
    let summary = serde_json::json!({
        "grid": args.grid,
        "hook": hook,
        "model": model_path,
        "d_in": d_in,
        "runs": results.len(),
        "harvest": {"rows": harvest.tokens, "seconds": harvest.seconds},
        "seconds": {"train": train_seconds, "eval": eval_seconds, "total": t_start.elapsed().as_secs_f64()},
        "seconds_all_invocations": all_invocations,
        "eval_tokens": eval_tokens,
        "timed_steps": timed,
        "fits": fits,
    });
    write_atomic(
        &out.join("fits.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!("{}", serde_json::to_string(&summary["fits"]["headline"])?);
    eprintln!("fits: {}", out.join("fits.json").display());
    Ok(())
}

/// `--refit`: the fits and plots of `out/runs.jsonl` again, written into `out/fits.json` in
/// place of its `fits` (timings and harvest figures stay those of the sweep that measured them).
fn refit(def: &GridDef, out: &Path) -> Result<()> {
    let runs_path = out.join("runs.jsonl");
    let text = std::fs::read_to_string(&runs_path).with_context(|| {
        format!(
            "--refit reads the runs of an earlier sweep from {}",
            runs_path.display()
        )
    })?;
    let mut results = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: RunResult = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: not a run of this sweep",
                runs_path.display(),
                i + 1
            )
        })?;
        results.push(r);
    }
    if results.is_empty() {
        bail!("{} holds no runs to fit", runs_path.display());
    }
    let fits = fit_and_plot(&results, def, out)?;
    let fits_path = out.join("fits.json");
    let mut summary: serde_json::Value = match std::fs::read(&fits_path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{} is not JSON", fits_path.display()))?,
        Err(_) => serde_json::json!({}),
    };
    summary["runs"] = serde_json::json!(results.len());
    summary["fits"] = fits;
    write_atomic(
        &fits_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!("{}", serde_json::to_string(&summary["fits"]["headline"])?);
    eprintln!("refitted {} runs: {}", results.len(), fits_path.display());
    Ok(())
}

/// Bytes one run holds while it trains: weights, gradients and Adam's two moments, eight
/// `n x d_in` f32 matrices.
fn run_bytes(s: &RunSpec, d_in: usize) -> f64 {
    training_bytes(d_in, s.n).map_or(f64::INFINITY, |b| b as f64)
}

/// `--memory-gb`, or 60% of the memory available now (`/proc/meminfo`; 8 GB where it cannot be
/// read): the rest is the stream's buffers, the evaluation model and the page cache.
fn memory_budget(memory_gb: Option<f64>) -> f64 {
    if let Some(gb) = memory_gb {
        return gb * 1e9;
    }
    available_memory_bytes().map_or(8e9, |b| 0.6 * b as f64)
}

/// Packs the runs into as few groups as fit in `budget` bytes (first fit, largest first).
/// Every group is one more pass over the stream, but the stream is cheap next to the steps.
fn plan_groups(runs: &[&RunSpec], d_in: usize, budget: f64) -> Result<Vec<Vec<String>>> {
    let mut order: Vec<&RunSpec> = runs.to_vec();
    order.sort_by(|a, b| run_bytes(b, d_in).total_cmp(&run_bytes(a, d_in)));
    let mut groups: Vec<(f64, Vec<String>)> = Vec::new();
    for s in order {
        let need = run_bytes(s, d_in);
        if need > budget {
            bail!(
                "{} alone needs about {:.1} GB for weights, gradients and Adam state (d_in \
                 {d_in}, {} features) and the memory budget is {:.1} GB: pass a larger \
                 --memory-gb or use a narrower hook",
                s.name,
                need / 1e9,
                s.n,
                budget / 1e9
            );
        }
        match groups.iter_mut().find(|(used, _)| used + need <= budget) {
            Some((used, names)) => {
                *used += need;
                names.push(s.name.clone());
            }
            None => groups.push((need, vec![s.name.clone()])),
        }
    }
    Ok(groups.into_iter().map(|(_, names)| names).collect())
}

/// Where a sweep stands: its groups, the group in training and the last phase recorded.
#[derive(Debug, Serialize, Deserialize)]
struct SweepProgress {
    groups: Vec<Vec<String>>,
    group: usize,
    step: u64,
}

/// The recorded plan when it still covers every run left to train (a rerun after a kill);
/// otherwise a new plan from step 0 (a first run, or a grid grown since).
fn resume_plan(
    path: &Path,
    pending: &[&RunSpec],
    d_in: usize,
    budget: f64,
) -> Result<SweepProgress> {
    let recorded: Option<SweepProgress> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(p) = recorded {
        let left: BTreeSet<&str> = p
            .groups
            .iter()
            .skip(p.group)
            .flatten()
            .map(String::as_str)
            .collect();
        if !pending.is_empty() && pending.iter().all(|s| left.contains(s.name.as_str())) {
            eprintln!("== resuming group {} at step {}", p.group + 1, p.step);
            return Ok(p);
        }
    }
    let plan = SweepProgress {
        groups: plan_groups(pending, d_in, budget)?,
        group: 0,
        step: 0,
    };
    write_atomic(path, &serde_json::to_vec(&plan)?)?;
    Ok(plan)
}

/// Trains one group to the end of its longest budget, phase by phase, from `source` (already
/// past the `plan.step` batches the group has trained on). At the end of each phase the runs
/// that reached their budget are saved, the others checkpointed, and `progress.json` records it.
fn train_group(
    members: &[&RunSpec],
    plan: &SweepProgress,
    config: &dyn Fn(&RunSpec) -> TrainerConfig,
    source: &mut dyn BatchSource,
    out: &Path,
    progress_path: &Path,
    device: &Device,
) -> Result<()> {
    let sae_dir = |s: &RunSpec| out.join("saes").join(&s.name);
    let ck_dir = |s: &RunSpec| out.join("checkpoints").join(&s.name);
    let done_step = plan.step;
    let mut trainers = Vec::with_capacity(members.len());
    for s in members {
        let ck = ck_dir(s).join(format!("step_{done_step:09}"));
        let t = if done_step > 0 && ck.exists() {
            Trainer::resume(&ck)?
        } else if done_step > 0 {
            bail!(
                "{} has no checkpoint at step {done_step} ({}): remove that file to restart \
                 the group",
                s.name,
                progress_path.display()
            );
        } else {
            Trainer::new(config(s))?
        };
        trainers.push(t.with_device(device.clone()));
    }
    let mut final_train: Vec<Option<TrainMetrics>> = vec![None; trainers.len()];
    let ends: BTreeSet<u64> = members
        .iter()
        .map(|s| s.steps)
        .filter(|&e| e > done_step)
        .collect();
    let mut at = done_step;
    for end in ends {
        eprintln!(
            "== phase to step {end}: {} runs training",
            trainers.iter().filter(|t| !t.is_done()).count()
        );
        let mut phase = Phase {
            inner: &mut *source,
            left: end - at,
        };
        let logs = train_many(&mut trainers, &mut phase, Progress::Bar)?;
        for (i, l) in logs.into_iter().enumerate() {
            if let Some(m) = l.last() {
                final_train[i] = Some(m.clone());
            }
        }
        at = end;
        for ((s, t), last) in members.iter().zip(&trainers).zip(&final_train) {
            // Saved only at its own budget: a saved run counts as finished on a rerun.
            if s.steps == end {
                t.save(sae_dir(s))?;
                write_atomic(
                    &sae_dir(s).join("train_final.json"),
                    &serde_json::to_vec(last)?,
                )?;
            } else if !t.is_done() {
                t.checkpoint(ck_dir(s))?;
            }
        }
        let now = SweepProgress {
            groups: plan.groups.clone(),
            group: plan.group,
            step: end,
        };
        write_atomic(progress_path, &serde_json::to_vec(&now)?)?;
        // Older checkpoints are dropped only once the new phase is recorded.
        for (s, t) in members.iter().zip(&trainers) {
            if t.is_done() {
                let _ = std::fs::remove_dir_all(ck_dir(s));
            } else if let Ok(rd) = std::fs::read_dir(ck_dir(s)) {
                let keep = format!("step_{end:09}");
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy() != keep {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
    }
    Ok(())
}

/// A stream cut after `left` batches: one phase of the sweep.
struct Phase<'a> {
    inner: &'a mut dyn BatchSource,
    left: u64,
}

impl BatchSource for Phase<'_> {
    fn next_batch(&mut self) -> sae_workbench::sae_core::Result<Option<Tensor>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        self.inner.next_batch()
    }
}

/// Wall time of training steps of the grid's TopK SAE at each width, beside the formula.
fn timed_steps(
    def: &GridDef,
    d_in: usize,
    batch: usize,
    acts: &sae_workbench::activation_store::HookActivations,
) -> Result<Vec<serde_json::Value>> {
    let mut stream = acts.batches(StreamConfig::new(batch))?;
    let Some(x) = stream.next().transpose()? else {
        bail!("the cache holds no batch of {batch}");
    };
    let hb = HostBatch::from_tensor(&x, d_in)?;
    let mut out = Vec::new();
    for &m in &def.mults {
        let s = RunSpec {
            name: String::new(),
            arch: "topk".into(),
            role: "timing".into(),
            n: d_in * m,
            expansion: m,
            k: Some(def.grid_k),
            l1_coefficient: None,
            matryoshka_widths: Vec::new(),
            tokens: 0,
            steps: 10,
            lr: 1e-3,
        };
        let mut t = Trainer::new(trainer_config(&s, d_in, "timing", 0))?;
        t.step_host(&hb)?;
        let t0 = Instant::now();
        let reps = 3;
        for _ in 0..reps {
            t.step_host(&hb)?;
        }
        let secs = t0.elapsed().as_secs_f64() / reps as f64;
        let flops = flops_per_token(&s, d_in, batch, def.grid_k as f64) * batch as f64;
        out.push(serde_json::json!({
            "n": s.n,
            "seconds_per_step": secs,
            "tokens_per_s": batch as f64 / secs,
            "formula_flops_per_step": flops,
            "gflop_per_s": flops / secs / 1e9,
        }));
    }
    Ok(out)
}

/// Fits the laws of the module docs and draws the four plots.
/// A run counts as converged where its fitted loss-against-budget curve comes this close to
/// its asymptote.
const CONVERGED_WITHIN: f64 = 0.05;
/// The criterion without a fit (`scaling::doubling_convergence`): converged from the budget at
/// which doubling the tokens lowers held-out FVU by less than this. Set at 5% before the `full`
/// grid's 4.1M-token runs were looked at.
const MAX_FALL_PER_DOUBLING: f64 = 0.05;

fn fit_and_plot(results: &[RunResult], def: &GridDef, out: &Path) -> Result<serde_json::Value> {
    let law_json = |x: &[f64], y: &[f64], offset: bool| -> serde_json::Value {
        if offset {
            match (
                fit_offset_power_law(x, y),
                bootstrap(x, y, fit_offset_power_law, 500, 0),
            ) {
                (Ok(f), Ok(b)) => serde_json::json!({
                    "law": f.law, "quality": f.quality, "intervals": b.params,
                    "verdict": assess(&f, &b, x, y),
                }),
                (Err(e), _) | (_, Err(e)) => serde_json::json!({"error": e.to_string()}),
            }
        } else {
            match (fit_power_law(x, y), bootstrap(x, y, fit_power_law, 500, 0)) {
                (Ok(f), Ok(b)) => serde_json::json!({
                    "law": f.law, "quality": f.quality, "intervals": b.params,
                    "verdict": assess(&f, &b, x, y),
                }),
                (Err(e), _) | (_, Err(e)) => serde_json::json!({"error": e.to_string()}),
            }
        }
    };
    let grid: Vec<&RunResult> = results.iter().filter(|r| r.spec.role == "grid").collect();
    let c: Vec<f64> = grid.iter().map(|r| r.compute).collect();
    let l: Vec<f64> = grid.iter().map(|r| r.fvu).collect();
    let front = frontier(&c, &l)?;
    let (fc, fl): (Vec<f64>, Vec<f64>) = front.iter().map(|&i| (c[i], l[i])).unzip();
    let frontier_fit = law_json(&fc, &fl, true);
    let bins = best_per_bin(&c, &l, 2.0)?;
    let (bc, bn, bs): (Vec<f64>, Vec<f64>, Vec<f64>) = bins.iter().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut a, mut b, mut d), &i| {
            a.push(c[i]);
            b.push(grid[i].spec.n as f64);
            d.push(grid[i].spec.tokens as f64);
            (a, b, d)
        },
    );
    let n_opt = law_json(&bc, &bn, false);
    let s_opt = law_json(&bc, &bs, false);
    let extrap = extrapolate(&c, &l, 4.0).map_or_else(
        |e| serde_json::json!({"error": e.to_string()}),
        |e| serde_json::to_value(e).unwrap_or_default(),
    );
    // L(n) at the largest budget, per k.
    let max_tokens = results.iter().map(|r| r.spec.tokens).max().unwrap_or(0);
    let mut ks: Vec<usize> = results.iter().filter_map(|r| r.spec.k).collect();
    ks.sort_unstable();
    ks.dedup();
    let mut by_k = serde_json::Map::new();
    let mut loss_n_series = Vec::new();
    for &k in &ks {
        let pts: Vec<(f64, f64)> = results
            .iter()
            .filter(|r| {
                r.spec.arch == "topk"
                    && r.spec.k == Some(k)
                    && r.spec.tokens == max_tokens
                    && (r.spec.role == "grid" || r.spec.role == "k")
            })
            .map(|r| (r.spec.n as f64, r.fvu))
            .collect();
        if pts.len() < def.mults.len().min(4) {
            continue;
        }
        let (x, y): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
        by_k.insert(format!("k{k}"), law_json(&x, &y, true));
        loss_n_series.push(Scatter {
            name: format!("k = {k}"),
            points: pts,
            mark: Mark::Line,
        });
    }

    // The learning-rate sweep: the best rate at each of its grid points, in order of compute
    // (Anthropic: the optimal rate falls as compute grows).
    let mut lr_points = Vec::new();
    for &m in &def.lr_points {
        let mut pts: Vec<(f64, f64, f64)> = results
            .iter()
            .filter(|r| {
                r.spec.arch == "topk"
                    && r.spec.expansion == m
                    && r.spec.k == Some(def.grid_k)
                    && r.spec.tokens == max_tokens
                    && (r.spec.role == "grid" || r.spec.role == "lr")
            })
            .map(|r| (r.spec.lr, r.fvu, r.compute))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let Some(best) = pts.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
            lr_points.push(serde_json::json!({
                "expansion": m,
                "compute": best.2,
                "fvu_by_lr": pts.iter().map(|p| serde_json::json!({"lr": p.0, "fvu": p.1})).collect::<Vec<_>>(),
                "best_lr": best.0,
            }));
        }
    }

    // Tokens to convergence (OpenAI: ∝ n^0.6): per size, FVU against the budget.
    let curves: Vec<(f64, Vec<(f64, f64)>)> = def
        .mults
        .iter()
        .filter_map(|&m| {
            let pts: Vec<(f64, f64)> = grid
                .iter()
                .filter(|r| r.spec.expansion == m)
                .map(|r| (r.spec.tokens as f64, r.fvu))
                .collect();
            let n = grid.iter().find(|r| r.spec.expansion == m)?.spec.n as f64;
            (pts.len() >= 4).then_some((n, pts))
        })
        .collect();
    let convergence = match tokens_to_convergence(&curves, CONVERGED_WITHIN) {
        Ok(conv) => {
            let (x, y): (Vec<f64>, Vec<f64>) = conv
                .points
                .iter()
                .filter_map(|p| Some((p.n, p.tokens_to_converge?)))
                .unzip();
            let law = if x.len() >= 3 {
                law_json(&x, &y, false)
            } else {
                serde_json::json!({"error": "fewer than 3 sizes with a convergence point"})
            };
            serde_json::json!({
                "criterion": format!("FVU within {}% of the fitted asymptote of FVU(tokens) = a + b·tokens^-alpha", 100.0 * CONVERGED_WITHIN),
                "all_extrapolated": conv.all_extrapolated,
                "per_n": conv.points,
                "law": law,
            })
        }
        Err(e) => serde_json::json!({"error": e.to_string()}),
    };
    // The same question read off the measured curves, without extrapolating a fit.
    let measured: Vec<serde_json::Value> = curves
        .iter()
        .map(|(n, pts)| {
            doubling_convergence(*n, pts, MAX_FALL_PER_DOUBLING).map_or_else(
                |e| serde_json::json!({"n": n, "error": e.to_string()}),
                |d| serde_json::to_value(d).unwrap_or_default(),
            )
        })
        .collect();
    let (mx, my): (Vec<f64>, Vec<f64>) = measured
        .iter()
        .filter_map(|d| Some((d["n"].as_f64()?, d["tokens"].as_f64()?)))
        .unzip();
    let convergence_measured = serde_json::json!({
        "criterion": format!(
            "the budget from which doubling the tokens lowers held-out FVU by less than {}% (measured falls, interpolated in log tokens; none beyond the largest budget)",
            100.0 * MAX_FALL_PER_DOUBLING
        ),
        "per_n": measured,
        "sizes_converged": mx.len(),
        "law": if mx.len() >= 3 {
            law_json(&mx, &my, false)
        } else {
            serde_json::json!({"error": format!("{} of {} sizes converge inside the budgets measured; the law needs 3", mx.len(), curves.len())})
        },
    });
    if !curves.is_empty() {
        let series: Vec<Scatter> = curves
            .iter()
            .map(|(n, pts)| Scatter {
                name: format!("{n} features"),
                points: pts.clone(),
                mark: Mark::Line,
            })
            .collect();
        plot_scatter(
            &series,
            "FVU vs training tokens per dictionary size (schedules end at each budget)",
            "training tokens",
            "FVU (held-out)",
            (true, true),
            &out.join("loss_vs_tokens.png"),
        )?;
    }

    let mut loss_c = Vec::new();
    for &m in &def.mults {
        let pts: Vec<(f64, f64)> = grid
            .iter()
            .filter(|r| r.spec.expansion == m)
            .map(|r| (r.compute, r.fvu))
            .collect();
        if !pts.is_empty() {
            loss_c.push(Scatter {
                name: format!("{m}x features"),
                points: pts,
                mark: Mark::Dots,
            });
        }
    }
    if let Ok(f) = fit_offset_power_law(&fc, &fl) {
        let (lo, hi) = c
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let curve = (0..=40)
            .map(|i| {
                let x = (lo.ln() + (hi.ln() - lo.ln()) * i as f64 / 40.0).exp();
                (x, f.law.at(x))
            })
            .collect();
        loss_c.push(Scatter {
            name: format!(
                "frontier fit {:.3} + {:.3}·C^-{:.3}",
                f.law.a, f.law.b, f.law.alpha
            ),
            points: curve,
            mark: Mark::Line,
        });
    }
    if !loss_c.is_empty() {
        plot_scatter(
            &loss_c,
            "FVU vs training compute (TopK, one k)",
            "compute (FLOPs)",
            "FVU (held-out)",
            (true, true),
            &out.join("loss_vs_compute.png"),
        )?;
    }
    if !bc.is_empty() {
        plot_scatter(
            &[
                Scatter {
                    name: "N_opt (features)".into(),
                    points: bc.iter().copied().zip(bn.iter().copied()).collect(),
                    mark: Mark::Line,
                },
                Scatter {
                    name: "S_opt (training tokens)".into(),
                    points: bc.iter().copied().zip(bs.iter().copied()).collect(),
                    mark: Mark::Line,
                },
            ],
            "Compute-optimal features and tokens",
            "compute (FLOPs)",
            "best run's features / tokens",
            (true, true),
            &out.join("optimal_vs_compute.png"),
        )?;
    }
    let mut archs: Vec<&str> = results.iter().map(|r| r.spec.arch.as_str()).collect();
    archs.sort_unstable();
    archs.dedup();
    let l0_series: Vec<Scatter> = archs
        .iter()
        .map(|a| Scatter {
            name: (*a).to_string(),
            points: results
                .iter()
                .filter(|r| {
                    r.spec.arch == *a
                        && r.spec.tokens == max_tokens
                        && r.l0 > 0.0
                        && r.loss_recovered_zero.is_finite()
                })
                .map(|r| (r.l0, r.loss_recovered_zero))
                .collect(),
            mark: Mark::Dots,
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if !l0_series.is_empty() {
        plot_scatter(
            &l0_series,
            &format!("Loss recovered vs L0 at {max_tokens} tokens (held-out)"),
            "L0",
            "loss recovered (zero ablation)",
            (true, false),
            &out.join("loss_recovered_vs_l0.png"),
        )?;
    }
    if !loss_n_series.is_empty() {
        plot_scatter(
            &loss_n_series,
            &format!("FVU vs features at {max_tokens} tokens"),
            "features n",
            "FVU (held-out)",
            (true, true),
            &out.join("loss_vs_features.png"),
        )?;
    }
    let headline = serde_json::json!({
        "frontier_alpha": frontier_fit["law"]["alpha"],
        "frontier_verdict": frontier_fit["verdict"],
        "n_opt_beta": n_opt["law"]["beta"],
        "s_opt_beta": s_opt["law"]["beta"],
        "extrapolation_relative_error": extrap["relative_error"],
        "tokens_to_convergence_delta": convergence["law"]["law"]["beta"],
        "tokens_to_convergence_measured_delta": convergence_measured["law"]["law"]["beta"],
    });
    Ok(serde_json::json!({
        "loss": "FVU on held-out tokens (OpenAI's normalised MSE)",
        "headline": headline,
        "frontier": {"runs": front.len(), "fit": frontier_fit},
        "n_opt": n_opt,
        "s_opt": s_opt,
        "extrapolation": extrap,
        "loss_vs_features": by_k,
        "lr_sweep": lr_points,
        "tokens_to_convergence": convergence,
        "tokens_to_convergence_measured": convergence_measured,
        "anchors": {
            "openai_gpt4_topk": "L(C) = 0.09 + 0.056·C^-0.084 (normalised MSE)",
            "openai_tokens_to_convergence": "∝ n^0.6",
            "anthropic": "N_opt and S_opt power laws in C, N_opt growing faster; optimal learning rate falling with compute",
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid_runs() -> Vec<RunSpec> {
        specs(&grid_def(Grid::Quick), 64, 256, 1e-3)
    }

    #[test]
    fn roles_pick_runs_and_unknown_roles_are_refused() {
        let a = Args::try_parse_from(["scaling_laws", "--roles", "grid,k"]).unwrap();
        let all = grid_runs();
        let some = with_roles(all.clone(), &a.roles);
        assert!(!some.is_empty() && some.len() < all.len());
        assert!(some.iter().all(|s| s.role == "grid" || s.role == "k"));
        assert_eq!(
            some.len(),
            all.iter()
                .filter(|s| s.role == "grid" || s.role == "k")
                .count()
        );
        assert_eq!(with_roles(all.clone(), &[]).len(), all.len());
        let e = Args::try_parse_from(["scaling_laws", "--roles", "grid,bogus"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn refit_fits_the_recorded_runs_and_keeps_the_sweeps_timings() {
        let dir = std::env::temp_dir().join(format!("scaling_refit_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let def = grid_def(Grid::Quick);
        // Runs whose loss follows a known law in n and tokens, so the fit has something to find.
        let lines: Vec<String> = grid_runs()
            .into_iter()
            .map(|spec| {
                let (n, t) = (spec.n as f64, spec.tokens as f64);
                let fvu = 0.05 + 2.0 * n.powf(-0.3) + 40.0 * t.powf(-0.5);
                let fpt = flops_per_token(&spec, 64, 256, 32.0);
                let r = RunResult {
                    compute: fpt * t,
                    flops_per_token: fpt,
                    spec,
                    train_l0: 32.0,
                    train_fvu: fvu,
                    l0: 32.0,
                    fvu,
                    dead_fraction: 0.0,
                    loss_recovered_zero: 1.0 - fvu,
                    loss_recovered_mean: 1.0 - fvu,
                    delta_nll: fvu,
                    kl: fvu,
                };
                serde_json::to_string(&r).unwrap()
            })
            .collect();
        std::fs::write(dir.join("runs.jsonl"), lines.join("\n") + "\n").unwrap();
        std::fs::write(
            dir.join("fits.json"),
            r#"{"harvest": {"rows": 7}, "fits": null}"#,
        )
        .unwrap();
        refit(&def, &dir).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("fits.json")).unwrap()).unwrap();
        assert_eq!(v["harvest"]["rows"], 7, "the sweep's own figures are kept");
        assert_eq!(v["runs"], lines.len());
        assert!(v["fits"]["frontier"].is_object(), "{}", v["fits"]);
        assert!(
            v["fits"]["tokens_to_convergence"].is_object(),
            "{}",
            v["fits"]
        );
        // The fit-free criterion reads each size's own curve: its first fall is the law's.
        let measured = v["fits"]["tokens_to_convergence_measured"]["per_n"]
            .as_array()
            .unwrap();
        assert_eq!(measured.len(), def.mults.len(), "{measured:?}");
        for m in measured {
            let n = m["n"].as_f64().unwrap();
            let mut ts: Vec<f64> = grid_runs()
                .iter()
                .filter(|s| s.role == "grid" && s.n as f64 == n)
                .map(|s| s.tokens as f64)
                .collect();
            ts.sort_by(f64::total_cmp);
            let law = |t: f64| 0.05 + 2.0 * n.powf(-0.3) + 40.0 * t.powf(-0.5);
            let want = 1.0 - law(ts[1]) / law(ts[0]);
            let got = m["falls"][0][1].as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "n {n}: {got} vs {want}");
        }
        assert!(dir.join("loss_vs_tokens.png").exists());
        // A line that is not a run is named, not skipped.
        std::fs::write(
            dir.join("runs.jsonl"),
            format!("{}\n{{\"name\": 3}}\n", lines[0]),
        )
        .unwrap();
        let err = format!("{:#}", refit(&def, &dir).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        let err = format!("{:#}", refit(&def, &dir).unwrap_err());
        assert!(err.contains("runs.jsonl"), "{err}");
    }

    #[test]
    fn groups_cover_every_run_once_within_budget() {
        let runs = grid_runs();
        let refs: Vec<&RunSpec> = runs.iter().collect();
        let total: f64 = refs.iter().map(|s| run_bytes(s, 64)).sum();
        let largest = refs.iter().map(|s| run_bytes(s, 64)).fold(0.0, f64::max);
        assert_eq!(plan_groups(&refs, 64, total).unwrap().len(), 1);
        let budget = (total / 3.0).max(largest);
        let groups = plan_groups(&refs, 64, budget).unwrap();
        assert!(groups.len() >= 3, "{} groups", groups.len());
        let mut seen: Vec<&str> = groups.iter().flatten().map(String::as_str).collect();
        seen.sort_unstable();
        let mut want: Vec<&str> = runs.iter().map(|s| s.name.as_str()).collect();
        want.sort_unstable();
        assert_eq!(seen, want);
        for g in &groups {
            let used: f64 = g
                .iter()
                .map(|n| run_bytes(runs.iter().find(|s| &s.name == n).unwrap(), 64))
                .sum();
            assert!(used <= budget, "{used} > {budget}");
        }
        let err = plan_groups(&refs, 64, largest / 2.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--memory-gb"), "{err}");
    }

    #[test]
    fn resume_keeps_a_recorded_plan_only_while_it_covers_what_is_left() {
        let dir = std::env::temp_dir().join(format!("scaling_resume_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("progress.json");
        let runs = grid_runs();
        let refs: Vec<&RunSpec> = runs.iter().collect();
        let budget = refs.iter().map(|s| run_bytes(s, 64)).sum::<f64>() / 2.0;
        let first = resume_plan(&path, &refs, 64, budget).unwrap();
        assert_eq!((first.group, first.step), (0, 0));
        // Killed in the second group at step 50: the rerun continues there.
        let killed = SweepProgress {
            groups: first.groups.clone(),
            group: 1,
            step: 50,
        };
        std::fs::write(&path, serde_json::to_vec(&killed).unwrap()).unwrap();
        let left: Vec<&RunSpec> = refs
            .iter()
            .filter(|s| killed.groups[1..].iter().flatten().any(|n| n == &s.name))
            .copied()
            .collect();
        let again = resume_plan(&path, &left, 64, budget).unwrap();
        assert_eq!((again.group, again.step), (1, 50));
        // A run the plan does not know (the grid grew): a new plan from step 0.
        let grown = resume_plan(&path, &refs, 64, budget).unwrap();
        assert_eq!((grown.group, grown.step), (0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Deterministic `[64, 16]` batches, `skip` onward, failing (like a killed process) once
    /// `fail_at` batches have been read in all.
    fn batches(skip: u64, fail_at: u64) -> impl BatchSource {
        IterSource((skip..).map(move |i| {
            if i >= fail_at {
                return Err(std::io::Error::other("killed"));
            }
            let v: Vec<f32> = (0..64 * 16)
                .map(|j| ((i as f32 * 1031.0 + j as f32) * 12.9898).sin() * 2.0)
                .collect();
            Ok(Tensor::from_vec(v, (64, 16), &Device::Cpu).expect("batch"))
        }))
    }

    fn run(steps: u64) -> RunSpec {
        RunSpec {
            name: format!("topk_{steps}"),
            arch: "topk".into(),
            role: "grid".into(),
            n: 32,
            expansion: 2,
            k: Some(4),
            l1_coefficient: None,
            matryoshka_widths: Vec::new(),
            tokens: steps * 64,
            steps,
            lr: 1e-3,
        }
    }

    #[test]
    fn a_killed_group_resumes_to_the_same_weights() {
        let root = std::env::temp_dir().join(format!("scaling_kill_{}", std::process::id()));
        let runs = [run(4), run(8)];
        let make = |s: &RunSpec| trainer_config(s, 16, "blocks.0.hook_resid_post", 0);
        let weights = |dir: &Path, s: &RunSpec| {
            std::fs::read(
                dir.join("saes")
                    .join(&s.name)
                    .join("sae_weights.safetensors"),
            )
        };
        let sweep = |dir: &Path, fail_at: u64| -> Result<()> {
            std::fs::create_dir_all(dir)?;
            let progress = dir.join("progress.json");
            let pending: Vec<&RunSpec> = runs
                .iter()
                .filter(|s| !dir.join("saes").join(&s.name).join("cfg.json").exists())
                .collect();
            let plan = resume_plan(&progress, &pending, 16, 1e12)?;
            let members: Vec<&RunSpec> = plan.groups[plan.group]
                .iter()
                .filter_map(|n| pending.iter().find(|s| &s.name == n).copied())
                .collect();
            let mut source = batches(plan.step, fail_at);
            train_group(
                &members,
                &plan,
                &make,
                &mut source,
                dir,
                &progress,
                &Device::Cpu,
            )
        };
        let whole = root.join("whole");
        sweep(&whole, u64::MAX).unwrap();
        let killed = root.join("killed");
        assert!(sweep(&killed, 6).is_err(), "the source fails at batch 6");
        // Killed in the second phase: the 4-step run is saved, the 8-step run only checkpointed.
        assert!(weights(&killed, &runs[0]).is_ok());
        assert!(
            weights(&killed, &runs[1]).is_err(),
            "an unfinished run must not be saved as if done"
        );
        assert!(killed.join("checkpoints/topk_8/step_000000004").exists());
        sweep(&killed, u64::MAX).unwrap();
        for s in &runs {
            assert!(
                weights(&whole, s).unwrap() == weights(&killed, s).unwrap(),
                "{} differs after the resume",
                s.name
            );
        }
        assert!(!killed.join("checkpoints/topk_8").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
