//! Generation with hooks applied at every step.
//!
//! By default the prompt runs once and each step runs one new position against a KV cache
//! ([`crate::KvCache`]); hooks then see each position once, when it is computed. Because every
//! intervention the workspace applies during generation (SAE-feature clamps, additions, splices)
//! acts on each position independently, that is the same function as the old recompute path
//! (`kv_cache: false`: the whole sequence at every step), and greedy decoding gives the same
//! tokens either way (`tests/generate.rs`).

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// A draw from `softmax(logits / temperature)`, restricted to the `top_k` most likely tokens
    /// and to the smallest set whose probability reaches `top_p`, from a ChaCha8 stream seeded by
    /// `seed` (same seed, same text).
    Sample {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    },
}

impl Sampling {
    /// A seeded draw at a positive `temperature` from the smallest set of tokens whose
    /// probability reaches `top_p` (the usual chat setting; no top-k cut); greedy otherwise
    /// (temperature 0).
    pub fn at_temperature(temperature: f64, top_p: f64, seed: u64) -> Self {
        if temperature > 0.0 {
            Sampling::Sample {
                temperature,
                top_k: None,
                top_p: Some(top_p),
                seed,
            }
        } else {
            Sampling::Greedy
        }
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to add.
    pub max_new_tokens: usize,
    /// How to choose each token.
    pub sampling: Sampling,
    /// Generation ends after emitting one of these (e.g. `tokenizer.stop_tokens()`).
    pub stop_tokens: Vec<u32>,
    /// Run each step on the new position only, against a KV cache (default). `false` reruns
    /// the whole sequence at every step: slower, kept as the reference the cache is tested against.
    pub kv_cache: bool,
    /// Token used for the left padding of a batch of prompts (never attended to; default: the
    /// first prompt's first token).
    pub pad_token: Option<u32>,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`, no stop tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: Sampling::Greedy,
            stop_tokens: Vec::new(),
            kv_cache: true,
            pad_token: None,
        }
    }

    /// Seeded sampling at `temperature`, no top-k/top-p restriction, no stop tokens.
    pub fn sampled(max_new_tokens: usize, temperature: f64, seed: u64) -> Self {
        Self {
            max_new_tokens,
            sampling: Sampling::Sample {
                temperature,
                top_k: None,
                top_p: None,
                seed,
            },
            stop_tokens: Vec::new(),
            kv_cache: true,
            pad_token: None,
        }
    }

    /// Stop after any of `tokens`.
    pub fn stop_at(mut self, tokens: impl IntoIterator<Item = u32>) -> Self {
        self.stop_tokens.extend(tokens);
        self
    }

    /// Rerun the whole sequence at every step instead of using a KV cache.
    pub fn without_kv_cache(mut self) -> Self {
        self.kv_cache = false;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } = &self.sampling
        {
            if !(temperature.is_finite() && *temperature > 0.0) {
                return Err(Error::invalid(
                    "temperature",
                    format!("{temperature} (must be positive; use Sampling::Greedy for 0)"),
                ));
            }
            if *top_k == Some(0) {
                return Err(Error::invalid("top_k", "0 (must be at least 1)"));
            }
            if let Some(p) = top_p
                && !(*p > 0.0 && *p <= 1.0)
            {
                return Err(Error::invalid("top_p", format!("{p} (must be in (0, 1])")));
            }
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The model emitted this stop token (it is the last of `tokens`).
    StopToken(u32),
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The sequence reached the model's context length.
    ContextFull,
    /// The caller's callback asked to stop ([`crate::Model::generate_streaming`]).
    Cancelled,
}

/// The result of [`crate::Model::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens (not the prompt).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
}

/// Draws tokens from logits according to a [`Sampling`].
pub(crate) struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// The sampler of row `row` of a batch: stream `row` of the seed's ChaCha8 generator, so
    /// that row 0 draws what a batch of one draws.
    pub(crate) fn for_row(sampling: &Sampling, row: u64) -> Self {
        let seed = match sampling {
            Sampling::Sample { seed, .. } => *seed,
            Sampling::Greedy => 0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(row);
        Self {
            sampling: sampling.clone(),
            rng,
        }
    }

    /// The next token from `[vocab]` logits.
    pub(crate) fn next(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if let Some((i, v)) = logits.iter().enumerate().find(|(_, v)| v.is_nan()) {
            return Err(Error::invalid("logits", format!("NaN ({v}) at token {i}")));
        }
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 { (i, v) } else { best }
                })
                .0 as u32
        };
        match self.sampling {
            Sampling::Greedy => Ok(argmax()),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                let mut order: Vec<usize> = (0..logits.len()).collect();
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                if let Some(k) = top_k {
                    order.truncate(k.max(1));
                }
                let max = logits[order[0]] as f64;
                let mut probs: Vec<f64> = order
                    .iter()
                    .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
                    .collect();
                let total: f64 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= total);
                if let Some(p_max) = top_p {
                    let mut acc = 0.0;
                    let keep = probs
                        .iter()
                        .position(|p| {
                            acc += p;
                            acc >= p_max
                        })
                        .map_or(probs.len(), |i| i + 1);
                    probs.truncate(keep);
                    order.truncate(keep);
                }
                let total: f64 = probs.iter().sum();
                let mut u = self.rng.random::<f64>() * total;
                for (i, p) in probs.iter().enumerate() {
                    if u < *p {
                        return Ok(order[i] as u32);
                    }
                    u -= p;
                }
                Ok(order[order.len() - 1] as u32)
            }
        }
    }
}
