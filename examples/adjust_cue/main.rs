//! Cue adjustment: a prompt triggers a feature you do not want; find the words responsible and
//! propose an edited prompt (words deleted, the sentence or clause holding them dropped, a word or
//! phrase replaced by a near-synonym from WordNet or a list, or a rephrasing written by the model
//! itself) on which the feature's peak activation falls below `--threshold` of its original,
//! keeping the meaning: the edited prompt must still predict the original prompt's answer
//! (`steering::cue::meaning_score` at least `--min-meaning`), read about as naturally
//! (`--max-fluency-cost`), leave no hole in the grammar (`steering::cue::grammar_jump` at most
//! `--max-grammar-jump`) and stay a question if it was one.
//!
//! One case (`--prompt TEXT --feature F`) or many (`--cases FILE`, lines `FEATURE<TAB>PROMPT`),
//! one JSON line per case and a summary; `--calibrate FILE` (lines
//! `paraphrase|unrelated<TAB>PROMPT A<TAB>PROMPT B`) prints the meaning scores of paraphrase and
//! unrelated pairs, to set `--min-meaning` before running the cases; `--calibrate-grammar FILE`
//! (lines `good|broken<TAB>ORIGINAL<TAB>EDIT`) prints the grammar jumps of good and broken word
//! edits, to set `--max-grammar-jump`; `--calibrate-senses FILE` (lines
//! `right|wrong<TAB>ORIGINAL<TAB>EDIT`) prints the sense similarities of right- and wrong-sense
//! word replacements (`steering::cue::sense_similarity`, reported with each replacement; too weak
//! on this model to be a bar).
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
    AdjustOptions, Adjustment, Candidate, EditKind, adjust, grammar_jump, meaning_score,
    parse_synonyms, sense_similarity, text_nll, token_nlls,
};
use sae_workbench::steering::{FeatureStats, activations, sae_hook_in};
use sae_workbench::transformer_hooks::{
    self as transformer_hooks, ChatMessage, GenerateOptions, Hooks, Model, assets,
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
    #[arg(long, value_parser = sae_workbench::cli::finite_f32, default_value_t = 0.1)]
    threshold: f32,
    /// Meaning bar: mean log-prob change of the original answer (nats per token). The default
    /// separates the 12 paraphrase pairs (-0.46 to +0.01) from the 12 unrelated pairs (-2.22 to
    /// -0.69) of `examples/adjust_cue/data/calibration.tsv` without error on SmolLM2-135M.
    #[arg(long, default_value_t = AdjustOptions::default().min_meaning)]
    min_meaning: f64,
    /// Fluency bar: the edit's mean NLL per token as the user's turn minus the original's (nats). The
    /// default is the largest cost among the 12 hand-written paraphrases of the calibration file
    /// (rounded up), so that an edit may read as unnaturally as a real paraphrase, no more.
    #[arg(long, default_value_t = AdjustOptions::default().max_fluency_cost)]
    max_fluency_cost: f64,
    /// Pairs `good|broken<TAB>ORIGINAL<TAB>EDIT` whose grammar jumps calibrate
    /// `--max-grammar-jump`.
    #[arg(long)]
    calibrate_grammar: Option<PathBuf>,
    /// Grammar bar: the largest rise in NLL (nats) of a word the edit left in place after it.
    /// The default separates the 15 good from the 15 broken word edits (1 error in 30) of
    /// `examples/adjust_cue/data/edits.tsv` on SmolLM2-135M.
    #[arg(long, default_value_t = AdjustOptions::default().max_grammar_jump)]
    max_grammar_jump: f64,
    /// Pairs `right|wrong<TAB>ORIGINAL<TAB>EDIT` (one word replaced by a word of its sense in
    /// the sentence, or of another sense): how well the sense similarity reported with each
    /// replacement (cosine at the SAE's hook between the word and its replacement) tells them
    /// apart.
    #[arg(long)]
    calibrate_senses: Option<PathBuf>,
    /// Do not try dropping the sentence or clause that holds the responsible word.
    #[arg(long)]
    no_drop_clauses: bool,
    /// Near-synonyms: lines `word or phrase<TAB>synonym, synonym, ...`.
    #[arg(long)]
    synonyms: Option<PathBuf>,
    /// WordNet 3.0 `dict` folder for near-synonyms of the prompt's words and phrases (default:
    /// `assets/wordnet` when present; fetch it with `python3 scripts/fetch_assets.py wordnet`).
    #[arg(long)]
    wordnet: Option<PathBuf>,
    /// Use no WordNet synonyms, only `--synonyms`.
    #[arg(long, conflicts_with = "wordnet")]
    no_wordnet: bool,
    /// WordNet senses of each word or phrase whose synonyms are tried, most frequent first (per
    /// part of speech, in WordNet's order: nouns, verbs, adjectives, adverbs).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 1)]
    wordnet_senses: usize,
    /// Also offer WordNet's broader words for each sense, after its synonyms ("vessel" for
    /// "ship", "legislature" for "Congress", "levy" for "tax").
    #[arg(long)]
    wordnet_broader: bool,
    /// WordNet synonyms tried per word or phrase.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 8)]
    wordnet_per_word: usize,
    /// Rephrasings asked of the model per case (0: none).
    #[arg(long, default_value_t = 4)]
    rephrasings: usize,
    /// Tokens of the original prompt's greedy answer that the meaning score predicts.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 32)]
    answer_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (`cases.jsonl`, `summary.json`).
    #[arg(long, default_value = "runs/adjust_cue")]
    out: PathBuf,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

#[derive(Serialize)]
struct CaseResult {
    label: String,
    #[serde(flatten)]
    adjustment: Adjustment,
}

fn main() -> Result<()> {
    transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let model =
        Model::load(&path, &device).with_context(|| format!("loading {}", path.display()))?;
    let sae =
        SaeModel::load(&args.sae).with_context(|| format!("loading SAE {}", args.sae.display()))?;
    let hook = sae_hook_in(&sae, &model)?;
    let stats = FeatureStats::load(&args.sae).ok();
    if let Some(p) = &args.calibrate {
        calibrate(&model, &args, p)?;
    }
    if let Some(p) = &args.calibrate_grammar {
        calibrate_grammar(&model, p)?;
    }
    if let Some(p) = &args.calibrate_senses {
        calibrate_senses(&model, &sae, hook, p)?;
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
        if args.calibrate.is_some()
            || args.calibrate_grammar.is_some()
            || args.calibrate_senses.is_some()
        {
            return Ok(());
        }
        bail!(
            "nothing to do: give --prompt and --feature, --cases FILE, --calibrate FILE, \
             --calibrate-grammar FILE or --calibrate-senses FILE"
        );
    }
    let synonyms = match &args.synonyms {
        Some(p) => parse_synonyms(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| p.display().to_string())?,
        None => Vec::new(),
    };
    let thesaurus = if args.no_wordnet {
        None
    } else {
        let (dir, asked) = match &args.wordnet {
            Some(d) => (d.clone(), true),
            None => (assets::assets_dir().join("wordnet"), false),
        };
        if asked || dir.is_dir() {
            let t = sae_workbench::wordnet::thesaurus(&dir, args.wordnet_broader)
                .with_context(|| format!("reading WordNet from {}", dir.display()))?;
            eprintln!("WordNet: {}", dir.display());
            Some(t)
        } else {
            eprintln!(
                "WordNet: none at {} (python3 scripts/fetch_assets.py wordnet); only --synonyms",
                dir.display()
            );
            None
        }
    };
    let opts = AdjustOptions {
        threshold: args.threshold,
        min_meaning: args.min_meaning,
        max_fluency_cost: args.max_fluency_cost,
        max_grammar_jump: args.max_grammar_jump,
        drop_clauses: !args.no_drop_clauses,
        synonyms,
        rephrasings: args.rephrasings,
        answer_tokens: args.answer_tokens,
        seed: args.seed,
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
        let mut synonyms = opts.synonyms.clone();
        if let Some(t) = &thesaurus {
            synonyms.extend(t.synonyms_for(prompt, args.wordnet_senses, args.wordnet_per_word));
        }
        let case_opts = AdjustOptions {
            seed: args.seed + ci as u64,
            synonyms,
            ..opts.clone()
        };
        let r = adjust(&model, &sae, hook, prompt, *feature, &case_opts)?;
        let r = CaseResult {
            label,
            adjustment: r,
        };
        let a = &r.adjustment;
        eprintln!(
            "[{}/{}] #{} [{}] {:.2} -> {}  {:?} => {}",
            ci + 1,
            cases.len(),
            a.feature,
            r.label,
            a.activation_before,
            a.proposed.as_ref().map_or("-".to_string(), |c| format!(
                "{:.2} (meaning {:.2})",
                c.activation, c.meaning
            )),
            a.prompt,
            a.proposed
                .as_ref()
                .map_or("(no edit passes every bar)", |c| c.text.as_str()),
        );
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
        results.push(r);
    }
    let valid: Vec<&Adjustment> = results
        .iter()
        .map(|r| &r.adjustment)
        .filter(|r| r.activation_before > 0.0)
        .collect();
    let n = valid.len().max(1) as f64;
    let chosen: Vec<&Candidate> = valid.iter().filter_map(|r| r.proposed.as_ref()).collect();
    let by_kind: Vec<serde_json::Value> = [
        EditKind::Delete,
        EditKind::DropSentence,
        EditKind::DropClause,
        EditKind::Synonym,
        EditKind::Rephrase,
    ]
    .iter()
    .map(|k| {
        let n = chosen.iter().filter(|c| c.kind == *k).count();
        serde_json::json!({"kind": k, "proposed": n})
    })
    .collect();
    // The issue's own criterion, beside the stricter one above: some edit silences the feature
    // with the meaning score above its bar, whatever its fluency, grammar, sense and form.
    let silenced_with_meaning = valid
        .iter()
        .filter(|r| {
            r.candidates.iter().any(|c| {
                c.activation <= args.threshold * r.activation_before
                    && c.meaning >= args.min_meaning
            })
        })
        .count();
    let summary = serde_json::json!({
        "cases": results.len(),
        "triggered": valid.len(),
        "threshold": args.threshold,
        "min_meaning": args.min_meaning,
        "max_fluency_cost": args.max_fluency_cost,
        "max_grammar_jump": args.max_grammar_jump,
        "silenced_with_meaning_rate": silenced_with_meaning as f64 / n,
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

/// Meaning scores of paraphrase and unrelated prompt pairs, and the bar that separates them best.
fn calibrate(model: &Model, args: &Args, path: &PathBuf) -> Result<()> {
    let tok = model.tokenizer()?;
    let encode = |text: &str| tok.encode_chat(&[ChatMessage::user(text)], true);
    let answer = |prompt: &[u32]| -> Result<Vec<u32>> {
        let opts = GenerateOptions::greedy(args.answer_tokens).stop_at(tok.stop_tokens());
        let mut a = model.generate(prompt, &opts, &mut Hooks::new())?.tokens;
        a.retain(|x| !opts.stop_tokens.contains(x));
        if a.is_empty() {
            bail!("the model gave an empty answer: no meaning to compare against");
        }
        Ok(a)
    };
    let mut scores: Vec<(bool, f64)> = Vec::new();
    let mut fluency: Vec<f64> = Vec::new();
    for (para, a, b) in read_pairs(path, "paraphrase", "unrelated")? {
        let (kind, a, b) = (
            if para { "paraphrase" } else { "unrelated" },
            a.as_str(),
            b.as_str(),
        );
        let ta = encode(a)?;
        let tb = encode(b)?;
        let s = meaning_score(model, &ta, &tb, &answer(&ta)?)?;
        let fluency_cost = text_nll(model, b)? - text_nll(model, a)?;
        println!(
            "{}",
            serde_json::json!({"kind": kind, "a": a, "b": b, "meaning": s, "fluency_cost": fluency_cost})
        );
        scores.push((para, s));
        if para {
            fluency.push(fluency_cost);
        }
    }
    // The bar with the fewest pairs on the wrong side (paraphrases below, unrelated at or above).
    let errors = |bar: f64| {
        scores
            .iter()
            .filter(|(p, s)| if *p { *s < bar } else { *s >= bar })
            .count()
    };
    let best_bar = best_cut(scores.iter().map(|s| s.1).collect(), errors);
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

/// Grammar jumps of good and broken edits, and the bar that separates them best.
fn calibrate_grammar(model: &Model, path: &PathBuf) -> Result<()> {
    let mut jumps: Vec<(bool, f64)> = Vec::new();
    for (good, a, b) in read_pairs(path, "good", "broken")? {
        let (kind, a, b) = (if good { "good" } else { "broken" }, a.as_str(), b.as_str());
        let (ia, na) = token_nlls(model, a)?;
        let (ib, nb) = token_nlls(model, b)?;
        // An edit that is the original's last sentences starts a sentence (see `grammar_jump`).
        let starts_a_sentence = a.len() > b.len()
            && a.ends_with(b)
            && a[..a.len() - b.len()].trim_end().ends_with(['.', '!', '?']);
        let j = grammar_jump((&ia, &na), (&ib, &nb), starts_a_sentence);
        println!(
            "{}",
            serde_json::json!({"kind": kind, "original": a, "edit": b, "grammar_jump": j})
        );
        jumps.push((good, j));
    }
    // Good edits above the bar and broken ones at or below it are the errors.
    let errors = |bar: f64| {
        jumps
            .iter()
            .filter(|(g, j)| if *g { *j > bar } else { *j <= bar })
            .count()
    };
    let best_bar = best_cut(jumps.iter().map(|j| j.1).collect(), errors);
    let range = |want: bool| value_range(&jumps, want);
    println!(
        "{}",
        serde_json::json!({
            "calibration": path.display().to_string(),
            "good": range(true),
            "broken": range(false),
            "best_bar": best_bar,
            "misclassified_at_best_bar": errors(best_bar),
        })
    );
    Ok(())
}

/// Sense similarities of right- and wrong-sense replacements, and the bar that separates them
/// best. The direction removed is that of the feature firing hardest at the replaced word's last
/// token in the original, standing for the unwanted feature that the word triggers in a case.
fn calibrate_senses(
    model: &Model,
    sae: &SaeModel,
    hook: sae_workbench::transformer_hooks::HookPoint,
    path: &PathBuf,
) -> Result<()> {
    let tok = model.tokenizer()?;
    let encode = |text: &str| tok.encode_chat(&[ChatMessage::user(text)], true);
    let mut sims: Vec<(bool, f64)> = Vec::new();
    let mut by_original: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for (right, a, b) in read_pairs(path, "right", "wrong")? {
        let (ta, tb) = (encode(&a)?, encode(&b)?);
        let suffix = ta
            .iter()
            .rev()
            .zip(tb.iter().rev())
            .take_while(|(x, y)| x == y)
            .count();
        let pos = ta.len().saturating_sub(suffix + 1);
        let row = activations(model, sae, hook, &ta)?.swap_remove(pos);
        let feature = (0..row.len())
            .max_by(|&i, &j| row[i].total_cmp(&row[j]))
            .context("an SAE with no features")?;
        let Some(s) = sense_similarity(model, sae, hook, &ta, &tb, feature)? else {
            bail!("{}: `{a}` and `{b}` replace no word", path.display());
        };
        let kind = if right { "right" } else { "wrong" };
        println!(
            "{}",
            serde_json::json!({"kind": kind, "original": a, "edit": b, "feature": feature, "sense": s})
        );
        sims.push((right, s));
        let at = match by_original.iter().position(|o| o.0 == a) {
            Some(i) => i,
            None => {
                by_original.push((a.clone(), Vec::new(), Vec::new()));
                by_original.len() - 1
            }
        };
        let o = &mut by_original[at];
        if right { &mut o.1 } else { &mut o.2 }.push(s);
    }
    // Per original, pairs of a right and a wrong replacement where the right one scores higher.
    let ranked_right = by_original
        .iter()
        .flat_map(|(_, r, w)| r.iter().flat_map(move |x| w.iter().map(move |y| x > y)))
        .filter(|&b| b)
        .count();
    // Right replacements below the bar and wrong ones at or above it are the errors.
    let errors = |bar: f64| {
        sims.iter()
            .filter(|(r, s)| if *r { *s < bar } else { *s >= bar })
            .count()
    };
    let best_bar = best_cut(sims.iter().map(|s| s.1).collect(), errors);
    let range = |want: bool| value_range(&sims, want);
    println!(
        "{}",
        serde_json::json!({
            "calibration": path.display().to_string(),
            "right": range(true),
            "wrong": range(false),
            "best_bar": best_bar,
            "misclassified_at_best_bar": errors(best_bar),
            "pairs_ranked_right": ranked_right,
        })
    );
    Ok(())
}

/// The lines `KIND<TAB>A<TAB>B` of a calibration file (`#` comments), KIND `yes` or `no`:
/// `(KIND == yes, A, B)`.
fn read_pairs(path: &PathBuf, yes: &str, no: &str) -> Result<Vec<(bool, String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split('\t').collect();
        let [kind, a, b] = parts[..] else {
            bail!("{}:{}: expected KIND<TAB>A<TAB>B", path.display(), i + 1);
        };
        let kind = kind.trim();
        if kind != yes && kind != no {
            bail!(
                "{}:{}: `{kind}` is neither {yes} nor {no}",
                path.display(),
                i + 1
            );
        }
        out.push((kind == yes, a.to_string(), b.to_string()));
    }
    Ok(out)
}

/// Count, smallest and largest of the values of one kind of a calibration's pairs.
fn value_range(scored: &[(bool, f64)], want: bool) -> serde_json::Value {
    let v: Vec<f64> = scored.iter().filter(|s| s.0 == want).map(|s| s.1).collect();
    serde_json::json!({
        "n": v.len(),
        "min": v.iter().copied().fold(f64::INFINITY, f64::min),
        "max": v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

/// The midpoint between two neighbouring `values` with the fewest `errors`.
fn best_cut(mut values: Vec<f64>, errors: impl Fn(f64) -> usize) -> f64 {
    values.sort_by(f64::total_cmp);
    values
        .windows(2)
        .map(|w| (w[0] + w[1]) / 2.0)
        .min_by_key(|&b| errors(b))
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["adjust_cue", "--sae", "x"],
            &[
                ("--device", "tpu"),
                ("--answer-tokens", "0"),
                ("--threshold", "nan"),
            ],
        );
    }
}
