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
//! Writes `results.json` (per task, class and feature source; SAEBench's names for the averages:
//! `llm_top_1_test_accuracy`, `sae_top_1_test_accuracy`, ...), `accuracy_vs_k.png`,
//! `top1_by_task.png` and `report.html` into `--out`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use activation_store::{CorpusName, Document, chunk_ranges, default_corpora_root, load_corpora};
use anyhow::{Context, bail};
use candle_core::Tensor;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use metrics::plots::{Series, plot_heatmap, plot_lines};
use metrics::{
    ClassProbing, HookedSplice, LabelledFeatures, PooledFeatures, ProbingConfig,
    pooled_window_features, sparse_probing,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sae_core::SaeModel;
use serde::Serialize;
use transformer_hooks::{Model, assets};

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

/// A task: documents with a class each.
struct Task {
    name: &'static str,
    about: &'static str,
    classes: Vec<String>,
    /// (index into the corpus documents, class)
    docs: Vec<(usize, usize)>,
}

/// The First Folio's grouping (Pericles, not in the Folio, with the comedies, as the late
/// romances are there; Troilus and Cymbeline with the tragedies, as the Folio prints them).
fn shakespeare_genre(work: &str) -> Option<&'static str> {
    const COMEDIES: [&str; 15] = [
        "alls_well_that_ends_well",
        "as_you_like_it",
        "comedy_of_errors",
        "loves_labours_lost",
        "measure_for_measure",
        "merchant_of_venice",
        "merry_wives_of_windsor",
        "midsummer_nights_dream",
        "much_ado_about_nothing",
        "pericles",
        "taming_of_the_shrew",
        "tempest",
        "twelfth_night",
        "two_gentlemen_of_verona",
        "winters_tale",
    ];
    const HISTORIES: [&str; 10] = [
        "henry_iv_part_1",
        "henry_iv_part_2",
        "henry_v",
        "henry_vi_part_1",
        "henry_vi_part_2",
        "henry_vi_part_3",
        "henry_viii",
        "john",
        "richard_ii",
        "richard_iii",
    ];
    const TRAGEDIES: [&str; 12] = [
        "antony_and_cleopatra",
        "coriolanus",
        "cymbeline",
        "hamlet",
        "julius_caesar",
        "lear",
        "macbeth",
        "othello",
        "romeo_and_juliet",
        "timon_of_athens",
        "tragedy_of_titus_andronicus",
        "troilus_and_cressida",
    ];
    if COMEDIES.contains(&work) {
        Some("comedy")
    } else if HISTORIES.contains(&work) {
        Some("history")
    } else if TRAGEDIES.contains(&work) {
        Some("tragedy")
    } else {
        None // the poems and sonnets
    }
}

/// `sotu/1790_george_washington_n` → (1790, "n").
fn sotu_year_party(id: &str) -> Option<(u32, &str)> {
    let stem = id.strip_prefix("sotu/")?;
    let year = stem.split('_').next()?.parse().ok()?;
    let party = stem.rsplit('_').next()?;
    Some((year, party))
}

/// The class of document `id` in `task`, or `None` when the task leaves it out.
fn class_of(task: &str, id: &str) -> Option<String> {
    let mut parts = id.split('/');
    let corpus = parts.next()?;
    match task {
        "source" => Some(corpus.to_string()),
        "austen_novel" if corpus == "austen" => parts.next().map(str::to_string),
        "shakespeare_genre" if corpus == "shakespeare" => {
            shakespeare_genre(parts.next()?).map(str::to_string)
        }
        "sotu_era" => {
            let (year, _) = sotu_year_party(id)?;
            Some(
                match year {
                    ..=1860 => "1790-1860",
                    1861..=1932 => "1861-1932",
                    _ => "1933-2021",
                }
                .to_string(),
            )
        }
        "sotu_party" => match sotu_year_party(id)?.1 {
            "d" => Some("democrat".into()),
            "r" => Some("republican".into()),
            _ => None,
        },
        _ => None,
    }
}

fn make_task(name: &'static str, docs: &[Document]) -> Task {
    let about = match name {
        "source" => "which corpus a window comes from",
        "austen_novel" => "which of Austen's six novels",
        "shakespeare_genre" => "comedy, history or tragedy (First Folio), on held-out plays",
        "sotu_era" => "the era of a State of the Union address",
        _ => "the party of the president giving a State of the Union address",
    };
    let labelled: Vec<(usize, String)> = docs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| class_of(name, &d.id).map(|c| (i, c)))
        .collect();
    let mut classes: Vec<String> = labelled.iter().map(|(_, c)| c.clone()).collect();
    classes.sort();
    classes.dedup();
    let docs = labelled
        .into_iter()
        .map(|(i, c)| (i, classes.binary_search(&c).unwrap_or(0)))
        .collect();
    Task {
        name,
        about,
        classes,
        docs,
    }
}

/// A window: document index and the start of its text tokens.
type WindowKey = (usize, usize);

/// Windows with their class.
type Labelled = Vec<(WindowKey, usize)>;

/// Per class and split, windows drawn round-robin over the class's documents (each document's
/// full windows in a seeded random order), so that no long document crowds out the rest.
/// Returns (train, test) lists of (window, class).
fn choose_windows(
    task: &Task,
    docs: &[Document],
    doc_windows: &HashMap<usize, Vec<usize>>,
    args: &Args,
) -> (Labelled, Labelled) {
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for class in 0..task.classes.len() {
        let mut members: Vec<usize> = task
            .docs
            .iter()
            .filter(|(_, c)| *c == class)
            .map(|(d, _)| *d)
            .collect();
        members.sort_by(|a, b| docs[*a].id.cmp(&docs[*b].id));
        // Every fourth document of the class, by id, is held out.
        let (held, kept): (Vec<_>, Vec<_>) = members
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % 4 == 3);
        for (split, list, want) in [
            (&kept, &mut train, args.train_per_class),
            (&held, &mut test, args.test_per_class),
        ] {
            let orders: Vec<(usize, &[usize])> = split
                .iter()
                .map(|&(_, d)| (d, doc_windows.get(&d).map_or(&[][..], Vec::as_slice)))
                .collect();
            let mut taken = 0;
            let mut round = 0;
            while taken < want {
                let mut any = false;
                for (d, starts) in &orders {
                    if let Some(&s) = starts.get(round) {
                        any = true;
                        if taken < want {
                            list.push(((*d, s), class));
                            taken += 1;
                        }
                    }
                }
                if !any {
                    break;
                }
                round += 1;
            }
        }
    }
    (train, test)
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
    if args.context < 3 {
        bail!(
            "--context {}: a window needs BOS and at least two tokens",
            args.context
        );
    }
    if args.ks.is_empty() || args.ks.contains(&0) {
        bail!("--ks {:?}: each k must be at least 1", args.ks);
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
    let mut saes = Vec::new();
    for p in &args.sae {
        saes.push(SaeModel::load(p).with_context(|| format!("loading --sae {}", p.display()))?);
    }
    let names = sae_names(&args.sae);
    let hook = match (&args.hook, saes[0].hook_name()) {
        (Some(h), _) => h.clone(),
        (None, Some(h)) => h.to_string(),
        (None, None) => bail!(
            "SAE {} names no hook (cfg.json metadata.hook_name): pass --hook",
            args.sae[0].display()
        ),
    };
    for (s, p) in saes.iter().zip(&args.sae) {
        if let Some(h) = s.hook_name()
            && h != hook
        {
            bail!(
                "--sae {} was trained on `{h}`, not `{hook}`: probe SAEs of one hook at a time",
                p.display()
            );
        }
    }
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let model_path = std::fs::canonicalize(&model_path).unwrap_or(model_path);
    let model = Model::load(&model_path, &device).with_context(|| {
        format!(
            "loading model {} (python3 scripts/fetch_assets.py smollm2)",
            model_path.display()
        )
    })?;
    let target = HookedSplice::new(&model, &hook)?;
    for (s, p) in saes.iter().zip(&args.sae) {
        target
            .check_sae(s)
            .with_context(|| format!("--sae {}", p.display()))?;
    }
    let n_ctx = model.config().n_ctx;
    if args.context > n_ctx {
        bail!(
            "--context {}: the model's context is {n_ctx} tokens",
            args.context
        );
    }
    let tok = model.tokenizer()?;
    let bos = tok.bos_id().or(model.config().bos_token_id);
    let skip = usize::from(bos.is_some());

    let root = default_corpora_root();
    let docs = load_corpora(&root, &CorpusName::ALL).with_context(|| {
        format!(
            "reading the corpora in {} (python3 scripts/fetch_assets.py corpora)",
            root.display()
        )
    })?;
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
    let tokens: HashMap<usize, Vec<u32>> = needed
        .par_iter()
        .map(|&d| {
            let text = &docs[d].text;
            let ids = if args.flatten_whitespace {
                tok.encode(
                    &text.split_whitespace().collect::<Vec<_>>().join(" "),
                    false,
                )?
            } else {
                tok.encode(text, false)?
            };
            Ok((d, ids))
        })
        .collect::<transformer_hooks::Result<_>>()?;
    // Each document's full windows, in an order seeded by the run's seed and the document's id.
    let doc_windows: HashMap<usize, Vec<usize>> = tokens
        .iter()
        .map(|(&d, ids)| {
            let mut starts: Vec<usize> = chunk_ranges(ids.len(), args.context, bos.is_some())
                .filter(|r| r.len() + skip == args.context)
                .map(|r| r.start)
                .collect();
            let h = docs[d].id.bytes().fold(args.seed, |h, b| {
                h.wrapping_mul(0x100_0000_01B3).wrapping_add(u64::from(b))
            });
            starts.shuffle(&mut ChaCha8Rng::seed_from_u64(h));
            (d, starts)
        })
        .collect();

    let chosen: Vec<_> = task_defs
        .iter()
        .map(|t| choose_windows(t, &docs, &doc_windows, &args))
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
    let mut windows = vec![Vec::new(); index.len()];
    for (&(d, s), &i) in &index {
        let ids = &tokens[&d];
        let mut w = Vec::with_capacity(args.context);
        w.extend(bos);
        w.extend_from_slice(&ids[s..s + args.context - skip]);
        windows[i] = w;
    }
    eprintln!(
        "{} windows of {} tokens for {} tasks; model {}, hook {hook}, {} SAE(s)",
        windows.len(),
        args.context,
        task_defs.len(),
        model_path.display(),
        saes.len()
    );
    let pb = ProgressBar::new(windows.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message("activations");
    let sae_refs: Vec<&SaeModel> = saes.iter().collect();
    let (neurons, codes) = pooled_window_features(
        &model,
        &hook,
        &sae_refs,
        &windows,
        args.batch_size,
        skip,
        Some(&pb),
    )?;
    pb.finish_and_clear();
    let features_s = t0.elapsed().as_secs_f64();

    let cfg = ProbingConfig {
        ks: args.ks.clone(),
        full: !args.no_full,
        seed: args.seed,
        ..ProbingConfig::default()
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
        let mut probes = BTreeMap::new();
        let mut top1_tokens = BTreeMap::new();
        for (name, f) in &sources {
            eprintln!("probing {} with {name}", t.name);
            let (xtr, ltr) = rows(tr, f);
            let (xte, lte) = rows(te, f);
            let res = sparse_probing(
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
                &cfg,
            )?;
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
                let acts = hook_rows(&model, &target, &held)?;
                for (si, sae) in saes.iter().enumerate() {
                    let latent = probes[&names[si]][c]
                        .top_k
                        .iter()
                        .find(|p: &&metrics::TopKProbe| p.k == 1)
                        .map(|p| p.features[0]);
                    per_sae[si].push(match latent {
                        Some(l) => top_tokens(&model, sae, l, &acts, skip)?,
                        None => Vec::new(),
                    });
                }
            }
            for (name, v) in names.iter().zip(per_sae) {
                top1_tokens.insert(name.clone(), v);
            }
        }
        results.push(TaskResult {
            task: t.name.to_string(),
            about: t.about.to_string(),
            classes: t.classes.clone(),
            train_windows: tr.len(),
            test_windows: te.len(),
            probes,
            top1_tokens,
        });
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    let source_names: Vec<String> = sources.iter().map(|s| s.0.clone()).collect();
    let summary = summarise(&results, &source_names, &cfg);
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
        "summary": summary,
        "tasks": results,
        "seconds": { "features": features_s, "total": t0.elapsed().as_secs_f64() },
    });
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    plots(&results, &source_names, &cfg, &args.out)?;
    let html = report(
        &results,
        &source_names,
        &cfg,
        &summary,
        &hook,
        &model_path,
        args.flatten_whitespace,
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
    println!(
        "wrote {}, report.html and two PNGs in {:.0} s",
        json_path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Names for the SAEs: their folder names, made unique.
fn sae_names(paths: &[PathBuf]) -> Vec<String> {
    let mut names = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let base = p
            .file_name()
            .map_or_else(|| format!("sae{i}"), |n| n.to_string_lossy().into_owned());
        let name = if names.contains(&base) || base == "neurons" {
            format!("{base}#{i}")
        } else {
            base
        };
        names.push(name);
    }
    names
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
    let (m, se) = mean_and_se(&d);
    serde_json::json!({
        "mean": m,
        "standard_error": se,
        "classes_sae_better": d.iter().filter(|&&x| x > 0.0).count(),
        "classes_neurons_better": d.iter().filter(|&&x| x < 0.0).count(),
        "classes": d.len(),
    })
}

/// Mean held-out accuracy per source: over every class of every task, and per task.
fn summarise(results: &[TaskResult], sources: &[String], cfg: &ProbingConfig) -> serde_json::Value {
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
        out.insert(s.clone(), m.into());
    }
    out.into()
}

fn plots(
    results: &[TaskResult],
    sources: &[String],
    cfg: &ProbingConfig,
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
    Ok(())
}

fn report(
    results: &[TaskResult],
    sources: &[String],
    cfg: &ProbingConfig,
    summary: &serde_json::Value,
    hook: &str,
    model: &Path,
    flattened: bool,
) -> String {
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
    h + "</body></html>"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_get_the_classes_of_each_task() {
        let cases = [
            ("source", "moby-dick/chapter-001", Some("moby-dick")),
            ("austen_novel", "austen/emma/chapter-01", Some("emma")),
            ("austen_novel", "sotu/1790_george_washington_n", None),
            ("shakespeare_genre", "shakespeare/hamlet", Some("tragedy")),
            ("shakespeare_genre", "shakespeare/henry_v", Some("history")),
            ("shakespeare_genre", "shakespeare/tempest", Some("comedy")),
            ("shakespeare_genre", "shakespeare/sonnets", None),
            ("sotu_era", "sotu/1860_james_buchanan_d", Some("1790-1860")),
            ("sotu_era", "sotu/1861_abraham_lincoln_r", Some("1861-1932")),
            ("sotu_era", "sotu/2021_joseph_r_biden_d", Some("1933-2021")),
            ("sotu_era", "moby-dick/chapter-001", None),
            (
                "sotu_party",
                "sotu/1861_abraham_lincoln_r",
                Some("republican"),
            ),
            ("sotu_party", "sotu/2021_joseph_r_biden_d", Some("democrat")),
            ("sotu_party", "sotu/1790_george_washington_n", None),
        ];
        for (task, id, want) in cases {
            assert_eq!(class_of(task, id).as_deref(), want, "{task} {id}");
        }
    }

    /// Every work of the pinned Shakespeare corpus is a play with a genre or one of its five
    /// poems (a misspelt name in the tables would silently drop a play).
    #[test]
    fn every_play_in_the_corpus_has_its_genre() {
        let root = default_corpora_root();
        let Ok(docs) = activation_store::load_corpus(&root, CorpusName::Shakespeare) else {
            eprintln!("skipping: corpora not fetched (python3 scripts/fetch_assets.py corpora)");
            return;
        };
        let works: Vec<&str> = docs.iter().map(|d| &d.id["shakespeare/".len()..]).collect();
        let poems = [
            "lovers_complaint",
            "passionate_pilgrim",
            "phoenix_and_the_turtle",
            "rape_of_lucrece",
            "sonnets",
        ];
        assert_eq!(works.len(), 42);
        for w in works {
            assert_eq!(shakespeare_genre(w).is_none(), poems.contains(&w), "{w}");
        }
        let task = make_task("shakespeare_genre", &docs);
        let per_class: Vec<usize> = (0..3)
            .map(|c| task.docs.iter().filter(|d| d.1 == c).count())
            .collect();
        assert_eq!(task.classes, ["comedy", "history", "tragedy"]);
        assert_eq!(per_class, [15, 10, 12]);
    }

    #[test]
    fn windows_are_held_out_by_document_and_spread_over_documents() {
        let docs: Vec<Document> = (0..12)
            .map(|i| Document {
                id: format!("c/{i:02}"),
                text: String::new(),
            })
            .collect();
        // Documents 0-7 are class 0, 8-11 class 1; each has three windows.
        let task = Task {
            name: "t",
            about: "",
            classes: vec!["a".into(), "b".into()],
            docs: (0..12).map(|d| (d, usize::from(d >= 8))).collect(),
        };
        let doc_windows: HashMap<usize, Vec<usize>> =
            (0..12).map(|d| (d, vec![200, 100, 0])).collect();
        let args = Args::parse_from([
            "sparse_probing",
            "--sae",
            "x",
            "--train-per-class",
            "5",
            "--test-per-class",
            "4",
        ]);
        let (train, test) = choose_windows(&task, &docs, &doc_windows, &args);
        let docs_of = |l: &Labelled, c: usize| -> Vec<usize> {
            l.iter().filter(|w| w.1 == c).map(|w| w.0.0).collect()
        };
        // Class 0: documents 3 and 7 (every fourth by id) are held out.
        assert_eq!(
            docs_of(&train, 0),
            vec![0, 1, 2, 4, 5],
            "one window from each of five documents first"
        );
        assert!(
            train.iter().filter(|w| w.1 == 0).all(|w| w.0.1 == 200),
            "each document's first window in its order"
        );
        assert_eq!(docs_of(&test, 0), vec![3, 7, 3, 7]);
        // Class 1: document 11 held out, its three windows all that the test split can have.
        assert_eq!(docs_of(&train, 1), vec![8, 9, 10, 8, 9]);
        assert_eq!(docs_of(&test, 1), vec![11, 11, 11]);
        for (tr, _) in &train {
            assert!(
                !test.iter().any(|(te, _)| te.0 == tr.0),
                "document {} in both splits",
                tr.0
            );
        }
    }

    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["sparse_probing", "--sae", "x"],
            &[
                ("--train-per-class", "0"),
                ("--test-per-class", "0"),
                ("--batch-size", "0"),
            ],
        );
    }
}
