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
//!
//! [`adjust`] runs the whole search for one prompt and feature.

use sae_core::SaeModel;
use serde::{Deserialize, Serialize};
use transformer_hooks::{ChatMessage, GenerateOptions, HookPoint, Hooks, Model, Sampling};

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

/// Near-synonyms for the words of a prompt: `(word, [synonym, ...])`, words lower-case.
pub type Synonyms = Vec<(String, Vec<String>)>;

/// Parses lines `word<TAB>synonym, synonym, ...` (`#` comments, blank lines skipped).
///
/// # Errors
/// A line without a tab, naming its number.
pub fn parse_synonyms(text: &str) -> Result<Synonyms> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((w, s)) = line.split_once('\t') else {
            return Err(SteeringError::invalid(
                format!("synonyms line {}", i + 1),
                "expected word<TAB>synonym, synonym",
            ));
        };
        out.push((
            w.trim().to_lowercase(),
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
        ));
    }
    Ok(out)
}

/// How [`adjust`] searches and what it accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct AdjustOptions {
    /// Success: the feature's peak on the edit at most this fraction of the original's.
    pub threshold: f32,
    /// Lowest [`meaning_score`] accepted. The default, -0.575, separates 12 paraphrase pairs
    /// (-0.46 to +0.01) from 12 unrelated pairs (-2.22 to -0.69) without error on
    /// SmolLM2-135M-Instruct (`examples/adjust_cue/data/calibration.tsv`).
    pub min_meaning: f64,
    /// Highest fluency cost accepted (see [`Candidate::fluency_cost`]). The default, 0.8, is the
    /// largest cost among the same file's hand-written paraphrases, rounded up: an edit may read
    /// as unnaturally as a real paraphrase, no more.
    pub max_fluency_cost: f64,
    /// Replacement words tried for the responsible words.
    pub synonyms: Synonyms,
    /// Rephrasings asked of the model itself (0: none).
    pub rephrasings: usize,
    /// Tokens of the original prompt's greedy answer that the meaning score predicts.
    pub answer_tokens: usize,
    /// Seed of the sampled rephrasings.
    pub seed: u64,
}

impl Default for AdjustOptions {
    fn default() -> Self {
        Self {
            threshold: 0.1,
            min_meaning: -0.575,
            max_fluency_cost: 0.8,
            synonyms: Vec::new(),
            rephrasings: 4,
            answer_tokens: 32,
            seed: 0,
        }
    }
}

/// The outcome of [`adjust`] for one prompt and feature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adjustment {
    pub prompt: String,
    pub feature: usize,
    /// The feature's peak over the original prompt.
    pub activation_before: f32,
    /// The words most responsible, each with the peak once it is deleted.
    pub responsible_words: Vec<(String, f32)>,
    /// The edit proposed: the best meaning among those passing every bar.
    pub proposed: Option<Candidate>,
    /// The lowest peak any candidate reached, whatever its meaning.
    pub lowest_activation: f32,
    /// Whether an edit passed every bar (false too when the prompt never triggers the feature).
    pub success: bool,
    /// Every edit tried.
    pub candidates: Vec<Candidate>,
}

/// Edits `prompt` (a user turn, sent in the chat template) so that `feature` stays quiet:
/// finds the responsible words, tries deleting them (one, two, three), replacing each by its
/// synonyms, and the model's own rephrasings, measures each, and proposes the best that passes
/// the bars of `opts`.
///
/// # Errors
/// Options out of range, a feature past the dictionary, an empty answer to the original prompt
/// (no meaning to compare against), model and SAE errors.
pub fn adjust(
    model: &Model,
    sae: &SaeModel,
    hook: HookPoint,
    prompt: &str,
    feature: usize,
    opts: &AdjustOptions,
) -> Result<Adjustment> {
    if !(opts.threshold > 0.0 && opts.threshold < 1.0) {
        return Err(SteeringError::invalid(
            "threshold",
            format!("{} (must be in (0, 1))", opts.threshold),
        ));
    }
    if opts.answer_tokens == 0 {
        return Err(SteeringError::invalid(
            "answer_tokens",
            "0 (must be at least 1)",
        ));
    }
    let tok = model.tokenizer()?;
    let encode =
        |text: &str| -> Result<Vec<u32>> { Ok(tok.encode_chat(&[ChatMessage::user(text)], true)?) };
    let generate = |prompt: &[u32], n: usize, sampling: Sampling| -> Result<Vec<Vec<u32>>> {
        let opts = GenerateOptions {
            sampling,
            ..GenerateOptions::greedy(opts.answer_tokens.max(8))
        }
        .stop_at(tok.stop_tokens());
        let gens = model.generate_batch(&vec![prompt.to_vec(); n], &opts, &mut Hooks::new())?;
        Ok(gens
            .into_iter()
            .map(|g| {
                let mut t = g.tokens;
                t.retain(|x| !opts.stop_tokens.contains(x));
                t
            })
            .collect())
    };

    let orig = encode(prompt)?;
    let (peak, _) = prompt_peak(model, sae, hook, &orig, feature)?;
    let mut result = Adjustment {
        prompt: prompt.to_string(),
        feature,
        activation_before: peak,
        responsible_words: Vec::new(),
        proposed: None,
        lowest_activation: peak,
        success: false,
        candidates: Vec::new(),
    };
    if peak <= 0.0 {
        return Ok(result);
    }
    let mut answer = generate(&orig, 1, Sampling::Greedy)?.remove(0);
    answer.truncate(opts.answer_tokens);
    if answer.is_empty() {
        return Err(SteeringError::invalid(
            "prompt",
            "the model gives it an empty answer: no meaning to compare edits against",
        ));
    }
    let nll0 = text_nll(model, prompt)?;
    let ws = words(prompt);
    let effects = word_effects(model, sae, hook, &encode, prompt, feature)?;
    let resp = responsible(&effects, peak, 3);
    result.responsible_words = resp
        .iter()
        .map(|&i| (ws[i].to_string(), effects[i]))
        .collect();

    let mut texts: Vec<(String, EditKind)> = Vec::new();
    for n in 1..=resp.len() {
        texts.push((edited(&ws, &resp[..n], None), EditKind::Delete));
    }
    let bare = |w: &str| {
        w.trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase()
    };
    for &i in &resp {
        let key = bare(ws[i]);
        for (word, syns) in &opts.synonyms {
            if *word != key {
                continue;
            }
            for s in syns {
                // Keep the punctuation around the word.
                let w = ws[i];
                let start = w.find(|c: char| c.is_alphanumeric()).unwrap_or(0);
                let end = w
                    .rfind(|c: char| c.is_alphanumeric())
                    .map_or(w.len(), |e| e + 1);
                let replaced = format!("{}{}{}", &w[..start], s, &w[end..]);
                texts.push((edited(&ws, &[], Some((i, &replaced))), EditKind::Synonym));
            }
        }
    }
    if opts.rephrasings > 0 {
        let avoid = resp
            .first()
            .map(|&i| format!(", without the word \"{}\"", bare(ws[i])))
            .unwrap_or_default();
        let ask = format!(
            "Rewrite this request in other words{avoid}. Reply with the rewritten request \
             only.\n\n{prompt}"
        );
        let sampling = Sampling::Sample {
            temperature: 0.8,
            top_k: None,
            top_p: Some(0.95),
            seed: opts.seed,
        };
        for g in generate(&encode(&ask)?, opts.rephrasings, sampling)? {
            let text = tok.decode(&g)?;
            let line = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .trim_matches('"')
                .to_string();
            if !line.is_empty() {
                texts.push((line, EditKind::Rephrase));
            }
        }
    }
    texts.dedup();
    for (text, kind) in texts {
        if text.trim().is_empty() {
            continue;
        }
        let t = encode(&text)?;
        let (activation, _) = prompt_peak(model, sae, hook, &t, feature)?;
        let meaning = meaning_score(model, &orig, &t, &answer)?;
        let fluency_cost = text_nll(model, &text)? - nll0;
        result.lowest_activation = result.lowest_activation.min(activation);
        result.candidates.push(Candidate {
            text,
            kind,
            activation,
            meaning,
            fluency_cost,
        });
    }
    let bars = Bars {
        max_activation: opts.threshold * peak,
        min_meaning: opts.min_meaning,
        max_fluency_cost: opts.max_fluency_cost,
    };
    result.proposed = best(&result.candidates, bars).cloned();
    result.success = result.proposed.is_some();
    Ok(result)
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
