//! The fine-tuning loop: loss on the model's turns only, gradient accumulation, clipping, AdamW
//! under a warm-up + cosine schedule, and checkpoints that resume bit for bit.
//!
//! The optimizer works on host buffers: candle's element-wise ops on the ~100M parameters of a
//! small model cost seconds per step where one fused pass costs a fraction of one, and host
//! buffers make the state easy to save (candle-nn's AdamW keeps its moments private).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use transformer_hooks::{ChatMessage, Hooks, Model, Tokenizer};

use crate::error::{Error, Result};

/// A tokenized conversation: `trained[i]` says whether token `i` is one the model is taught to
/// produce (its own turns and their end-of-turn token), i.e. scored from position `i - 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Example {
    /// Tokens scored by the loss.
    pub fn n_trained(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }

    /// The first `max_len` tokens (a longer conversation's later trained tokens are dropped).
    pub fn truncated(&self, max_len: usize) -> Example {
        let n = self.tokens.len().min(max_len);
        Example {
            tokens: self.tokens[..n].to_vec(),
            trained: self.trained[..n].to_vec(),
        }
    }
}

/// Which part of a chat conversation a token belongs to, for measuring a model (or an SAE
/// spliced into it) separately on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// Markup the template adds: BOS, turn starts and role names, end-of-turn tokens, newlines
    /// between turns.
    Template,
    /// The content of a user (or system) message.
    User,
    /// The content of the model's own turns.
    Model,
}

impl TokenKind {
    pub const ALL: [TokenKind; 3] = [TokenKind::Template, TokenKind::User, TokenKind::Model];

    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Template => "template",
            TokenKind::User => "user",
            TokenKind::Model => "model",
        }
    }
}

/// Tokenizes `messages` with the tokenizer's chat template, marking the assistant's content and
/// its end-of-turn token as trained and everything else (template, user turns) as context.
///
/// Each assistant turn is found as the difference between the prompt that asks for it (the
/// template's generation prompt) and the conversation that contains it, so the split holds for
/// any template the tokenizer knows, and the prompt tokens equal what generation will see.
///
/// # Errors
/// No chat template, turns that do not fit it, or a template whose rendering of a conversation
/// does not extend its generation prompt.
pub fn encode_conversation(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<Example> {
    Ok(encode_conversation_kinds(tok, messages)?.0)
}

/// [`encode_conversation`] plus each token's [`TokenKind`]: a token is `User` or `Model` when
/// its text lies inside a message's content, `Template` otherwise. The tokens are the same.
///
/// # Errors
/// As [`encode_conversation`].
pub fn encode_conversation_kinds(
    tok: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<(Example, Vec<TokenKind>)> {
    let template = tok
        .chat_template()
        .ok_or_else(|| Error::invalid("tokenizer", "it has no chat template"))?;
    let eot = template.end_of_turn();
    let mut tokens = Vec::new();
    let mut trained = Vec::new();
    let mut kinds = Vec::new();
    let mut done = String::new();
    // Tokenizes one piece of the rendering; `spans` are the byte ranges of message content in
    // it, with the kind their tokens get.
    let mut push = |text: &str,
                    train: bool,
                    spans: &[(usize, usize, TokenKind)],
                    tokens: &mut Vec<u32>|
     -> Result<()> {
        let enc = tok
            .inner()
            .encode(text, false)
            .map_err(|e| Error::invalid("tokenizer", format!("encoding a conversation: {e}")))?;
        for &(a, b) in enc.get_offsets() {
            let kind = spans
                .iter()
                .find(|&&(s, e, _)| a >= s && b <= e && b > a)
                .map_or(TokenKind::Template, |&(_, _, k)| k);
            kinds.push(kind);
        }
        trained.extend(std::iter::repeat_n(train, enc.len()));
        tokens.extend_from_slice(enc.get_ids());
        Ok(())
    };
    let mut from = 0;
    for (k, m) in messages.iter().enumerate() {
        if m.role != transformer_hooks::Role::Assistant {
            continue;
        }
        let prompt = template.render(&messages[..k], true)?;
        let full = template.render(&messages[..=k], false)?;
        let (Some(context), Some(turn)) = (prompt.strip_prefix(&done), full.strip_prefix(&prompt))
        else {
            return Err(Error::invalid(
                "chat template",
                format!("its rendering of message {k} does not extend the prompt before it"),
            ));
        };
        let Some(end) = turn.find(eot) else {
            return Err(Error::invalid(
                "chat template",
                format!("assistant message {k} has no `{eot}`"),
            ));
        };
        // The user and system messages since the last model turn, found in order.
        let mut spans = Vec::new();
        let mut cursor = 0;
        for u in &messages[from..k] {
            let text = u.content.trim();
            if let Some(i) = context[cursor..].find(text) {
                let s = cursor + i;
                spans.push((s, s + text.len(), TokenKind::User));
                cursor = s + text.len();
            }
        }
        push(context, false, &spans, &mut tokens)?;
        let reply = &turn[..end + eot.len()];
        let text = m.content.trim();
        let model_span = reply
            .find(text)
            .map(|i| vec![(i, i + text.len(), TokenKind::Model)])
            .unwrap_or_default();
        push(reply, true, &model_span, &mut tokens)?;
        push(&turn[end + eot.len()..], false, &[], &mut tokens)?;
        done = full;
        from = k + 1;
    }
    Ok((Example { tokens, trained }, kinds))
}

/// What a fine-tuning run does. The defaults are a full fine-tune of everything but the
/// embedding at a learning rate that teaches a 270M model a chat format in a few hundred steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SftConfig {
    /// Peak learning rate, reached after `warmup_steps` and decayed by a cosine to
    /// `lr * final_lr_fraction` at `total_steps`.
    pub lr: f64,
    pub final_lr_fraction: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// Conversations per forward pass, and forward passes per optimizer step.
    pub micro_batch: usize,
    pub grad_accum: usize,
    /// Conversations longer than this are cut (their trained tokens past it are dropped).
    pub max_len: usize,
    /// Global gradient-norm clip (0 disables).
    pub clip_norm: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Also train the (tied) token embedding: two more vocabulary-sized products per step.
    pub train_embeddings: bool,
    /// Seeds the order in which conversations are visited.
    pub seed: u64,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            lr: 5e-5,
            final_lr_fraction: 0.1,
            warmup_steps: 20,
            total_steps: 400,
            micro_batch: 4,
            grad_accum: 4,
            max_len: 256,
            clip_norm: 1.0,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            train_embeddings: false,
            seed: 0,
        }
    }
}

impl SftConfig {
    /// The learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let floor = self.lr * self.final_lr_fraction;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str, why: &str| Err(Error::invalid(format!("SFT config `{what}`"), why));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be a positive number");
        }
        if self.micro_batch == 0 || self.grad_accum == 0 || self.total_steps == 0 {
            return bad(
                "micro_batch/grad_accum/total_steps",
                "must all be at least 1",
            );
        }
        if self.max_len < 2 {
            return bad("max_len", "must be at least 2 tokens");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1/beta2", "must be in [0, 1)");
        }
        Ok(())
    }
}

/// One optimizer step's record.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    /// Mean next-token loss (nats) over the step's trained tokens.
    pub loss: f64,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub trained_tokens: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// AdamW over host copies of the trainable weights.
struct AdamW {
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Elements per parallel task; fixed so that sums come out the same on every run.
const CHUNK: usize = 1 << 16;

/// Fine-tunes a model's weights in place.
pub struct Trainer {
    cfg: SftConfig,
    vars: Vec<(String, Var)>,
    adam: AdamW,
    step: usize,
    history: Vec<StepLog>,
}

/// The canonical weight names that carry the vocabulary (tied or not).
fn is_embedding(name: &str) -> bool {
    name == "embed.weight" || name == "unembed.weight"
}

impl Trainer {
    /// Makes the model's weights trainable (all but the embedding unless
    /// `cfg.train_embeddings`), with fresh optimizer state.
    ///
    /// # Errors
    /// An invalid config; a model not in f32 (the optimizer and checkpoints are f32).
    pub fn new(model: &mut Model, cfg: SftConfig) -> Result<Self> {
        cfg.validate()?;
        if model.dtype() != DType::F32 {
            return Err(Error::invalid(
                "model",
                format!("dtype {:?}; fine-tuning needs f32 weights", model.dtype()),
            ));
        }
        let train_embeddings = cfg.train_embeddings;
        let vars = model.trainable_params_where(|n| train_embeddings || !is_embedding(n))?;
        let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        let adam = AdamW {
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        };
        Ok(Self {
            cfg,
            vars,
            adam,
            step: 0,
            history: Vec::new(),
        })
    }

    /// Optimizer steps taken.
    pub fn step_index(&self) -> usize {
        self.step
    }

    pub fn config(&self) -> &SftConfig {
        &self.cfg
    }

    /// Every step's record so far (restored with a checkpoint).
    pub fn history(&self) -> &[StepLog] {
        &self.history
    }

    /// Trainable parameter count.
    pub fn n_trainable(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The conversations of optimizer step `step`, `micro_batch * grad_accum` of them: a fresh
    /// seeded permutation per epoch, so the order depends on nothing but the seed and the step.
    pub fn batch_indices(&self, n_examples: usize, step: usize) -> Vec<usize> {
        let per_step = self.cfg.micro_batch * self.cfg.grad_accum;
        let mut out = Vec::with_capacity(per_step);
        let mut epoch_cache: Option<(usize, Vec<usize>)> = None;
        for k in 0..per_step {
            let global = step * per_step + k;
            let (epoch, i) = (global / n_examples, global % n_examples);
            if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                epoch_cache = Some((epoch, permutation(n_examples, self.cfg.seed, epoch)));
            }
            if let Some((_, perm)) = &epoch_cache {
                out.push(perm[i]);
            }
        }
        out
    }

    /// One optimizer step on the conversations [`Trainer::batch_indices`] picks from `data`.
    ///
    /// # Errors
    /// Empty data, a forward/backward failure, or a non-finite loss (the weights are left as
    /// they were, so the last checkpoint stays good).
    pub fn train_step(&mut self, model: &Model, data: &[Example]) -> Result<StepLog> {
        if data.is_empty() {
            return Err(Error::invalid("training data", "no conversations"));
        }
        let t0 = std::time::Instant::now();
        let picked: Vec<Example> = self
            .batch_indices(data.len(), self.step)
            .into_iter()
            .map(|i| data[i].truncated(self.cfg.max_len))
            .collect();
        let n_trained: usize = picked.iter().map(Example::n_trained).sum();
        if n_trained == 0 {
            return Err(Error::invalid(
                "training data",
                format!(
                    "step {} has no trained tokens (conversations without an assistant turn inside max_len)",
                    self.step
                ),
            ));
        }
        let mut grads: Vec<Vec<f32>> = self
            .vars
            .iter()
            .map(|(_, v)| vec![0.0; v.elem_count()])
            .collect();
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        for batch in picked.chunks(self.cfg.micro_batch) {
            tokens += batch.iter().map(|e| e.tokens.len()).sum::<usize>();
            let Some(lp) = batch_logprobs(model, batch)? else {
                continue;
            };
            let sum = lp.sum_all()?;
            loss_sum -= f64::from(sum.to_scalar::<f32>()?);
            let loss = (sum.neg()? / n_trained as f64)?;
            let g = loss.backward()?;
            for ((_, var), acc) in self.vars.iter().zip(grads.iter_mut()) {
                if let Some(t) = g.get(var.as_tensor()) {
                    let t = t.flatten_all()?.to_vec1::<f32>()?;
                    acc.par_chunks_mut(CHUNK)
                        .zip(t.par_chunks(CHUNK))
                        .for_each(|(a, t)| a.iter_mut().zip(t).for_each(|(a, t)| *a += t));
                }
            }
        }
        let loss = loss_sum / n_trained as f64;
        let grad_norm = global_norm(&grads);
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::invalid(
                "training",
                format!(
                    "step {}: loss {loss}, gradient norm {grad_norm}; the weights were left unchanged (lower the learning rate or resume from the last checkpoint)",
                    self.step
                ),
            ));
        }
        let lr = self.cfg.lr_at(self.step);
        let scale = if self.cfg.clip_norm > 0.0 && grad_norm > self.cfg.clip_norm {
            self.cfg.clip_norm / grad_norm
        } else {
            1.0
        };
        self.apply_adamw(&grads, lr, scale as f32)?;
        self.step += 1;
        let log = StepLog {
            step: self.step,
            loss,
            lr,
            grad_norm,
            trained_tokens: n_trained,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
        };
        self.history.push(log);
        Ok(log)
    }

    fn apply_adamw(&mut self, grads: &[Vec<f32>], lr: f64, scale: f32) -> Result<()> {
        let t = (self.step + 1) as i32;
        let (b1, b2) = (self.cfg.beta1 as f32, self.cfg.beta2 as f32);
        let bc1 = 1.0 - self.cfg.beta1.powi(t);
        let bc2 = 1.0 - self.cfg.beta2.powi(t);
        // lr * m_hat / (sqrt(v_hat) + eps) with the bias corrections folded into two scalars.
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.cfg.eps as f32;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let decay = if var.rank() >= 2 {
                (lr * self.cfg.weight_decay) as f32
            } else {
                0.0
            };
            let mut w = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let (m, v) = (&mut self.adam.m[i], &mut self.adam.v[i]);
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(grads[i].par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| {
                    for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
                        let g = g * scale;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *w -= decay * *w;
                        *w -= step_size * *m / ((*v).sqrt() / bc2_sqrt + eps);
                    }
                });
            var.set(&Tensor::from_vec(w, var.shape(), var.device())?)?;
        }
        Ok(())
    }

    /// Writes weights, optimizer state and history to `dir` atomically: into `dir.tmp`, then
    /// renamed over `dir`, so a kill at any moment leaves either the old or the new checkpoint.
    ///
    /// # Errors
    /// A file that cannot be written.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let tmp = sibling(dir, "tmp");
        let old = sibling(dir, "old");
        for d in [&tmp, &old] {
            if d.exists() {
                std::fs::remove_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut weights = Vec::new();
        let mut moments = Vec::new();
        for (i, (name, var)) in self.vars.iter().enumerate() {
            weights.push((name.clone(), var.as_tensor().detach().contiguous()?));
            let shape = var.shape().clone();
            let dev = var.device();
            moments.push((
                format!("m.{name}"),
                Tensor::from_slice(&self.adam.m[i], &shape, dev)?,
            ));
            moments.push((
                format!("v.{name}"),
                Tensor::from_slice(&self.adam.v[i], &shape, dev)?,
            ));
        }
        let wp = tmp.join("weights.safetensors");
        let mp = tmp.join("adamw.safetensors");
        candle_core::safetensors::save(&weights.into_iter().collect(), &wp)?;
        candle_core::safetensors::save(&moments.into_iter().collect(), &mp)?;
        let state = CheckpointState {
            step: self.step,
            config: self.cfg.clone(),
            history: self.history.clone(),
            weights_sha256: sha256_file(&wp)?,
            adamw_sha256: sha256_file(&mp)?,
        };
        let json = serde_json::to_string_pretty(&state)
            .map_err(|e| Error::invalid("checkpoint state", e.to_string()))?;
        let sp = tmp.join("state.json");
        std::fs::write(&sp, json).map_err(|e| Error::io(&sp, e))?;
        for f in [&wp, &mp, &sp] {
            std::fs::File::open(f)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(f, e))?;
        }
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(&tmp, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }

    /// Restores weights, optimizer state, step and history from a checkpoint of the same run.
    /// A checkpoint left by a kill between the two renames of [`Trainer::save_checkpoint`] is
    /// found under `dir.old`.
    ///
    /// # Errors
    /// A damaged checkpoint (its files do not match the checksums it recorded), one made with a
    /// different config, or weights whose names or shapes differ from this model's.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let dir = checkpoint_dir(dir).ok_or_else(|| {
            Error::invalid("checkpoint", format!("{} does not exist", dir.display()))
        })?;
        let sp = dir.join("state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: sp.clone(),
            message: format!("not a checkpoint state: {e}"),
        })?;
        if state.config != self.cfg {
            return Err(Error::Format {
                path: sp,
                message: format!(
                    "made with a different config ({:?}); this run has {:?}: use another output folder or the same settings",
                    state.config, self.cfg
                ),
            });
        }
        let wp = dir.join("weights.safetensors");
        let mp = dir.join("adamw.safetensors");
        for (p, want) in [(&wp, &state.weights_sha256), (&mp, &state.adamw_sha256)] {
            let got = sha256_file(p)?;
            if &got != want {
                return Err(Error::Format {
                    path: p.clone(),
                    message: format!(
                        "damaged: sha256 {got}, the checkpoint recorded {want}; delete the checkpoint folder to start over"
                    ),
                });
            }
        }
        let dev = self.vars[0].1.device().clone();
        let weights = candle_core::safetensors::load(&wp, &dev)?;
        let moments = candle_core::safetensors::load(&mp, &dev)?;
        let get = |map: &std::collections::HashMap<String, Tensor>,
                   key: &str,
                   path: &Path,
                   shape: &[usize]|
         -> Result<Tensor> {
            let t = map.get(key).ok_or_else(|| Error::Format {
                path: path.to_path_buf(),
                message: format!("no tensor `{key}`"),
            })?;
            if t.dims() != shape {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    message: format!(
                        "`{key}` has shape {:?}, the model needs {shape:?}",
                        t.dims()
                    ),
                });
            }
            Ok(t.clone())
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let shape = var.dims().to_vec();
            var.set(&get(&weights, name, &wp, &shape)?)?;
            self.adam.m[i] = get(&moments, &format!("m.{name}"), &mp, &shape)?
                .flatten_all()?
                .to_vec1()?;
            self.adam.v[i] = get(&moments, &format!("v.{name}"), &mp, &shape)?
                .flatten_all()?
                .to_vec1()?;
        }
        self.step = state.step;
        self.history = state.history;
        Ok(())
    }
}

/// The folder a checkpoint at `dir` is actually in, if any.
pub fn checkpoint_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), sibling(dir, "old")]
        .into_iter()
        .find(|d| d.join("state.json").exists())
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    config: SftConfig,
    history: Vec<StepLog>,
    weights_sha256: String,
    adamw_sha256: String,
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(format!(".{suffix}"));
    PathBuf::from(s)
}

fn sha256_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// A seeded permutation of `0..n` for one epoch (Fisher-Yates on a ChaCha stream).
fn permutation(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.random_range(0..=i));
    }
    p
}

/// The L2 norm of all gradients together, summed in a fixed order.
fn global_norm(grads: &[Vec<f32>]) -> f64 {
    grads
        .iter()
        .map(|g| {
            g.par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
                .collect::<Vec<f64>>()
                .into_iter()
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

/// The next-token log-probabilities of the trained tokens of a batch (right-padded), `[n]`, or
/// `None` when the batch has no trained token.
pub fn batch_logprobs(model: &Model, batch: &[Example]) -> Result<Option<Tensor>> {
    let mut positions = Vec::new();
    for (r, e) in batch.iter().enumerate() {
        for (i, &t) in e.trained.iter().enumerate().skip(1) {
            if t {
                positions.push((r, i - 1));
            }
        }
    }
    if positions.is_empty() {
        return Ok(None);
    }
    let seqs: Vec<Vec<u32>> = batch.iter().map(|e| e.tokens.clone()).collect();
    let pad = model
        .config()
        .pad_token_id
        .or(model.config().eos_token_id)
        .unwrap_or(0);
    let (tokens, mask) = model.pad_batch(&seqs, pad, false)?;
    let all_full = seqs.iter().all(|s| s.len() == seqs[0].len());
    let mask = if all_full { None } else { Some(&mask) };
    Ok(Some(model.next_token_logprobs(
        &tokens,
        mask,
        &mut Hooks::new(),
        &positions,
    )?))
}

/// Mean loss (nats per trained token) of `model` on `data`, `micro_batch` conversations at a
/// time, each cut to `max_len` tokens: the held-out chat loss.
///
/// # Errors
/// A forward failure, or data without a single trained token.
pub fn chat_loss(
    model: &Model,
    data: &[Example],
    micro_batch: usize,
    max_len: usize,
) -> Result<f64> {
    let mut sum = 0.0;
    let mut n = 0usize;
    for batch in data.chunks(micro_batch.max(1)) {
        let cut: Vec<Example> = batch.iter().map(|e| e.truncated(max_len)).collect();
        if let Some(lp) = batch_logprobs(model, &cut)? {
            n += lp.dim(0)?;
            sum -= f64::from(lp.sum_all()?.to_scalar::<f32>()?);
        }
    }
    if n == 0 {
        return Err(Error::invalid("evaluation data", "no trained tokens"));
    }
    Ok(sum / n as f64)
}
