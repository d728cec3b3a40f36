//! Makes a chat model from a base model by supervised fine-tuning (SFT) through the workspace's
//! own forward pass, and shows that it became one.
//!
//! Conversations are built from WordNet and the corpora (`sft::conversations`: definitions,
//! synonyms, example sentences, naming a passage's source, continuing a passage, counting words),
//! with held-out words and documents for evaluation, and rendered in the model's chat template
//! (Gemma's `<start_of_turn>user ... <end_of_turn>`). The loss scores the model's turns only.
//! Before and after training it measures the held-out chat loss on the model's turns and the
//! share of greedy answers to held-out instructions that end with `<end_of_turn>`.
//!
//! The run checkpoints every `--checkpoint-every` steps (weights, AdamW state, history; atomic)
//! and resumes where it stopped when started again with the same settings. It writes to `--out`:
//! `model/` (an HF folder: `AutoModelForCausalLM.from_pretrained` loads it), `summary.json`,
//! `loss.png`, `samples.md`, `data/{train,eval}.jsonl`.
//!
//!     cargo run --release --example chat_sft -- --quick          # minutes, a first look
//!     cargo run --release --example chat_sft                     # the default run (~2 h on 2 cores)

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sae_workbench::metrics::plots::{Mark, Scatter, plot_scatter};
use sae_workbench::sft::checkpoint_dir;
use sae_workbench::sft::conversations::{self, Conversation, Material, Sources, Split};
use sae_workbench::sft::{Example, SftConfig, Trainer, chat_loss, encode_conversation};
use sae_workbench::transformer_hooks::{
    self as transformer_hooks, ChatTemplate, GenerateOptions, Hooks, Model, StopReason, assets,
};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(about = "Chat fine-tuning of a base model, with before/after evaluation")]
struct Args {
    /// GGUF file or HF folder of the base model (default: Gemma-3-270M from the assets folder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output folder (checkpoint, chat model, report).
    #[arg(long, default_value = "runs/chat_sft")]
    out: PathBuf,
    /// A run of minutes instead of hours: fewer steps and conversations.
    #[arg(long)]
    quick: bool,
    /// Optimizer steps (default 160, quick 24).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one)]
    steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Conversations per forward pass.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 4)]
    micro_batch: usize,
    /// Forward passes per optimizer step (default 4, quick 2).
    #[arg(long, value_parser = sae_workbench::cli::at_least_one)]
    grad_accum: Option<usize>,
    /// Tokens per conversation at most.
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Also train the token embedding (slower; see the sft crate docs).
    #[arg(long)]
    train_embeddings: bool,
    /// Held-out conversations for the chat loss (default 200, quick 40).
    #[arg(long)]
    eval_conversations: Option<usize>,
    /// Held-out instructions answered greedily before and after (default 24, quick 12).
    #[arg(long)]
    instructions: Option<usize>,
    /// Longest greedy answer.
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 96)]
    max_new_tokens: usize,
    #[arg(long, value_parser = sae_workbench::cli::at_least_one, default_value_t = 10)]
    checkpoint_every: usize,
    /// End this run after this many optimizer steps (checkpointed; the schedule stays that of
    /// `--steps`), evaluate and export the model as it is; run again without it to go on.
    #[arg(long)]
    stop_after: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu` or `cuda` (a build with `--features cuda`): where the model runs.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
}

/// The measurements of one model (base or fine-tuned).
#[derive(Serialize, Deserialize, Clone)]
struct Measured {
    chat_loss: f64,
    end_of_turn_share: f64,
    answers: Vec<Answer>,
    seconds: f64,
}

#[derive(Serialize, Deserialize, Clone)]
struct Answer {
    instruction: String,
    task: String,
    reference: String,
    answer: String,
    ended_with_end_of_turn: bool,
    tokens: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = sae_workbench::cli::device(&args.device)
        .with_context(|| format!("--device {} (a build with --features cuda?)", args.device))?;
    transformer_hooks::retain_freed_memory();
    let quick = args.quick;
    let steps = args.steps.unwrap_or(if quick { 24 } else { 160 });
    let grad_accum = args.grad_accum.unwrap_or(if quick { 2 } else { 4 });
    let n_eval = args
        .eval_conversations
        .unwrap_or(if quick { 40 } else { 200 });
    let n_instr = args.instructions.unwrap_or(if quick { 12 } else { 24 });
    let n_train = steps * args.micro_batch * grad_accum;
    let path = args
        .model
        .clone()
        .unwrap_or_else(|| assets::asset_path("models/gemma-3-270m-q4_k_m.gguf"));
    std::fs::create_dir_all(args.out.join("data"))?;

    eprintln!("== loading {}", path.display());
    let mut model = Model::load(&path, &device)
        .with_context(|| format!("loading the base model {}", path.display()))?;
    let mut tok = model.tokenizer()?.clone();
    if tok.chat_template().is_none() {
        if model.config().arch != transformer_hooks::Architecture::Gemma3 {
            bail!(
                "{} has no chat template and is not Gemma 3, whose template this program knows",
                path.display()
            );
        }
        tok.set_chat_template(Some(ChatTemplate::Gemma));
        model.set_tokenizer(Some(tok.clone()));
    }

    eprintln!("== building conversations ({n_train} train, {n_eval} held out)");
    let material = Material::load(&Sources::default())?;
    let train_conv = material.build(Split::Train, n_train, args.seed)?;
    // The instructions come after the loss set, so that the two never share a conversation.
    let eval_conv = material.build(Split::Eval, n_eval + n_instr, args.seed)?;
    let (loss_conv, instr_conv) = eval_conv.split_at(n_eval);
    conversations::write_jsonl(&args.out.join("data/train.jsonl"), &train_conv)?;
    conversations::write_jsonl(&args.out.join("data/eval.jsonl"), &eval_conv)?;
    let encode = |cs: &[Conversation]| -> Result<Vec<Example>> {
        cs.iter()
            .map(|c| Ok(encode_conversation(&tok, &c.messages)?))
            .collect()
    };
    let train = encode(&train_conv)?;
    let held_out = encode(loss_conv)?;
    let tokens_per_conv =
        train.iter().map(|e| e.tokens.len()).sum::<usize>() as f64 / train.len() as f64;
    eprintln!("   {tokens_per_conv:.0} tokens per conversation on average");

    let cfg = SftConfig {
        lr: args.lr,
        warmup_steps: (steps / 10).max(1),
        total_steps: steps,
        micro_batch: args.micro_batch,
        grad_accum,
        max_len: args.max_len,
        train_embeddings: args.train_embeddings,
        seed: args.seed,
        ..SftConfig::default()
    };
    let eval_mb = 8;

    let before_path = args.out.join("before.json");
    let before: Measured = match read_json(&before_path) {
        Some(m) => m,
        None => {
            eprintln!("== measuring the base model");
            let m = measure(
                &model,
                &held_out,
                instr_conv,
                &cfg,
                eval_mb,
                args.max_new_tokens,
            )?;
            write_json(&before_path, &m)?;
            m
        }
    };
    eprintln!(
        "   base: chat loss {:.3}, {:.0}% of answers end with <end_of_turn>",
        before.chat_loss,
        100.0 * before.end_of_turn_share
    );

    let ckpt = args.out.join("checkpoint");
    let mut trainer = Trainer::new(&mut model, cfg.clone())?;
    if checkpoint_dir(&ckpt).is_some() {
        trainer.load_checkpoint(&ckpt)?;
        eprintln!("== resumed at step {}", trainer.step_index());
    }
    eprintln!(
        "== fine-tuning {} weights for {steps} steps ({} conversations per step)",
        trainer.n_trainable(),
        cfg.micro_batch * cfg.grad_accum
    );
    let pb = indicatif::ProgressBar::new(steps as u64);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]",
    )?);
    pb.set_position(trainer.step_index() as u64);
    let until = args.stop_after.unwrap_or(steps).min(steps);
    while trainer.step_index() < until {
        let log = trainer.train_step(&model, &train)?;
        pb.set_position(log.step as u64);
        pb.set_message(format!(
            "loss {:.3}  {:.0} tok/s",
            log.loss,
            log.tokens as f64 / log.seconds
        ));
        if log.step % args.checkpoint_every == 0 || log.step == until {
            trainer.save_checkpoint(&ckpt)?;
        }
    }
    pb.finish_and_clear();
    let trained_steps = trainer.step_index();
    let history = trainer.history().to_vec();
    let train_seconds: f64 = history.iter().map(|h| h.seconds).sum();
    let train_tokens: usize = history.iter().map(|h| h.tokens).sum();
    drop(trainer);

    // A copy without autograd, so the fused inference kernels run.
    let chat = detached(&model)?;
    let model_dir = args.out.join("model");
    chat.save_hf(&model_dir)?;
    eprintln!("== chat model written to {}", model_dir.display());
    let after = measure(
        &chat,
        &held_out,
        instr_conv,
        &cfg,
        eval_mb,
        args.max_new_tokens,
    )?;

    let points: Vec<(f64, f64)> = history.iter().map(|h| (h.step as f64, h.loss)).collect();
    plot_scatter(
        &[Scatter {
            name: "train loss (model turns)".into(),
            points,
            mark: Mark::Line,
        }],
        "Chat fine-tuning",
        "optimizer step",
        "loss (nats/token)",
        (false, false),
        &args.out.join("loss.png"),
    )?;
    write_samples(&args.out.join("samples.md"), &before, &after)?;
    let reduction = 1.0 - after.chat_loss / before.chat_loss;
    let summary = serde_json::json!({
        "experiment": "chat_sft",
        "base_model": path.display().to_string(),
        "chat_model": model_dir.display().to_string(),
        "steps": trained_steps,
        "schedule_steps": steps,
        "config": cfg,
        "train_conversations": train.len(),
        "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "train_tokens_per_s": train_tokens as f64 / train_seconds.max(1e-9),
        "held_out_conversations": held_out.len(),
        "instructions": instr_conv.len(),
        "chat_loss_before": before.chat_loss,
        "chat_loss_after": after.chat_loss,
        "chat_loss_reduction": reduction,
        "end_of_turn_share_before": before.end_of_turn_share,
        "end_of_turn_share_after": after.end_of_turn_share,
        "final_train_loss": history.last().map(|h| h.loss),
    });
    write_json(&args.out.join("summary.json"), &summary)?;
    println!("{}", serde_json::to_string(&summary)?);
    eprintln!(
        "chat loss {:.3} -> {:.3} ({:.0}% lower); answers ending with <end_of_turn>: {:.0}% -> {:.0}%; {} steps, {:.0} s",
        before.chat_loss,
        after.chat_loss,
        100.0 * reduction,
        100.0 * before.end_of_turn_share,
        100.0 * after.end_of_turn_share,
        trained_steps,
        train_seconds
    );
    Ok(())
}

/// Held-out chat loss and greedy answers to the instructions.
fn measure(
    model: &Model,
    held_out: &[Example],
    instructions: &[Conversation],
    cfg: &SftConfig,
    micro_batch: usize,
    max_new_tokens: usize,
) -> Result<Measured> {
    let t0 = Instant::now();
    let chat_loss = chat_loss(model, held_out, micro_batch, cfg.max_len)?;
    let tok = model.tokenizer()?;
    let eot = tok
        .token_to_id("<end_of_turn>")
        .context("the tokenizer has no <end_of_turn> token")?;
    let opts = GenerateOptions::greedy(max_new_tokens).stop_at(tok.stop_tokens());
    let mut answers = Vec::new();
    for c in instructions {
        let first = &c.messages[..1];
        let prompt = tok.encode_chat(first, true)?;
        let g = model.generate(&prompt, &opts, &mut Hooks::new())?;
        let ended = g.stop == StopReason::StopToken(eot);
        let text_tokens: Vec<u32> = g
            .tokens
            .iter()
            .copied()
            .filter(|t| !opts.stop_tokens.contains(t))
            .collect();
        answers.push(Answer {
            instruction: first[0].content.clone(),
            task: c.task.clone(),
            reference: c
                .messages
                .get(1)
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            answer: tok.decode(&text_tokens)?,
            ended_with_end_of_turn: ended,
            tokens: g.tokens.len(),
        });
    }
    let share = answers.iter().filter(|a| a.ended_with_end_of_turn).count() as f64
        / answers.len().max(1) as f64;
    Ok(Measured {
        chat_loss,
        end_of_turn_share: share,
        answers,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn detached(model: &Model) -> Result<Model> {
    let params = model
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.detach()))
        .collect();
    Ok(Model::from_params(
        model.config().clone(),
        params,
        model.tokenizer().ok().cloned(),
    )?)
}

fn write_samples(path: &Path, before: &Measured, after: &Measured) -> Result<()> {
    let mut md = String::from(
        "# Greedy answers to held-out instructions, base model and after chat fine-tuning\n\n",
    );
    for (b, a) in before.answers.iter().zip(&after.answers) {
        md.push_str(&format!(
            "## {} ({})\n\n**Instruction:** {}\n\n**Reference:** {}\n\n**Base** ({}):\n\n> {}\n\n**Fine-tuned** ({}):\n\n> {}\n\n",
            a.task,
            if a.ended_with_end_of_turn { "ended" } else { "did not end" },
            a.instruction.replace('\n', " "),
            a.reference,
            if b.ended_with_end_of_turn { "ended with <end_of_turn>" } else { "no <end_of_turn>" },
            b.answer.trim().replace('\n', "\n> "),
            if a.ended_with_end_of_turn { "ended with <end_of_turn>" } else { "no <end_of_turn>" },
            a.answer.trim().replace('\n', "\n> "),
        ));
    }
    std::fs::write(path, md)?;
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    Ok(sae_workbench::sae_core::io::write_json(path, v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts, rates and values this program cannot use are refused while parsing, naming the
    /// flag, before any file is read.
    #[test]
    fn bad_numbers_are_refused_naming_the_flag() {
        sae_workbench::cli::assert_refused::<Args>(
            &["chat_sft"],
            &[
                ("--device", "tpu"),
                ("--micro-batch", "0"),
                ("--grad-accum", "0"),
                ("--max-new-tokens", "0"),
                ("--checkpoint-every", "0"),
                ("--steps", "0"),
            ],
        );
    }
}
