//! Cue adjustment: a prompt triggers a feature the user does not want; find the words
//! responsible and edit the prompt so that the feature stays quiet, while keeping what the
//! prompt asks.
//!
//! * **How strongly a prompt triggers a feature**: its largest activation over the prompt's
//!   positions (BOS excluded), [`prompt_peak`].
//! * **Which words are responsible**: delete each word in turn and measure the peak again
//!   ([`word_effects`]); the words whose deletion lowers it most.
//! * **Edits**: delete the responsible words (one, then two, then three, most responsible first),
//!   replace one by a near-synonym from a list, or take a rephrasing (the caller's: e.g. the
//!   model's own, asked to avoid the word).
//! * **Meaning kept**: [`meaning_score`], the change in the mean log-probability of the original
//!   prompt's (greedy) answer when the edited prompt is asked instead. 0: the edited prompt
//!   predicts the original answer as well as the original did; an unrelated prompt scores far
//!   below (calibrate the bar on paraphrase and unrelated pairs before using it).

use sae_core::SaeModel;
use serde::{Deserialize, Serialize};
use transformer_hooks::{HookPoint, Hooks, Model};

use crate::error::{Result, SteeringError};
use crate::features::activations;
use crate::measure::response_nll;

/// The largest activation of `feature` over `tokens[1..]`, and its position.
///
/// # Errors
/// A feature past the dictionary, fewer than two tokens, model and SAE errors.
pub fn prompt_peak(
    model: &Model,
    sae: &SaeModel,
    hook: HookPoint,
    tokens: &[u32],
    feature: usize,
) -> Result<(f32, usize)> {
    if feature >= sae.d_sae() {
        return Err(SteeringError::NoSuchFeature {
            feature,
            d_sae: sae.d_sae(),
        });
    }
    if tokens.len() < 2 {
        return Err(SteeringError::invalid(
            "prompt",
            "fewer than two tokens (BOS and at least one more)",
        ));
    }
    let acts = activations(model, sae, hook, tokens)?;
    Ok(acts
        .iter()
        .enumerate()
        .skip(1)
        .map(|(p, row)| (row[feature], p))
        .fold((0.0, 0), |best, x| if x.0 > best.0 { x } else { best }))
}

/// The prompt's words (split on whitespace), for deletions and replacements.
pub fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// `words` with word `skip` left out (and `replace` put in its place, if any).
pub fn edited(words: &[&str], skip: &[usize], replace: Option<(usize, &str)>) -> String {
    words
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match replace {
            Some((j, r)) if j == i => Some(r),
            _ => (!skip.contains(&i)).then_some(*w),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Per word of `text`, the feature's prompt peak with that word deleted (`encode` turns a text
/// into the prompt's tokens, e.g. in the chat template).
///
/// # Errors
/// Encoding, model and SAE errors.
pub fn word_effects(
    model: &Model,
    sae: &SaeModel,
    hook: HookPoint,
    encode: &dyn Fn(&str) -> Result<Vec<u32>>,
    text: &str,
    feature: usize,
) -> Result<Vec<f32>> {
    let ws = words(text);
    (0..ws.len())
        .map(|i| {
            Ok(prompt_peak(
                model,
                sae,
                hook,
                &encode(&edited(&ws, &[i], None))?,
                feature,
            )?
            .0)
        })
        .collect()
}

/// How well the prompt `new` predicts `answer`, the original prompt's answer, compared with the
/// original prompt `original`: mean log p(answer | new) − mean log p(answer | original), per
/// answer token, unsteered. Near 0: same question as far as the model is concerned.
///
/// # Errors
/// An empty answer or prompt, model errors.
pub fn meaning_score(model: &Model, original: &[u32], new: &[u32], answer: &[u32]) -> Result<f64> {
    if answer.is_empty() || original.is_empty() || new.is_empty() {
        return Err(SteeringError::invalid(
            "meaning score",
            "empty prompt or answer",
        ));
    }
    let seq = |p: &[u32]| p.iter().chain(answer).copied().collect::<Vec<u32>>();
    let nll = response_nll(
        model,
        &[seq(original), seq(new)],
        &[original.len(), new.len()],
        &mut Hooks::new,
    )?;
    Ok(nll[0] - nll[1])
}

/// Mean negative log-likelihood per token of `text` as plain text (BOS first where the model
/// uses one), unsteered: how natural the model finds it. An edit that breaks the grammar
/// ("worked at flood") raises it; the difference from the original prompt's is the edit's
/// fluency cost.
///
/// # Errors
/// A text of no tokens, model errors.
pub fn text_nll(model: &Model, text: &str) -> Result<f64> {
    let tok = model.tokenizer()?;
    let ids = tok.encode(text, model.config().add_bos)?;
    if ids.len() < 2 {
        return Err(SteeringError::invalid(
            "text",
            format!("{text:?} has fewer than two tokens"),
        ));
    }
    let lp: Vec<f32> = model
        .logprobs(&model.tokens(&ids)?)?
        .squeeze(0)?
        .to_vec1()?;
    Ok(-lp.iter().map(|&v| f64::from(v)).sum::<f64>() / lp.len() as f64)
}

/// How an adjusted cue was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditKind {
    Delete,
    Synonym,
    Rephrase,
}

/// One edited prompt, measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub text: String,
    pub kind: EditKind,
    /// The feature's prompt peak on it.
    pub activation: f32,
    /// [`meaning_score`] against the original.
    pub meaning: f64,
    /// [`text_nll`] of the edit minus that of the original (positive: less natural).
    pub fluency_cost: f64,
}

/// The words worth editing: indices of `effects` (peaks with each word deleted) below
/// `original_peak`, largest drop first, at most `n`.
pub fn responsible(effects: &[f32], original_peak: f32, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..effects.len())
        .filter(|&i| effects[i] < original_peak)
        .collect();
    idx.sort_by(|&a, &b| effects[a].total_cmp(&effects[b]));
    idx.truncate(n);
    idx
}

/// The bars a proposed edit must pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bars {
    /// The feature's peak on the edit, in its own units.
    pub max_activation: f32,
    /// Lowest [`meaning_score`].
    pub min_meaning: f64,
    /// Highest fluency cost.
    pub max_fluency_cost: f64,
}

/// The candidate to propose: among those passing all `bars`, the best meaning; `None` if none
/// qualifies.
pub fn best(candidates: &[Candidate], bars: Bars) -> Option<&Candidate> {
    candidates
        .iter()
        .filter(|c| {
            c.activation <= bars.max_activation
                && c.meaning >= bars.min_meaning
                && c.fluency_cost <= bars.max_fluency_cost
        })
        .max_by(|a, b| a.meaning.total_cmp(&b.meaning))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_delete_and_replace_words() {
        let w = words("I feel  all at sea today");
        assert_eq!(w, ["I", "feel", "all", "at", "sea", "today"]);
        assert_eq!(edited(&w, &[3, 4], None), "I feel all today");
        assert_eq!(
            edited(&w, &[], Some((4, "lost"))),
            "I feel all at lost today"
        );
    }

    #[test]
    fn responsible_words_are_the_largest_drops() {
        let eff = [2.0, 0.1, 1.5, 2.0, 0.0];
        assert_eq!(responsible(&eff, 2.0, 2), vec![4, 1]);
        assert_eq!(responsible(&eff, 2.0, 9), vec![4, 1, 2]);
    }

    #[test]
    fn best_respects_both_bars() {
        let c = |a: f32, m: f64, f: f64| Candidate {
            text: String::new(),
            kind: EditKind::Delete,
            activation: a,
            meaning: m,
            fluency_cost: f,
        };
        let cs = [
            c(0.0, -3.0, 0.0),
            c(0.05, -0.5, 0.1),
            c(0.5, -0.1, 0.0),
            c(0.0, -0.8, 0.0),
            c(0.0, -0.2, 2.0),
        ];
        let bars = |a, m, f| Bars {
            max_activation: a,
            min_meaning: m,
            max_fluency_cost: f,
        };
        assert_eq!(best(&cs, bars(0.1, -1.0, 1.0)), Some(&cs[1]));
        assert_eq!(best(&cs, bars(0.1, -1.0, 3.0)), Some(&cs[4]));
        assert_eq!(best(&cs, bars(0.1, -1.0, 0.05)), Some(&cs[3]));
        assert_eq!(best(&cs, bars(0.1, -0.4, 1.0)), None);
    }
}
