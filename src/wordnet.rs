//! WordNet as a thesaurus for cue adjustment: the synsets that the `sft` crate reads for its chat
//! data, indexed by each word's senses in order of frequency, so that `adjust_cue` and
//! `steer_chat` propose near-synonyms from the same source.

use std::collections::HashMap;
use std::path::Path;

use sft::conversations::{read_wordnet, read_wordnet_index};
use steering::cue::Thesaurus;

/// Synonyms for cue adjustment from a WordNet 3.0 `dict` folder (its `data.*` and `index.*`
/// files; `python3 scripts/fetch_assets.py wordnet` puts them in `assets/wordnet`).
///
/// With `broader`, each sense also offers the words of the senses it is a kind of, after its
/// own: a word whose only sense has no other member ("ship", "Congress" as the US legislature)
/// still gets a replacement that keeps the sentence's sense ("vessel", "legislature"), where a
/// synonym would change the topic only by changing the meaning.
///
/// # Errors
/// A missing or malformed WordNet file, named.
pub fn thesaurus(dir: &Path, broader: bool) -> sft::Result<Thesaurus> {
    let synsets = read_wordnet(dir)?;
    let index = read_wordnet_index(dir)?;
    let at: HashMap<String, usize> = synsets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.key(), i))
        .collect();
    let senses = index
        .into_iter()
        .map(|(lemma, keys)| {
            let groups = keys.iter().filter_map(|k| at.get(k).copied()).collect();
            (lemma, groups)
        })
        .collect();
    let groups = synsets
        .iter()
        .map(|s| {
            let mut words = s.lemmas.clone();
            if broader {
                for h in s.hypernyms.iter().filter_map(|k| at.get(k)) {
                    words.extend(synsets[*h].lemmas.iter().cloned());
                }
            }
            words
        })
        .collect();
    Ok(Thesaurus::with_senses(groups, senses))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the real WordNet (skipped without it): the broader words come after the sense's own,
    /// and only when asked for.
    #[test]
    fn broader_senses_follow_the_synonyms_only_when_asked() {
        let dir = crate::transformer_hooks::assets::assets_dir().join("wordnet");
        if !dir.join("data.noun").is_file() {
            println!(
                "skipping: {} is missing (python3 scripts/fetch_assets.py wordnet)",
                dir.display()
            );
            return;
        }
        let plain = thesaurus(&dir, false).unwrap();
        let broad = thesaurus(&dir, true).unwrap();
        let text = "A ship sailed past while Congress debated a tax.";
        let get = |t: &Thesaurus, key: &str| {
            t.synonyms_for(text, 1, 20)
                .into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or_default()
        };
        for (key, broader_word) in [
            ("ship", "vessel"),
            ("tax", "levy"),
            ("congress", "legislature"),
        ] {
            let (p, b) = (get(&plain, key), get(&broad, key));
            assert!(b.contains(&broader_word.to_string()), "{key}: {b:?}");
            assert!(!p.contains(&broader_word.to_string()), "{key}: {p:?}");
            // The plain synonyms keep their order among the broader words.
            let mut rest = b.iter();
            assert!(
                p.iter().all(|w| rest.any(|x| x == w)),
                "{key}: {p:?} in {b:?}"
            );
        }
        // Within a sense the broader words come after its own: the noun "ship" has no other
        // member, so "vessel" leads.
        assert_eq!(get(&broad, "ship")[0], "vessel");
        let tax = get(&broad, "tax");
        let at = |w: &str| tax.iter().position(|x| x == w);
        assert!(at("taxation") < at("levy"), "{tax:?}");
    }
}
