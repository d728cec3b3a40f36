//! Chat conversations for SAEs that must know the chat model's own turns (the steering SAEs):
//! prompts built from passages of the corpus documents, answered by the model itself, rendered
//! in its chat template. Each conversation takes the split of the document its passage came
//! from, so held-out documents stay held out.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use sae_workbench::activation_store::{Document, Split, SplitSpec, TokenizedDocument};
use sae_workbench::sae_core::io::write_atomic;
use sae_workbench::transformer_hooks::{ChatMessage, GenerateOptions, Hooks, Model, Sampling};
use serde::{Deserialize, Serialize};

/// What the user asks about a passage; `{}` is the passage.
const TEMPLATES: [&str; 8] = [
    "Summarize this passage in one or two sentences:\n\n{}",
    "What is this passage about?\n\n{}",
    "Continue this text:\n\n{}",
    "Explain this in simple words: {}",
    "Who might have written this, and what is happening? {}",
    "Rewrite this passage in modern English:\n\n{}",
    "What is the mood of this passage? {}",
    "Give three questions a student could ask about this text:\n\n{}",
];

#[derive(Serialize, Deserialize)]
struct Conversation {
    id: String,
    split: Split,
    user: String,
    assistant: String,
}

/// `n` training conversations and `n / 8` test ones (at least one), generated once and kept in
/// `path` (JSON lines), which a rerun reads back instead of generating again.
pub fn conversations(
    model: &Model,
    docs: &[Document],
    n: usize,
    seed: u64,
    path: &Path,
) -> Result<Vec<TokenizedDocument>> {
    let tok = model.tokenizer()?;
    let convs: Vec<Conversation> = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("{}", path.display())))
            .collect::<Result<_>>()?,
        Err(_) => {
            let convs = generate(model, docs, n, seed)?;
            let mut lines = Vec::new();
            for c in &convs {
                writeln!(lines, "{}", serde_json::to_string(c)?)?;
            }
            write_atomic(path, &lines)?;
            convs
        }
    };
    convs
        .iter()
        .map(|c| {
            let tokens = tok.encode_chat(
                &[
                    ChatMessage::user(c.user.as_str()),
                    ChatMessage::assistant(c.assistant.as_str()),
                ],
                false,
            )?;
            Ok(TokenizedDocument {
                id: c.id.clone(),
                split: c.split,
                tokens,
            })
        })
        .collect()
}

fn generate(model: &Model, docs: &[Document], n: usize, seed: u64) -> Result<Vec<Conversation>> {
    let tok = model.tokenizer()?;
    let spec = SplitSpec::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xc4a7);
    let by_split = |s: Split| -> Vec<&Document> {
        docs.iter()
            .filter(|d| spec.split_of(&d.id) == s && d.text.split_whitespace().nth(80).is_some())
            .collect()
    };
    let (train, test) = (by_split(Split::Train), by_split(Split::Test));
    let mut wanted: Vec<(Split, String)> = Vec::new();
    for (split, pool, count) in [
        (Split::Train, &train, n),
        (Split::Test, &test, (n / 8).max(1)),
    ] {
        for _ in 0..count {
            let Some(doc) = pool.choose(&mut rng) else {
                break;
            };
            let words: Vec<&str> = doc.text.split_whitespace().collect();
            let len = rng.random_range(25..60).min(words.len());
            let start = rng.random_range(0..=words.len() - len);
            let passage = words[start..start + len].join(" ");
            let template = TEMPLATES[rng.random_range(0..TEMPLATES.len())];
            wanted.push((split, template.replace("{}", &passage)));
        }
    }
    let pb = ProgressBar::new(wanted.len() as u64).with_style(
        ProgressStyle::with_template(
            "chat answers {wide_bar} {human_pos}/{human_len} conversations eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut out = Vec::with_capacity(wanted.len());
    for (bi, chunk) in wanted.chunks(16).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(_, u)| tok.encode_chat(&[ChatMessage::user(u.as_str())], true))
            .collect::<std::result::Result<_, _>>()?;
        let opts = GenerateOptions {
            sampling: Sampling::Sample {
                temperature: 0.8,
                top_k: None,
                top_p: Some(0.95),
                seed: seed.wrapping_add(bi as u64),
            },
            ..GenerateOptions::greedy(96)
        }
        .stop_at(tok.stop_tokens());
        let gens = model.generate_batch(&prompts, &opts, &mut Hooks::new())?;
        for ((split, user), g) in chunk.iter().zip(gens) {
            let mut answer = g.tokens;
            answer.retain(|t| !opts.stop_tokens.contains(t));
            out.push(Conversation {
                id: format!("chat/{}/{:05}", split.as_str(), out.len()),
                split: *split,
                user: user.clone(),
                assistant: tok.decode(&answer)?.trim().to_string(),
            });
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}
