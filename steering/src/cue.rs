//! Cue adjustment: a prompt triggers a feature the user does not want; find the words
//! responsible and edit the prompt so that the feature stays quiet, while keeping what the
//! prompt asks.
//!
//! * **How strongly a prompt triggers a feature**: its largest activation over the prompt's
//!   positions (BOS excluded), [`prompt_peak`].
//! * **Which words are responsible**: delete each word in turn and measure the peak again
//!   ([`word_effects`]); the words whose deletion lowers it most.
//! * **Edits**: delete the responsible words (one, then two, then three, most responsible first),
//!   drop the sentence or comma clause holding the most responsible word, replace a word or a
//!   phrase by a near-synonym from a list (hand-written, or WordNet's through
//!   [`Thesaurus::synonyms_for`]), or take a rephrasing (the caller's: e.g. the model's own, asked
//!   to avoid the word).
//! * **Meaning kept**: [`meaning_score`], the change in the mean log-probability of the original
//!   prompt's (greedy) answer when the edited prompt is asked instead. 0: the edited prompt
//!   predicts the original answer as well as the original did; an unrelated prompt scores far
//!   below (calibrate the bar on paraphrase and unrelated pairs before using it).
//! * **Grammar kept**: [`grammar_jump`], the largest rise in surprise (NLL) of a word that the
//!   edit left in place after it. Deleting "sea" from "all at sea with my homework" makes "with"
//!   10 nats less likely; a good synonym moves no later word by more than a nat or so. A request
//!   stays a request: an edit of a prompt ending in "?" must end in "?" too.
//!
//! [`adjust`] runs the whole search for one prompt and feature and proposes, among the edits that
//! pass every bar, the most natural one ([`best`]).

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

/// `words` with the words `skip` left out (and `replace` put in place of one, if any). A deleted
/// word's closing punctuation stays, on the word kept before it ("the history of Congress. How"
/// → "the history of. How", not "of How"), so that a deletion never merges two sentences or
/// clauses.
pub fn edited(words: &[&str], skip: &[usize], replace: Option<(usize, &str)>) -> String {
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        match replace {
            Some((j, r)) if j == i => out.push(r.to_string()),
            _ if skip.contains(&i) => {
                let end = w
                    .char_indices()
                    .rev()
                    .find(|(_, c)| c.is_alphanumeric())
                    .map_or(0, |(k, c)| k + c.len_utf8());
                let tail = &w[end..];
                if let (false, Some(prev)) = (tail.is_empty(), out.last_mut()) {
                    let keep = prev.trim_end_matches(|c: char| !c.is_alphanumeric()).len();
                    prev.truncate(keep);
                    prev.push_str(tail);
                }
            }
            _ => out.push(w.to_string()),
        }
    }
    out.join(" ")
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

/// Mean negative log-likelihood per token of `text` as the user's turn (see [`token_nlls`]),
/// unsteered: how natural the model finds it as a request. An edit that breaks the grammar
/// ("worked at flood") raises it; the difference from the original prompt's is the edit's
/// fluency cost.
///
/// # Errors
/// A text of no tokens, model errors.
pub fn text_nll(model: &Model, text: &str) -> Result<f64> {
    let (_, nll) = token_nlls(model, text)?;
    Ok(nll.iter().sum::<f64>() / nll.len() as f64)
}

/// The tokens of `text` sent as the user's turn in the chat template, and the token that closes
/// the turn, each with its negative log-likelihood given everything before it, unsteered. In
/// the template every word is scored in the place the prompt takes, the first one included
/// (as plain text a model without BOS has nothing to score the first token against, so a cut
/// at the start, "We walked along" → "walked along", went unseen), and the closing token
/// scores how naturally the request ends. Without a chat template: the text as plain text
/// (BOS first where the model uses one), its tokens after the first.
///
/// # Errors
/// A text of no tokens (fewer than two as plain text), model errors.
pub fn token_nlls(model: &Model, text: &str) -> Result<(Vec<u32>, Vec<f64>)> {
    let tok = model.tokenizer()?;
    let chat = |t: &str| tok.encode_chat(&[ChatMessage::user(t)], false);
    let (ids, span) = match (chat(text), chat("")) {
        (Ok(ids), Ok(empty)) => {
            // The template around the text: what it shares with an empty turn.
            let (head, tail) = changed_span(&ids, &empty);
            if head + tail >= ids.len() || head == 0 {
                return Err(SteeringError::invalid(
                    "text",
                    format!("{text:?} has no tokens"),
                ));
            }
            let end = (ids.len() - tail + 1).min(ids.len());
            (ids, head..end)
        }
        _ => {
            let ids = tok.encode(text, model.config().add_bos)?;
            let n = ids.len();
            (ids, 1..n)
        }
    };
    if span.is_empty() {
        return Err(SteeringError::invalid(
            "text",
            format!("{text:?} has fewer than two tokens"),
        ));
    }
    let lp: Vec<f32> = model
        .logprobs(&model.tokens(&ids)?)?
        .squeeze(0)?
        .to_vec1()?;
    // lp[i] is the log-probability of ids[i + 1].
    Ok((
        ids[span.clone()].to_vec(),
        lp[span.start - 1..span.end - 1]
            .iter()
            .map(|&v| -f64::from(v))
            .collect(),
    ))
}

/// The largest rise in NLL, over the tokens an edit left in place after its first change, from
/// `original` to `edit` (each the tokens and NLLs of [`token_nlls`]); 0 when no token rose or
/// none follows a change. The tokens left in place are those of a longest common subsequence of
/// the two (earliest matches first), so that a token between two deleted words counts too
/// ("There is a whale poster" → "There a poster": "a" now follows "There"). A hole in the
/// grammar ("all at with", "a of paperwork") shows as one following token made many nats less
/// likely, which a mean over the whole prompt dilutes. When the edit is the original without its
/// first sentences (`starts_a_sentence`), the token that now opens the text is not compared:
/// nothing precedes it, so it is naturally more surprising than it was after a full stop. After
/// any other cut at the start ("The sea was calm" → "was calm") it is compared like any other.
pub fn grammar_jump(
    original: (&[u32], &[f64]),
    edit: (&[u32], &[f64]),
    starts_a_sentence: bool,
) -> f64 {
    let (oi, on) = original;
    let (ei, en) = edit;
    let (prefix, _) = changed_span(oi, ei);
    kept_tokens(oi, ei)
        .into_iter()
        .filter(|&(i, _)| i >= prefix)
        .filter(|&(_, j)| !(starts_a_sentence && prefix == 0 && j == 0))
        .map(|(i, j)| en[j] - on[i])
        .fold(0.0, f64::max)
}

/// The pairs `(i, j)` of a longest common subsequence of `a` and `b` (`a[i] == b[j]`), each
/// token matched as early as it can be.
fn kept_tokens(a: &[u32], b: &[u32]) -> Vec<(usize, usize)> {
    let (n, m) = (a.len(), b.len());
    // lcs[i][j]: the length of a longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n && j < m {
        if a[i] == b[j] && lcs[i][j] == lcs[i + 1][j + 1] + 1 {
            out.push((i, j));
            i += 1;
            j += 1;
        } else if lcs[i + 1][j] >= lcs[i][j + 1] {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The tokens two sequences share at the start and, after those, at the end: what lies between
/// is the span an edit changed.
fn changed_span(a: &[u32], b: &[u32]) -> (usize, usize) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let room = a.len().min(b.len()) - prefix;
    let suffix = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
        .min(room);
    (prefix, suffix)
}

/// Whether a replacement keeps the sense the replaced word had in its sentence: the cosine
/// between the hook's activations at the last token of the replaced span in `original` and at
/// the last token of its replacement in `edit` (both whole prompts, tokens), each taken
/// relative to the SAE's `b_dec` (so that the part every position shares does not make all
/// words look alike) and with the component along `feature`'s decoder direction removed (the
/// edit is meant to change that one). Meaning scores cannot see a wrong sense: "drew a whale"
/// and "drew a hulk" predict the same answer about crayon marks, but at "hulk" the model
/// represents a large person. `None` when either span is empty (a deletion), where there is no
/// word to compare.
///
/// It is reported with each replacement but is not one of the [`Bars`]: on SmolLM2-135M-Instruct
/// (layer 15) it separates 19 right-sense from 19 wrong-sense hand-written replacements
/// (`examples/adjust_cue/data/senses.tsv`) with 11 of 38 on the wrong side of the best bar,
/// and ranks the right one higher in 14 of 19 pairs: too weak to reject an edit on.
///
/// # Errors
/// A feature past the dictionary, model and SAE errors.
pub fn sense_similarity(
    model: &Model,
    sae: &SaeModel,
    hook: HookPoint,
    original: &[u32],
    edit: &[u32],
    feature: usize,
) -> Result<Option<f64>> {
    let Some(dir) = sae.w_dec_row(feature) else {
        return Err(SteeringError::NoSuchFeature {
            feature,
            d_sae: sae.d_sae(),
        });
    };
    let (prefix, suffix) = changed_span(original, edit);
    if original.len() - suffix <= prefix || edit.len() - suffix <= prefix {
        return Ok(None);
    }
    let at = |tokens: &[u32], pos: usize| -> Result<Vec<f64>> {
        let cache = model.run_with_cache(&model.tokens(tokens)?, &[hook])?;
        let x: Vec<f32> = cache.require(hook)?.squeeze(0)?.get(pos)?.to_vec1()?;
        Ok(x.iter().map(|&v| f64::from(v)).collect())
    };
    let b_dec = sae.b_dec()?;
    let unit = {
        let n = dir
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        dir.iter()
            .map(|&v| f64::from(v) / n.max(f64::MIN_POSITIVE))
            .collect::<Vec<f64>>()
    };
    let prepare = |mut x: Vec<f64>| {
        for (v, b) in x.iter_mut().zip(b_dec) {
            *v -= f64::from(*b);
        }
        let along: f64 = x.iter().zip(&unit).map(|(a, u)| a * u).sum();
        for (v, u) in x.iter_mut().zip(&unit) {
            *v -= along * u;
        }
        x
    };
    let a = prepare(at(original, original.len() - suffix - 1)?);
    let b = prepare(at(edit, edit.len() - suffix - 1)?);
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    Ok(Some(dot / (norm(&a) * norm(&b)).max(f64::MIN_POSITIVE)))
}

/// How an adjusted cue was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditKind {
    Delete,
    /// The sentence holding the most responsible word, dropped (another sentence is left).
    DropSentence,
    /// The comma clause holding the most responsible word, dropped.
    DropClause,
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
    /// [`grammar_jump`] from the original to the edit.
    #[serde(default)]
    pub grammar_jump: f64,
    /// Whether the edit keeps the original's form: a question stays a question.
    #[serde(default = "yes")]
    pub keeps_form: bool,
    /// [`sense_similarity`] of a replacement (synonyms only): reported, not a bar (see there).
    #[serde(default)]
    pub sense: Option<f64>,
}

fn yes() -> bool {
    true
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
    /// Highest [`grammar_jump`].
    pub max_grammar_jump: f64,
}

impl Bars {
    /// Whether `c` passes every bar (and keeps the prompt's form). A dropped sentence is judged
    /// on activation, meaning and form only: what is left is the user's own whole sentences, so
    /// it cannot read worse than they wrote it, and what the drop costs (the context, and with
    /// it the next words' predictability, which the fluency and grammar measures would count)
    /// is what the meaning score measures.
    pub fn pass(&self, c: &Candidate) -> bool {
        let whole_sentences = c.kind == EditKind::DropSentence;
        c.activation <= self.max_activation
            && c.meaning >= self.min_meaning
            && (whole_sentences || c.fluency_cost <= self.max_fluency_cost)
            && (whole_sentences || c.grammar_jump <= self.max_grammar_jump)
            && c.keeps_form
    }
}

/// The candidate to propose: among those passing all `bars`, the smallest kind of edit first
/// (a word or phrase replaced or deleted; then a whole sentence dropped; then a clause dropped;
/// then a rephrasing), and within it the one that reads most naturally (lowest fluency cost);
/// `None` if none qualifies. Smallest first because a user who asked for a prompt without one
/// feature wants the rest of it kept: a dropped sentence or clause also drops its context, and
/// a dropped clause tends to leave a fragment ("And he likes gardening."). Naturalness,
/// not the meaning score, picks within a kind, because the meaning score barely separates a good
/// synonym from a wrong-sense one that passes its bar (on the tuning cases, "works near
/// Congress" → "near coition" scored +0.01). Rephrasings come last because the grammar bar
/// cannot see into them (they share no words with the prompt to measure against) and a small
/// model's rephrasings tend to answer the request rather than restate it.
pub fn best(candidates: &[Candidate], bars: Bars) -> Option<&Candidate> {
    let tier = |k: EditKind| match k {
        EditKind::Delete | EditKind::Synonym => 0,
        EditKind::DropSentence => 1,
        EditKind::DropClause => 2,
        EditKind::Rephrase => 3,
    };
    candidates.iter().filter(|c| bars.pass(c)).min_by(|a, b| {
        tier(a.kind)
            .cmp(&tier(b.kind))
            .then(a.fluency_cost.total_cmp(&b.fluency_cost))
    })
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

/// A word's letters and digits, lower-cased: how prompt words are matched against synonym keys.
fn bare(w: &str) -> String {
    w.trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase()
}

/// The candidates that replace a span of `ws` matching a key of `synonyms` and covering word
/// `i`: the span's words swapped for each synonym, the punctuation before its first word and
/// after its last kept.
fn synonym_edits(ws: &[&str], i: usize, synonyms: &Synonyms) -> Vec<String> {
    let mut out = Vec::new();
    for (key, syns) in synonyms {
        let kw: Vec<&str> = key.split_whitespace().collect();
        let n = kw.len();
        if n == 0 || n > ws.len() {
            continue;
        }
        for start in i.saturating_sub(n - 1)..=i.min(ws.len() - n) {
            let span = &ws[start..start + n];
            if !span.iter().zip(&kw).all(|(w, k)| bare(w) == *k) {
                continue;
            }
            let first = span[0];
            let last = span[n - 1];
            let lead = &first[..first.find(|c: char| c.is_alphanumeric()).unwrap_or(0)];
            let tail = &last[last
                .rfind(|c: char| c.is_alphanumeric())
                .map_or(last.len(), |e| e + 1)..];
            for s in syns {
                let mut new: Vec<String> = ws[..start].iter().map(|w| w.to_string()).collect();
                new.push(format!("{lead}{s}{tail}"));
                new.extend(ws[start + n..].iter().map(|w| w.to_string()));
                out.push(new.join(" "));
            }
        }
    }
    out
}

/// Whether a word ends a sentence (`.`, `!` or `?`, before any closing quotes or brackets).
fn ends_sentence(w: &str) -> bool {
    w.trim_end_matches(['"', '\'', ')'])
        .ends_with(['.', '!', '?'])
}

/// The prompt without the sentence holding word `i` (when another sentence is left), and without
/// the comma clause holding it (when its sentence has another clause): the first remaining word
/// of a sentence capitalised, a clause's lost end punctuation moved to the word before it.
pub fn clause_drops(ws: &[&str], i: usize) -> Vec<(String, EditKind)> {
    let mut out = Vec::new();
    if i >= ws.len() {
        return out;
    }
    let start = (0..i)
        .rev()
        .find(|&j| ends_sentence(ws[j]))
        .map_or(0, |j| j + 1);
    let end = (i..ws.len())
        .find(|&j| ends_sentence(ws[j]))
        .unwrap_or(ws.len() - 1);
    if start > 0 || end + 1 < ws.len() {
        let rest: Vec<&str> = ws[..start].iter().chain(&ws[end + 1..]).copied().collect();
        out.push((rest.join(" "), EditKind::DropSentence));
    }
    let cstart = (start..i)
        .rev()
        .find(|&j| ws[j].ends_with(','))
        .map_or(start, |j| j + 1);
    let cend = (i..end).find(|&j| ws[j].ends_with(',')).unwrap_or(end);
    if cstart == start && cend == end {
        return out;
    }
    let mut new: Vec<String> = ws[..cstart].iter().map(|w| w.to_string()).collect();
    if cstart == start {
        // A leading clause: the next word now opens the sentence.
        let mut next = ws[cend + 1].to_string();
        if let Some(c) = next.chars().next() {
            next = c.to_uppercase().chain(next.chars().skip(1)).collect();
        }
        new.push(next);
        new.extend(ws[cend + 2..].iter().map(|w| w.to_string()));
    } else {
        // A later clause: the word before it loses its comma and, if the clause ended the
        // sentence, takes its end punctuation.
        if let Some(prev) = new.last_mut() {
            prev.pop();
            if cend == end {
                let last = ws[end];
                let cut = last
                    .rfind(|c: char| c.is_alphanumeric())
                    .map_or(last.len(), |e| e + 1);
                prev.push_str(&last[cut..]);
            }
        }
        new.extend(ws[cend + 1..].iter().map(|w| w.to_string()));
    }
    out.push((new.join(" "), EditKind::DropClause));
    out
}

/// Groups of words that can stand for each other (WordNet's synsets, or any list of lists),
/// indexed by their lower-cased members, each member's groups most frequent sense first, to
/// propose near-synonyms for the words and phrases of a prompt.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Thesaurus {
    groups: Vec<Vec<String>>,
    /// Per member, its senses: one list per part of speech, most frequent first.
    index: std::collections::HashMap<String, Vec<Vec<usize>>>,
}

impl Thesaurus {
    /// From groups of interchangeable words or phrases (spaces between a phrase's words); a
    /// member's senses are its groups in the order given.
    pub fn new(groups: Vec<Vec<String>>) -> Self {
        let mut index: std::collections::HashMap<String, Vec<Vec<usize>>> =
            std::collections::HashMap::new();
        for (g, members) in groups.iter().enumerate() {
            for m in members {
                let e = index
                    .entry(m.to_lowercase())
                    .or_insert_with(|| vec![Vec::new()]);
                if e[0].last() != Some(&g) {
                    e[0].push(g);
                }
            }
        }
        Self { groups, index }
    }

    /// From groups and each word's senses in order of frequency (indices into `groups`), one
    /// entry per word and part of speech, as WordNet's `index.*` files list them; groups past
    /// the end are dropped.
    pub fn with_senses(groups: Vec<Vec<String>>, senses: Vec<(String, Vec<usize>)>) -> Self {
        let mut index: std::collections::HashMap<String, Vec<Vec<usize>>> =
            std::collections::HashMap::new();
        for (word, mut gs) in senses {
            gs.retain(|&g| g < groups.len());
            if !gs.is_empty() {
                index.entry(word.to_lowercase()).or_default().push(gs);
            }
        }
        Self { groups, index }
    }

    /// Near-synonyms for the words and the two- and three-word phrases of `text`, keyed by their
    /// lower-cased surface form: the other members of each one's first `senses` groups (per part
    /// of speech), at most `per_key`. A plural the index lacks ("boats") is looked up as its singular and its
    /// synonyms get an "s".
    pub fn synonyms_for(&self, text: &str, senses: usize, per_key: usize) -> Synonyms {
        let ws: Vec<String> = words(text).iter().map(|w| bare(w)).collect();
        let mut out: Synonyms = Vec::new();
        for n in 1..=3 {
            for span in ws.windows(n) {
                if span.iter().any(String::is_empty) {
                    continue;
                }
                let key = span.join(" ");
                if out.iter().any(|(k, _)| *k == key) {
                    continue;
                }
                let (lemma, plural) = match self.index.contains_key(&key) {
                    true => (key.clone(), false),
                    false if n == 1 && key.len() > 3 && key.ends_with('s') => {
                        (key[..key.len() - 1].to_string(), true)
                    }
                    false => continue,
                };
                let Some(gs) = self.index.get(&lemma) else {
                    continue;
                };
                let mut syns: Vec<String> = Vec::new();
                for &g in gs.iter().flat_map(|p| p.iter().take(senses)) {
                    for m in &self.groups[g] {
                        let m = if plural { format!("{m}s") } else { m.clone() };
                        if m.to_lowercase() != key && !syns.contains(&m) {
                            syns.push(m);
                        }
                    }
                }
                syns.truncate(per_key);
                if !syns.is_empty() {
                    out.push((key, syns));
                }
            }
        }
        out
    }
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
    /// Highest fluency cost accepted (see [`Candidate::fluency_cost`]). The default, 1.4, is the
    /// largest cost among the same file's hand-written paraphrases (1.34, each text scored as
    /// the user's turn), rounded up: an edit may read as unnaturally as a real paraphrase, no
    /// more.
    pub max_fluency_cost: f64,
    /// Highest [`grammar_jump`] accepted. The default, 4.9 nats, is the bar with the fewest
    /// errors between the 15 good and 15 broken hand-written edits of
    /// `examples/adjust_cue/data/edits.tsv` on SmolLM2-135M-Instruct (good ones at most 3.86,
    /// broken ones from 6.03 but one at 1.71: 1 error in 30), set with that example's
    /// `--calibrate-grammar` (figures in the README).
    pub max_grammar_jump: f64,
    /// Whether to try dropping the sentence or clause holding the most responsible word.
    pub drop_clauses: bool,
    /// Replacement words and phrases tried for the spans covering the responsible words.
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
            max_fluency_cost: 1.4,
            max_grammar_jump: 4.9,
            drop_clauses: true,
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
    /// The edit proposed: the most natural among those passing every bar ([`best`]).
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
    let nlls0 = token_nlls(model, prompt)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let nll0 = mean(&nlls0.1);
    let question = prompt.trim_end().ends_with('?');
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
    if let (true, Some(&i)) = (opts.drop_clauses, resp.first()) {
        texts.extend(clause_drops(&ws, i));
    }
    for &i in &resp {
        for t in synonym_edits(&ws, i, &opts.synonyms) {
            texts.push((t, EditKind::Synonym));
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
    let mut seen = std::collections::HashSet::new();
    texts.retain(|(t, _)| seen.insert(t.clone()));
    for (text, kind) in texts {
        if text.trim().is_empty() || text == prompt {
            continue;
        }
        let t = encode(&text)?;
        let (activation, _) = prompt_peak(model, sae, hook, &t, feature)?;
        let meaning = meaning_score(model, &orig, &t, &answer)?;
        let nlls = token_nlls(model, &text)?;
        let fluency_cost = mean(&nlls.1) - nll0;
        let grammar_jump = grammar_jump(
            (&nlls0.0, &nlls0.1),
            (&nlls.0, &nlls.1),
            kind == EditKind::DropSentence,
        );
        let keeps_form = !question || text.trim_end().ends_with('?');
        let sense = match kind {
            EditKind::Synonym => sense_similarity(model, sae, hook, &orig, &t, feature)?,
            _ => None,
        };
        result.lowest_activation = result.lowest_activation.min(activation);
        result.candidates.push(Candidate {
            text,
            kind,
            activation,
            meaning,
            fluency_cost,
            grammar_jump,
            keeps_form,
            sense,
        });
    }
    let bars = Bars {
        max_activation: opts.threshold * peak,
        min_meaning: opts.min_meaning,
        max_fluency_cost: opts.max_fluency_cost,
        max_grammar_jump: opts.max_grammar_jump,
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
        // A deleted word's closing punctuation stays on the word before it.
        let p = words("We read the history of Congress. How do I start, then?");
        assert_eq!(
            edited(&p, &[5], None),
            "We read the history of. How do I start, then?"
        );
        assert_eq!(
            edited(&p, &[4, 5], None),
            "We read the history. How do I start, then?"
        );
        assert_eq!(
            edited(&p, &[9, 10], None),
            "We read the history of Congress. How do I?"
        );
        assert_eq!(
            edited(&p, &[9], None),
            "We read the history of Congress. How do I, then?"
        );
        assert_eq!(
            edited(&p, &[0], None),
            "read the history of Congress. How do I start, then?"
        );
        // Punctuation before a deleted closing mark is replaced, not doubled.
        let q = words("Hello, world.");
        assert_eq!(edited(&q, &[1], None), "Hello.");
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
    fn best_passes_every_bar_and_reads_most_naturally() {
        let c = |a: f32, m: f64, f: f64| Candidate {
            text: String::new(),
            kind: EditKind::Delete,
            activation: a,
            meaning: m,
            fluency_cost: f,
            grammar_jump: 0.0,
            keeps_form: true,
            sense: None,
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
            max_grammar_jump: 1.0,
        };
        // Passing: 1 and 3 (0 misses the meaning bar, 2 the activation bar, 4 the fluency
        // bar); 3 reads more naturally.
        assert_eq!(best(&cs, bars(0.1, -1.0, 1.0)), Some(&cs[3]));
        assert_eq!(best(&cs, bars(0.1, -0.6, 3.0)), Some(&cs[1]));
        assert_eq!(best(&cs, bars(0.1, -0.3, 3.0)), Some(&cs[4]));
        assert_eq!(best(&cs, bars(0.1, -0.4, 1.0)), None);
        // A rephrasing only when nothing else passes.
        let mut re = cs.clone();
        re[3].kind = EditKind::Rephrase;
        assert_eq!(best(&re, bars(0.1, -1.0, 1.0)), Some(&re[1]));
        assert_eq!(best(&re, bars(0.01, -1.0, 1.0)), Some(&re[3]));
        // The grammar bar and the form are bars too.
        let mut broken = cs.clone();
        broken[3].grammar_jump = 1.5;
        assert_eq!(best(&broken, bars(0.1, -1.0, 1.0)), Some(&cs[1]));
        broken[1].keeps_form = false;
        assert_eq!(best(&broken, bars(0.1, -1.0, 1.0)), None);
        // A dropped sentence only when no smaller edit passes, however natural.
        let mut drop = cs.clone();
        drop[3].kind = EditKind::DropSentence;
        drop[3].fluency_cost = -1.0;
        assert_eq!(best(&drop, bars(0.1, -1.0, 1.0)), Some(&drop[1]));
        drop[1].kind = EditKind::DropClause;
        assert_eq!(best(&drop, bars(0.1, -1.0, 1.0)), Some(&drop[3]));
        drop[3].kind = EditKind::Rephrase;
        assert_eq!(best(&drop, bars(0.1, -1.0, 1.0)), Some(&drop[1]));
        // A dropped sentence is not held to the fluency and grammar bars, only to activation,
        // meaning and form; a dropped clause is held to all.
        let mut whole = cs.clone();
        whole[4].kind = EditKind::DropSentence;
        whole[4].grammar_jump = 9.0;
        assert_eq!(best(&whole, bars(0.1, -0.3, 1.0)), Some(&whole[4]));
        whole[4].kind = EditKind::DropClause;
        assert_eq!(best(&whole, bars(0.1, -0.3, 1.0)), None);
        whole[4].kind = EditKind::DropSentence;
        whole[4].meaning = -0.35;
        assert_eq!(best(&whole, bars(0.1, -0.3, 1.0)), None);
    }

    #[test]
    fn grammar_jump_is_the_largest_rise_after_the_edit() {
        // Tokens 1 2 [3] 4 5 -> 1 2 [9 9] 4 5: the common suffix is 4 5.
        let o = ([1u32, 2, 3, 4, 5], [1.0, 1.0, 2.0, 1.0, 3.0]);
        let e = ([1u32, 2, 9, 9, 4, 5], [1.0, 1.0, 5.0, 5.0, 4.5, 2.0]);
        assert_eq!(grammar_jump((&o.0, &o.1), (&e.0, &e.1), false), 3.5);
        // The edited tokens' own surprise does not count, nor does a fall.
        let e2 = ([1u32, 2, 9, 4, 5], [1.0, 1.0, 9.0, 0.5, 3.0]);
        assert_eq!(grammar_jump((&o.0, &o.1), (&e2.0, &e2.1), false), 0.0);
        // A deletion: 1 2 4 5; prefix and suffix may not overlap.
        let d = ([1u32, 2, 4, 5], [1.0, 1.0, 7.0, 3.0]);
        assert_eq!(grammar_jump((&o.0, &o.1), (&d.0, &d.1), false), 6.0);
        // A dropped first sentence: the token that now opens the text is not compared, the next
        // ones are.
        let tail = ([4u32, 5], [8.0, 3.5]);
        assert_eq!(grammar_jump((&o.0, &o.1), (&tail.0, &tail.1), true), 0.5);
        let tail = ([4u32, 5], [8.0, 2.0]);
        assert_eq!(grammar_jump((&o.0, &o.1), (&tail.0, &tail.1), true), 0.0);
        // Not at a sentence start ("The sea was calm" -> "was calm"): compared.
        assert_eq!(grammar_jump((&o.0, &o.1), (&tail.0, &tail.1), false), 7.0);
        // Ambiguous alignments take the common prefix first: [1 1] -> [1] deleted the last token.
        let same = ([1u32, 1], [1.0, 2.0]);
        let one = ([1u32], [5.0]);
        assert_eq!(
            grammar_jump((&same.0, &same.1), (&one.0, &one.1), false),
            0.0
        );
        assert_eq!(
            grammar_jump((&one.0, &one.1), (&same.0, &same.1), false),
            0.0
        );
        // Two words deleted (2 and 4 of 1 2 3 4 5 6): the 3 between them is left in place after
        // the first change and counts, as do 5 and 6.
        let o6 = ([1u32, 2, 3, 4, 5, 6], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let two = ([1u32, 3, 5, 6], [1.0, 6.0, 2.0, 1.5]);
        assert_eq!(grammar_jump((&o6.0, &o6.1), (&two.0, &two.1), false), 5.0);
        let two = ([1u32, 3, 5, 6], [1.0, 1.0, 2.0, 1.5]);
        assert_eq!(grammar_jump((&o6.0, &o6.1), (&two.0, &two.1), false), 1.0);
        // The first word and a later one deleted ("We walked along the sea front" → "walked
        // along the front"): the new first token counts (it is not a dropped sentence).
        let cut = ([2u32, 3, 4, 6], [7.0, 1.0, 1.0, 1.0]);
        assert_eq!(grammar_jump((&o6.0, &o6.1), (&cut.0, &cut.1), false), 6.0);
    }

    #[test]
    fn kept_tokens_are_a_longest_common_subsequence_matched_early() {
        assert_eq!(
            kept_tokens(&[1, 2, 3, 4, 5], &[1, 3, 5]),
            vec![(0, 0), (2, 1), (4, 2)]
        );
        assert_eq!(kept_tokens(&[1, 1], &[1]), vec![(0, 0)]);
        assert_eq!(kept_tokens(&[7, 8], &[9]), vec![]);
        assert_eq!(kept_tokens(&[], &[1]), vec![]);
        // A replacement in the middle: everything else kept, in order.
        assert_eq!(
            kept_tokens(&[1, 2, 3, 4], &[1, 9, 9, 3, 4]),
            vec![(0, 0), (2, 3), (3, 4)]
        );
    }

    #[test]
    fn clauses_and_sentences_drop_cleanly() {
        let w = words("I grew up by the sea, and now I live here. How do I make friends?");
        let texts = |v: Vec<(String, EditKind)>| -> Vec<String> {
            assert_eq!(v[0].1, EditKind::DropSentence);
            assert!(v[1..].iter().all(|x| x.1 == EditKind::DropClause));
            v.into_iter().map(|x| x.0).collect()
        };
        assert_eq!(
            texts(clause_drops(&w, 5)),
            [
                "How do I make friends?",
                "And now I live here. How do I make friends?"
            ]
        );
        assert_eq!(
            texts(clause_drops(&w, 8)),
            [
                "How do I make friends?",
                "I grew up by the sea. How do I make friends?"
            ]
        );
        let w = words("Like Congress, my family never agrees. What is an easy meal?");
        assert_eq!(
            texts(clause_drops(&w, 1)),
            [
                "What is an easy meal?",
                "My family never agrees. What is an easy meal?"
            ]
        );
        // One sentence, one clause: nothing to drop.
        assert!(clause_drops(&words("Where is the sea?"), 3).is_empty());
    }

    #[test]
    fn synonyms_replace_words_and_phrases_keeping_punctuation() {
        let w = words("I feel all at sea, truly. Sea!");
        let syns = parse_synonyms("at sea\tlost, confused\nsea\tocean\n").unwrap();
        assert_eq!(
            synonym_edits(&w, 4, &syns),
            [
                "I feel all lost, truly. Sea!",
                "I feel all confused, truly. Sea!",
                "I feel all at ocean, truly. Sea!"
            ]
        );
        assert_eq!(
            synonym_edits(&w, 6, &syns),
            ["I feel all at sea, truly. ocean!"]
        );
        assert!(synonym_edits(&w, 1, &syns).is_empty());
    }

    #[test]
    fn thesaurus_finds_words_phrases_and_plurals() {
        let t = Thesaurus::new(vec![
            vec!["sea".into()],
            vec!["ocean".into(), "sea".into()],
            vec!["lost".into(), "confused".into(), "at sea".into()],
            vec!["boat".into(), "vessel".into()],
        ]);
        let s = t.synonyms_for("All at sea in two boats", 9, 5);
        let get = |k: &str| s.iter().find(|(key, _)| key == k).map(|x| x.1.clone());
        // "sea" alone is not a member of the "at sea" group.
        assert_eq!(get("sea"), Some(vec!["ocean".into()]));
        assert_eq!(get("at sea"), Some(vec!["lost".into(), "confused".into()]));
        assert_eq!(get("boats"), Some(vec!["vessels".into()]));
        assert_eq!(get("two"), None);
        assert_eq!(t.synonyms_for("sea", 9, 1)[0].1, ["ocean"]);
        // Only the first senses: "sea"'s first group has no other member.
        assert!(t.synonyms_for("sea", 1, 9).is_empty());
        // Senses in the order given, not the groups'.
        let t = Thesaurus::with_senses(
            t.groups.clone(),
            vec![
                ("sea".into(), vec![1, 0]),
                ("boat".into(), vec![3, 99]),
                ("sea".into(), vec![2]),
            ],
        );
        // The first sense of each part of speech.
        assert_eq!(
            t.synonyms_for("sea", 1, 9)[0].1,
            ["ocean", "lost", "confused", "at sea"]
        );
        assert_eq!(t.synonyms_for("boat", 9, 9)[0].1, ["vessel"]);
        assert!(t.synonyms_for("lost", 9, 9).is_empty());
    }
}
