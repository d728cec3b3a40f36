//! Finding SAE features to steer with, three ways (one or more per call):
//!
//! * `--cache DIR`: scan a harvested activation cache once and write `feature_stats.json` into
//!   the SAE folder: each feature's maximum activation (the unit of `steer --values`), firing
//!   rate, automatic label (its most frequent top tokens) and top contexts;
//! * `--search WORD`: features whose label or top contexts mention the word;
//! * `--contrast-a FILE --contrast-b FILE`: features that fire more on texts A than B (Welch's t
//!   over texts, dense features left out). A line `user<TAB>assistant` is a chat exchange whose
//!   assistant turn is averaged over; any other line is plain text;
//! * `--prompt TEXT`: the features that fire on one prompt (in the chat template unless
//!   `--raw`), strongest relative to their maximum first.
//!
//! Results print as JSON lines (one per hit) after a readable table on stderr.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sae_workbench::activation_store::ActivationStore;
use sae_workbench::sae_core::SaeModel;
use sae_workbench::steering::{
    ContrastText, FeatureStats, contrast, features_in, sae_hook, sae_hook_in,
};
use sae_workbench::transformer_hooks::{
    self as transformer_hooks, ChatMessage, Model, Tokenizer, assets,
};

#[derive(Parser)]
#[command(about = "Find SAE features: stats from a cache, search by word, contrast, by prompt")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// SAE folder.
    #[arg(long)]
    sae: PathBuf,
    /// Activation cache of the SAE's hook (e.g. the held-out `cache_test` of its training run)
    /// to compute `feature_stats.json` from; skipped if the stats exist unless `--rescan`.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Rows of the cache to scan.
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    #[arg(long)]
    rescan: bool,
    /// Find features whose label or top contexts mention this word.
    #[arg(long)]
    search: Option<String>,
    /// Texts A of a contrast (one per line).
    #[arg(long, requires = "contrast_b")]
    contrast_a: Option<PathBuf>,
    /// Texts B of a contrast.
    #[arg(long, requires = "contrast_a")]
    contrast_b: Option<PathBuf>,
    /// Features active on this prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Use `--prompt` as it is, not in the chat template.
    #[arg(long)]
    raw: bool,
    /// Features firing on more than this fraction of tokens are left out (dense features).
    #[arg(long, value_parser = sae_workbench::cli::fraction, default_value_t = 0.05)]
    max_firing_rate: f64,
    /// Hits shown per query.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 12)]
    top: usize,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

fn main() -> Result<()> {
    transformer_hooks::retain_freed_memory();
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    let sae =
        SaeModel::load(&args.sae).with_context(|| format!("loading SAE {}", args.sae.display()))?;
    let hook = sae_hook(&sae)?;
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let tok = Tokenizer::load(&path)?;
    let decode = |id: u32| tok.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"));

    let existing = FeatureStats::load(&args.sae).ok();
    let stats = match (&args.cache, existing) {
        (Some(cache), e) if args.rescan || e.is_none() => {
            let cache = ActivationStore::open(cache)
                .with_context(|| format!("opening cache {}", cache.display()))?;
            let acts = cache.hook(&hook.to_string())?;
            let pb = ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "scan {wide_bar} {human_pos}/{human_len} rows eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let s = FeatureStats::scan(&acts, &sae, args.rows, &decode, Some(&pb))?;
            pb.finish_and_clear();
            s.save(&args.sae)?;
            let alive = s.firing_rate.iter().filter(|&&r| r > 0.0).count();
            eprintln!(
                "wrote {} ({} rows scanned, {alive} of {} features fired)",
                args.sae.join(sae_workbench::steering::STATS_FILE).display(),
                s.rows,
                s.d_sae()
            );
            Some(s)
        }
        (_, e) => e,
    };

    if let Some(word) = &args.search {
        let stats = stats
            .as_ref()
            .context("--search needs feature stats: pass --cache once")?;
        let hits = stats.search(word, args.max_firing_rate);
        eprintln!("== features mentioning {word:?} ({} hits)", hits.len());
        for h in hits.iter().take(args.top) {
            let ctx = stats.top_contexts[h.feature]
                .first()
                .map_or("", |c| c.text.as_str());
            eprintln!(
                "{:>6}  score {:.2}  max {:.2}  rate {:.5}  [{}]  {}",
                h.feature, h.score, h.max_activation, h.firing_rate, h.label, ctx
            );
            println!(
                "{}",
                serde_json::json!({"query": "search", "word": word, "hit": h})
            );
        }
    }

    let needs_model = args.contrast_a.is_some() || args.prompt.is_some();
    if !needs_model {
        if stats.is_none() && args.search.is_none() {
            bail!("nothing to do: pass --cache, --search, --contrast-a/--contrast-b or --prompt");
        }
        return Ok(());
    }
    let model =
        Model::load(&path, &device).with_context(|| format!("loading {}", path.display()))?;
    sae_hook_in(&sae, &model)?;

    if let (Some(a), Some(b)) = (&args.contrast_a, &args.contrast_b) {
        let (ta, tb) = (read_texts(&model, a)?, read_texts(&model, b)?);
        let hits = contrast(
            &model,
            &sae,
            hook,
            &ta,
            &tb,
            stats.as_ref(),
            args.max_firing_rate,
        )?;
        let label = |f: usize| {
            stats
                .as_ref()
                .and_then(|s| s.labels.get(f).cloned())
                .unwrap_or_default()
        };
        for (name, list) in [
            ("A over B", hits.iter().take(args.top).collect::<Vec<_>>()),
            (
                "B over A",
                hits.iter().rev().take(args.top).collect::<Vec<_>>(),
            ),
        ] {
            eprintln!("== contrast: {name} ({} texts vs {})", ta.len(), tb.len());
            for h in list {
                eprintln!(
                    "{:>6}  t {:>7.2}  mean A {:.3}  mean B {:.3}  [{}]",
                    h.feature,
                    h.t,
                    h.mean_a,
                    h.mean_b,
                    label(h.feature)
                );
                println!(
                    "{}",
                    serde_json::json!({"query": "contrast", "direction": name, "hit": h, "label": label(h.feature)})
                );
            }
        }
    }

    if let Some(p) = &args.prompt {
        let tok = model.tokenizer()?;
        let tokens = if args.raw {
            tok.encode(p, model.config().add_bos)?
        } else {
            tok.encode_chat(&[ChatMessage::user(p.as_str())], true)?
        };
        let hits = features_in(
            &model,
            &sae,
            hook,
            &tokens,
            stats.as_ref(),
            args.max_firing_rate,
        )?;
        eprintln!("== features on the prompt ({} tokens)", tokens.len());
        for h in hits.iter().take(args.top) {
            let at = tok
                .decode(&tokens[h.position..=h.position])
                .unwrap_or_default();
            eprintln!(
                "{:>6}  {:.2} ({:.0}% of max) at {:?}  [{}]",
                h.feature,
                h.activation,
                100.0 * h.relative,
                at,
                h.label
            );
            println!(
                "{}",
                serde_json::json!({"query": "prompt", "hit": h, "token": at})
            );
        }
    }
    Ok(())
}

/// One text per line: `user<TAB>assistant` (the assistant turn is what counts) or plain text
/// (all of it after BOS).
fn read_texts(model: &Model, path: &PathBuf) -> Result<Vec<ContrastText>> {
    let tok = model.tokenizer()?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match line.split_once('\t') {
            Some((user, assistant)) => {
                let prompt = tok.encode_chat(&[ChatMessage::user(user)], true)?;
                let full = tok.encode_chat(
                    &[ChatMessage::user(user), ChatMessage::assistant(assistant)],
                    false,
                )?;
                // The assistant's tokens: after the prompt, before the end-of-turn marker.
                let end = full.len() - 1;
                if full.len() <= prompt.len() + 1 || full[..prompt.len()] != prompt[..] {
                    bail!(
                        "{}: could not locate the assistant turn of {line:?}",
                        path.display()
                    );
                }
                out.push(ContrastText {
                    tokens: full,
                    span: prompt.len()..end,
                });
            }
            None => {
                let tokens = tok.encode(line, model.config().add_bos)?;
                let start = usize::from(model.config().add_bos);
                if tokens.len() <= start {
                    continue;
                }
                out.push(ContrastText {
                    span: start..tokens.len(),
                    tokens,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["find_features", "--sae", "x"],
            &[
                ("--device", "tpu"),
                ("--max-firing-rate", "0"),
                ("--top", "0"),
            ],
        );
    }
}
