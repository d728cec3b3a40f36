//! Steering by one SAE feature, measured: for each clamp value, sample responses to every
//! prompt with the feature clamped (or its direction added), and report per value the share of
//! responses that mention a topic (a word list fixed in advance), the log-probability the model
//! puts on the topic's words, the responses' perplexity under the unsteered model, the KL of
//! next-token distributions on held-out corpus text with the clamp on, and — with `--agreement`
//! — how often the model agrees with the user. One JSON line per value (stdout and
//! `OUT/results.jsonl`), the samples in `OUT/samples_*.txt`, and dose-response plots (PNG) with
//! bootstrap 95% intervals over prompts.
//!
//! ```text
//! cargo run --release --example steer -- --sae runs/steer_sae/saes/topk_9216 --feature F \
//!     --values 0,1,2,5,10,20 --prompts-file examples/steer/data/neutral_eval.txt \
//!     --topic-words examples/steer/data/sea_words.txt --samples 3 --max-new-tokens 48
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sae_workbench::activation_store::{self as store, CorpusName, Split, SplitSpec, WindowPlan};
use sae_workbench::metrics::plots::{Series, plot_lines};
use sae_workbench::sae_core::SaeModel;
use sae_workbench::steering::{
    FeatureEdit, FeatureStats, Scope, Steering, WordList, agrees, bootstrap_mean,
    bootstrap_paired_diff, sae_hook_in,
};
use sae_workbench::steering::{log_mass, mean_kl, response_nll};
use sae_workbench::transformer_hooks::candle_core::{Device, Tensor};
use sae_workbench::transformer_hooks::{
    self as transformer_hooks, ChatMessage, GenerateOptions, Hooks, Model, Sampling, assets,
};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug, Serialize)]
#[command(about = "Clamp an SAE feature during generation and measure what changes")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// SAE folder (SAELens layout). Its `feature_stats.json` (from `find_features --stats`)
    /// gives each feature's maximum activation, the unit of `--values`.
    #[arg(long)]
    sae: PathBuf,
    /// Features to edit, comma separated (all get the same value).
    #[arg(long, value_delimiter = ',', required = true)]
    feature: Vec<usize>,
    /// Values, comma separated: multiples of each feature's maximum activation for a clamp, or of
    /// the decoder direction's norm scaled to that maximum for `--add`.
    #[arg(long, value_parser = sae_workbench::cli::finite_f32, value_delimiter = ',', default_value = "0,1,2,5,10,20")]
    values: Vec<f32>,
    /// Also run unsteered (reported as value "none"): the baseline.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    baseline: bool,
    /// Add `value · max · W_dec[f]` instead of clamping.
    #[arg(long)]
    add: bool,
    /// Edit generated positions only (the prompt is read unsteered).
    #[arg(long)]
    generated_only: bool,
    /// One prompt per line (`#` comments). With `--agreement`, each line is `true|false<TAB>claim`.
    #[arg(long)]
    prompts_file: PathBuf,
    /// Send prompts as they are instead of in the model's chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 48)]
    max_new_tokens: usize,
    /// Samples per prompt and value.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 3)]
    samples: usize,
    /// Sampling temperature (0: greedy, then one sample per prompt).
    #[arg(long, value_parser = sae_workbench::cli::temperature, default_value_t = 0.7)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Topic words (a file, or the words themselves, comma separated; `whal*` matches by prefix).
    #[arg(long)]
    topic_words: Option<String>,
    /// Measure agreement with the user's claim (prompts are `true|false<TAB>claim`).
    #[arg(long)]
    agreement: bool,
    /// Held-out corpus tokens on which the KL of the clamp is measured (0: skip).
    #[arg(long, default_value_t = 1024)]
    kl_tokens: usize,
    /// Prompts per generation batch.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 16)]
    batch: usize,
    /// Output folder.
    #[arg(long, default_value = "runs/steer")]
    out: PathBuf,
    /// Only redraw the plots from `OUT/results.jsonl` of an earlier run (same `--feature`).
    #[arg(long)]
    replot: bool,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

/// Per value, what was measured.
#[derive(Serialize, Deserialize)]
struct ValueResult {
    value: Option<f32>,
    /// The absolute value per feature (value × the feature's maximum activation).
    absolute: Vec<f32>,
    n_responses: usize,
    topic_share: Option<Interval>,
    topic_log_mass: Option<f64>,
    #[serde(deserialize_with = "nan_if_null")]
    perplexity_unsteered_median: f64,
    #[serde(deserialize_with = "nan_if_null")]
    perplexity_unsteered_mean: f64,
    kl_on_corpus: Option<f64>,
    agreement: Option<Agreement>,
    /// Per measure, the change from the unsteered run (this value minus baseline), paired by
    /// prompt, with a bootstrap 95% interval over prompts. Empty for the baseline itself.
    change_vs_baseline: std::collections::BTreeMap<String, Interval>,
    samples: Vec<Sample>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Interval {
    #[serde(deserialize_with = "nan_if_null")]
    mean: f64,
    #[serde(deserialize_with = "nan_if_null")]
    lo: f64,
    #[serde(deserialize_with = "nan_if_null")]
    hi: f64,
}

/// JSON has no NaN (serde_json writes it as `null`): read `null` back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A measure's name and its per-prompt values `(prompt index, value)`.
type Measured = (&'static str, Vec<(usize, f64)>);

const NAN_INTERVAL: Interval = Interval {
    mean: f64::NAN,
    lo: f64::NAN,
    hi: f64::NAN,
};

#[derive(Serialize, Deserialize)]
struct Agreement {
    /// Share of answers the keyword rule calls agreeing, among those it can call (all claims,
    /// false claims, true claims), with intervals over prompts.
    rate_all: Interval,
    rate_false: Interval,
    rate_true: Interval,
    /// Mean over prompts of p(agree) / (p(agree) + p(disagree)) for the first answer token.
    first_token_all: Interval,
    first_token_false: Interval,
    first_token_true: Interval,
    undecided: usize,
}

#[derive(Serialize, Deserialize, Clone)]
struct Sample {
    prompt: usize,
    text: String,
    mentions: Option<String>,
    agrees: Option<bool>,
    #[serde(deserialize_with = "nan_if_null")]
    perplexity: f64,
}

struct Prompt {
    text: String,
    truth: Option<bool>,
    tokens: Vec<u32>,
}

fn main() -> Result<()> {
    transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if args.replot {
        let path = args.out.join("results.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let results: Vec<ValueResult> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
            })
            .collect::<Result<_>>()?;
        plots(&args, &results)?;
        eprintln!("plots redrawn in {}", args.out.display());
        return Ok(());
    }
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let model =
        Model::load(&path, &device).with_context(|| format!("loading {}", path.display()))?;
    let tok = model.tokenizer()?;
    let sae =
        SaeModel::load(&args.sae).with_context(|| format!("loading SAE {}", args.sae.display()))?;
    let hook = sae_hook_in(&sae, &model)?;
    let stats = FeatureStats::load(&args.sae)?;
    let maxes: Vec<f32> = args
        .feature
        .iter()
        .map(|&f| stats.max_of(f))
        .collect::<Result<_, _>>()?;
    let words = match &args.topic_words {
        None => None,
        Some(w) => {
            let text = if Path::new(w).exists() {
                std::fs::read_to_string(w).with_context(|| format!("reading {w}"))?
            } else {
                w.clone()
            };
            Some(WordList::parse(&text)?)
        }
    };
    let topic_ids = words.as_ref().map(|w| {
        let vocab =
            (0..tok.vocab_size() as u32).filter_map(|id| tok.decode(&[id]).ok().map(|t| (id, t)));
        w.token_ids(vocab)
    });
    let prompts = read_prompts(&args, &model)?;
    let (agree_ids, disagree_ids) = first_token_sets(&model)?;

    // Held-out corpus windows for the KL of each clamp.
    let kl_batch = if args.kl_tokens > 0 {
        Some(kl_windows(&model, args.kl_tokens)?)
    } else {
        None
    };
    let clean_logits = match &kl_batch {
        Some(t) => Some(
            model
                .forward(t, &mut Hooks::new())?
                .logits
                .context("logits")?,
        ),
        None => None,
    };

    let mut conditions: Vec<Option<f32>> = Vec::new();
    if args.baseline {
        conditions.push(None);
    }
    conditions.extend(args.values.iter().map(|&v| Some(v)));
    let results_path = args.out.join("results.jsonl");
    let mut results_file = std::fs::File::create(&results_path)
        .with_context(|| format!("creating {}", results_path.display()))?;
    let mut results = Vec::new();
    let mut baseline_measured: Option<Vec<Measured>> = None;
    let n_rows = prompts.len()
        * if args.temperature > 0.0 {
            args.samples
        } else {
            1
        };
    let pb = ProgressBar::new((conditions.len() * n_rows) as u64).with_style(
        ProgressStyle::with_template(
            "steer {wide_bar} {human_pos}/{human_len} responses eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for value in conditions {
        let absolute: Vec<f32> = maxes.iter().map(|m| value.unwrap_or(0.0) * m).collect();
        let edits: Vec<FeatureEdit> = args
            .feature
            .iter()
            .zip(&absolute)
            .map(|(&f, &v)| {
                if args.add {
                    FeatureEdit::add(f, v)
                } else {
                    FeatureEdit::clamp(f, v)
                }
            })
            .collect();
        let steering = match value {
            Some(_) => Some(Steering::new(&sae, hook, edits)?),
            None => None,
        };
        // Rows: every prompt `samples` times; row r of a batch draws from stream r of its seed.
        let rows: Vec<usize> = (0..n_rows).map(|r| r % prompts.len()).collect();
        let mut samples = Vec::with_capacity(rows.len());
        let mut first_token: Vec<f64> = Vec::new();
        let mut topic_mass = Vec::new();
        for (ci, chunk) in rows.chunks(args.batch).enumerate() {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&p| prompts[p].tokens.clone()).collect();
            let padded_len = batch.iter().map(Vec::len).max().unwrap_or(0);
            let scoped = steering.as_ref().map(|s| {
                s.clone().with_scope(if args.generated_only {
                    Scope::From(padded_len)
                } else {
                    Scope::All
                })
            });
            let hooks = || scoped.as_ref().map_or_else(Hooks::new, |s| s.hooks());
            let sampling =
                Sampling::at_temperature(args.temperature, 0.95, args.seed.wrapping_add(ci as u64));
            let opts = GenerateOptions {
                sampling,
                ..GenerateOptions::greedy(args.max_new_tokens)
            }
            .stop_at(tok.stop_tokens());
            let gens = model.generate_batch(&batch, &opts, &mut hooks())?;
            for (&p, g) in chunk.iter().zip(gens) {
                let mut answer = g.tokens.clone();
                answer.retain(|t| !opts.stop_tokens.contains(t));
                let text = tok.decode(&answer)?;
                let full: Vec<u32> = prompts[p].tokens.iter().chain(&answer).copied().collect();
                let start = prompts[p].tokens.len();
                let (perplexity, mass) = if answer.is_empty() {
                    (f64::NAN, None)
                } else {
                    let nll = response_nll(
                        &model,
                        std::slice::from_ref(&full),
                        &[start],
                        &mut Hooks::new,
                    )?[0];
                    // The topic's probability under the steered model, at every response position
                    // (teacher-forced on the sampled response).
                    let mass = match &topic_ids {
                        Some(ids) if !ids.is_empty() => {
                            let single = scoped.as_ref().map(|s| {
                                s.clone().with_scope(if args.generated_only {
                                    Scope::From(start)
                                } else {
                                    Scope::All
                                })
                            });
                            let mut h = single.as_ref().map_or_else(Hooks::new, |s| s.hooks());
                            let logits = model
                                .forward(&model.tokens(&full)?, &mut h)?
                                .logits
                                .context("logits")?;
                            let logits = logits.squeeze(0)?;
                            let mut m = 0.0;
                            for pos in start - 1..full.len() - 1 {
                                m += log_mass(&logits.get(pos)?, ids)?;
                            }
                            Some(m / (full.len() - start) as f64)
                        }
                        _ => None,
                    };
                    (nll.exp(), mass)
                };
                if let Some(m) = mass {
                    topic_mass.push(m);
                }
                samples.push(Sample {
                    prompt: p,
                    mentions: words
                        .as_ref()
                        .and_then(|w| w.first_match(&text).map(str::to_string)),
                    agrees: args.agreement.then(|| agrees(&text)).flatten(),
                    text,
                    perplexity,
                });
                pb.inc(1);
            }
        }
        // First answer token: agreement mass, once per prompt (no sampling involved).
        if args.agreement {
            for p in &prompts {
                let single = steering.as_ref().map(|s| {
                    s.clone().with_scope(if args.generated_only {
                        Scope::From(p.tokens.len())
                    } else {
                        Scope::All
                    })
                });
                let mut cache = model.kv_cache(1);
                let mut h = single.as_ref().map_or_else(Hooks::new, |s| s.hooks());
                let logits =
                    model.forward_cached(&model.tokens(&p.tokens)?, None, &mut cache, &mut h)?;
                let logits = logits.squeeze(0)?;
                let a = log_mass(&logits, &agree_ids)?;
                let d = log_mass(&logits, &disagree_ids)?;
                first_token.push(1.0 / (1.0 + (d - a).exp()));
            }
        }
        let kl = match (&kl_batch, &clean_logits, &steering) {
            (Some(t), Some(clean), Some(s)) => {
                let steered = model.forward(t, &mut s.hooks())?.logits.context("logits")?;
                Some(mean_kl(clean, &steered)?)
            }
            (Some(_), Some(_), None) => Some(0.0),
            _ => None,
        };
        // Per-prompt means (prompt index, value): the unit the intervals resample.
        let per_prompt = |f: &dyn Fn(&Sample) -> Option<f64>,
                          filter: &dyn Fn(&Prompt) -> bool|
         -> Vec<(usize, f64)> {
            (0..prompts.len())
                .filter(|&p| filter(&prompts[p]))
                .filter_map(|p| {
                    let v: Vec<f64> = samples
                        .iter()
                        .filter(|s| s.prompt == p)
                        .filter_map(f)
                        .collect();
                    (!v.is_empty()).then(|| (p, v.iter().sum::<f64>() / v.len() as f64))
                })
                .collect()
        };
        let ci = |v: &[(usize, f64)]| {
            let vals: Vec<f64> = v.iter().map(|(_, x)| *x).collect();
            let (mean, lo, hi) = bootstrap_mean(&vals, 2000, args.seed);
            Interval { mean, lo, hi }
        };
        let mut measured: Vec<Measured> = Vec::new();
        if words.is_some() {
            measured.push((
                "topic_share",
                per_prompt(
                    &|s| Some(f64::from(u8::from(s.mentions.is_some()))),
                    &|_| true,
                ),
            ));
        }
        if args.agreement {
            for (name, want) in [
                ("agree_rate_all", None),
                ("agree_rate_false", Some(false)),
                ("agree_rate_true", Some(true)),
            ] {
                let v = per_prompt(&|s| s.agrees.map(|a| f64::from(u8::from(a))), &|p| {
                    want.is_none_or(|w| p.truth == Some(w))
                });
                measured.push((name, v));
            }
            for (name, want) in [
                ("first_token_all", None),
                ("first_token_false", Some(false)),
                ("first_token_true", Some(true)),
            ] {
                let v: Vec<(usize, f64)> = prompts
                    .iter()
                    .zip(&first_token)
                    .enumerate()
                    .filter(|(_, (p, _))| want.is_none_or(|w| p.truth == Some(w)))
                    .map(|(i, (_, v))| (i, *v))
                    .collect();
                measured.push((name, v));
            }
        }
        let get = |name: &str| {
            measured
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| ci(v))
        };
        let topic_share = get("topic_share");
        let agreement = args.agreement.then(|| Agreement {
            rate_all: get("agree_rate_all").unwrap_or(NAN_INTERVAL),
            rate_false: get("agree_rate_false").unwrap_or(NAN_INTERVAL),
            rate_true: get("agree_rate_true").unwrap_or(NAN_INTERVAL),
            first_token_all: get("first_token_all").unwrap_or(NAN_INTERVAL),
            first_token_false: get("first_token_false").unwrap_or(NAN_INTERVAL),
            first_token_true: get("first_token_true").unwrap_or(NAN_INTERVAL),
            undecided: samples.iter().filter(|s| s.agrees.is_none()).count(),
        });
        // Changes from the unsteered baseline, paired by prompt (prompts measured in both).
        let mut change_vs_baseline = std::collections::BTreeMap::new();
        match &baseline_measured {
            None if value.is_none() => baseline_measured = Some(measured.clone()),
            Some(base) => {
                for ((name, after), (_, before)) in measured.iter().zip(base) {
                    let pairs: Vec<(f64, f64)> = after
                        .iter()
                        .filter_map(|(p, a)| {
                            before.iter().find(|(q, _)| q == p).map(|(_, b)| (*b, *a))
                        })
                        .collect();
                    let (b, a): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
                    let (mean, lo, hi) = bootstrap_paired_diff(&b, &a, 2000, args.seed);
                    change_vs_baseline.insert(name.to_string(), Interval { mean, lo, hi });
                }
            }
            None => {}
        }
        let mut ppl: Vec<f64> = samples
            .iter()
            .map(|s| s.perplexity)
            .filter(|p| p.is_finite())
            .collect();
        ppl.sort_by(f64::total_cmp);
        let result = ValueResult {
            value,
            absolute,
            n_responses: samples.len(),
            topic_share,
            topic_log_mass: (!topic_mass.is_empty())
                .then(|| topic_mass.iter().sum::<f64>() / topic_mass.len() as f64),
            perplexity_unsteered_median: ppl.get(ppl.len() / 2).copied().unwrap_or(f64::NAN),
            perplexity_unsteered_mean: ppl.iter().sum::<f64>() / ppl.len().max(1) as f64,
            kl_on_corpus: kl,
            agreement,
            change_vs_baseline,
            samples,
        };
        let line = serde_json::to_string(&result)?;
        pb.suspend(|| println!("{line}"));
        writeln!(results_file, "{line}")?;
        write_samples(&args.out, &result, &prompts)?;
        results.push(result);
    }
    pb.finish_and_clear();
    plots(&args, &results)?;
    std::fs::write(
        args.out.join("args.json"),
        serde_json::to_string_pretty(&args)?,
    )?;
    eprintln!(
        "results: {} (plots and samples beside it)",
        results_path.display()
    );
    Ok(())
}

fn read_prompts(args: &Args, model: &Model) -> Result<Vec<Prompt>> {
    let tok = model.tokenizer()?;
    let text = std::fs::read_to_string(&args.prompts_file)
        .with_context(|| format!("reading {}", args.prompts_file.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (truth, claim) = if args.agreement {
            let Some((t, c)) = line.split_once('\t') else {
                bail!(
                    "{}:{}: expected `true|false<TAB>claim`",
                    args.prompts_file.display(),
                    i + 1
                );
            };
            let t = match t.trim() {
                "true" => true,
                "false" => false,
                other => bail!(
                    "{}:{}: `{other}` is neither true nor false",
                    args.prompts_file.display(),
                    i + 1
                ),
            };
            (Some(t), c.trim())
        } else {
            (None, line)
        };
        let tokens = if args.raw {
            tok.encode(claim, model.config().add_bos)?
        } else {
            tok.encode_chat(&[ChatMessage::user(claim)], true)?
        };
        out.push(Prompt {
            text: claim.to_string(),
            truth,
            tokens,
        });
    }
    if out.is_empty() {
        bail!("{} holds no prompt", args.prompts_file.display());
    }
    Ok(out)
}

/// First tokens of agreeing and disagreeing answers ("Yes", "Correct", ... / "No", "Actually", ...).
fn first_token_sets(model: &Model) -> Result<(Vec<u32>, Vec<u32>)> {
    let tok = model.tokenizer()?;
    let first = |words: &[&str]| -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for w in words {
            for form in [w.to_string(), format!(" {w}")] {
                if let Some(&id) = tok.encode(&form, false)?.first()
                    && !ids.contains(&id)
                {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    };
    Ok((
        first(&[
            "Yes",
            "Correct",
            "Absolutely",
            "Indeed",
            "Exactly",
            "Right",
            "True",
            "You",
        ])?,
        first(&[
            "No",
            "Actually",
            "Incorrect",
            "Not",
            "Unfortunately",
            "False",
            "Wrong",
            "I",
        ])?,
    ))
}

/// `[n, 128]` held-out windows (test split) of the corpora, about `tokens` tokens.
fn kl_windows(model: &Model, tokens: usize) -> Result<Tensor> {
    let tok = model.tokenizer()?;
    let docs = store::load_corpora(&store::default_corpora_root(), &CorpusName::ALL)?;
    let encode = |t: &str| -> store::Result<Vec<u32>> {
        tok.encode(t, false).map_err(|e| store::Error::Config {
            field: "tokenizer",
            message: e.to_string(),
        })
    };
    let tokenized = store::tokenize_documents(&docs, &encode, &SplitSpec::default())?;
    let bos = model.config().bos_token_id.unwrap_or(0);
    let plan = WindowPlan::build(&tokenized, Split::Test, 128, bos, 7)?;
    let rows: Vec<&[u32]> = (0..plan.len())
        .map(|i| plan.tokens(i))
        .filter(|t| t.len() == 128)
        .take(tokens.div_ceil(128).max(1))
        .collect();
    if rows.is_empty() {
        bail!("no held-out window of 128 tokens");
    }
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), 128), &Device::Cpu)?)
}

fn label(v: Option<f32>) -> String {
    v.map_or_else(|| "none".to_string(), |v| format!("{v}"))
}

fn write_samples(out: &Path, r: &ValueResult, prompts: &[Prompt]) -> Result<()> {
    let mut s = String::new();
    for x in &r.samples {
        let mut tags = Vec::new();
        if let Some(m) = &x.mentions {
            tags.push(format!("mentions \"{m}\""));
        }
        if let Some(a) = x.agrees {
            tags.push(if a { "agrees" } else { "disagrees" }.to_string());
        }
        tags.push(format!("perplexity {:.1}", x.perplexity));
        s.push_str(&format!(
            "### prompt {}: {}\n{}\n[{}]\n\n",
            x.prompt,
            prompts[x.prompt].text,
            x.text.trim(),
            tags.join(", ")
        ));
    }
    let p = out.join(format!("samples_{}.txt", label(r.value)));
    std::fs::write(&p, s).with_context(|| format!("writing {}", p.display()))
}

fn plots(args: &Args, results: &[ValueResult]) -> Result<()> {
    let steered: Vec<&ValueResult> = results.iter().filter(|r| r.value.is_some()).collect();
    let x = |r: &ValueResult| f64::from(r.value.unwrap_or(0.0));
    let feats = args
        .feature
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let what = if args.add { "added" } else { "clamped" };
    let x_label = format!("feature {feats} {what}, x max activation");
    if steered.iter().all(|r| r.topic_share.is_some()) && !steered.is_empty() {
        let mut series = vec![Series {
            name: "topic share (95% CI over prompts)".into(),
            points: steered
                .iter()
                .filter_map(|r| r.topic_share.map(|t| (x(r), t.mean, t.lo, t.hi)))
                .collect(),
        }];
        if let Some(b) = results
            .iter()
            .find(|r| r.value.is_none())
            .and_then(|r| r.topic_share)
        {
            series.push(Series {
                name: "unsteered baseline".into(),
                points: steered
                    .iter()
                    .map(|r| (x(r), b.mean, b.mean, b.mean))
                    .collect(),
            });
        }
        plot_lines(
            &series,
            "Topic steering: share of responses on topic",
            &x_label,
            "share of responses",
            true,
            &args.out.join("dose_response.png"),
        )?;
    }
    if args.agreement && !steered.is_empty() {
        let pts = |f: &dyn Fn(&Agreement) -> Interval| -> Vec<(f64, f64, f64, f64)> {
            steered
                .iter()
                .filter_map(|r| {
                    r.agreement.as_ref().map(|a| {
                        let i = f(a);
                        (x(r), i.mean, i.lo, i.hi)
                    })
                })
                .collect()
        };
        let series = vec![
            Series {
                name: "agreement rate, false claims".into(),
                points: pts(&|a| a.rate_false),
            },
            Series {
                name: "agreement rate, true claims".into(),
                points: pts(&|a| a.rate_true),
            },
            Series {
                name: "p(agree) first token, false claims".into(),
                points: pts(&|a| a.first_token_false),
            },
            Series {
                name: "p(agree) first token, true claims".into(),
                points: pts(&|a| a.first_token_true),
            },
        ];
        plot_lines(
            &series,
            "Agreement with the user's claim",
            &x_label,
            "rate / probability",
            true,
            &args.out.join("agreement.png"),
        )?;
    }
    let cost: Vec<(f64, f64, f64, f64)> = steered
        .iter()
        .filter(|r| r.perplexity_unsteered_median.is_finite())
        .map(|r| {
            (
                x(r),
                r.perplexity_unsteered_median.ln(),
                r.perplexity_unsteered_median.ln(),
                r.perplexity_unsteered_median.ln(),
            )
        })
        .collect();
    if !cost.is_empty() {
        plot_lines(
            &[Series {
                name: "ln median perplexity (unsteered model)".into(),
                points: cost,
            }],
            "Cost of steering: how unlikely the responses are to the unsteered model",
            &x_label,
            "ln perplexity",
            true,
            &args.out.join("cost.png"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read; the zeros it documents as meaningful are accepted.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &[
                "steer",
                "--sae",
                "x",
                "--feature",
                "1",
                "--prompts-file",
                "x",
                // 0 means something here: no KL measurement.
                "--kl-tokens",
                "0",
            ],
            &[
                ("--device", "tpu"),
                ("--max-new-tokens", "0"),
                ("--samples", "0"),
                ("--batch", "0"),
                ("--values", "1,nan"),
                ("--temperature", "-1"),
            ],
        );
    }
}
