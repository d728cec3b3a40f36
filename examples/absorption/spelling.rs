//! SAEBench's first-letter task built from a tokenizer's own vocabulary: every token that is a
//! word of ASCII letters (with at most one leading space), asked about in a prompt of ten solved
//! examples, `"\n{ex} has the first letter: {L}\n..." + "{word} has the first letter:"`, and read
//! at the word's token.

use rand::Rng;
use rand::seq::IndexedRandom;
use sae_workbench::transformer_hooks::Tokenizer;

/// What follows the word in every line (SAEBench's `prompt_template` after `{word}`).
pub const SUFFIX: &str = " has the first letter:";

/// A vocabulary token that is a word.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    pub id: u32,
    pub text: String,
    /// 0 for a, ..., 25 for z.
    pub letter: usize,
}

/// SAEBench's `get_alpha_tokens`: one optional leading space, then ASCII letters only.
pub fn is_word(text: &str) -> bool {
    let rest = text.strip_prefix(' ').unwrap_or(text);
    !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphabetic())
}

/// The word's first letter, 0-25 (`None` for a non-word).
pub fn letter_of(text: &str) -> Option<usize> {
    if !is_word(text) {
        return None;
    }
    let c = text.trim_start().chars().next()?;
    Some((c.to_ascii_lowercase() as u8 - b'a') as usize)
}

/// Every word of the vocabulary, in id order; a text that two ids decode to is kept once.
pub fn vocabulary_words(tok: &Tokenizer) -> anyhow::Result<Vec<Word>> {
    let mut seen = std::collections::HashSet::new();
    let mut words = Vec::new();
    for id in 0..tok.vocab_size() as u32 {
        let text = tok.decode(&[id])?;
        if let Some(letter) = letter_of(&text)
            && seen.insert(text.clone())
        {
            words.push(Word { id, text, letter });
        }
    }
    Ok(words)
}

/// One solved line: `"{word} has the first letter: {L}"`.
fn solved(word: &str) -> String {
    let first = word.trim_start().chars().next().unwrap_or('?');
    format!("{word}{SUFFIX} {}", first.to_ascii_uppercase())
}

/// The prompt for `word`: a newline, `icl` solved lines of other words drawn from `examples`,
/// then the word's own line, unanswered.
pub fn prompt(word: &str, examples: &[&str], icl: usize, rng: &mut impl Rng) -> String {
    let mut lines = Vec::with_capacity(icl + 1);
    let others: Vec<&&str> = examples.iter().filter(|e| **e != word).collect();
    for e in others.choose_multiple(rng, icl) {
        lines.push(solved(e));
    }
    lines.push(format!("{word}{SUFFIX}"));
    format!("\n{}", lines.join("\n"))
}

/// Where the word sits in a prompt's tokens: just before the suffix's tokens, if the prompt ends
/// with them and the token there is the word's own (a tokenizer may merge it with its
/// neighbours, and then the word is not asked about).
pub fn word_position(ids: &[u32], suffix: &[u32], word_id: u32) -> Option<usize> {
    if ids.len() <= suffix.len() || !ids.ends_with(suffix) {
        return None;
    }
    let p = ids.len() - suffix.len() - 1;
    (ids[p] == word_id).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn words_are_letters_after_at_most_one_space() {
        assert!(is_word(" cat") && is_word("Cat") && is_word("x"));
        for bad in [
            "", " ", "  cat", "cat ", "can't", "naïve", "a1", "\ncat", " C++",
        ] {
            assert!(!is_word(bad), "{bad:?}");
        }
        assert_eq!(letter_of(" Zebra"), Some(25));
        assert_eq!(letter_of("apple"), Some(0));
        assert_eq!(letter_of("1a"), None);
    }

    #[test]
    fn a_prompt_has_solved_lines_of_other_words_and_asks_last() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let examples = [" cat", " dog", "Emu", " cat2", " owl"];
        let p = prompt(" cat", &examples, 3, &mut rng);
        assert!(p.starts_with('\n'));
        let lines: Vec<&str> = p[1..].split('\n').collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[3], " cat has the first letter:");
        for l in &lines[..3] {
            assert!(
                !l.starts_with(" cat "),
                "the word itself is not an example: {p:?}"
            );
            let (w, answer) = l.split_once(" has the first letter: ").unwrap();
            let first = w.trim_start().chars().next().unwrap().to_ascii_uppercase();
            assert_eq!(answer, first.to_string(), "{l}");
        }
        assert_eq!(word_position(&[9, 4, 7, 1, 2], &[1, 2], 7), Some(2));
        assert_eq!(word_position(&[9, 4, 7, 1, 2], &[1, 2], 8), None);
        assert_eq!(word_position(&[9, 4, 7, 1, 3], &[1, 2], 7), None);
        assert_eq!(word_position(&[1, 2], &[1, 2], 7), None);
    }

    #[test]
    fn smollm2s_vocabulary_gives_words_read_at_their_own_token() {
        use sae_workbench::transformer_hooks::{Model, assets};
        let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
            return;
        };
        let model = Model::load(&path, &candle_core::Device::Cpu).unwrap();
        let tok = model.tokenizer().unwrap();
        let words = vocabulary_words(tok).unwrap();
        assert!(words.len() > 10_000, "{} words", words.len());
        for l in 0..26 {
            assert!(words.iter().any(|w| w.letter == l), "letter {l}");
        }
        let suffix = tok.encode(SUFFIX, false).unwrap();
        let texts: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut found = 0;
        for w in words.iter().step_by(97) {
            let ids = tok
                .encode(&prompt(&w.text, &texts, 10, &mut rng), false)
                .unwrap();
            if let Some(p) = word_position(&ids, &suffix, w.id) {
                assert_eq!(tok.decode(&ids[p..p + 1]).unwrap(), w.text);
                found += 1;
            }
        }
        // Nearly every word keeps its own token in context.
        let tried = words.len().div_ceil(97);
        assert!(found * 10 >= tried * 9, "{found} of {tried}");
    }
}
