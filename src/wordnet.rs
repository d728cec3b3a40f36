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
/// # Errors
/// A missing or malformed WordNet file, named.
pub fn thesaurus(dir: &Path) -> sft::Result<Thesaurus> {
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
    Ok(Thesaurus::with_senses(
        synsets.into_iter().map(|s| s.lemmas).collect(),
        senses,
    ))
}
