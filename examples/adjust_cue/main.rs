//! Cue adjustment: a prompt triggers a feature you do not want; find the words responsible and
//! propose an edited prompt (words deleted, a word replaced by a near-synonym from a list, or a
//! rephrasing written by the model itself) on which the feature's peak activation falls below
//! `--threshold` of its original, keeping the meaning: the edited prompt must still predict the
//! original prompt's answer (`steering::cue::meaning_score` at least `--min-meaning`).
//!
//! One case (`--prompt TEXT --feature F`) or many (`--cases FILE`, lines `FEATURE<TAB>PROMPT`),
//! one JSON line per case and a summary; `--calibrate FILE` (lines
//! `paraphrase|unrelated<TAB>PROMPT A<TAB>PROMPT B`) prints the meaning scores of paraphrase and
//! unrelated pairs, to set `--min-meaning` before running the cases.
//!
//! ```text
//! cargo run --release --example adjust_cue -- --sae runs/steer_sae/saes/topk_9216 \
//!     --prompt "I feel all at sea with my chemistry homework. Can you help?" --feature 4639
//! ```

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sae_workbench::sae_core::SaeModel;
use sae_workbench::steering::cue::{
    Bars, Candidate, EditKind, best, edited, meaning_score, prompt_peak, responsible, text_nll,
    word_effects, words,
};
use sae_workbench::steering::{FeatureStats, sae_hook};
use sae_workbench::transformer_hooks::candle_core::Device;
use sae_workbench::transformer_hooks::{
    self as transformer_hooks, ChatMessage, GenerateOptions, Hooks, Model, Sampling, assets,
};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Edit a prompt so that an unwanted SAE feature stays quiet, keeping its meaning")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// SAE folder (its `feature_stats.json`, if present, supplies labels).
    #[arg(long)]
    sae: PathBuf,
    /// The prompt (sent in the chat template).
    #[arg(long, requires = "feature")]
    prompt: Option<String>,
    /// The unwanted feature.
    #[arg(long)]
    feature: Option<usize>,
    /// Many cases: lines `FEATURE<TAB>PROMPT` (`#` comments).
    #[arg(long)]
    cases: Option<PathBuf>,
    /// Pairs `paraphrase|unrelated<TAB>A<TAB>B` whose meaning scores calibrate `--min-meaning`.
    #[arg(long)]
    calibrate: Option<PathBuf>,
    /// Success: the feature's peak on the edited prompt at most this fraction of the original's.
    #[arg(long, default_value_t = 0.1)]
    threshold: f32,
    /// Meaning bar: mean log-prob change of the original answer (nats per token). The default
    /// separates the 12 paraphrase pairs (-0.46 to +0.01) from the 12 unrelated pairs (-2.22 to
    /// -0.69) of `examples/adjust_cue/data/calibration.tsv` without error on SmolLM2-135M.
    #[arg(long, default_value_t = -0.575)]
    min_meaning: f64,
    /// Fluency bar: the edit's mean NLL per token as plain text minus the original's (nats). The
    /// default is the largest cost among the 12 hand-written paraphrases of the calibration file
    /// (rounded up), so that an edit may read as unnaturally as a real paraphrase, no more.
    #[arg(long, default_value_t = FLUENCY_BAR)]
    max_fluency_cost: f64,
    /// Near-synonyms: lines `word<TAB>synonym, synonym, ...`.
    #[arg(long)]
    synonyms: Option<PathBuf>,
    /// Rephrasings asked of the model per case (0: none).
    #[arg(long, default_value_t = 4)]
    rephrasings: usize,
    /// Tokens of the original prompt's greedy answer that the meaning score predicts.
    #[arg(long, default_value_t = 32)]
    answer_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (`cases.jsonl`, `summary.json`).
    #[arg(long, default_value = "runs/adjust_cue")]
    out: PathBuf,
}

/// See `--max-fluency-cost`.
const FLUENCY_BAR: f64 = 0.8;

#[derive(Serialize)]
struct CaseResult {
    prompt: String,
    feature: usize,
    label: String,
    activation_before: f32,
    /// The word most responsible, and the peak with it deleted.
    responsible_words: Vec<(String, f32)>,
    proposed: Option<Candidate>,
    /// The lowest activation reached by any candidate (whatever its meaning).
    lowest_activation: f32,
    success: bool,
    candidates: Vec<Candidate>,
}

struct Ctx<'a> {
    model: &'a Model,
    sae: &'a SaeModel,
    hook: sae_workbench::transformer_hooks::HookPoint,
    args: &'a Args,
}

impl Ctx<'_> {
    fn encode(&self, text: &str) -> sae_workbench::steering::Result<Vec<u32>> {
        Ok(self
            .model
            .tokenizer()?
            .encode_chat(&[ChatMessage::user(text)], true)?)
    }

    fn generate(&self, prompt: &[u32], n: usize, sampling: Sampling) -> Result<Vec<Vec<u32>>> {
        let tok = self.model.tokenizer()?;
        let opts = GenerateOptions {
            sampling,
            ..GenerateOptions::greedy(self.args.answer_tokens.max(8))
        }
        .stop_at(tok.stop_tokens());
        let prompts = vec![prompt.to_vec(); n];
        let gens = self
            .model
            .generate_batch(&prompts, &opts, &mut Hooks::new())?;
        Ok(gens
            .into_iter()
            .map(|g| {
                let mut t = g.tokens;
                t.retain(|x| !opts.stop_tokens.contains(x));
                t
            })
            .collect())
    }

    fn answer(&self, prompt: &[u32]) -> Result<Vec<u32>> {
        let mut a = self.generate(prompt, 1, Sampling::Greedy)?.remove(0);
        a.truncate(self.args.answer_tokens);
        if a.is_empty() {
            bail!("the model gave an empty answer: no meaning to compare against");
        }
        Ok(a)
    }
}

fn main() -> Result<()> {
    transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    if !(args.threshold > 0.0 && args.threshold < 1.0) {
        bail!("--threshold must be in (0, 1)");
    }
    if args.answer_tokens == 0 {
        bail!("--answer-tokens must be at least 1");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let model =
        Model::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
    let sae =
        SaeModel::load(&args.sae).with_context(|| format!("loading SAE {}", args.sae.display()))?;
    let hook = sae_hook(&sae)?;
    let stats = FeatureStats::load(&args.sae).ok();
    let ctx = Ctx {
        model: &model,
        sae: &sae,
        hook,
        args: &args,
    };

    if let Some(p) = &args.calibrate {
        calibrate(&ctx, p)?;
    }
    let mut cases: Vec<(usize, String)> = Vec::new();
    if let (Some(p), Some(f)) = (&args.prompt, args.feature) {
        cases.push((f, p.clone()));
    }
    if let Some(file) = &args.cases {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((f, p)) = line.split_once('\t') else {
                bail!("{}:{}: expected FEATURE<TAB>PROMPT", file.display(), i + 1);
            };
            let f: usize = f
                .trim()
                .parse()
                .with_context(|| format!("{}:{}: `{f}` is not a feature", file.display(), i + 1))?;
            cases.push((f, p.trim().to_string()));
        }
    }
    if cases.is_empty() {
        if args.calibrate.is_some() {
            return Ok(());
        }
        bail!("nothing to do: give --prompt and --feature, --cases FILE, or --calibrate FILE");
    }
    let synonyms = match &args.synonyms {
        Some(p) => read_synonyms(p)?,
        None => Vec::new(),
    };
    let out_path = args.out.join("cases.jsonl");
    let mut out = std::fs::File::create(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let mut results = Vec::new();
    for (ci, (feature, prompt)) in cases.iter().enumerate() {
        let label = stats
            .as_ref()
            .and_then(|s| s.labels.get(*feature).cloned())
            .unwrap_or_default();
        let r = adjust(
            &ctx,
            *feature,
            prompt,
            label,
            &synonyms,
            args.seed + ci as u64,
        )?;
        eprintln!(
            "[{}/{}] #{} [{}] {:.2} -> {}  {:?} => {}",
            ci + 1,
            cases.len(),
            r.feature,
            r.label,
            r.activation_before,
            r.proposed.as_ref().map_or("-".to_string(), |c| format!(
                "{:.2} (meaning {:.2})",
                c.activation, c.meaning
            )),
            r.prompt,
            r.proposed
                .as_ref()
                .map_or("(no edit passes both bars)", |c| c.text.as_str()),
        );
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
        results.push(r);
    }
    let valid: Vec<&CaseResult> = results
        .iter()
        .filter(|r| r.activation_before > 0.0)
        .collect();
    let n = valid.len().max(1) as f64;
    let chosen: Vec<&Candidate> = valid.iter().filter_map(|r| r.proposed.as_ref()).collect();
    let by_kind: Vec<serde_json::Value> = [EditKind::Delete, EditKind::Synonym, EditKind::Rephrase]
        .iter()
        .map(|k| {
            let n = chosen.iter().filter(|c| c.kind == *k).count();
            serde_json::json!({"kind": k, "proposed": n})
        })
        .collect();
    let summary = serde_json::json!({
        "cases": results.len(),
        "triggered": valid.len(),
        "threshold": args.threshold,
        "min_meaning": args.min_meaning,
        "max_fluency_cost": args.max_fluency_cost,
        "success_rate": valid.iter().filter(|r| r.success).count() as f64 / n,
        "mean_activation_before": valid.iter().map(|r| f64::from(r.activation_before)).sum::<f64>() / n,
        "mean_activation_after_proposed": chosen.iter().map(|c| f64::from(c.activation)).sum::<f64>() / chosen.len().max(1) as f64,
        "mean_meaning_proposed": chosen.iter().map(|c| c.meaning).sum::<f64>() / chosen.len().max(1) as f64,
        "by_kind": by_kind,
    });
    println!("{summary}");
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    eprintln!("cases: {}", out_path.display());
    Ok(())
}

fn adjust(
    ctx: &Ctx,
    feature: usize,
    prompt: &str,
    label: String,
    synonyms: &[(String, Vec<String>)],
    seed: u64,
) -> Result<CaseResult> {
    let (model, sae, hook, args) = (ctx.model, ctx.sae, ctx.hook, ctx.args);
    let orig = ctx.encode(prompt)?;
    let (peak, _) = prompt_peak(model, sae, hook, &orig, feature)?;
    let mut result = CaseResult {
        prompt: prompt.to_string(),
        feature,
        label,
        activation_before: peak,
        responsible_words: Vec::new(),
        proposed: None,
        lowest_activation: peak,
        success: false,
        candidates: Vec::new(),
    };
    if peak <= 0.0 {
        return Ok(result);
    }
    let answer = ctx.answer(&orig)?;
    let nll0 = text_nll(model, prompt)?;
    let ws = words(prompt);
    let effects = word_effects(model, sae, hook, &|t| ctx.encode(t), prompt, feature)?;
    let resp = responsible(&effects, peak, 3);
    result.responsible_words = resp
        .iter()
        .map(|&i| (ws[i].to_string(), effects[i]))
        .collect();

    let mut texts: Vec<(String, EditKind)> = Vec::new();
    for n in 1..=resp.len() {
        texts.push((edited(&ws, &resp[..n], None), EditKind::Delete));
    }
    let norm = |w: &str| {
        w.trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase()
    };
    for &i in &resp {
        let key = norm(ws[i]);
        for (word, syns) in synonyms {
            if *word == key {
                for s in syns {
                    // Keep the punctuation around the word.
                    let w = ws[i];
                    let start = w.find(|c: char| c.is_alphanumeric()).unwrap_or(0);
                    let end = w
                        .rfind(|c: char| c.is_alphanumeric())
                        .map_or(w.len(), |e| e + 1);
                    let replaced = format!("{}{}{}", &w[..start], s, &w[end..]);
                    texts.push((edited(&ws, &[], Some((i, &replaced))), EditKind::Synonym));
                }
            }
        }
    }
    if args.rephrasings > 0 {
        let avoid: Vec<String> = resp
            .iter()
            .map(|&i| format!("\"{}\"", norm(ws[i])))
            .collect();
        let ask = format!(
            "Rewrite this request in other words, without the word {}. Reply with the rewritten request only.\n\n{}",
            avoid.first().cloned().unwrap_or_default(),
            prompt
        );
        let gens = ctx.generate(
            &ctx.encode(&ask)?,
            args.rephrasings,
            Sampling::Sample {
                temperature: 0.8,
                top_k: None,
                top_p: Some(0.95),
                seed,
            },
        )?;
        let tok = model.tokenizer()?;
        for g in gens {
            let text = tok.decode(&g)?;
            let line = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .trim_matches('"')
                .to_string();
            if !line.is_empty() {
                texts.push((line, EditKind::Rephrase));
            }
        }
    }
    texts.dedup();
    for (text, kind) in texts {
        if text.trim().is_empty() {
            continue;
        }
        let t = ctx.encode(&text)?;
        let (activation, _) = prompt_peak(model, sae, hook, &t, feature)?;
        let meaning = meaning_score(model, &orig, &t, &answer)?;
        let fluency_cost = text_nll(model, &text)? - nll0;
        result.lowest_activation = result.lowest_activation.min(activation);
        result.candidates.push(Candidate {
            text,
            kind,
            activation,
            meaning,
            fluency_cost,
        });
    }
    let bars = Bars {
        max_activation: args.threshold * peak,
        min_meaning: args.min_meaning,
        max_fluency_cost: args.max_fluency_cost,
    };
    result.proposed = best(&result.candidates, bars).cloned();
    result.success = result.proposed.is_some();
    Ok(result)
}

fn read_synonyms(path: &PathBuf) -> Result<Vec<(String, Vec<String>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((w, s)) = line.split_once('\t') else {
            bail!(
                "{}:{}: expected word<TAB>synonym, synonym",
                path.display(),
                i + 1
            );
        };
        out.push((
            w.trim().to_lowercase(),
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
        ));
    }
    Ok(out)
}

/// Meaning scores of paraphrase and unrelated prompt pairs, and the bar that separates them best.
fn calibrate(ctx: &Ctx, path: &PathBuf) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut scores: Vec<(bool, f64)> = Vec::new();
    let mut fluency: Vec<f64> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split('\t').collect();
        let [kind, a, b] = parts[..] else {
            bail!("{}:{}: expected KIND<TAB>A<TAB>B", path.display(), i + 1);
        };
        let para = match kind.trim() {
            "paraphrase" => true,
            "unrelated" => false,
            other => bail!(
                "{}:{}: `{other}` is neither paraphrase nor unrelated",
                path.display(),
                i + 1
            ),
        };
        let ta = ctx.encode(a)?;
        let tb = ctx.encode(b)?;
        let answer = ctx.answer(&ta)?;
        let s = meaning_score(ctx.model, &ta, &tb, &answer)?;
        let fluency_cost = text_nll(ctx.model, b)? - text_nll(ctx.model, a)?;
        println!(
            "{}",
            serde_json::json!({"kind": kind.trim(), "a": a, "b": b, "meaning": s, "fluency_cost": fluency_cost})
        );
        scores.push((para, s));
        if para {
            fluency.push(fluency_cost);
        }
    }
    // The bar with the fewest pairs on the wrong side (paraphrases below, unrelated at or above).
    let mut cuts: Vec<f64> = scores.iter().map(|s| s.1).collect();
    cuts.sort_by(f64::total_cmp);
    let errors = |bar: f64| {
        scores
            .iter()
            .filter(|(p, s)| if *p { *s < bar } else { *s >= bar })
            .count()
    };
    let best_bar = cuts
        .windows(2)
        .map(|w| (w[0] + w[1]) / 2.0)
        .min_by_key(|&b| errors(b))
        .unwrap_or(f64::NAN);
    let stats = |want: bool| {
        let mut v: Vec<f64> = scores.iter().filter(|s| s.0 == want).map(|s| s.1).collect();
        v.sort_by(f64::total_cmp);
        serde_json::json!({
            "n": v.len(),
            "min": v.first(),
            "median": v.get(v.len() / 2),
            "max": v.last(),
        })
    };
    println!(
        "{}",
        serde_json::json!({
            "calibration": path.display().to_string(),
            "paraphrase": stats(true),
            "unrelated": stats(false),
            "best_bar": best_bar,
            "paraphrase_fluency_cost_max": fluency.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            "misclassified_at_best_bar": errors(best_bar),
        })
    );
    Ok(())
}
