//! Do SAEs transfer between a base model and its chat fine-tune? (Kissane et al. 2024.)
//!
//! For a base/chat pair of one architecture (by default Gemma-3-270M and the chat model
//! `chat_sft` makes of it), on the same tokens:
//! 1. captures both models' activations at a middle layer's residual stream and MLP neurons, on
//!    corpus text and chat conversations (half each);
//! 2. trains TopK and ReLU-L1 SAEs on each model's activations (or reuses SAEs given with
//!    `--sae-base` / `--sae-chat`, SAELens folders);
//! 3. evaluates every SAE on {base, chat} x {corpus text, chat conversations}: loss recovered
//!    (zero and mean ablation), KL, FVU, L0, dead fraction;
//! 4. measures mean activation norms per layer of both models and their ratio;
//! 5. makes the Gemma-v1 failure on purpose, a copy of the chat model whose residual stream is
//!    `--collapse-scale` times larger (same logits), and evaluates the base SAEs on it without
//!    and with normalisation to each model's fitted mean norm;
//! 6. fine-tunes the base TopK SAE on `--finetune-share` of the chat activations and compares it
//!    with the chat SAE trained from scratch on all of them, and on the same share.
//!
//! Writes `--out`/`report/index.html` (tables, heatmaps, norm plots), `cells.json`,
//! `summary.json`, and prints one JSON summary line. SAEs are saved under `--out`/`saes/` and
//! reused when the program is run again.
//!
//!     cargo run --release --example transfer -- --quick
//!     cargo run --release --example transfer -- --base BASE.gguf --chat CHAT_DIR --layer 12

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sae_workbench::activation_store::{
    self as store, CorpusName, Split as DocSplit, SplitSpec, WindowPlan,
};
use sae_workbench::metrics::TokenGroups;
use sae_workbench::sae_core::{
    ArchitectureConfig, SaeModel, StandardTraining, TopKTraining, Trainer, TrainerConfig,
};
use sae_workbench::sft::conversations::{Material, Sources, Split};
use sae_workbench::sft::{TokenKind, encode_conversation_kinds};
use sae_workbench::transfer::capture::{Rows, capture};
use sae_workbench::transfer::matrix::{
    Cell, NamedSae, evaluate_on, markdown_group_table, markdown_table, plot_groups, plot_matrix,
};
use sae_workbench::transfer::norms::{norm_profile, plot_norms};
use sae_workbench::transfer::pair::check_pair;
use sae_workbench::transfer::rescale::{normalized_for, scaled_residual_copy};
use sae_workbench::transfer::train::train_on_rows;
use sae_workbench::transformer_hooks::candle_core::{Device, Tensor};
use sae_workbench::transformer_hooks::{self as transformer_hooks, HookPoint, Model, Site, assets};

#[derive(Parser)]
#[command(
    about = "Base-to-chat SAE transfer: the matrix, the norm diagnosis, the collapse and its fix, SAE fine-tuning"
)]
struct Args {
    /// Base model (GGUF or HF folder; default Gemma-3-270M from the assets folder).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Chat model (default: runs/chat_sft/model, written by the chat_sft example).
    #[arg(long, default_value = "runs/chat_sft/model")]
    chat: PathBuf,
    /// Layer of the hooks (default: the middle one).
    #[arg(long)]
    layer: Option<usize>,
    /// Hook sites: `resid` (blocks.L.hook_resid_post) and/or `mlp` (blocks.L.mlp.hook_post).
    #[arg(long, value_delimiter = ',', default_value = "resid,mlp")]
    sites: Vec<String>,
    /// Reuse these base-model SAEs (SAELens folders) instead of training them.
    #[arg(long)]
    sae_base: Vec<PathBuf>,
    /// Reuse these chat-model SAEs.
    #[arg(long)]
    sae_chat: Vec<PathBuf>,
    /// Training tokens per model (half corpus, half chat); default 120k, quick 24k.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one)]
    train_tokens: Option<usize>,
    /// Evaluation tokens per text; default 2048, quick 512.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one)]
    eval_tokens: Option<usize>,
    /// Features per input dimension.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 4)]
    expansion: usize,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 32)]
    k: usize,
    /// Passes over the training tokens.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 2)]
    epochs: usize,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 512)]
    sae_batch: usize,
    /// Residual scale of the collapse demonstration.
    #[arg(long, default_value_t = 8.0)]
    collapse_scale: f64,
    /// Share of the chat SAE's training tokens the fine-tuned base SAE gets.
    #[arg(long, default_value_t = 0.05)]
    finetune_share: f64,
    /// Passes over that share (the tokens stay the share; more passes are more steps on them:
    /// 2 passes were too few steps to reach the from-scratch SAE, 20 reach it).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 20)]
    finetune_epochs: usize,
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Small settings for a first look in minutes.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value = "runs/transfer")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

struct Texts {
    train: Vec<Tensor>,
    eval_corpus: Vec<Tensor>,
    eval_chat: Vec<Tensor>,
    /// The token kind (template, user, model) of every token of `eval_chat`.
    eval_chat_kinds: TokenGroups,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    transformer_hooks::retain_freed_memory();
    let t_start = Instant::now();
    let train_tokens = args
        .train_tokens
        .unwrap_or(if args.quick { 24_000 } else { 120_000 });
    let eval_tokens = args
        .eval_tokens
        .unwrap_or(if args.quick { 512 } else { 2048 });
    let out = args.out.clone();
    std::fs::create_dir_all(out.join("report"))?;
    let base_path = args
        .base
        .clone()
        .unwrap_or_else(|| assets::asset_path("models/gemma-3-270m-q4_k_m.gguf"));
    eprintln!(
        "== loading {} and {}",
        base_path.display(),
        args.chat.display()
    );
    let base = Model::load(&base_path, &device)
        .with_context(|| format!("loading the base model {}", base_path.display()))?;
    let chat = Model::load(&args.chat, &device).with_context(|| {
        format!(
            "loading the chat model {} (make one with `cargo run --release --example chat_sft`)",
            args.chat.display()
        )
    })?;
    check_pair(&base, &chat)?;
    let layer = args.layer.unwrap_or(base.config().n_layers / 2);
    if layer >= base.config().n_layers {
        bail!(
            "--layer {layer}: the model has {} layers",
            base.config().n_layers
        );
    }
    let mut hooks = Vec::new();
    for s in &args.sites {
        hooks.push(match s.as_str() {
            "resid" => HookPoint::Block(layer, Site::ResidPost),
            "mlp" => HookPoint::Block(layer, Site::MlpPost),
            other => bail!("--sites: unknown site `{other}` (resid, mlp)"),
        });
    }

    let texts = texts(&chat, &args, train_tokens, eval_tokens)?;
    let pb = || {
        let p = indicatif::ProgressBar::new(0);
        p.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]",
            )
            .expect("a valid template"),
        );
        p
    };

    // 1. Activations of both models on the same training tokens.
    let t = Instant::now();
    eprintln!(
        "== capturing {} at {} training windows per model",
        hooks.len(),
        texts.train.len()
    );
    let p = pb();
    let base_rows = capture(&base, &hooks, &texts.train, 1, Some(&p))?;
    let chat_rows = capture(&chat, &hooks, &texts.train, 1, Some(&p))?;
    p.finish_and_clear();
    let capture_s = t.elapsed().as_secs_f64();

    // 2. SAEs: given, saved by an earlier run, or trained now.
    let t = Instant::now();
    let mut given = load_given(&args.sae_base, &args.sae_chat)?;
    // (name, trained_on, hook, sae, folder)
    let mut saes: Vec<(String, String, HookPoint, SaeModel, PathBuf)> = Vec::new();
    let (base_fp, chat_fp) = (fingerprint(&base_path), fingerprint(&args.chat));
    for (who, rows, source) in [
        ("base", &base_rows, &base_fp),
        ("chat", &chat_rows, &chat_fp),
    ] {
        for r in rows.iter() {
            for arch in ["topk", "relu"] {
                let name = format!("{who}/{arch}");
                if let Some(i) = given
                    .iter()
                    .position(|g| g.who == who && g.hook == r.hook && g.arch == arch)
                {
                    let g = given.swap_remove(i);
                    saes.push((name, who.into(), r.hook, g.sae, g.dir));
                    continue;
                }
                let dir = out.join("saes").join(format!("{who}_{}_{arch}", r.hook));
                let sae = trained(&dir, r, arch, &args, args.epochs, None, source)?;
                saes.push((name, who.into(), r.hook, sae, dir));
            }
        }
    }
    let train_s = t.elapsed().as_secs_f64();

    // 6 (trained here, evaluated with the rest). The base TopK SAE fine-tuned on a share of the
    // chat activations, and a chat SAE from scratch on that same share (matched compute).
    let t = Instant::now();
    let resid = hooks
        .iter()
        .copied()
        .find(|h| matches!(h, HookPoint::Block(_, Site::ResidPost)));
    let mut finetune_names = Vec::new();
    if let Some(h) = resid {
        let rows = chat_rows
            .iter()
            .find(|r| r.hook == h)
            .context("resid rows")?;
        let n_share = ((rows.n() as f64 * args.finetune_share) as usize).max(args.sae_batch);
        let share = Rows {
            hook: h,
            width: rows.width,
            data: rows.data[..n_share * rows.width].to_vec(),
        };
        let base_dir = saes
            .iter()
            .find(|(n, _, hh, _, _)| n == "base/topk" && *hh == h)
            .context("base/topk SAE")?
            .4
            .clone();
        let e = args.finetune_epochs;
        let suffix = if e == args.epochs {
            String::new()
        } else {
            format!("_e{e}")
        };
        let dir = out.join("saes").join(format!("finetuned_{h}_topk{suffix}"));
        let both = format!("{base_fp} then {chat_fp}");
        let ft = trained(&dir, &share, "topk", &args, e, Some(&base_dir), &both)?;
        let dir_small = out
            .join("saes")
            .join(format!("chat-share_{h}_topk{suffix}"));
        let small = trained(&dir_small, &share, "topk", &args, e, None, &chat_fp)?;
        saes.push((
            "base/topk fine-tuned on chat".into(),
            "base+chat".into(),
            h,
            ft,
            dir,
        ));
        saes.push((
            "chat/topk on the same share".into(),
            "chat".into(),
            h,
            small,
            dir_small,
        ));
        finetune_names = vec![
            "base/topk fine-tuned on chat".to_string(),
            "chat/topk on the same share".to_string(),
        ];
        eprintln!(
            "   fine-tuning share: {n_share} of {} chat training rows ({:.1}%)",
            rows.n(),
            100.0 * n_share as f64 / rows.n() as f64
        );
    }
    let finetune_s = t.elapsed().as_secs_f64();

    // 3. The matrix. Cells already measured for the same SAE files and evaluation tokens are
    // read back from `cells_cache.jsonl`, so a rerun evaluates only what changed.
    let t = Instant::now();
    let cache_path = out.join("cells_cache.jsonl");
    let mut cache: Vec<(String, Cell)> = std::fs::read_to_string(&cache_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut cells: Vec<Cell> = Vec::new();
    let model_fp = [("base", base_fp.clone()), ("chat", chat_fp.clone())];
    for &h in &hooks {
        for (mname, model) in [("base", &base), ("chat", &chat)] {
            for (tname, batches, groups) in [
                ("corpus", &texts.eval_corpus, None),
                ("chat", &texts.eval_chat, Some(&texts.eval_chat_kinds)),
            ] {
                let mfp = &model_fp.iter().find(|m| m.0 == mname).context("model")?.1;
                let key = |dir: &Path| -> String {
                    format!(
                        "{}|{mname}:{mfp}|{tname}{}|{eval_tokens}|{}",
                        fingerprint(dir),
                        if groups.is_some() { ":kinds" } else { "" },
                        args.seed
                    )
                };
                let mut todo = Vec::new();
                for (n, w, hh, sae, dir) in &saes {
                    if *hh != h {
                        continue;
                    }
                    match cache.iter().find(|(k, c)| *k == key(dir) && c.sae == *n) {
                        Some((_, c)) => cells.push(c.clone()),
                        None => todo.push((
                            key(dir),
                            NamedSae {
                                name: n.clone(),
                                trained_on: w.clone(),
                                sae,
                            },
                        )),
                    }
                }
                if todo.is_empty() {
                    continue;
                }
                eprintln!(
                    "== evaluating {} SAEs at {h} on the {mname} model, {tname} text",
                    todo.len()
                );
                let p = pb();
                let (keys, named): (Vec<String>, Vec<NamedSae>) = todo.into_iter().unzip();
                let fresh = evaluate_on(
                    model,
                    mname,
                    tname,
                    &h.to_string(),
                    &named,
                    batches,
                    groups,
                    Some(&p),
                )?;
                p.finish_and_clear();
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&cache_path)?;
                for (k, c) in keys.into_iter().zip(fresh) {
                    use std::io::Write;
                    writeln!(f, "{}", serde_json::to_string(&(&k, &c))?)?;
                    cache.push((k, c.clone()));
                    cells.push(c);
                }
            }
        }
    }
    let matrix_s = t.elapsed().as_secs_f64();

    // 4. Norms.
    let t = Instant::now();
    let norm_batches: Vec<Tensor> = texts
        .eval_corpus
        .iter()
        .chain(&texts.eval_chat)
        .cloned()
        .collect();
    let norms = norm_profile(&base, &chat, &norm_batches)?;
    plot_norms(
        &norms,
        &out.join("report/norms.png"),
        &out.join("report/norm_ratio.png"),
    )?;
    let norms_s = t.elapsed().as_secs_f64();

    // 5. The collapse, made on purpose, and its fix.
    let t = Instant::now();
    let mut collapse = Vec::new();
    if let Some(h) = resid {
        let rows = base_rows
            .iter()
            .find(|r| r.hook == h)
            .context("resid rows")?;
        for factor in [args.collapse_scale, 1.0 / args.collapse_scale] {
            let scaled = scaled_residual_copy(&chat, factor)?;
            let target_norm = {
                let r = capture(&scaled, &[h], &texts.eval_corpus, 1, None)?;
                r[0].mean_norm()
            };
            // The base SAEs as trained, each followed by its normalised copy.
            let mut fixed = Vec::new();
            let mut named = Vec::new();
            for arch in ["topk", "relu"] {
                let (_, _, _, sae, dir) = saes
                    .iter()
                    .find(|(n, _, hh, _, _)| *n == format!("base/{arch}") && *hh == h)
                    .context("base SAE")?;
                named.push((format!("base/{arch}"), sae));
                fixed.push((
                    format!("base/{arch} normalized"),
                    normalized_for(SaeModel::load(dir)?, rows.mean_norm(), target_norm)?,
                ));
            }
            let named: Vec<NamedSae> = named
                .into_iter()
                .zip(&fixed)
                .flat_map(|((pn, ps), (fname, fs))| [(pn, ps), (fname.clone(), fs)])
                .map(|(name, sae)| NamedSae {
                    name,
                    trained_on: "base".into(),
                    sae,
                })
                .collect();
            let label = format!("chat x{factor}");
            eprintln!("== collapse demonstration: residual stream x{factor}");
            let p = pb();
            let c = evaluate_on(
                &scaled,
                &label,
                "corpus",
                &h.to_string(),
                &named,
                &texts.eval_corpus,
                None,
                Some(&p),
            )?;
            p.finish_and_clear();
            collapse.extend(c);
        }
    }
    let collapse_s = t.elapsed().as_secs_f64();

    // Outputs.
    std::fs::write(
        out.join("cells.json"),
        serde_json::to_string_pretty(&cells)?,
    )?;
    std::fs::write(
        out.join("collapse.json"),
        serde_json::to_string_pretty(&collapse)?,
    )?;
    std::fs::write(
        out.join("norms.json"),
        serde_json::to_string_pretty(&norms)?,
    )?;
    let main_cells: Vec<Cell> = cells
        .iter()
        .filter(|c| !finetune_names.contains(&c.sae))
        .cloned()
        .collect();
    plot_matrix(
        &main_cells,
        &|c| c.loss_recovered(),
        "Loss recovered (zero ablation)",
        (0.0, 1.0),
        &out.join("report/loss_recovered.png"),
    )?;
    plot_matrix(
        &main_cells,
        &|c| c.eval.reconstruction.fvu,
        "FVU",
        (1.0, 0.0),
        &out.join("report/fvu.png"),
    )?;
    plot_groups(
        &main_cells,
        "Loss recovered on chat text, by token kind",
        &out.join("report/by_kind.png"),
    )?;
    if !collapse.is_empty() {
        plot_matrix(
            &collapse,
            &|c| c.loss_recovered(),
            "Base SAEs on a residual-scaled chat model",
            (0.0, 1.0),
            &out.join("report/collapse.png"),
        )?;
    }
    let get = |cs: &[Cell], sae: &str, model: &str, text: &str, hook: &HookPoint| {
        cs.iter()
            .find(|c| {
                c.sae == sae && c.model == model && c.text == text && c.hook == hook.to_string()
            })
            .map(Cell::loss_recovered)
    };
    let mut headline = serde_json::Map::new();
    for &h in &hooks {
        for arch in ["topk", "relu"] {
            for text in ["corpus", "chat"] {
                let key = |k: &str| format!("{}_{arch}_{text}_{k}", site_short(h));
                headline.insert(
                    key("base_sae_on_base"),
                    get(&cells, &format!("base/{arch}"), "base", text, &h).into(),
                );
                headline.insert(
                    key("base_sae_on_chat"),
                    get(&cells, &format!("base/{arch}"), "chat", text, &h).into(),
                );
                headline.insert(
                    key("chat_sae_on_chat"),
                    get(&cells, &format!("chat/{arch}"), "chat", text, &h).into(),
                );
            }
        }
    }
    if let Some(h) = resid {
        for text in ["corpus", "chat"] {
            headline.insert(
                format!("resid_topk_{text}_finetuned_on_chat"),
                get(&cells, "base/topk fine-tuned on chat", "chat", text, &h).into(),
            );
            headline.insert(
                format!("resid_topk_{text}_chat_share_scratch_on_chat"),
                get(&cells, "chat/topk on the same share", "chat", text, &h).into(),
            );
        }
        for factor in [args.collapse_scale, 1.0 / args.collapse_scale] {
            let m = format!("chat x{factor}");
            for arch in ["topk", "relu"] {
                headline.insert(
                    format!("collapse_x{factor}_{arch}_plain"),
                    get(&collapse, &format!("base/{arch}"), &m, "corpus", &h).into(),
                );
                headline.insert(
                    format!("collapse_x{factor}_{arch}_normalized"),
                    get(
                        &collapse,
                        &format!("base/{arch} normalized"),
                        &m,
                        "corpus",
                        &h,
                    )
                    .into(),
                );
            }
        }
    }
    // Loss recovered on chat text per token kind, for the base SAE on both models and the chat
    // SAE on the chat model.
    let mut by_kind = serde_json::Map::new();
    for &h in &hooks {
        for arch in ["topk", "relu"] {
            for (sae, model) in [("base", "base"), ("base", "chat"), ("chat", "chat")] {
                let cell = cells.iter().find(|c| {
                    c.sae == format!("{sae}/{arch}")
                        && c.model == model
                        && c.text == "chat"
                        && c.hook == h.to_string()
                });
                if let Some(c) = cell {
                    let kinds: serde_json::Map<String, serde_json::Value> = c
                        .eval
                        .by_group
                        .iter()
                        .map(|g| (g.group.clone(), g.loss_recovered_zero.into()))
                        .collect();
                    by_kind.insert(
                        format!("{}_{arch}_{sae}_sae_on_{model}", site_short(h)),
                        kinds.into(),
                    );
                }
            }
        }
    }
    let max_ratio = norms.iter().map(|r| r.ratio).fold(0.0f64, |a, b| a.max(b));
    let min_ratio = norms.iter().map(|r| r.ratio).fold(f64::INFINITY, f64::min);
    let summary = serde_json::json!({
        "experiment": "transfer",
        "base": base_path.display().to_string(),
        "chat": args.chat.display().to_string(),
        "layer": layer,
        "train_tokens_per_model": base_rows.first().map(Rows::n),
        "eval_tokens_per_text": eval_tokens,
        "norm_ratio_range": [min_ratio, max_ratio],
        "loss_recovered": headline,
        "loss_recovered_chat_text_by_token_kind": by_kind,
        "seconds": {
            "capture": capture_s, "train": train_s, "finetune": finetune_s, "matrix": matrix_s,
            "norms": norms_s, "collapse": collapse_s, "total": t_start.elapsed().as_secs_f64(),
        },
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    write_report(&out, &summary, &cells, &collapse, &norms)?;
    println!("{}", serde_json::to_string(&summary)?);
    eprintln!("report: {}", out.join("report/index.html").display());
    Ok(())
}

fn site_short(h: HookPoint) -> &'static str {
    match h {
        HookPoint::Block(_, Site::MlpPost) => "mlp",
        _ => "resid",
    }
}

/// Corpus windows (the activation store's document split) and chat conversations (held-out
/// words and documents for evaluation), packed into windows of `--context` tokens.
fn texts(chat: &Model, args: &Args, train_tokens: usize, eval_tokens: usize) -> Result<Texts> {
    let tok = chat.tokenizer()?;
    let bos = chat
        .config()
        .bos_token_id
        .context("the model has no BOS token")?;
    let docs = store::load_corpora(&store::default_corpora_root(), &CorpusName::ALL)?;
    let encode = |t: &str| -> store::Result<Vec<u32>> {
        tok.encode_document(t).map_err(|e| store::Error::Tokenize {
            doc: String::new(),
            message: e.to_string(),
        })
    };
    let tokenized = store::tokenize_documents(&docs, &encode, &SplitSpec::default())?;
    let train_plan = WindowPlan::build(&tokenized, DocSplit::Train, args.context, bos, args.seed)?;
    let test_plan = WindowPlan::build(&tokenized, DocSplit::Test, args.context, bos, args.seed)?;
    let half = train_tokens / 2;
    let corpus_train = train_plan.full_window_batches(half, 8, &Device::Cpu)?;
    let eval_corpus = test_plan.full_window_batches(eval_tokens, 8, &Device::Cpu)?;
    let material = Material::load(&Sources::default())?;
    // Batches of windows, and each token's kind (its index in TokenKind::ALL).
    let pack = |split: Split, tokens: usize| -> Result<(Vec<Tensor>, Vec<Vec<u8>>)> {
        let n_conv = tokens / 50 + 8;
        let convs = material.build(split, n_conv, args.seed + 1)?;
        let (mut stream, mut kinds) = (Vec::new(), Vec::new());
        for c in &convs {
            let (e, k) = encode_conversation_kinds(tok, &c.messages)?;
            stream.extend(e.tokens);
            kinds.extend(
                k.iter()
                    .map(|&k| TokenKind::ALL.iter().position(|&x| x == k).unwrap_or(0) as u8),
            );
        }
        let n_windows = (stream.len() / args.context).min(tokens.div_ceil(args.context));
        let per_batch = 8 * args.context;
        let used = n_windows * args.context;
        let batches = stream[..used]
            .chunks(per_batch)
            .map(|w| {
                Tensor::from_vec(
                    w.to_vec(),
                    (w.len() / args.context, args.context),
                    &Device::Cpu,
                )
            })
            .collect::<std::result::Result<_, _>>()?;
        let labels = kinds[..used]
            .chunks(per_batch)
            .map(<[u8]>::to_vec)
            .collect();
        Ok((batches, labels))
    };
    let (chat_train, _) = pack(Split::Train, half)?;
    let (eval_chat, eval_labels) = pack(Split::Eval, eval_tokens)?;
    let mut train = Vec::new();
    for (a, b) in corpus_train.into_iter().zip(chat_train) {
        train.push(a);
        train.push(b);
    }
    Ok(Texts {
        train,
        eval_corpus,
        eval_chat,
        eval_chat_kinds: TokenGroups {
            names: TokenKind::ALL
                .iter()
                .map(|k| k.name().to_string())
                .collect(),
            labels: eval_labels,
        },
    })
}

fn trainer_config(
    d_in: usize,
    arch: &str,
    steps: u64,
    args: &Args,
    hook: HookPoint,
) -> TrainerConfig {
    let a = match arch {
        "relu" => ArchitectureConfig::Standard(StandardTraining {
            l1_coefficient: 5.0,
            ..StandardTraining::default()
        }),
        _ => ArchitectureConfig::TopK(TopKTraining::new(args.k)),
    };
    let mut cfg = TrainerConfig::new(d_in, args.expansion * d_in, a, steps);
    cfg.lr = 2e-3;
    cfg.lr_warm_up_steps = (steps / 20).max(1);
    cfg.lr_decay_steps = steps / 5;
    if arch == "relu" {
        cfg.sparsity_warm_up_steps = steps / 10;
        cfg.encoder_bias_init_l0 = Some(48);
    }
    cfg.dead_window_tokens = 100_000;
    cfg.seed = args.seed;
    cfg.metadata.hook_name = Some(hook.to_string());
    cfg
}

/// The SAE saved at `dir`, or one trained on `rows` (from the SAE saved at `init` when given)
/// and saved there.
#[allow(clippy::too_many_arguments)]
fn trained(
    dir: &Path,
    rows: &Rows,
    arch: &str,
    args: &Args,
    epochs: usize,
    init: Option<&Path>,
    source: &str,
) -> Result<SaeModel> {
    // An SAE saved by an earlier run is reused only if it was trained on the same model(s).
    let stamp = dir.join("trained_from.txt");
    if dir.join("cfg.json").exists() {
        match std::fs::read_to_string(&stamp) {
            Ok(s) if s != source => eprintln!(
                "== {} was trained on another model ({s}); training it again",
                dir.display()
            ),
            _ => return Ok(SaeModel::load(dir)?),
        }
    }
    let steps = (epochs * rows.n() / args.sae_batch).max(1) as u64;
    let cfg = trainer_config(rows.width, arch, steps, args, rows.hook);
    let mut trainer = match init {
        Some(from) => Trainer::from_pretrained(cfg, SaeModel::load(from)?)?,
        None => Trainer::new(cfg)?,
    };
    eprintln!(
        "== training {} ({steps} steps of {} rows)",
        dir.display(),
        args.sae_batch
    );
    let p = indicatif::ProgressBar::new(steps);
    let last = train_on_rows(
        &mut trainer,
        &rows.data,
        rows.width,
        args.sae_batch,
        args.seed,
        Some(&p),
    )?;
    p.finish_and_clear();
    if let Some(m) = last {
        eprintln!(
            "   final batch: FVU {:.3}, L0 {:.1}, dead {:.3}",
            m.fvu, m.l0, m.dead_fraction
        );
    }
    trainer.save(dir)?;
    std::fs::write(&stamp, source)?;
    Ok(SaeModel::load(dir)?)
}

/// Identifies weights on disk (path, size and modification time of the weights file: an SAE's
/// `sae_weights.safetensors`, an HF folder's `model.safetensors`, or the file itself), for the
/// cell cache and for SAEs saved by an earlier run.
fn fingerprint(path: &Path) -> String {
    let w = ["sae_weights.safetensors", "model.safetensors"]
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.exists())
        .unwrap_or_else(|| path.to_path_buf());
    let dir = path;
    let modified_ns = std::fs::metadata(&w)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let len = std::fs::metadata(&w).map_or(0, |m| m.len());
    format!("{}:{len}:{modified_ns}", dir.display())
}

/// An SAE given on the command line, loaded once.
struct GivenSae {
    who: &'static str,
    hook: HookPoint,
    /// `relu` for SAELens's `standard`, else `topk`.
    arch: &'static str,
    dir: PathBuf,
    sae: SaeModel,
}

fn load_given(base: &[PathBuf], chat: &[PathBuf]) -> Result<Vec<GivenSae>> {
    let mut out = Vec::new();
    for (who, dirs) in [("base", base), ("chat", chat)] {
        for d in dirs {
            let sae = SaeModel::load(d).with_context(|| format!("loading SAE {}", d.display()))?;
            let hook: HookPoint = sae
                .hook_name()
                .with_context(|| format!("{} names no hook (cfg.json hook_name)", d.display()))?
                .parse()?;
            let arch = if sae.config().architecture() == "standard" {
                "relu"
            } else {
                "topk"
            };
            out.push(GivenSae {
                who,
                hook,
                arch,
                dir: d.clone(),
                sae,
            });
        }
    }
    Ok(out)
}

fn write_report(
    out: &Path,
    summary: &serde_json::Value,
    cells: &[Cell],
    collapse: &[Cell],
    norms: &[sae_workbench::transfer::norms::NormRow],
) -> Result<()> {
    let esc = sae_workbench::metrics::html::escape_html;
    let md_to_html = |md: &str| -> String {
        let mut h = String::from("<table>");
        let mut notes = String::new();
        let mut header = true;
        for line in md.lines() {
            if line.starts_with("|---") {
                continue;
            }
            if !line.starts_with('|') {
                if !line.trim().is_empty() {
                    notes.push_str(&format!("<p>{}</p>", esc(line)));
                }
                continue;
            }
            let tag = if header { "th" } else { "td" };
            header = false;
            h.push_str("<tr>");
            for c in line.trim_matches('|').split('|') {
                h.push_str(&format!("<{tag}>{}</{tag}>", esc(c.trim())));
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
        h + &notes
    };
    let mut norm_rows =
        String::from("<table><tr><th>hook</th><th>base</th><th>chat</th><th>chat / base</th></tr>");
    for r in norms {
        norm_rows.push_str(&format!(
            "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.3}</td></tr>",
            esc(&r.hook),
            r.base,
            r.chat,
            r.ratio
        ));
    }
    norm_rows.push_str("</table>");
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>SAE transfer: base vs chat</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}img{{max-width:100%}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style></head><body>
<h1>Do SAEs transfer between the base and the chat model?</h1>
<p>Kissane et al. (2024): Mistral-7B base SAE on chat 0.989 loss recovered (0.990 on base); Qwen1.5-0.5B 0.976 vs 0.958; Gemma v1 2B about 0.25, where the chat model's norms differ about 8x.</p>
<h2>Summary</h2><pre>{}</pre>
<h2>Loss recovered (zero ablation)</h2><img src="loss_recovered.png"><img src="fvu.png">
<h2>All cells</h2>{}
<h2>Chat text by token kind</h2><p>The same cells on chat conversations, split by the kind of token predicted (loss) or read (FVU): the template's markup, the user's turn, the model's turn.</p><img src="by_kind.png">{}
<h2>Activation norms</h2><img src="norms.png"><img src="norm_ratio.png">{}
<h2>The collapse, made on purpose, and its fix</h2><p>A copy of the chat model with its residual stream scaled (same logits); the base SAEs read it as they are, and normalised to each model's fitted mean norm.</p><img src="collapse.png">{}
</body></html>"#,
        esc(&serde_json::to_string_pretty(summary)?),
        md_to_html(&markdown_table(cells)),
        md_to_html(&markdown_group_table(cells)),
        norm_rows,
        md_to_html(&markdown_table(collapse)),
    );
    std::fs::write(out.join("report/index.html"), html)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["transfer"],
            &[
                ("--device", "tpu"),
                ("--expansion", "0"),
                ("--k", "0"),
                ("--epochs", "0"),
                ("--sae-batch", "0"),
                ("--finetune-epochs", "0"),
                ("--train-tokens", "0"),
                ("--eval-tokens", "0"),
            ],
        );
    }
}
