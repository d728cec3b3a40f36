//! The fine-tuning loop on a tiny random Gemma 3 (written by HF transformers, in
//! `transformer-hooks/tests/fixtures`): the loss mask, the optimizer's arithmetic, learning,
//! and checkpoints that survive `kill -9` and refuse damage.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sft::{
    Example, SftConfig, TokenKind, Trainer, chat_loss, encode_conversation,
    encode_conversation_kinds,
};
use transformer_hooks::{ChatMessage, ChatTemplate, Hooks, Model, Tokenizer};

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../transformer-hooks/tests/fixtures/tiny/gemma3")
}

fn tiny() -> Model {
    Model::load(&tiny_dir(), &Device::Cpu).unwrap()
}

/// Eight conversations of 12-20 tokens over the tiny vocabulary (128), the second half trained.
fn data() -> Vec<Example> {
    (0..8)
        .map(|i| {
            let n = 12 + i;
            let tokens: Vec<u32> = (0..n)
                .map(|j| ((i * 31 + j * 7 + 3) % 120) as u32 + 2)
                .collect();
            let trained = (0..n).map(|j| j >= n / 2).collect();
            Example { tokens, trained }
        })
        .collect()
}

fn config(steps: usize) -> SftConfig {
    SftConfig {
        lr: 3e-3,
        warmup_steps: 2,
        total_steps: steps,
        micro_batch: 2,
        grad_accum: 2,
        max_len: 32,
        ..SftConfig::default()
    }
}

fn weights_bits(model: &Model) -> Vec<(String, Vec<u32>)> {
    model
        .params()
        .iter()
        .map(|(k, v)| {
            let bits = v
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect();
            (k.clone(), bits)
        })
        .collect()
}

/// A word-level tokenizer with Gemma's special tokens, and Gemma's chat template.
fn word_tokenizer(dir: &Path) -> Tokenizer {
    let words = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<start_of_turn>",
        "<end_of_turn>",
        "user",
        "model",
        "\n",
        "what",
        "is",
        "a",
        "cat",
        "?",
        "an",
        "animal",
        ".",
        "and",
        "dog",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = words[..5]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            serde_json::json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": false},
            {"type": "Split", "pattern": {"Regex": "[?.\n]"}, "behavior": "Isolated", "invert": false},
        ]},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"},
    });
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, json.to_string()).unwrap();
    let mut t = Tokenizer::from_file(&p, Some(2), Some(1), true).unwrap();
    t.set_chat_template(Some(ChatTemplate::Gemma));
    t
}

/// Only the model's words and its `<end_of_turn>` are trained, in both turns of a two-exchange
/// conversation; the prompt part of each turn is exactly what generation is given.
#[test]
fn only_the_model_turns_are_trained() {
    let dir = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(dir.path());
    let messages = vec![
        ChatMessage::user("what is a cat?"),
        ChatMessage::assistant("an animal."),
        ChatMessage::user("and a dog?"),
        ChatMessage::assistant("an animal."),
    ];
    let e = encode_conversation(&tok, &messages).unwrap();
    assert_eq!(e.tokens.len(), e.trained.len());
    let id = |w: &str| tok.token_to_id(w).unwrap();
    let trained: Vec<u32> = e
        .tokens
        .iter()
        .zip(&e.trained)
        .filter(|(_, t)| **t)
        .map(|(&x, _)| x)
        .collect();
    let answer = [id("an"), id("animal"), id("."), id("<end_of_turn>")];
    assert_eq!(trained, [answer, answer].concat());
    // The whole sequence is the template's rendering, and each answer follows its prompt.
    assert_eq!(e.tokens, tok.encode_chat(&messages, false).unwrap());
    let prompt = tok.encode_chat(&messages[..1], true).unwrap();
    assert_eq!(&e.tokens[..prompt.len()], prompt.as_slice());
    assert!(e.trained[prompt.len()] && !e.trained[prompt.len() - 1]);
}

/// Each token's kind: the user's words are `User`, the model's words `Model`, and every piece of
/// markup (BOS, turn starts, role names, end-of-turn, newlines) `Template`; the tokens are those
/// of `encode_conversation`.
#[test]
fn token_kinds_split_template_user_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let tok = word_tokenizer(dir.path());
    let messages = vec![
        ChatMessage::user("what is a cat?"),
        ChatMessage::assistant("an animal."),
        ChatMessage::user("and a dog?"),
        ChatMessage::assistant("a dog."),
    ];
    let (e, kinds) = encode_conversation_kinds(&tok, &messages).unwrap();
    assert_eq!(e, encode_conversation(&tok, &messages).unwrap());
    assert_eq!(kinds.len(), e.tokens.len());
    let words = |kind: TokenKind| -> Vec<String> {
        e.tokens
            .iter()
            .zip(&kinds)
            .filter(|(_, k)| **k == kind)
            .map(|(&t, _)| tok.id_to_token(t).unwrap())
            .collect()
    };
    let w = |s: &str| -> Vec<String> { s.split(' ').map(String::from).collect() };
    assert_eq!(words(TokenKind::User), w("what is a cat ? and a dog ?"));
    assert_eq!(words(TokenKind::Model), w("an animal . a dog ."));
    let template = words(TokenKind::Template);
    for t in template.iter() {
        assert!(
            [
                "<bos>",
                "<start_of_turn>",
                "<end_of_turn>",
                "user",
                "model",
                "\n"
            ]
            .contains(&t.as_str()),
            "{t:?} counted as template"
        );
    }
    // BOS, then per exchange: <start_of_turn> user \n ... <end_of_turn> \n <start_of_turn>
    // model \n ... <end_of_turn> \n.
    assert_eq!(template.len(), 1 + 2 * 10);
    assert_eq!(template.iter().filter(|t| *t == "<end_of_turn>").count(), 4);
    // A model turn's end-of-turn token is trained but counted as template.
    let eot = tok.token_to_id("<end_of_turn>").unwrap();
    let i = (0..e.tokens.len())
        .rfind(|&i| e.tokens[i] == eot && e.trained[i])
        .unwrap();
    assert_eq!(kinds[i], TokenKind::Template);
}

/// After one step with clipping and weight decay off, Adam moves each weight by `lr` against the
/// sign of its gradient (m_hat = g, v_hat = g^2), where the gradient is the mean loss over the
/// step's trained tokens, taken here independently with autograd on the whole batch at once.
#[test]
fn first_step_is_sign_descent_on_the_mean_trained_token_loss() {
    let data = data();
    let cfg = SftConfig {
        clip_norm: 0.0,
        weight_decay: 0.0,
        warmup_steps: 1,
        ..config(4)
    };
    // Independent gradient of the same batch: all four conversations in one forward pass.
    let mut reference = tiny();
    let probe = Trainer::new(&mut reference, cfg.clone()).unwrap();
    let picked: Vec<Example> = probe
        .batch_indices(data.len(), 0)
        .into_iter()
        .map(|i| data[i].clone())
        .collect();
    let vars = reference
        .trainable_params_where(|n| n != "embed.weight")
        .unwrap();
    let lp = sft::batch_logprobs(&reference, &picked).unwrap().unwrap();
    let loss = lp.mean_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();

    let mut model = tiny();
    let before: Vec<(String, Tensor)> = model
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.copy().unwrap()))
        .collect();
    let mut trainer = Trainer::new(&mut model, cfg.clone()).unwrap();
    let log = trainer.train_step(&model, &data).unwrap();
    assert!((log.loss - f64::from(loss.to_scalar::<f32>().unwrap())).abs() < 1e-5);
    let mut checked = 0;
    for (name, var) in &vars {
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w0: Vec<f32> = before
            .iter()
            .find(|(k, _)| k == name)
            .unwrap()
            .1
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w1: Vec<f32> = model.params()[name]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..g.len() {
            if g[i].abs() > 1e-4 {
                let step = w1[i] - w0[i];
                let want = -(cfg.lr_at(0) as f32) * g[i].signum();
                assert!(
                    (step - want).abs() < 1e-3 * cfg.lr as f32 + 1e-6,
                    "{name}[{i}]: moved {step}, expected {want}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 1000, "only {checked} weights checked");
}

/// A few dozen steps on eight short conversations drive their loss well down.
#[test]
fn training_lowers_the_loss_on_the_model_turns() {
    let data = data();
    let mut model = tiny();
    let cfg = config(40);
    let before = chat_loss(&model, &data, 4, cfg.max_len).unwrap();
    let mut trainer = Trainer::new(&mut model, cfg).unwrap();
    for _ in 0..40 {
        trainer.train_step(&model, &data).unwrap();
    }
    let after = chat_loss(&model, &data, 4, 32).unwrap();
    assert!(after < 0.5 * before, "loss {before} -> {after}");
    // The embedding stays frozen by default.
    let fresh = tiny();
    let a = fresh.params()["embed.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = model.params()["embed.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

const KILL_CHILD_DIR: &str = "SFT_TEST_KILL_CHILD_DIR";
const KILL_STEPS: usize = 40;

/// `kill -9` mid-run, then resume from the checkpoint: the final weights equal an uninterrupted
/// run's bit for bit. The test re-runs its own binary as the process to kill.
#[test]
fn sigkill_mid_training_then_resume_is_bit_identical() {
    let data = data();
    if let Some(dir) = std::env::var_os(KILL_CHILD_DIR) {
        let dir = PathBuf::from(dir);
        let mut model = tiny();
        let mut t = Trainer::new(&mut model, config(KILL_STEPS)).unwrap();
        while t.step_index() < KILL_STEPS {
            t.train_step(&model, &data).unwrap();
            t.save_checkpoint(&dir.join("ckpt")).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "sigkill_mid_training_then_resume_is_bit_identical",
            "--exact",
            "--test-threads=1",
        ])
        .env(KILL_CHILD_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = dir.path().join("ckpt");
    let step_of = |p: &Path| -> usize {
        std::fs::read_to_string(p.join("state.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0) as usize
    };
    let start = std::time::Instant::now();
    while step_of(&ckpt) < 5 {
        assert!(
            start.elapsed().as_secs() < 120,
            "the child wrote no checkpoint"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());

    let mut resumed_model = tiny();
    let mut resumed = Trainer::new(&mut resumed_model, config(KILL_STEPS)).unwrap();
    resumed.load_checkpoint(&ckpt).unwrap();
    let done = resumed.step_index();
    assert!((5..KILL_STEPS).contains(&done), "resumed at step {done}");
    while resumed.step_index() < KILL_STEPS {
        resumed.train_step(&resumed_model, &data).unwrap();
    }
    let mut full_model = tiny();
    let mut full = Trainer::new(&mut full_model, config(KILL_STEPS)).unwrap();
    while full.step_index() < KILL_STEPS {
        full.train_step(&full_model, &data).unwrap();
    }
    assert!(
        weights_bits(&full_model) == weights_bits(&resumed_model),
        "resumed after SIGKILL at step {done}: the weights differ from the uninterrupted run"
    );
    let losses = |t: &Trainer| -> Vec<(usize, u64, u64)> {
        t.history()
            .iter()
            .map(|h| (h.step, h.loss.to_bits(), h.grad_norm.to_bits()))
            .collect()
    };
    assert_eq!(losses(&full), losses(&resumed));
}

/// A checkpoint with a file cut short, or made under another config, is refused with an error
/// naming the problem; an intact one restores step and history.
#[test]
fn damaged_or_foreign_checkpoints_are_refused() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut model = tiny();
    let mut t = Trainer::new(&mut model, config(6)).unwrap();
    t.train_step(&model, &data).unwrap();
    t.save_checkpoint(&ckpt).unwrap();

    let mut other = tiny();
    let mut ok = Trainer::new(&mut other, config(6)).unwrap();
    ok.load_checkpoint(&ckpt).unwrap();
    assert_eq!(ok.step_index(), 1);
    assert_eq!(ok.history(), t.history());
    assert_eq!(ok.history().len(), 1);

    let mut other = tiny();
    let mut foreign = Trainer::new(
        &mut other,
        SftConfig {
            lr: 1.0,
            ..config(6)
        },
    )
    .unwrap();
    let e = foreign.load_checkpoint(&ckpt).unwrap_err().to_string();
    assert!(e.contains("different config"), "{e}");

    let w = ckpt.join("adamw.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let mut other = tiny();
    let mut damaged = Trainer::new(&mut other, config(6)).unwrap();
    let e = damaged.load_checkpoint(&ckpt).unwrap_err().to_string();
    assert!(
        e.contains("damaged") && e.contains("adamw.safetensors"),
        "{e}"
    );

    let mut other = tiny();
    let mut missing = Trainer::new(&mut other, config(6)).unwrap();
    let e = missing
        .load_checkpoint(&dir.path().join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

/// The positions API scores exactly what the all-positions one does at those positions.
#[test]
fn next_token_logprobs_equal_logprobs_at_the_same_positions() {
    let model = tiny();
    let seqs = vec![data()[0].tokens.clone(), data()[3].tokens[..10].to_vec()];
    let (tokens, mask) = model.pad_batch(&seqs, 0, false).unwrap();
    let all: Vec<Vec<f32>> = model
        .logprobs_with_hooks(&tokens, Some(&mask), &mut Hooks::new())
        .unwrap()
        .to_vec2()
        .unwrap();
    let positions = [(0, 0), (1, 8), (0, 10), (1, 3)];
    let some: Vec<f32> = model
        .next_token_logprobs(&tokens, Some(&mask), &mut Hooks::new(), &positions)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (k, &(r, p)) in positions.iter().enumerate() {
        assert!((some[k] - all[r][p]).abs() < 1e-5, "({r}, {p})");
    }
    let e = model
        .next_token_logprobs(&tokens, Some(&mask), &mut Hooks::new(), &[(0, 11)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside"), "{e}");
}
