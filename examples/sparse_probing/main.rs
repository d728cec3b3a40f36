//! Sparse probing (SAEBench's evaluation) on the pinned corpora: can one, two or five SAE
//! latents tell a class of texts from the rest as well as the model's own neurons, or a probe on
//! everything?
//!
//! Five tasks are made from the documents, each class kept to whole documents per split (every
//! fourth document of a class, by id, is held out), so a probe is tested on texts from books,
//! plays and speeches it never saw:
//!
//! - `source`: Austen, Moby-Dick, Shakespeare, State of the Union;
//! - `austen_novel`: which of Austen's six novels;
//! - `shakespeare_genre`: comedy, history or tragedy (the First Folio's grouping; the poems left
//!   out), tested on whole plays held out;
//! - `sotu_era`: a State of the Union address from 1790-1860, 1861-1932 or 1933-2021;
//! - `sotu_party`: by a Democrat or a Republican.
//!
//! Each text is a window of `--context` tokens; its vector is the mean over its tokens (BOS left
//! out) of the hook's activations, or of each SAE's codes. Then for every class, one against the
//! rest, balanced: the k dimensions with the largest difference of means, an L2 logistic probe
//! (sklearn's defaults), accuracy on the held-out windows (`metrics::sparse_probing`). For each
//! class's top-1 latent the report lists the tokens it fires on most, so a reader can see what the
//! single latent found.
//!
//! ```text
//! cargo run --release --example sparse_probing -- \
//!     --sae runs/main/saes/topk_12288 --sae runs/main/saes/standard_12288
//! ```
//!
//! The same pooled features then give SAEBench's targeted probe perturbation (TPP) at no further
//! forward pass: per class, a probe on every neuron; the N latents that matter most to it
//! zero-ablated in the held-out windows (the SAE's error kept); the drop of its own probe less the
//! mean drop of the other classes' probes (`metrics::targeted_probe_perturbation`), on the tasks of
//! three classes or more. Neurons ablated the same way are the baseline.
//!
//! Writes `results.json` (per task, class and feature source; SAEBench's names for the averages:
//! `llm_top_1_test_accuracy`, `sae_top_1_test_accuracy`, `tpp_threshold_20_total_metric`, ...),
//! `accuracy_vs_k.png`, `top1_by_task.png`, `tpp_vs_n.png` and `report.html` into `--out`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Tensor;
use clap::Parser;

use metrics::plots::{Series, plot_heatmap, plot_lines};
use metrics::{
    ClassProbes, ClassProbing, FeatureSource, HookedSplice, LabelledFeatures, PooledFeatures,
    ProbingConfig, TppClass, TppConfig, sparse_probing, targeted_probe_perturbation, tpp_mean,
};
use sae_core::SaeModel;
use serde::Serialize;
use transformer_hooks::Model;

mod tasks;
use tasks::{
    Setup, Task, WindowKey, choose_windows, load_all_corpora, make_task, tokenize_documents,
    window_orders, window_tokens,
};

const TASKS: [&str; 5] = [
    "source",
    "austen_novel",
    "shakespeare_genre",
    "sotu_era",
    "sotu_party",
];

#[derive(Parser, Debug)]
#[command(about = "Sparse probing: k SAE latents against k neurons, on tasks from the corpora")]
struct Args {
    /// SAE folder(s) (ours, SAELens, sparsify, dictionary_learning), all on one hook.
    #[arg(long, required = true)]
    sae: Vec<PathBuf>,
    /// Model file or folder; default SmolLM2-135M-Instruct from the asset cache.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Hook to probe; defaults to the SAEs' `hook_name`.
    #[arg(long)]
    hook: Option<String>,
    /// Tasks, comma-separated (default all): source, austen_novel, shakespeare_genre, sotu_era,
    /// sotu_party.
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Window length including BOS (SAEBench: 128).
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Training windows per class (fewer if the class's training documents have fewer).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 200)]
    train_per_class: usize,
    /// Held-out windows per class.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 80)]
    test_per_class: usize,
    /// Numbers of dimensions to probe with, comma-separated (SAEBench: 1,2,5).
    #[arg(long, value_delimiter = ',', default_value = "1,2,5")]
    ks: Vec<usize>,
    /// Skip the probes on every dimension (the slowest part at large widths).
    #[arg(long)]
    no_full: bool,
    /// Targeted probe perturbation: numbers of latents (and, for the baseline, neurons) ablated
    /// per class, comma-separated (SAEBench: 2,5,10,20,50,100,500).
    #[arg(long, value_delimiter = ',', value_parser = sae_workbench::cli::at_least_one,
          default_value = "2,5,10,20,50,100,500")]
    tpp_n: Vec<usize>,
    /// Skip targeted probe perturbation.
    #[arg(long)]
    no_tpp: bool,
    /// Windows per forward pass.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 8)]
    batch_size: usize,
    /// Seed of the window choice and the one-vs-rest draws.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// `cpu`, or `cuda` (build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Join each document's lines with single spaces before tokenizing, so that no class can be
    /// told by its layout (verse lines, paragraph breaks) rather than its words.
    #[arg(long)]
    flatten_whitespace: bool,
    /// Output folder.
    #[arg(long, default_value = "runs/sparse_probing")]
    out: PathBuf,
}

/// For each feature source (the neurons, then each SAE) and each task: the probes per class.
#[derive(Serialize)]
struct TaskResult {
    task: String,
    about: String,
    classes: Vec<String>,
    train_windows: usize,
    test_windows: usize,
    /// Source name → one result per class.
    probes: BTreeMap<String, Vec<ClassProbing>>,
    /// SAE name → for each class, where its top-1 latent fires most (context, activation).
    top1_tokens: BTreeMap<String, Vec<Vec<(String, f32)>>>,
    /// Targeted probe perturbation, for tasks of three classes or more (with two, the other
    /// class's probe asks the same question reversed, so no ablation can spare it).
    tpp: Option<TaskTpp>,
}

/// TPP of one task: the model's class probes and, per feature source, the ablations per class.
#[derive(Serialize)]
struct TaskTpp {
    /// Each class's probe on every neuron, nothing ablated.
    clean_accuracy: Vec<f64>,
    /// Source name (`neurons` or an SAE) → one result per class.
    sources: BTreeMap<String, Vec<TppClass>>,
}

fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.into_iter().collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The mean of `v` and its standard error (sample variance over n - 1).
fn mean_and_se(v: &[f64]) -> (f64, f64) {
    let m = mean(v.iter().copied());
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (m, (var / v.len().max(1) as f64).sqrt())
}

fn main() -> anyhow::Result<()> {
    sae_workbench::transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let t0 = Instant::now();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {}", args.device))?;
    if args.ks.is_empty() || args.ks.contains(&0) {
        bail!("--ks {:?}: each k must be at least 1", args.ks);
    }
    if !args.no_tpp && args.tpp_n.is_empty() {
        bail!("--tpp-n is empty: give the numbers to ablate, or pass --no-tpp");
    }
    let tasks: Vec<&'static str> = if args.tasks.is_empty() {
        TASKS.to_vec()
    } else {
        args.tasks
            .iter()
            .map(|t| {
                TASKS.iter().copied().find(|k| k == t).with_context(|| {
                    format!("--tasks: unknown task {t:?}; known: {}", TASKS.join(", "))
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let setup = Setup::load(
        &args.sae,
        args.model.as_deref(),
        args.hook.as_deref(),
        &device,
        args.context,
    )?;
    let Setup {
        model,
        model_path,
        saes,
        names,
        hook,
        bos,
    } = &setup;
    let bos = *bos;
    let target = HookedSplice::new(model, hook)?;
    let skip = usize::from(bos.is_some());
    let tok = model.tokenizer()?;

    let docs = load_all_corpora()?;
    let task_defs: Vec<Task> = tasks.iter().map(|t| make_task(t, &docs)).collect();
    let needed: Vec<usize> = {
        let mut v: Vec<usize> = task_defs
            .iter()
            .flat_map(|t| t.docs.iter().map(|d| d.0))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    eprintln!("tokenizing {} documents", needed.len());
    let tokens = tokenize_documents(tok, &docs, &needed, args.flatten_whitespace)?;
    let doc_windows = window_orders(&tokens, &docs, args.context, bos.is_some(), args.seed);

    let chosen: Vec<_> = task_defs
        .iter()
        .map(|t| {
            choose_windows(
                t,
                &docs,
                &doc_windows,
                args.train_per_class,
                args.test_per_class,
            )
        })
        .collect();
    for (t, (tr, te)) in task_defs.iter().zip(&chosen) {
        for (c, name) in t.classes.iter().enumerate() {
            let (a, b) = (
                tr.iter().filter(|w| w.1 == c).count(),
                te.iter().filter(|w| w.1 == c).count(),
            );
            if a == 0 || b == 0 {
                bail!(
                    "task {}: class {name} has {a} training and {b} held-out windows of {} tokens: \
                     lower --context",
                    t.name,
                    args.context
                );
            }
            if a < args.train_per_class || b < args.test_per_class {
                eprintln!(
                    "task {}: class {name} has only {a} training / {b} held-out windows",
                    t.name
                );
            }
        }
    }
    // Every window once, whichever tasks use it.
    let mut index: BTreeMap<WindowKey, usize> = BTreeMap::new();
    for (tr, te) in &chosen {
        for (k, _) in tr.iter().chain(te) {
            let n = index.len();
            index.entry(*k).or_insert(n);
        }
    }
    let windows = window_tokens(&index, &tokens, bos, args.context);
    eprintln!(
        "{} windows of {} tokens for {} tasks; model {}, hook {hook}, {} SAE(s)",
        windows.len(),
        args.context,
        task_defs.len(),
        model_path.display(),
        saes.len()
    );
    let (neurons, codes) = setup.pooled_features(&windows, args.batch_size)?;
    let features_s = t0.elapsed().as_secs_f64();

    let cfg = ProbingConfig {
        ks: args.ks.clone(),
        full: !args.no_full,
        seed: args.seed,
        ..ProbingConfig::default()
    };
    let tpp_cfg = TppConfig {
        n_values: args.tpp_n.clone(),
        seed: args.seed,
        ..TppConfig::default()
    };
    let mut sources: Vec<(String, &PooledFeatures)> = vec![("neurons".into(), &neurons)];
    sources.extend(names.iter().cloned().zip(codes.iter()));
    let mut results = Vec::new();
    for (t, (tr, te)) in task_defs.iter().zip(&chosen) {
        let rows = |list: &[(WindowKey, usize)], f: &PooledFeatures| -> (Vec<f32>, Vec<usize>) {
            let x = list
                .iter()
                .flat_map(|(k, _)| {
                    let i = index[k];
                    f.rows[i * f.d..(i + 1) * f.d].iter().copied()
                })
                .collect();
            (x, list.iter().map(|w| w.1).collect())
        };
        let (ntr, ltr) = rows(tr, &neurons);
        let (nte, lte) = rows(te, &neurons);
        let neuron_train = LabelledFeatures {
            x: &ntr,
            d: neurons.d,
            labels: &ltr,
        };
        let neuron_test = LabelledFeatures {
            x: &nte,
            d: neurons.d,
            labels: &lte,
        };
        let tpp_probes = if args.no_tpp || t.classes.len() < 3 {
            None
        } else {
            Some(ClassProbes::fit(
                neuron_train,
                neuron_test,
                &t.classes,
                &tpp_cfg,
            )?)
        };
        // TPP's class probes are the neurons' full-width probes (the same rows, C and seed):
        // fitted once, for both.
        let shared_full = tpp_probes
            .as_ref()
            .filter(|_| cfg.full && cfg.c == tpp_cfg.c && cfg.seed == tpp_cfg.seed);
        let mut probes = BTreeMap::new();
        let mut top1_tokens = BTreeMap::new();
        for (name, f) in &sources {
            eprintln!("probing {} with {name}", t.name);
            let (xtr, ltr) = rows(tr, f);
            let (xte, lte) = rows(te, f);
            let shared = shared_full.filter(|_| name == "neurons");
            let run_cfg = ProbingConfig {
                full: cfg.full && shared.is_none(),
                ..cfg.clone()
            };
            let mut res = sparse_probing(
                LabelledFeatures {
                    x: &xtr,
                    d: f.d,
                    labels: &ltr,
                },
                LabelledFeatures {
                    x: &xte,
                    d: f.d,
                    labels: &lte,
                },
                &t.classes,
                &run_cfg,
            )?;
            if let Some(shared) = shared {
                for (c, r) in res.iter_mut().enumerate() {
                    r.full_test_accuracy = Some(shared.clean_accuracy[c]);
                    r.unconverged += usize::from(!shared.probes[c].converged);
                }
            }
            probes.insert(name.clone(), res);
        }
        // What each SAE's top-1 latent of a class fires on, in that class's held-out windows
        // (one model pass per class, shared by the SAEs).
        if cfg.ks.contains(&1) {
            let mut per_sae: Vec<Vec<Vec<(String, f32)>>> = vec![Vec::new(); saes.len()];
            for (c, _) in t.classes.iter().enumerate() {
                let held: Vec<&Vec<u32>> = te
                    .iter()
                    .filter(|w| w.1 == c)
                    .take(TOP_TOKEN_WINDOWS)
                    .map(|(k, _)| &windows[index[k]])
                    .collect();
                let acts = hook_rows(model, &target, &held)?;
                for (si, sae) in saes.iter().enumerate() {
                    let latent = probes[&names[si]][c]
                        .top_k
                        .iter()
                        .find(|p: &&metrics::TopKProbe| p.k == 1)
                        .map(|p| p.features[0]);
                    per_sae[si].push(match latent {
                        Some(l) => top_tokens(model, sae, l, &acts, skip)?,
                        None => Vec::new(),
                    });
                }
            }
            for (name, v) in names.iter().zip(per_sae) {
                top1_tokens.insert(name.clone(), v);
            }
        }
        let tpp = if let Some(probes) = tpp_probes {
            eprintln!("targeted probe perturbation on {}", t.name);
            let (train, test) = (neuron_train, neuron_test);
            let mut by_source = BTreeMap::new();
            by_source.insert(
                "neurons".to_string(),
                targeted_probe_perturbation(
                    &probes,
                    train,
                    test,
                    FeatureSource::Neurons,
                    &tpp_cfg,
                )?,
            );
            for ((name, sae), f) in names.iter().zip(saes).zip(&codes) {
                let (ctr, cte) = (rows(tr, f).0, rows(te, f).0);
                let source = FeatureSource::Latents {
                    sae,
                    train_codes: &ctr,
                    test_codes: &cte,
                };
                by_source.insert(
                    name.clone(),
                    targeted_probe_perturbation(&probes, train, test, source, &tpp_cfg)?,
                );
            }
            Some(TaskTpp {
                clean_accuracy: probes.clean_accuracy,
                sources: by_source,
            })
        } else {
            None
        };
        results.push(TaskResult {
            task: t.name.to_string(),
            about: t.about.to_string(),
            classes: t.classes.clone(),
            train_windows: tr.len(),
            test_windows: te.len(),
            probes,
            top1_tokens,
            tpp,
        });
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    let source_names: Vec<String> = sources.iter().map(|s| s.0.clone()).collect();
    let summary = summarise(&results, &source_names, &cfg, &tpp_cfg);
    let out = serde_json::json!({
        "model": model_path,
        "hook": hook,
        "saes": args.sae,
        "context": args.context,
        "flatten_whitespace": args.flatten_whitespace,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "windows": windows.len(),
        "config": cfg,
        "tpp_config": (!args.no_tpp).then_some(&tpp_cfg),
        "summary": summary,
        "tasks": results,
        "seconds": { "features": features_s, "total": t0.elapsed().as_secs_f64() },
    });
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    plots(&results, &source_names, &cfg, &tpp_cfg, &args.out)?;
    let html = report(
        &results,
        &source_names,
        &cfg,
        &summary,
        &tpp_cfg,
        &RunInfo {
            hook,
            model: model_path,
            flattened: args.flatten_whitespace,
        },
    );
    let html_path = args.out.join("report.html");
    std::fs::write(&html_path, html).with_context(|| format!("writing {}", html_path.display()))?;

    println!(
        "sparse probing, {} held-out accuracy (mean over tasks and classes):",
        hook
    );
    for s in &source_names {
        let line: Vec<String> = cfg
            .ks
            .iter()
            .map(|&k| {
                format!(
                    "top-{k} {:.3}",
                    summary[s][format!("top_{k}")].as_f64().unwrap_or(f64::NAN)
                )
            })
            .chain(
                cfg.full
                    .then(|| format!("all {:.3}", summary[s]["all"].as_f64().unwrap_or(f64::NAN))),
            )
            .collect();
        println!("  {s:>16}: {}", line.join(", "));
    }
    if results.iter().any(|r| r.tpp.is_some()) {
        println!(
            "targeted probe perturbation, total = own probe's drop - others' mean drop \
             (mean over the classes of tasks with three or more):"
        );
        for s in &source_names {
            let line: Vec<String> = tpp_cfg
                .n_values
                .iter()
                .map(|&n| {
                    let v = &summary[s]["tpp"][format!("tpp_threshold_{n}_total_metric")];
                    format!("N={n} {:.3}", v.as_f64().unwrap_or(f64::NAN))
                })
                .collect();
            println!("  {s:>16}: {}", line.join(", "));
        }
    }
    println!(
        "wrote {}, report.html and the PNGs in {:.0} s",
        json_path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Held-out windows per class whose tokens show what a top-1 latent fires on.
const TOP_TOKEN_WINDOWS: usize = 24;

/// The hook's activations on `windows`, 8 at a time: `[rows, width]` with each row's token id.
fn hook_rows(
    model: &Model,
    target: &HookedSplice<'_>,
    windows: &[&Vec<u32>],
) -> anyhow::Result<Vec<(Tensor, Vec<u32>, usize)>> {
    let mut out = Vec::new();
    for chunk in windows.chunks(8) {
        let len = chunk[0].len();
        let flat: Vec<u32> = chunk.iter().flat_map(|w| w.iter().copied()).collect();
        let t = Tensor::from_vec(flat.clone(), (chunk.len(), len), model.device())?;
        let cache = model.run_with_cache(&t, &[target.hook()])?;
        let h = cache.require(target.hook())?;
        out.push((h.reshape((chunk.len() * len, h.dim(2)?))?, flat, len));
    }
    Ok(out)
}

/// Where `latent` fires most: its five highest activations on distinct tokens, each shown with
/// the four tokens before it (`…of the [Congress]`). Summing by token would instead favour the
/// commonest tokens (commas, "the") for any latent that fires a little everywhere.
fn top_tokens(
    model: &Model,
    sae: &SaeModel,
    latent: usize,
    acts: &[(Tensor, Vec<u32>, usize)],
    skip: usize,
) -> anyhow::Result<Vec<(String, f32)>> {
    let tok = model.tokenizer()?;
    let mut hits: Vec<(f32, usize, usize)> = Vec::new(); // (activation, chunk, row)
    for (ci, (rows, _, len)) in acts.iter().enumerate() {
        let codes = sae.encode_sparse(rows)?;
        for i in 0..codes.n_tokens {
            if i % len < skip {
                continue;
            }
            let (fs, vs) = codes.row(i);
            if let Some(p) = fs.iter().position(|&f| f as usize == latent) {
                hits.push((vs[p], ci, i));
            }
        }
    }
    hits.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for (v, ci, i) in hits {
        let (_, ids, len) = &acts[ci];
        if seen.contains(&ids[i]) {
            continue;
        }
        seen.push(ids[i]);
        let from = (i - i % len + skip).max(i.saturating_sub(4));
        let before = tok.decode(&ids[from..i])?;
        out.push((format!("…{before}[{}]", tok.decode(&ids[i..=i])?), v));
        if out.len() == 5 {
            break;
        }
    }
    Ok(out)
}

/// The SAE's top-k accuracy less the neurons', class by class (the same rows in both): mean,
/// standard error over the classes, and how many classes each side wins. A mean gap within two
/// standard errors is not a difference these tasks can show.
fn paired_difference(results: &[TaskResult], sae: &str, k: usize) -> serde_json::Value {
    let d: Vec<f64> = results
        .iter()
        .flat_map(|r| r.probes[sae].iter().zip(&r.probes["neurons"]))
        .filter_map(|(a, b)| Some(a.top_k_accuracy(k)? - b.top_k_accuracy(k)?))
        .collect();
    paired_summary(&d)
}

/// Every class's TPP ablations of `source`, over the tasks that have TPP.
fn tpp_classes<'a>(results: &'a [TaskResult], source: &str) -> Vec<&'a TppClass> {
    results
        .iter()
        .filter_map(|r| r.tpp.as_ref())
        .flat_map(|t| t.sources[source].iter())
        .collect()
}

/// The SAE's TPP total at `n` less the neurons', class by class (the same probes).
fn tpp_paired_difference(results: &[TaskResult], sae: &str, n: usize) -> serde_json::Value {
    let d: Vec<f64> = tpp_classes(results, sae)
        .into_iter()
        .zip(tpp_classes(results, "neurons"))
        .filter_map(|(a, b)| Some(a.at(n)?.total - b.at(n)?.total))
        .collect();
    paired_summary(&d)
}

/// Mean and standard error of paired differences `d` (SAE minus neurons), with the classes won.
fn paired_summary(d: &[f64]) -> serde_json::Value {
    let (m, se) = mean_and_se(d);
    serde_json::json!({
        "mean": m,
        "standard_error": se,
        "classes_sae_better": d.iter().filter(|&&x| x > 0.0).count(),
        "classes_neurons_better": d.iter().filter(|&&x| x < 0.0).count(),
        "classes": d.len(),
    })
}

/// Mean held-out accuracy per source: over every class of every task, and per task.
fn summarise(
    results: &[TaskResult],
    sources: &[String],
    cfg: &ProbingConfig,
    tpp_cfg: &TppConfig,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for s in sources {
        let all: Vec<&ClassProbing> = results.iter().flat_map(|r| r.probes[s].iter()).collect();
        let mut m = serde_json::Map::new();
        // SAEBench's key names: llm_* for the model's own activations, sae_* for an SAE.
        let prefix = if s == "neurons" { "llm" } else { "sae" };
        for &k in &cfg.ks {
            let acc = mean(all.iter().filter_map(|c| c.top_k_accuracy(k)));
            m.insert(format!("top_{k}"), acc.into());
            m.insert(format!("{prefix}_top_{k}_test_accuracy"), acc.into());
            if s != "neurons" {
                m.insert(
                    format!("top_{k}_minus_neurons"),
                    paired_difference(results, s, k),
                );
            }
        }
        if cfg.full {
            let acc = mean(all.iter().filter_map(|c| c.full_test_accuracy));
            m.insert("all".into(), acc.into());
            m.insert(format!("{prefix}_test_accuracy"), acc.into());
        }
        let per_task: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|r| {
                let ks: serde_json::Map<String, serde_json::Value> = cfg
                    .ks
                    .iter()
                    .map(|&k| {
                        let acc = mean(r.probes[s].iter().filter_map(|c| c.top_k_accuracy(k)));
                        (format!("top_{k}"), acc.into())
                    })
                    .collect();
                (r.task.clone(), ks.into())
            })
            .collect();
        m.insert("per_task".into(), per_task.into());
        if results.iter().any(|r| r.tpp.is_some()) {
            m.insert("tpp".into(), tpp_summary(results, s, tpp_cfg));
        }
        out.insert(s.clone(), m.into());
    }
    out.into()
}

/// TPP per `n`, under SAEBench's key names, as the mean over every class of the tasks with TPP;
/// for an SAE also its paired difference from the neurons; and the totals per task.
fn tpp_summary(results: &[TaskResult], source: &str, tpp_cfg: &TppConfig) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    let classes: Vec<TppClass> = tpp_classes(results, source).into_iter().cloned().collect();
    for &n in &tpp_cfg.n_values {
        let key = |what: &str| format!("tpp_threshold_{n}_{what}");
        m.insert(
            key("total_metric"),
            tpp_mean(&classes, n, |a| a.total).into(),
        );
        m.insert(
            key("intended_diff_only"),
            tpp_mean(&classes, n, |a| a.intended_diff).into(),
        );
        m.insert(
            key("unintended_diff_only"),
            tpp_mean(&classes, n, |a| a.unintended_diff).into(),
        );
        if source != "neurons" {
            m.insert(
                key("total_minus_neurons"),
                tpp_paired_difference(results, source, n),
            );
        }
    }
    let per_task: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .filter_map(|r| Some((r.task.clone(), r.tpp.as_ref()?)))
        .map(|(task, t)| {
            let totals: serde_json::Map<String, serde_json::Value> = tpp_cfg
                .n_values
                .iter()
                .map(|&n| {
                    let v = tpp_mean(&t.sources[source], n, |a| a.total);
                    (format!("tpp_threshold_{n}_total_metric"), v.into())
                })
                .collect();
            (task, totals.into())
        })
        .collect();
    m.insert("per_task".into(), per_task.into());
    m.into()
}

fn plots(
    results: &[TaskResult],
    sources: &[String],
    cfg: &ProbingConfig,
    tpp_cfg: &TppConfig,
    out: &Path,
) -> anyhow::Result<()> {
    // Accuracy against k, with ± one standard error over the classes of all tasks.
    let series: Vec<Series> = sources
        .iter()
        .map(|s| {
            let points = cfg
                .ks
                .iter()
                .map(|&k| {
                    let v: Vec<f64> = results
                        .iter()
                        .flat_map(|r| r.probes[s].iter().filter_map(|c| c.top_k_accuracy(k)))
                        .collect();
                    let (m, se) = mean_and_se(&v);
                    (k as f64, m, m - se, m + se)
                })
                .collect();
            Series {
                name: s.clone(),
                points,
            }
        })
        .collect();
    plot_lines(
        &series,
        "Sparse probing: held-out accuracy with k dimensions (mean over classes, ± s.e.)",
        "k (dimensions probed)",
        "accuracy",
        true,
        &out.join("accuracy_vs_k.png"),
    )?;
    if cfg.ks.contains(&1) {
        let grid: Vec<Vec<f64>> = sources
            .iter()
            .map(|s| {
                results
                    .iter()
                    .map(|r| mean(r.probes[s].iter().filter_map(|c| c.top_k_accuracy(1))))
                    .collect()
            })
            .collect();
        let cols: Vec<String> = results.iter().map(|r| r.task.clone()).collect();
        plot_heatmap(
            &grid,
            sources,
            &cols,
            "Top-1 accuracy per task (mean over classes)",
            (0.5, 1.0),
            &out.join("top1_by_task.png"),
        )?;
    }
    if results.iter().any(|r| r.tpp.is_some()) {
        let series: Vec<Series> = sources
            .iter()
            .map(|s| {
                let classes = tpp_classes(results, s);
                let points = tpp_cfg
                    .n_values
                    .iter()
                    .map(|&n| {
                        let v: Vec<f64> = classes
                            .iter()
                            .filter_map(|c| Some(c.at(n)?.total))
                            .collect();
                        let (m, se) = mean_and_se(&v);
                        (n as f64, m, m - se, m + se)
                    })
                    .collect();
                Series {
                    name: s.clone(),
                    points,
                }
            })
            .collect();
        plot_lines(
            &series,
            "TPP total: own probe's drop minus the others' mean drop (± s.e.)",
            "N (latents or neurons ablated per class)",
            "TPP total",
            true,
            &out.join("tpp_vs_n.png"),
        )?;
    }
    Ok(())
}

/// What the report says about the run it comes from.
struct RunInfo<'a> {
    hook: &'a str,
    model: &'a Path,
    flattened: bool,
}

fn report(
    results: &[TaskResult],
    sources: &[String],
    cfg: &ProbingConfig,
    summary: &serde_json::Value,
    tpp_cfg: &TppConfig,
    run: &RunInfo<'_>,
) -> String {
    let RunInfo {
        hook,
        model,
        flattened,
    } = *run;
    use metrics::html::escape_html as esc;
    let mut h = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sparse probing: {hook}</title>\
         <style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         td.l,th.l{{text-align:left}}code{{background:#f4f4f4}}</style></head><body>\
         <h1>Sparse probing at <code>{}</code></h1><p>Model <code>{}</code>. Each text is a \
         window; its vector is the mean over its tokens of the hook's activations (\"neurons\") or \
         of an SAE's codes. For each class against the rest (balanced), the k dimensions with the \
         largest difference of means are kept and an L2 logistic probe (C = {}) is fitted; the \
         numbers are accuracy on windows from held-out documents.{}</p>\
         <img src=\"accuracy_vs_k.png\" width=\"640\"> <img src=\"top1_by_task.png\" width=\"640\">\
         <h2>Mean over all classes</h2><table><tr><th class=l>source</th>",
        esc(hook),
        esc(&model.display().to_string()),
        cfg.c,
        if flattened {
            " Each document's lines were joined with single spaces (<code>--flatten-whitespace</code>): \
             no class can be told by its layout."
        } else {
            ""
        }
    );
    for &k in &cfg.ks {
        h += &format!("<th>top-{k}</th>");
    }
    if cfg.full {
        h += "<th>all</th>";
    }
    h += "</tr>";
    for s in sources {
        h += &format!("<tr><td class=l>{}</td>", esc(s));
        for &k in &cfg.ks {
            h += &format!(
                "<td>{:.3}</td>",
                summary[s][format!("top_{k}")].as_f64().unwrap_or(f64::NAN)
            );
        }
        if cfg.full {
            h += &format!(
                "<td>{:.3}</td>",
                summary[s]["all"].as_f64().unwrap_or(f64::NAN)
            );
        }
        h += "</tr>";
    }
    h += "</table>";
    for r in results {
        h += &format!(
            "<h2>{}</h2><p>{} ({} training and {} held-out windows)</p><table><tr><th class=l>class</th>",
            esc(&r.task),
            esc(&r.about),
            r.train_windows,
            r.test_windows
        );
        for s in sources {
            h += &format!("<th>{} top-1</th>", esc(s));
            if cfg.ks.len() > 1 {
                let k = cfg.ks[cfg.ks.len() - 1];
                h += &format!("<th>{} top-{k}</th>", esc(s));
            }
        }
        h += "<th class=l>each SAE's top-1 latent: where it fires most in the class's held-out \
              windows (distinct tokens, ⏎ = line break); (+) higher on the class, (−) lower</th></tr>";
        for (c, class) in r.classes.iter().enumerate() {
            h += &format!("<tr><td class=l>{}</td>", esc(class));
            for s in sources {
                let p = &r.probes[s][c];
                let first = p.top_k.first().map_or(f64::NAN, |t| t.test_accuracy);
                h += &format!("<td>{first:.3}</td>");
                if cfg.ks.len() > 1 {
                    let last = p.top_k.last().map_or(f64::NAN, |t| t.test_accuracy);
                    h += &format!("<td>{last:.3}</td>");
                }
            }
            let mut cells = Vec::new();
            for s in sources.iter().skip(1) {
                // Its probe weight's sign: whether the latent is higher (+) or lower (−) on the class.
                let latent = r.probes[s][c]
                    .top_k
                    .first()
                    .map(|t| (t.features[0], if t.weights[0] >= 0.0 { "+" } else { "−" }));
                let toks = r.top1_tokens.get(s).and_then(|v| v.get(c));
                if let (Some((l, sign)), Some(toks)) = (latent, toks) {
                    let list: Vec<String> = toks
                        .iter()
                        .map(|(t, v)| format!("<code>{}</code> {v:.1}", esc(&t.replace('\n', "⏎"))))
                        .collect();
                    cells.push(format!("{}: #{l} ({sign}) {}", esc(s), list.join(" ")));
                }
            }
            h += &format!("<td class=l>{}</td></tr>", cells.join("<br>"));
        }
        h += "</table>";
    }
    h += &tpp_report(results, sources, summary, tpp_cfg);
    h + "</body></html>"
}

/// The report's TPP section: the totals per N for each source, then per class at one N.
fn tpp_report(
    results: &[TaskResult],
    sources: &[String],
    summary: &serde_json::Value,
    tpp_cfg: &TppConfig,
) -> String {
    use metrics::html::escape_html as esc;
    if !results.iter().any(|r| r.tpp.is_some()) {
        return String::new();
    }
    let mut h = String::from(
        "<h2>Targeted probe perturbation</h2><p>For each class, a probe on every neuron (one \
         against the rest) is fitted; the N latents (or neurons) that matter most to it (mean \
         code higher on the class, times the probe weight along the latent's decoder direction) \
         are zero-ablated in the held-out windows, keeping the SAE's error. <i>Intended</i> is the \
         drop of that class's probe accuracy, <i>unintended</i> the mean drop of the other \
         classes' probes, <i>total</i> their difference: high when a class can be removed \
         without touching its neighbours. Tasks with two classes are left out (the other probe \
         asks the same question reversed).</p><img src=\"tpp_vs_n.png\" width=\"640\">\
         <table><tr><th class=l>source: total (intended / unintended)</th>",
    );
    for &n in &tpp_cfg.n_values {
        h += &format!("<th>N = {n}</th>");
    }
    h += "</tr>";
    for s in sources {
        h += &format!("<tr><td class=l>{}</td>", esc(s));
        for &n in &tpp_cfg.n_values {
            let v = |what: &str| {
                summary[s]["tpp"][format!("tpp_threshold_{n}_{what}")]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            };
            h += &format!(
                "<td>{:.3} ({:.3} / {:.3})</td>",
                v("total_metric"),
                v("intended_diff_only"),
                v("unintended_diff_only")
            );
        }
        h += "</tr>";
    }
    h += "</table>";
    // Per class at the middle N (20 with SAEBench's list).
    let n = tpp_cfg.n_values[tpp_cfg.n_values.len() / 2];
    for r in results {
        let Some(t) = &r.tpp else { continue };
        h += &format!(
            "<h3>{} at N = {n}</h3><table><tr><th class=l>class</th><th>clean probe</th>",
            esc(&r.task)
        );
        for s in sources {
            h += &format!("<th>{} total</th>", esc(s));
        }
        h += "<th class=l>the first two latents ablated, per SAE</th></tr>";
        for (c, class) in r.classes.iter().enumerate() {
            h += &format!(
                "<tr><td class=l>{}</td><td>{:.3}</td>",
                esc(class),
                t.clean_accuracy[c]
            );
            for s in sources {
                let total = t.sources[s][c].at(n).map_or(f64::NAN, |a| a.total);
                h += &format!("<td>{total:.3}</td>");
            }
            let firsts: Vec<String> = sources
                .iter()
                .skip(1)
                .filter_map(|s| {
                    let a = t.sources[s][c].ablations.iter().max_by_key(|a| a.n)?;
                    let ids: Vec<String> =
                        a.features.iter().take(2).map(|f| format!("#{f}")).collect();
                    Some(format!("{}: {}", esc(s), ids.join(", ")))
                })
                .collect();
            h += &format!("<td class=l>{}</td></tr>", firsts.join("; "));
        }
        h += "</table>";
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["sparse_probing", "--sae", "x"],
            &[
                ("--train-per-class", "0"),
                ("--test-per-class", "0"),
                ("--batch-size", "0"),
                ("--tpp-n", "0"),
            ],
        );
    }
}
