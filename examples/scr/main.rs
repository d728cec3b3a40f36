//! Spurious correlation removal (SAEBench's SCR) on the pinned corpora, with layout as the
//! spurious attribute: a probe trained on texts where a concept always came with one layout
//! learns the layout; can ablating an SAE's layout latents make it read the concept?
//!
//! Sparse probing found layout latents (line breaks, double spaces after a full stop) that tell
//! some classes apart better than their words do. Here that is turned into SAEBench's SCR test.
//! Each pair of classes is the concept (Shakespeare's tragedies against his comedies, tested on
//! whole held-out plays; *Emma* against *Pride and Prejudice*; Austen against *Moby-Dick*). Every
//! window is drawn from the text as printed (its line breaks kept) or from the text with its lines
//! joined (`flattened`): that is the spurious attribute. The biased probe is trained on printed
//! windows of the first class and flattened windows of the second; the concept probe and the
//! layout probe on all four groups; each is tested on held-out windows of all four groups. The
//! latents that matter most to the layout probe are zero-ablated (the SAE's error kept), and the
//! score is the share of the biased probe's gap to the concept probe that the ablation closes
//! (`metrics::spurious_correlation_removal`). Neurons ablated the same way are the baseline.
//!
//! ```text
//! cargo run --release --example scr -- \
//!     --sae runs/main/saes/topk_12288 --sae runs/main/saes/standard_12288
//! ```
//!
//! Writes `results.json` (SAEBench's `scr_metric_threshold_{n}` per source, averaged over the
//! pairs, and everything per pair), `scr_<pair>.png` (the biased and concept probes' accuracy
//! against N) and `report.html` into `--out`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;

use metrics::plots::{Series, plot_lines};
use metrics::{
    FeatureSource, PooledFeatures, ScrAblation, ScrConfig, ScrProbes, TwoAttributes,
    spurious_correlation_removal,
};
use serde::Serialize;

#[path = "../sparse_probing/tasks.rs"]
mod tasks;
use tasks::{
    Labelled, Setup, Task, WindowKey, choose_windows, load_all_corpora, make_task,
    tokenize_documents, window_orders, window_tokens,
};

/// A concept: two classes of one of the probing tasks.
struct Pair {
    name: &'static str,
    task: &'static str,
    /// The class the biased probe sees printed (the concept's positive side).
    first: &'static str,
    /// The class it sees flattened.
    second: &'static str,
}

const PAIRS: [Pair; 3] = [
    Pair {
        name: "tragedy_comedy",
        task: "shakespeare_genre",
        first: "tragedy",
        second: "comedy",
    },
    Pair {
        name: "emma_pride",
        task: "austen_novel",
        first: "emma",
        second: "prideprejudice",
    },
    Pair {
        name: "austen_moby",
        task: "source",
        first: "austen",
        second: "moby-dick",
    },
];

#[derive(Parser, Debug)]
#[command(about = "Spurious correlation removal: can ablating layout latents unbias a probe?")]
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
    /// Pairs, comma-separated (default all): tragedy_comedy, emma_pride, austen_moby.
    #[arg(long, value_delimiter = ',')]
    pairs: Vec<String>,
    /// Window length including BOS (SAEBench: 128).
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Training windows per group (class x layout).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 100)]
    train_per_group: usize,
    /// Held-out windows per group.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 50)]
    test_per_group: usize,
    /// Numbers of latents (and neurons) ablated, comma-separated (SAEBench: 2,5,10,20,50,100,500).
    #[arg(long, value_delimiter = ',', value_parser = sae_workbench::cli::at_least_one,
          default_value = "2,5,10,20,50,100,500")]
    n: Vec<usize>,
    /// Windows per forward pass.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 8)]
    batch_size: usize,
    /// Seed of the window choice.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// `cpu`, or `cuda` (build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output folder.
    #[arg(long, default_value = "runs/scr")]
    out: PathBuf,
}

/// `task` cut down to the pair's two classes: 0 is `second`, 1 is `first` (the concept).
fn pair_task(pair: &Pair, task: &Task) -> anyhow::Result<Task> {
    let find = |c: &str| {
        task.classes
            .iter()
            .position(|k| k == c)
            .with_context(|| format!("pair {}: task {} has no class {c}", pair.name, task.name))
    };
    let (first, second) = (find(pair.first)?, find(pair.second)?);
    Ok(Task {
        name: task.name,
        about: task.about,
        classes: vec![pair.second.to_string(), pair.first.to_string()],
        docs: task
            .docs
            .iter()
            .filter_map(|&(d, c)| {
                if c == first {
                    Some((d, 1))
                } else if c == second {
                    Some((d, 0))
                } else {
                    None
                }
            })
            .collect(),
    })
}

/// Keeps the first `n` windows of each class, so that the four groups (class x layout) of a split
/// are of one size and neither attribute predicts the other.
fn equal_groups(printed: &Labelled, flat: &Labelled) -> (Labelled, Labelled, usize) {
    let count = |l: &Labelled, c: usize| l.iter().filter(|w| w.1 == c).count();
    let n = [0, 1]
        .iter()
        .flat_map(|&c| [count(printed, c), count(flat, c)])
        .min()
        .unwrap_or(0);
    let take = |l: &Labelled| -> Labelled {
        let mut seen = [0usize; 2];
        l.iter()
            .filter(|w| {
                seen[w.1] += 1;
                seen[w.1] <= n
            })
            .copied()
            .collect()
    };
    (take(printed), take(flat), n)
}

/// One pair's windows: (layout printed?, window, class) per split.
struct PairWindows {
    train: Vec<(bool, WindowKey, usize)>,
    test: Vec<(bool, WindowKey, usize)>,
    per_group: (usize, usize),
}

#[derive(Serialize)]
struct PairResult {
    pair: String,
    concept: String,
    windows_per_group: (usize, usize),
    probes: ProbeAccuracies,
    /// Source name (`neurons` or an SAE) → one ablation per n.
    ablations: BTreeMap<String, Vec<ScrAblation>>,
    /// SAE name → its three most layout-laden latents: (latent, mean pooled code on printed
    /// held-out windows, on flattened ones).
    layout_latents: BTreeMap<String, Vec<(usize, f64, f64)>>,
}

#[derive(Serialize)]
struct ProbeAccuracies {
    biased: f64,
    biased_on_layout: f64,
    concept: f64,
    layout: f64,
}

fn main() -> anyhow::Result<()> {
    sae_workbench::transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let t0 = Instant::now();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {}", args.device))?;
    if args.n.is_empty() {
        bail!("--n is empty: give the numbers of latents to ablate");
    }
    let pairs: Vec<&Pair> = if args.pairs.is_empty() {
        PAIRS.iter().collect()
    } else {
        args.pairs
            .iter()
            .map(|p| {
                PAIRS.iter().find(|k| k.name == p).with_context(|| {
                    let known: Vec<&str> = PAIRS.iter().map(|k| k.name).collect();
                    format!("--pairs: unknown pair {p:?}; known: {}", known.join(", "))
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
    let tok = model.tokenizer()?;
    let docs = load_all_corpora()?;

    let pair_tasks: Vec<Task> = pairs
        .iter()
        .map(|p| pair_task(p, &make_task(p.task, &docs)))
        .collect::<anyhow::Result<_>>()?;
    let mut needed: Vec<usize> = pair_tasks
        .iter()
        .flat_map(|t| t.docs.iter().map(|d| d.0))
        .collect();
    needed.sort_unstable();
    needed.dedup();
    eprintln!(
        "tokenizing {} documents, as printed and flattened",
        needed.len()
    );
    let printed_tokens = tokenize_documents(tok, &docs, &needed, false)?;
    let flat_tokens = tokenize_documents(tok, &docs, &needed, true)?;
    let printed_orders = window_orders(
        &printed_tokens,
        &docs,
        args.context,
        bos.is_some(),
        args.seed,
    );
    let flat_orders = window_orders(&flat_tokens, &docs, args.context, bos.is_some(), args.seed);

    let mut per_pair = Vec::new();
    for (p, t) in pairs.iter().zip(&pair_tasks) {
        let (tr_p, te_p) = choose_windows(
            t,
            &docs,
            &printed_orders,
            args.train_per_group,
            args.test_per_group,
        );
        let (tr_f, te_f) = choose_windows(
            t,
            &docs,
            &flat_orders,
            args.train_per_group,
            args.test_per_group,
        );
        let (tr_p, tr_f, n_tr) = equal_groups(&tr_p, &tr_f);
        let (te_p, te_f, n_te) = equal_groups(&te_p, &te_f);
        if n_tr == 0 || n_te == 0 {
            bail!(
                "pair {}: a group has no windows of {} tokens ({n_tr} training, {n_te} held out \
                 per group): lower --context",
                p.name,
                args.context
            );
        }
        if n_tr < args.train_per_group || n_te < args.test_per_group {
            eprintln!(
                "pair {}: {n_tr} training and {n_te} held-out windows per group",
                p.name
            );
        }
        let tag = |l: Labelled, printed: bool| l.into_iter().map(move |(k, c)| (printed, k, c));
        per_pair.push(PairWindows {
            train: tag(tr_p, true).chain(tag(tr_f, false)).collect(),
            test: tag(te_p, true).chain(tag(te_f, false)).collect(),
            per_group: (n_tr, n_te),
        });
    }
    // Every window once: printed ones first, then flattened.
    let mut printed_index: BTreeMap<WindowKey, usize> = BTreeMap::new();
    let mut flat_index: BTreeMap<WindowKey, usize> = BTreeMap::new();
    for w in &per_pair {
        for &(printed, k, _) in w.train.iter().chain(&w.test) {
            let index = if printed {
                &mut printed_index
            } else {
                &mut flat_index
            };
            let n = index.len();
            index.entry(k).or_insert(n);
        }
    }
    let mut windows = window_tokens(&printed_index, &printed_tokens, bos, args.context);
    let offset = windows.len();
    windows.extend(window_tokens(&flat_index, &flat_tokens, bos, args.context));
    let row_of = |printed: bool, k: &WindowKey| {
        if printed {
            printed_index[k]
        } else {
            offset + flat_index[k]
        }
    };
    eprintln!(
        "{} windows of {} tokens for {} pairs; model {}, hook {hook}, {} SAE(s)",
        windows.len(),
        args.context,
        pairs.len(),
        model_path.display(),
        saes.len()
    );
    let (neurons, codes) = setup.pooled_features(&windows, args.batch_size)?;
    let features_s = t0.elapsed().as_secs_f64();

    let cfg = ScrConfig {
        n_values: args.n.clone(),
        ..ScrConfig::default()
    };
    let mut results = Vec::new();
    for (p, w) in pairs.iter().zip(&per_pair) {
        let rows = |list: &[(bool, WindowKey, usize)], f: &PooledFeatures| -> Vec<f32> {
            list.iter()
                .flat_map(|(printed, k, _)| {
                    let i = row_of(*printed, k);
                    f.rows[i * f.d..(i + 1) * f.d].iter().copied()
                })
                .collect()
        };
        let concept =
            |l: &[(bool, WindowKey, usize)]| -> Vec<bool> { l.iter().map(|w| w.2 == 1).collect() };
        let layout =
            |l: &[(bool, WindowKey, usize)]| -> Vec<bool> { l.iter().map(|w| w.0).collect() };
        let (xtr, xte) = (rows(&w.train, &neurons), rows(&w.test, &neurons));
        let (ctr, cte) = (concept(&w.train), concept(&w.test));
        let (ltr, lte) = (layout(&w.train), layout(&w.test));
        let train = TwoAttributes {
            x: &xtr,
            d: neurons.d,
            concept: &ctr,
            spurious: &ltr,
        };
        let test = TwoAttributes {
            x: &xte,
            d: neurons.d,
            concept: &cte,
            spurious: &lte,
        };
        eprintln!("SCR on {}", p.name);
        let probes = ScrProbes::fit(train, test, cfg.c)?;
        let mut ablations = BTreeMap::new();
        ablations.insert(
            "neurons".to_string(),
            spurious_correlation_removal(&probes, train, test, FeatureSource::Neurons, &cfg)?,
        );
        let mut layout_latents = BTreeMap::new();
        for ((name, sae), f) in names.iter().zip(saes).zip(&codes) {
            let (ktr, kte) = (rows(&w.train, f), rows(&w.test, f));
            let source = FeatureSource::Latents {
                sae,
                train_codes: &ktr,
                test_codes: &kte,
            };
            let res = spurious_correlation_removal(&probes, train, test, source, &cfg)?;
            // What the first latents ablated do: their mean code on printed and on flattened
            // held-out windows.
            let first: Vec<(usize, f64, f64)> = res
                .iter()
                .max_by_key(|a| a.n)
                .map(|a| {
                    a.features
                        .iter()
                        .take(3)
                        .map(|&l| {
                            let mean = |printed: bool| {
                                let v: Vec<f64> = (0..lte.len())
                                    .filter(|&i| lte[i] == printed)
                                    .map(|i| f64::from(kte[i * f.d + l]))
                                    .collect();
                                v.iter().sum::<f64>() / v.len().max(1) as f64
                            };
                            (l, mean(true), mean(false))
                        })
                        .collect()
                })
                .unwrap_or_default();
            layout_latents.insert(name.clone(), first);
            ablations.insert(name.clone(), res);
        }
        results.push(PairResult {
            pair: p.name.to_string(),
            concept: format!(
                "{} (printed in the biased training set) against {} (flattened)",
                p.first, p.second
            ),
            windows_per_group: w.per_group,
            probes: ProbeAccuracies {
                biased: probes.biased_accuracy,
                biased_on_layout: probes.biased_on_spurious_accuracy,
                concept: probes.concept_accuracy,
                layout: probes.spurious_accuracy,
            },
            ablations,
            layout_latents,
        });
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    let mut sources = vec!["neurons".to_string()];
    sources.extend(names.iter().cloned());
    let summary = summarise(&results, &sources, &cfg);
    let out = serde_json::json!({
        "model": model_path,
        "hook": hook,
        "saes": args.sae,
        "context": args.context,
        "train_per_group": args.train_per_group,
        "test_per_group": args.test_per_group,
        "windows": windows.len(),
        "config": cfg,
        "seed": args.seed,
        "summary": summary,
        "pairs": results,
        "seconds": { "features": features_s, "total": t0.elapsed().as_secs_f64() },
    });
    let json_path = args.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    plot(&results, &sources, &cfg, &args.out)?;
    let html_path = args.out.join("report.html");
    std::fs::write(
        &html_path,
        report(&results, &sources, &cfg, hook, model_path),
    )
    .with_context(|| format!("writing {}", html_path.display()))?;

    println!("spurious correlation removal at {hook} (layout as the spurious attribute):");
    for r in &results {
        println!(
            "  {}: biased probe {:.3} (reads layout {:.3}), concept probe {:.3}, layout probe {:.3}",
            r.pair, r.probes.biased, r.probes.biased_on_layout, r.probes.concept, r.probes.layout
        );
    }
    println!("score, the share of the biased probe's gap closed (mean over pairs):");
    for s in &sources {
        let line: Vec<String> = cfg
            .n_values
            .iter()
            .map(|&n| {
                let v = summary[s][format!("scr_metric_threshold_{n}")].as_f64();
                format!("N={n} {:.3}", v.unwrap_or(f64::NAN))
            })
            .collect();
        println!("  {s:>16}: {}", line.join(", "));
    }
    println!(
        "wrote {}, report.html and a PNG per pair in {:.0} s",
        json_path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The mean of the defined values, or `None`.
fn mean_of(v: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Per source and n, SAEBench's `scr_metric_threshold_{n}` (mean over the pairs whose biased
/// probe had a gap to close) and the biased probe's mean accuracy after the ablation.
fn summarise(results: &[PairResult], sources: &[String], cfg: &ScrConfig) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for s in sources {
        let mut m = serde_json::Map::new();
        for &n in &cfg.n_values {
            let at = |r: &PairResult| r.ablations[s].iter().find(|a| a.n == n).cloned();
            m.insert(
                format!("scr_metric_threshold_{n}"),
                mean_of(results.iter().map(|r| at(r).and_then(|a| a.score))).into(),
            );
            m.insert(
                format!("biased_accuracy_{n}"),
                mean_of(results.iter().map(|r| at(r).map(|a| a.biased_accuracy))).into(),
            );
            m.insert(
                format!("layout_accuracy_{n}"),
                mean_of(results.iter().map(|r| at(r).map(|a| a.spurious_accuracy))).into(),
            );
        }
        out.insert(s.clone(), m.into());
    }
    out.into()
}

/// One PNG per pair: the biased and the concept probe's held-out accuracy after ablating N of
/// each source's dimensions (a mean score over pairs would hide what the ablation does to each).
fn plot(
    results: &[PairResult],
    sources: &[String],
    cfg: &ScrConfig,
    out: &Path,
) -> anyhow::Result<()> {
    type Pick = fn(&ScrAblation) -> f64;
    let picks: [(&str, Pick); 2] = [
        ("biased probe", |a| a.biased_accuracy),
        ("concept probe", |a| a.concept_accuracy),
    ];
    for r in results {
        let mut series = Vec::new();
        for s in sources {
            for (what, pick) in picks {
                let points = r.ablations[s]
                    .iter()
                    .filter(|a| cfg.n_values.contains(&a.n))
                    .map(|a| {
                        let v = pick(a);
                        (a.n as f64, v, v, v)
                    })
                    .collect();
                series.push(Series {
                    name: format!("{s}: {what}"),
                    points,
                });
            }
        }
        plot_lines(
            &series,
            &format!("{}: concept accuracy with the layout ablated", r.pair),
            "N (latents or neurons ablated)",
            "held-out concept accuracy",
            true,
            &out.join(format!("scr_{}.png", r.pair)),
        )?;
    }
    Ok(())
}

fn report(
    results: &[PairResult],
    sources: &[String],
    cfg: &ScrConfig,
    hook: &str,
    model: &Path,
) -> String {
    use metrics::html::escape_html as esc;
    let mut h = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>SCR: {hook}</title>\
         <style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         td.l,th.l{{text-align:left}}code{{background:#f4f4f4}}</style></head><body>\
         <h1>Spurious correlation removal at <code>{}</code></h1><p>Model <code>{}</code>. The \
         spurious attribute is layout: a window is drawn from the text as printed or with its \
         lines joined. The biased probe learnt the concept from printed windows of the first \
         class and flattened windows of the second; the concept and layout probes from all four \
         groups. The N latents (or neurons) that matter most to the layout probe are \
         zero-ablated in held-out windows (the SAE's error kept). Score: (biased probe's accuracy \
         after − before) / (concept probe's − biased probe's before).</p>\
",
        esc(hook),
        esc(&model.display().to_string())
    );
    for r in results {
        h += &format!(
            "<h2>{}</h2><p>{}; {} training and {} held-out windows per group. Held-out accuracy \
             with nothing ablated: biased probe {:.3} (against the layout labels {:.3}), concept \
             probe {:.3}, layout probe {:.3}.</p><table><tr><th class=l>source</th>",
            esc(&r.pair),
            esc(&r.concept),
            r.windows_per_group.0,
            r.windows_per_group.1,
            r.probes.biased,
            r.probes.biased_on_layout,
            r.probes.concept,
            r.probes.layout
        );
        for &n in &cfg.n_values {
            h += &format!("<th>N = {n}: score (biased / layout probe)</th>");
        }
        h += "</tr>";
        for s in sources {
            h += &format!("<tr><td class=l>{}</td>", esc(s));
            for a in &r.ablations[s] {
                let score = a.score.map_or("–".to_string(), |v| format!("{v:.2}"));
                h += &format!(
                    "<td>{score} ({:.3} / {:.3})</td>",
                    a.biased_accuracy, a.spurious_accuracy
                );
            }
            h += "</tr>";
        }
        h += &format!("</table><img src=\"scr_{}.png\" width=\"640\">", r.pair);
        h += "<p>The three latents of each SAE that matter most to the layout probe, \
              with their mean code on printed / flattened held-out windows: ";
        let cells: Vec<String> = r
            .layout_latents
            .iter()
            .map(|(s, ls)| {
                let l: Vec<String> = ls
                    .iter()
                    .map(|(l, a, b)| format!("#{l} ({a:.3} / {b:.3})"))
                    .collect();
                format!("{}: {}", esc(s), l.join(", "))
            })
            .collect();
        h += &cells.join("; ");
        h += "</p>";
    }
    h + "</body></html>"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_take_two_classes_of_their_task() {
        let task = Task {
            name: "t",
            about: "",
            classes: vec!["a".into(), "b".into(), "c".into()],
            docs: vec![(0, 0), (1, 1), (2, 2), (3, 2)],
        };
        let pair = Pair {
            name: "p",
            task: "t",
            first: "c",
            second: "a",
        };
        let t = pair_task(&pair, &task).unwrap();
        assert_eq!(t.classes, ["a", "c"]);
        assert_eq!(t.docs, vec![(0, 0), (2, 1), (3, 1)]);
        let bad = Pair { first: "z", ..pair };
        let e = pair_task(&bad, &task).err().unwrap().to_string();
        assert!(e.contains("has no class z"), "{e}");
        // Every built-in pair names classes its task has, in the real corpora.
        let Ok(docs) = load_all_corpora() else {
            eprintln!("skipping: corpora not fetched (python3 scripts/fetch_assets.py corpora)");
            return;
        };
        for p in &PAIRS {
            let t = pair_task(p, &make_task(p.task, &docs)).unwrap();
            for c in 0..2 {
                assert!(
                    t.docs.iter().filter(|d| d.1 == c).count() >= 4,
                    "{}",
                    p.name
                );
            }
        }
    }

    #[test]
    fn the_four_groups_are_cut_to_one_size() {
        let l = |spec: &[usize]| -> Labelled {
            spec.iter().enumerate().map(|(i, &c)| ((i, 0), c)).collect()
        };
        let printed = l(&[0, 1, 0, 1, 0, 0, 1]); // 4 of class 0, 3 of class 1
        let flat = l(&[1, 0, 1, 1, 1]); // 1 of class 0, 4 of class 1
        let (p, f, n) = equal_groups(&printed, &flat);
        assert_eq!(n, 1);
        assert_eq!(p, vec![((0, 0), 0), ((1, 0), 1)], "the first of each class");
        assert_eq!(f, vec![((0, 0), 1), ((1, 0), 0)]);
    }

    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["scr", "--sae", "x"],
            &[
                ("--train-per-group", "0"),
                ("--test-per-group", "0"),
                ("--batch-size", "0"),
                ("--n", "0"),
            ],
        );
    }
}
