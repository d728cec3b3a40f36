//! A local page to chat with a model while steering it by SAE features (`steer-chat` crate):
//! streamed answers, the traits of each answer, a slider per feature to clamp it and regenerate,
//! feature search by label, and "adjust my prompt" to keep an unwanted feature quiet.
//!
//! ```text
//! cargo run --release --example steer_chat -- --sae runs/steer_sae/saes/topk_9216
//! # then open http://127.0.0.1:7878/ (on a GPU: a build with --features cuda, and --device cuda)
//! ```
//!
//! The SAE folder needs its `feature_stats.json` (from `find_features --cache`): the labels,
//! the maxima that clamps are measured in, and the firing rates that rank traits.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sae_workbench::steering::TraitOptions;
use sae_workbench::steering::cue::parse_synonyms;
use sae_workbench::transformer_hooks::{self as transformer_hooks, assets};
use steer_chat::{ChatApp, Limits};

#[derive(Parser, Debug)]
#[command(about = "Serve a local page to chat with a model and steer it by SAE features")]
struct Args {
    /// GGUF file or HF folder (default: SmolLM2-135M-Instruct from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// SAE folder with `feature_stats.json`.
    #[arg(long)]
    sae: PathBuf,
    /// Port on 127.0.0.1 (0: any free one).
    #[arg(long, default_value_t = 7878)]
    port: u16,
    /// Near-synonyms for "adjust my prompt": lines `word<TAB>synonym, synonym`.
    #[arg(long, default_value = "examples/adjust_cue/data/synonyms.tsv")]
    synonyms: PathBuf,
    /// WordNet 3.0 `dict` folder whose synonyms "adjust my prompt" tries too (default:
    /// `assets/wordnet` when present).
    #[arg(long)]
    wordnet: Option<PathBuf>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = Limits::default().max_new_tokens)]
    max_new_tokens: usize,
    /// Features firing on more than this fraction of tokens are not listed as traits.
    #[arg(long, default_value_t = Limits::default().traits.max_firing_rate)]
    max_firing_rate: f64,
    /// Jobs at once (more get "busy"); each takes the CPU's cores, so more than a few only share them.
    #[arg(long, default_value_t = Limits::default().max_concurrent)]
    max_concurrent: usize,
    /// Where the model runs: cpu, or cuda (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    transformer_hooks::retain_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.max_new_tokens == 0 || args.max_concurrent == 0 {
        bail!("--max-new-tokens and --max-concurrent must be at least 1");
    }
    let model = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path(assets::SMOLLM2));
    let limits = Limits {
        max_new_tokens: args.max_new_tokens,
        max_concurrent: args.max_concurrent,
        traits: TraitOptions {
            max_firing_rate: args.max_firing_rate,
            ..Limits::default().traits
        },
        ..Limits::default()
    };
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    let mut app = ChatApp::load_on(&model, &args.sae, limits, &device)
        .with_context(|| format!("loading {} and {}", model.display(), args.sae.display()))?;
    if args.synonyms.exists() {
        let text = std::fs::read_to_string(&args.synonyms)
            .with_context(|| format!("reading {}", args.synonyms.display()))?;
        app = app.with_synonyms(
            parse_synonyms(&text).with_context(|| args.synonyms.display().to_string())?,
        );
    }
    let (dir, asked) = match &args.wordnet {
        Some(d) => (d.clone(), true),
        None => (assets::assets_dir().join("wordnet"), false),
    };
    if asked || dir.is_dir() {
        app = app.with_thesaurus(
            sae_workbench::wordnet::thesaurus(&dir, false)
                .with_context(|| format!("reading WordNet from {}", dir.display()))?,
        );
    }
    steer_chat::serve_blocking(app, ([127, 0, 0, 1], args.port).into())?;
    Ok(())
}
