//! What steering did, measured: whether a response mentions a topic, whether an answer agrees,
//! the cost in perplexity and KL, and bootstrap intervals over prompts.

use candle_core::{D, Tensor};
use rand::{Rng, SeedableRng};
use transformer_hooks::{Hooks, Model};

use crate::error::{Result, SteeringError};

/// A word list: a text mentions the topic when one of its words equals an entry, or starts with
/// an entry written with a trailing `*` (`whal*` matches "whale", "whales", "whaling").
/// Case-insensitive; words are runs of letters.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WordList {
    pub entries: Vec<String>,
}

impl WordList {
    /// From entries separated by commas, whitespace or newlines (a file or a flag); `#` starts a
    /// comment line.
    ///
    /// # Errors
    /// No entry at all.
    pub fn parse(text: &str) -> Result<Self> {
        let entries: Vec<String> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split(|c: char| c == ',' || c.is_whitespace()))
            .map(|w| w.trim().to_lowercase())
            .filter(|w| !w.is_empty())
            .collect();
        if entries.is_empty() {
            return Err(SteeringError::invalid("word list", "no words"));
        }
        Ok(Self { entries })
    }

    /// The first word of `text` in the list.
    pub fn first_match<'t>(&self, text: &'t str) -> Option<&'t str> {
        text.split(|c: char| !c.is_alphabetic())
            .filter(|w| !w.is_empty())
            .find(|w| {
                let w = w.to_lowercase();
                self.entries.iter().any(|e| match e.strip_suffix('*') {
                    Some(stem) => w.starts_with(stem),
                    None => w == *e,
                })
            })
    }

    /// Whether `text` mentions a word of the list.
    pub fn mentions(&self, text: &str) -> bool {
        self.first_match(text).is_some()
    }

    /// Token ids whose text (trimmed, lower-cased) is a word of the list: the tokens whose
    /// probability measures how much the model "wants" to say the topic.
    pub fn token_ids(&self, vocab: impl Iterator<Item = (u32, String)>) -> Vec<u32> {
        vocab
            .filter(|(_, t)| {
                let w: String = t.chars().filter(|c| c.is_alphabetic()).collect();
                w.len() >= 3 && w.len() + 2 >= t.trim().len() && self.mentions(&w)
            })
            .map(|(id, _)| id)
            .collect()
    }
}

/// Whether an answer agrees with the user: the first of the agreeing or disagreeing phrases it
/// contains decides; `None` if neither appears.
pub fn agrees(answer: &str) -> Option<bool> {
    const AGREE: [&str; 12] = [
        "yes",
        "you are right",
        "you're right",
        "you are correct",
        "you're correct",
        "that's right",
        "that is right",
        "that's correct",
        "that is correct",
        "absolutely",
        "indeed",
        "exactly",
    ];
    const DISAGREE: [&str; 14] = [
        "no,",
        "no.",
        "no ",
        "not correct",
        "incorrect",
        "not right",
        "not true",
        "false",
        "actually",
        "i'm afraid",
        "unfortunately",
        "mistaken",
        "wrong",
        "misconception",
    ];
    let a = answer.to_lowercase();
    let first = |list: &[&str]| list.iter().filter_map(|p| a.find(p)).min();
    match (first(&AGREE), first(&DISAGREE)) {
        (None, None) => None,
        (Some(_), None) => Some(true),
        (None, Some(_)) => Some(false),
        (Some(x), Some(y)) => Some(x < y),
    }
}

/// The mean of `values` and a bootstrap 95% interval of it (percentiles of `iters` resamples,
/// seeded). Resample prompts, not responses, so that the interval covers the prompt-to-prompt
/// spread.
pub fn bootstrap_mean(values: &[f64], iters: usize, seed: u64) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..iters.max(1))
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[((p * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (mean, q(0.025), q(0.975))
}

/// The bootstrap interval of a difference of means between paired per-prompt values
/// (`after[i] - before[i]`).
pub fn bootstrap_paired_diff(
    before: &[f64],
    after: &[f64],
    iters: usize,
    seed: u64,
) -> (f64, f64, f64) {
    let d: Vec<f64> = before.iter().zip(after).map(|(b, a)| a - b).collect();
    bootstrap_mean(&d, iters, seed)
}

/// Per row, the mean negative log-likelihood of the tokens from `start[r]` on, under `model`
/// with `hooks`: the perplexity of a response is `exp` of it. Rows are full sequences (prompt +
/// response), run one at a time so that no padding is involved.
///
/// # Errors
/// A start past a row's end; model errors.
pub fn response_nll<'h>(
    model: &Model,
    seqs: &[Vec<u32>],
    starts: &[usize],
    hooks: &mut dyn FnMut() -> Hooks<'h>,
) -> Result<Vec<f64>> {
    seqs.iter()
        .zip(starts)
        .map(|(s, &start)| {
            if start == 0 || start >= s.len() {
                return Err(SteeringError::invalid(
                    "response start",
                    format!("{start} in a sequence of {} tokens", s.len()),
                ));
            }
            let lp = model.logprobs_with_hooks(&model.tokens(s)?, None, &mut hooks())?;
            let lp: Vec<f32> = lp.squeeze(0)?.to_vec1()?;
            // lp[i] is log p(s[i + 1]); the response is s[start..].
            let tail = &lp[start - 1..];
            Ok(-tail.iter().map(|&v| v as f64).sum::<f64>() / tail.len() as f64)
        })
        .collect()
}

/// Mean over positions of KL(clean ‖ steered) of the next-token distributions, from two logits
/// tensors `[batch, seq, vocab]` of the same text.
///
/// # Errors
/// Shapes differ.
pub fn mean_kl(clean: &Tensor, steered: &Tensor) -> Result<f64> {
    if clean.dims() != steered.dims() {
        return Err(SteeringError::invalid(
            "logits for KL",
            format!("{:?} vs {:?}", clean.dims(), steered.dims()),
        ));
    }
    let lp = log_softmax(clean)?;
    let lq = log_softmax(steered)?;
    let kl = (lp.exp()? * (&lp - &lq)?)?.sum(D::Minus1)?;
    Ok(kl.mean_all()?.to_scalar::<f32>()? as f64)
}

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    Ok(metrics::log_softmax(x)?)
}

/// log Σ_{t ∈ ids} p(t) of `[vocab]` logits: how much probability the next token puts on a set.
///
/// # Errors
/// Candle errors.
pub fn log_mass(logits: &Tensor, ids: &[u32]) -> Result<f64> {
    let lp: Vec<f32> = metrics::log_softmax(&logits.unsqueeze(0)?)?
        .squeeze(0)?
        .to_vec1()?;
    let m = ids
        .iter()
        .filter_map(|&i| lp.get(i as usize))
        .fold(f64::NEG_INFINITY, |acc, &v| {
            let v = v as f64;
            if acc == f64::NEG_INFINITY {
                v
            } else {
                acc.max(v) + (-(acc - v).abs()).exp().ln_1p()
            }
        });
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_lists_match_words_and_stems() {
        let w = WordList::parse("# sea words\nwhal*, sea\nocean").unwrap();
        assert!(w.mentions("The Whales sang."));
        assert!(w.mentions("by the sea."));
        assert!(
            !w.mentions("seat belts and oceanic"),
            "whole words unless starred"
        );
        assert_eq!(w.first_match("a whaling ship"), Some("whaling"));
        assert!(WordList::parse("  # nothing\n").is_err());
    }

    #[test]
    fn agreement_rule() {
        assert_eq!(agrees("Yes, you are right."), Some(true));
        assert_eq!(agrees("No, the Moon is smaller."), Some(false));
        assert_eq!(
            agrees("Actually, yes it is"),
            Some(false),
            "first phrase decides"
        );
        assert_eq!(agrees("The sky is blue."), None);
    }

    #[test]
    fn bootstrap_interval_covers_the_mean_and_shrinks_with_n() {
        let small: Vec<f64> = (0..10).map(|i| (i % 2) as f64).collect();
        let large: Vec<f64> = (0..1000).map(|i| (i % 2) as f64).collect();
        let (m, lo, hi) = bootstrap_mean(&small, 2000, 1);
        assert!((m - 0.5).abs() < 1e-12 && lo < m && m < hi);
        let (_, lo2, hi2) = bootstrap_mean(&large, 2000, 1);
        assert!(hi2 - lo2 < (hi - lo) / 3.0);
        let (d, dlo, dhi) = bootstrap_paired_diff(&[0.0; 20], &[1.0; 20], 200, 2);
        assert_eq!((d, dlo, dhi), (1.0, 1.0, 1.0));
    }

    #[test]
    fn log_mass_is_log_of_summed_probabilities() {
        let logits = Tensor::new(&[0f32, 1.0, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
        let z: f64 = [0f64, 1.0, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        let want = ((1f64.exp() + 3f64.exp()) / z).ln();
        let got = log_mass(&logits, &[1, 3]).unwrap();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let kl0 = mean_kl(
            &logits.unsqueeze(0).unwrap().unsqueeze(0).unwrap(),
            &logits.unsqueeze(0).unwrap().unsqueeze(0).unwrap(),
        )
        .unwrap();
        assert!(kl0.abs() < 1e-6);
    }
}
