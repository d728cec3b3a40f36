//! Traits with every response: generate answers to a file of prompts (optionally with features
//! clamped), then list under each answer the SAE features most characteristic of it
//! (`steering::traits`: activation relative to each feature's maximum, summed over the answer,
//! weighted by ln(1 / firing rate)), with their labels and the tokens where they fire. Printed in
//! the terminal, one JSON line per response in `OUT/traits.jsonl`, and `OUT/traits.html`.
//!
//! `--expect F` reports how often feature F is among the top traits: the check that traits mean
//! something (clamp a topic feature on, and it should be there; leave it off, and it should not).
//!
//! ```text
//! cargo run --release --example traits -- --sae runs/steer_sae/saes/topk_9216 \
//!     --prompts-file examples/steer/data/neutral_eval.txt --clamp 4639=2 --expect 4639
//! ```

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sae_workbench::metrics::html::escape_html;
use sae_workbench::sae_core::SaeModel;
use sae_workbench::steering::{
    FeatureEdit, FeatureStats, Steering, Trait, TraitOptions, sae_hook_in, traits,
};
use sae_workbench::transformer_hooks::{
    self as transformer_hooks, ChatMessage, GenerateOptions, Hooks, Model, Sampling, assets,
};
use serde::Serialize;

#[derive(Parser, Debug, Serialize)]
#[command(about = "Generate answers and show the SAE features most characteristic of each")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// SAE folder with `feature_stats.json` (from `find_features --cache`).
    #[arg(long)]
    sae: PathBuf,
    /// One prompt per line (`#` comments), sent in the model's chat template.
    #[arg(long)]
    prompts_file: PathBuf,
    /// `F=V`: clamp feature F to V times its maximum activation while generating (repeatable).
    #[arg(long, value_parser = parse_clamp)]
    clamp: Vec<(usize, f32)>,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 48)]
    max_new_tokens: usize,
    /// Samples per prompt.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 1)]
    samples: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, value_parser = sae_workbench::cli::temperature, default_value_t = 0.7)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Traits listed per response.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 5)]
    top: usize,
    /// Features firing on more than this fraction of tokens are not traits (at 0.05, features of
    /// "was", "I", "a" crowd the list).
    #[arg(long, value_parser = sae_workbench::cli::fraction, default_value_t = 0.01)]
    max_firing_rate: f64,
    /// Features whose firing positions overlap a stronger trait's by at least this Jaccard index
    /// are listed under it rather than as traits of their own; above 1, never.
    #[arg(long, value_parser = sae_workbench::cli::positive, default_value_t = 0.6)]
    merge_overlap: f64,
    /// Report the share of responses with this feature among their top traits.
    #[arg(long)]
    expect: Option<usize>,
    /// Prompts per generation batch.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 16)]
    batch: usize,
    /// Output folder.
    #[arg(long, default_value = "runs/traits")]
    out: PathBuf,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

fn parse_clamp(s: &str) -> Result<(usize, f32), String> {
    let (f, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected FEATURE=VALUE, e.g. 4639=2"))?;
    let f = f
        .trim()
        .parse()
        .map_err(|_| format!("`{f}` is not a feature index"))?;
    let v: f32 = v
        .trim()
        .parse()
        .map_err(|_| format!("`{v}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("`{s}`: the value must be finite"));
    }
    Ok((f, v))
}

#[derive(Serialize)]
struct Row {
    prompt: String,
    response: String,
    clamp: Vec<(usize, f32)>,
    traits: Vec<Trait>,
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
    let tok = model.tokenizer()?;
    let sae =
        SaeModel::load(&args.sae).with_context(|| format!("loading SAE {}", args.sae.display()))?;
    let hook = sae_hook_in(&sae, &model)?;
    let stats = FeatureStats::load(&args.sae)?;
    if let Some(f) = args.expect
        && f >= sae.d_sae()
    {
        bail!("--expect {f}: the SAE has {} features", sae.d_sae());
    }
    let edits = args
        .clamp
        .iter()
        .map(|&(f, v)| Ok(FeatureEdit::clamp(f, v * stats.max_of(f)?)))
        .collect::<Result<Vec<_>>>()?;
    let steering = if edits.is_empty() {
        None
    } else {
        Some(Steering::new(&sae, hook, edits)?)
    };

    let text = std::fs::read_to_string(&args.prompts_file)
        .with_context(|| format!("reading {}", args.prompts_file.display()))?;
    let prompts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if prompts.is_empty() {
        bail!("{} holds no prompt", args.prompts_file.display());
    }
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode_chat(&[ChatMessage::user(*p)], true))
        .collect::<Result<_, _>>()?;
    let rows: Vec<usize> = (0..prompts.len() * args.samples)
        .map(|r| r % prompts.len())
        .collect();
    let pb = ProgressBar::new(rows.len() as u64).with_style(
        ProgressStyle::with_template(
            "traits {wide_bar} {human_pos}/{human_len} responses eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let out_path = args.out.join("traits.jsonl");
    let mut out = std::fs::File::create(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let mut results = Vec::new();
    for (ci, chunk) in rows.chunks(args.batch).enumerate() {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&p| encoded[p].clone()).collect();
        let sampling =
            Sampling::at_temperature(args.temperature, 0.95, args.seed.wrapping_add(ci as u64));
        let opts = GenerateOptions {
            sampling,
            ..GenerateOptions::greedy(args.max_new_tokens)
        }
        .stop_at(tok.stop_tokens());
        let mut hooks = steering.as_ref().map_or_else(Hooks::new, |s| s.hooks());
        let gens = model.generate_batch(&batch, &opts, &mut hooks)?;
        for (&p, g) in chunk.iter().zip(gens) {
            let mut answer = g.tokens.clone();
            answer.retain(|t| !opts.stop_tokens.contains(t));
            let response = tok.decode(&answer)?;
            let found = if answer.is_empty() {
                Vec::new()
            } else {
                let full: Vec<u32> = encoded[p].iter().chain(&answer).copied().collect();
                let span = encoded[p].len()..full.len();
                traits(
                    &model,
                    &sae,
                    hook,
                    &stats,
                    &full,
                    span,
                    TraitOptions {
                        top: args.top,
                        max_firing_rate: args.max_firing_rate,
                        merge_overlap: args.merge_overlap,
                    },
                )?
            };
            let row = Row {
                prompt: prompts[p].to_string(),
                response,
                clamp: args.clamp.clone(),
                traits: found,
            };
            pb.suspend(|| print_row(&row));
            writeln!(out, "{}", serde_json::to_string(&row)?)?;
            results.push(row);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let summary = args.expect.map(|f| {
        // In a top trait, leading it or folded into it; and leading one.
        let hits = results
            .iter()
            .filter(|r| {
                r.traits
                    .iter()
                    .any(|t| t.feature == f || t.also.iter().any(|a| a.feature == f))
            })
            .count();
        let leads = results
            .iter()
            .filter(|r| r.traits.iter().any(|t| t.feature == f))
            .count();
        serde_json::json!({
            "expect": f,
            "top": args.top,
            "merge_overlap": args.merge_overlap,
            "clamp": args.clamp,
            "responses": results.len(),
            "with_feature_in_top": hits,
            "share": hits as f64 / results.len() as f64,
            "leading_a_top_trait": leads,
            "share_leading": leads as f64 / results.len() as f64,
        })
    });
    if let Some(s) = &summary {
        println!("{s}");
        std::fs::write(
            args.out.join("expect.json"),
            serde_json::to_string_pretty(s)?,
        )?;
    }
    let html_path = args.out.join("traits.html");
    std::fs::write(&html_path, html(&args, &results, summary.as_ref()))
        .with_context(|| format!("writing {}", html_path.display()))?;
    eprintln!("traits: {} and {}", out_path.display(), html_path.display());
    Ok(())
}

fn print_row(r: &Row) {
    println!("\n> {}\n{}", r.prompt, r.response.trim());
    for t in &r.traits {
        let where_: Vec<String> = t.tokens.iter().map(|x| format!("{:?}", x.token)).collect();
        println!(
            "    #{:<6} {:>6.2}  [{}]  fires on {}{}",
            t.feature,
            t.score,
            t.label,
            where_.join(" "),
            also(t)
        );
    }
}

/// The features folded into a trait, as ` (also #6573, #5368)`; empty when there are none.
fn also(t: &Trait) -> String {
    if t.also.is_empty() {
        return String::new();
    }
    let mut ids: Vec<String> = t
        .also
        .iter()
        .take(4)
        .map(|a| format!("#{}", a.feature))
        .collect();
    if t.also.len() > 4 {
        ids.push(format!("{} more", t.also.len() - 4));
    }
    format!(" (also {})", ids.join(", "))
}

fn html(args: &Args, rows: &[Row], summary: Option<&serde_json::Value>) -> String {
    let mut s = String::from(
        "<!doctype html><meta charset=utf-8><title>Traits</title><style>\
         body{font:15px/1.5 system-ui,sans-serif;max-width:56em;margin:2em auto;padding:0 1em}\
         .r{border-top:1px solid #ddd;padding:.8em 0}.p{color:#555}.a{white-space:pre-wrap}\
         .t{display:inline-block;margin:.2em .3em 0 0;padding:.1em .5em;border-radius:1em;\
         background:#fde7c8;font-size:13px}.t b{font-weight:600}\
         </style><h1>Traits of each response</h1>",
    );
    s.push_str(&format!(
        "<p>SAE <code>{}</code>; clamps: {}. A trait's score is its activation relative to its \
         maximum, summed over the response's non-blank tokens, times ln(1 / firing rate); features \
         firing on nearly the same tokens as a stronger trait are folded into it (also).</p>",
        escape_html(&args.sae.display().to_string()),
        if args.clamp.is_empty() {
            "none".to_string()
        } else {
            escape_html(
                &args
                    .clamp
                    .iter()
                    .map(|(f, v)| format!("{f}={v}x"))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        }
    ));
    if let Some(v) = summary {
        s.push_str(&format!(
            "<p><code>{}</code></p>",
            escape_html(&v.to_string())
        ));
    }
    for r in rows {
        s.push_str(&format!(
            "<div class=r><div class=p>&gt; {}</div><div class=a>{}</div>",
            escape_html(&r.prompt),
            escape_html(r.response.trim())
        ));
        for t in &r.traits {
            let toks: Vec<String> = t.tokens.iter().map(|x| format!("{:?}", x.token)).collect();
            s.push_str(&format!(
                "<span class=t title=\"fires on {}\"><b>#{}</b> {} · {:.2}{}</span>",
                escape_html(&toks.join(" ")),
                t.feature,
                escape_html(&t.label),
                t.score,
                escape_html(&also(t))
            ));
        }
        s.push_str("</div>");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["traits", "--sae", "x", "--prompts-file", "x"],
            &[
                ("--device", "tpu"),
                ("--max-new-tokens", "0"),
                ("--samples", "0"),
                ("--batch", "0"),
                ("--top", "0"),
                ("--temperature", "-1"),
                ("--max-firing-rate", "0"),
                ("--merge-overlap", "0"),
                ("--merge-overlap", "NaN"),
            ],
        );
    }
}
