//! Chat conversations for turning a base model into a chat model, built from sources whose
//! answers can be checked: WordNet 3.0 (definitions, synonyms, example sentences) and the pinned
//! text corpora (which work a passage is from, how it continues, how many words a sentence has).
//!
//! Every answer is read off the source data, never generated, so fine-tuning teaches the chat
//! format and short, true answers instead of a teacher model's mistakes. Train and eval are kept
//! apart by a stable hash of each synset and each corpus document: nothing an eval question is
//! about (a sense, a passage) was seen in training, so eval loss measures the chat skill and not
//! recall of training items.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use activation_store::{CorpusName, Document, load_corpora};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use transformer_hooks::{ChatMessage, Role};

/// The command that puts WordNet where [`Sources::default`] looks for it.
pub const FETCH_WORDNET: &str = "python3 scripts/fetch_assets.py wordnet";

/// The WordNet files read, with the part of speech each one holds (`data.adj` also holds
/// satellite adjectives).
const WORDNET_FILES: [(&str, Pos); 4] = [
    ("data.noun", Pos::Noun),
    ("data.verb", Pos::Verb),
    ("data.adj", Pos::Adjective),
    ("data.adv", Pos::Adverb),
];

/// Share of conversations with two exchanges: enough that the model learns to keep answering
/// after its own first turn, few enough that single questions dominate as they will in use.
const TWO_EXCHANGE_SHARE: f64 = 0.15;

/// Answers longer than this are not produced (a small model should learn to be brief).
const MAX_ANSWER_WORDS: usize = 60;

/// Which half of the data an item belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }

    fn index(self) -> usize {
        match self {
            Split::Train => 0,
            Split::Eval => 1,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// FNV-1a (64-bit). The split must not change between runs, machines or Rust versions, which
/// rules out `std`'s randomly seeded hasher.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn split_of(key: &str) -> Split {
    if fnv1a64(key.as_bytes()).is_multiple_of(10) {
        Split::Eval
    } else {
        Split::Train
    }
}

/// The split of a corpus document, by its id: a whole document (chapter, play, address) is on
/// one side, so no eval passage overlaps a training passage.
pub fn document_split(id: &str) -> Split {
    split_of(id)
}

/// A WordNet part of speech (`ss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pos {
    Noun,
    Verb,
    Adjective,
    /// An adjective listed under a head adjective (`s`); it lives in `data.adj`.
    AdjectiveSatellite,
    Adverb,
}

impl Pos {
    fn from_ss_type(s: &str) -> Option<Pos> {
        Some(match s {
            "n" => Pos::Noun,
            "v" => Pos::Verb,
            "a" => Pos::Adjective,
            "s" => Pos::AdjectiveSatellite,
            "r" => Pos::Adverb,
            _ => return None,
        })
    }

    /// The letter of the data file the synset is in; a synset offset is only unique per file,
    /// so this letter plus the offset identifies a synset.
    pub fn file_letter(self) -> char {
        match self {
            Pos::Noun => 'n',
            Pos::Verb => 'v',
            Pos::Adjective | Pos::AdjectiveSatellite => 'a',
            Pos::Adverb => 'r',
        }
    }

    /// The word used in answers ("a noun", "an adjective").
    pub fn name(self) -> &'static str {
        match self {
            Pos::Noun => "noun",
            Pos::Verb => "verb",
            Pos::Adjective | Pos::AdjectiveSatellite => "adjective",
            Pos::Adverb => "adverb",
        }
    }

    fn article(self) -> &'static str {
        match self {
            Pos::Adjective | Pos::AdjectiveSatellite | Pos::Adverb => "an",
            Pos::Noun | Pos::Verb => "a",
        }
    }
}

/// One WordNet sense: the words that share it, its definition and its example sentences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synset {
    /// Byte offset of the synset's line in its data file (WordNet's synset id).
    pub offset: u32,
    pub lex_filenum: u8,
    pub pos: Pos,
    /// Lemmas with underscores turned into spaces and adjective markers (`(a)`, `(p)`, `(ip)`)
    /// removed, in WordNet's order.
    pub lemmas: Vec<String>,
    /// The gloss before the first example; several definitions stay joined by "; ".
    pub definition: String,
    /// The quoted example sentences, without their quotes.
    pub examples: Vec<String>,
    /// Keys ([`Synset::key`]) of the broader senses this one is a kind or an instance of
    /// (WordNet's `@` and `@i` pointers): "vessel" for "ship", "legislature" for "Congress".
    #[serde(default)]
    pub hypernyms: Vec<String>,
}

impl Synset {
    /// `n00001740`: the file letter and the offset, the identity used for the split and in
    /// [`Origin::Synset`].
    pub fn key(&self) -> String {
        format!("{}{:08}", self.pos.file_letter(), self.offset)
    }

    /// A synset is in Eval iff the FNV-1a hash of its [`Synset::key`] is 0 mod 10.
    pub fn split(&self) -> Split {
        split_of(&self.key())
    }
}

/// Reads `data.noun`, `data.verb`, `data.adj` and `data.adv` from a WordNet 3.0 `dict` folder.
///
/// # Errors
/// [`Error::MissingAsset`] naming the folder or file (with the command that fetches it),
/// [`Error::Parse`] naming the file and line of a malformed data line.
pub fn read_wordnet(dir: &Path) -> Result<Vec<Synset>> {
    if !dir.is_dir() {
        return Err(Error::MissingAsset {
            path: dir.to_path_buf(),
            fetch: FETCH_WORDNET.into(),
        });
    }
    let mut synsets = Vec::new();
    for (name, pos) in WORDNET_FILES {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::MissingAsset {
                path,
                fetch: FETCH_WORDNET.into(),
            });
        }
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        synsets.extend(parse_wordnet_data(&path, &text, pos)?);
    }
    if synsets.is_empty() {
        return Err(Error::Format {
            path: dir.to_path_buf(),
            message: format!("no synsets in the WordNet data files; run `{FETCH_WORDNET}`"),
        });
    }
    Ok(synsets)
}

/// WordNet's index: per lemma (lower case, spaces for underscores) and part of speech, its
/// synsets as [`Synset::key`]s, most frequent sense first. Read from `index.noun`, `index.verb`,
/// `index.adj` and `index.adv` beside the data files; cue adjustment takes a word's first senses
/// only, so that "Congress" is not replaced by a synonym of its rarest sense.
///
/// # Errors
/// [`Error::MissingAsset`] naming a missing file (with the command that fetches it),
/// [`Error::Parse`] naming the file and line of a malformed entry.
pub fn read_wordnet_index(dir: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for (data, pos) in WORDNET_FILES {
        let name = data.replace("data.", "index.");
        let path = dir.join(&name);
        if !path.is_file() {
            return Err(Error::MissingAsset {
                path,
                fetch: FETCH_WORDNET.into(),
            });
        }
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        out.extend(parse_lines(&path, &text, |line| {
            parse_index_line(line, pos)
        })?);
    }
    Ok(out)
}

/// Parses each line of a WordNet file with `parse`, skipping the licence header (every line of
/// it starts with two spaces) and blank lines; a malformed line is named by file and number.
fn parse_lines<T>(
    path: &Path,
    text: &str,
    parse: impl Fn(&str) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("  ") || line.trim().is_empty() {
            continue;
        }
        out.push(parse(line).map_err(|message| Error::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        })?);
    }
    Ok(out)
}

/// `lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...`
fn parse_index_line(line: &str, pos: Pos) -> std::result::Result<(String, Vec<String>), String> {
    let mut t = line.split_ascii_whitespace();
    let lemma = field(&mut t, "lemma")?.replace('_', " ");
    field(&mut t, "part of speech")?;
    let synsets = number(field(&mut t, "synset count")?, 10, "synset count")?;
    let pointers = number(field(&mut t, "pointer count")?, 10, "pointer count")?;
    for _ in 0..pointers {
        field(&mut t, "pointer symbol")?;
    }
    field(&mut t, "sense count")?;
    field(&mut t, "tagged sense count")?;
    let keys = (0..synsets)
        .map(|_| {
            let o = number(field(&mut t, "synset offset")?, 10, "synset offset")?;
            Ok(format!("{}{o:08}", pos.file_letter()))
        })
        .collect::<std::result::Result<Vec<String>, String>>()?;
    Ok((lemma, keys))
}

/// Parses the text of one WordNet data file; `path` only names the file in errors and `pos`
/// is the part of speech the file holds (for `data.adj`, [`Pos::Adjective`]).
///
/// # Errors
/// [`Error::Parse`] with the 1-based line number of the first malformed line.
pub fn parse_wordnet_data(path: &Path, text: &str, pos: Pos) -> Result<Vec<Synset>> {
    parse_lines(path, text, |line| parse_data_line(line, pos))
}

fn field<'a>(
    t: &mut impl Iterator<Item = &'a str>,
    what: &str,
) -> std::result::Result<&'a str, String> {
    t.next()
        .ok_or_else(|| format!("the line ends before the {what}"))
}

fn number(s: &str, radix: u32, what: &str) -> std::result::Result<usize, String> {
    usize::from_str_radix(s, radix).map_err(|_| {
        let base = if radix == 16 {
            "hexadecimal"
        } else {
            "decimal"
        };
        format!("{what} {s:?} is not a {base} number")
    })
}

fn parse_data_line(line: &str, file_pos: Pos) -> std::result::Result<Synset, String> {
    let (fields, gloss) = line.split_once('|').ok_or("no `|` before the gloss")?;
    let mut t = fields.split_ascii_whitespace();
    let offset_text = field(&mut t, "synset offset")?;
    let offset = u32::try_from(number(offset_text, 10, "synset offset")?)
        .map_err(|_| format!("synset offset {offset_text} is too large"))?;
    let lex_text = field(&mut t, "lex_filenum")?;
    let lex_filenum = u8::try_from(number(lex_text, 10, "lex_filenum")?)
        .map_err(|_| format!("lex_filenum {lex_text} is too large"))?;
    let ss_type = field(&mut t, "ss_type")?;
    let pos = Pos::from_ss_type(ss_type).ok_or_else(|| format!("unknown ss_type {ss_type:?}"))?;
    if pos.file_letter() != file_pos.file_letter() {
        return Err(format!(
            "ss_type {ss_type:?} in the {} data file",
            file_pos.name()
        ));
    }
    let w_cnt = number(field(&mut t, "w_cnt")?, 16, "w_cnt")?;
    if w_cnt == 0 {
        return Err("w_cnt is 0: a synset has at least one word".into());
    }
    let mut lemmas = Vec::with_capacity(w_cnt);
    for _ in 0..w_cnt {
        let word = field(&mut t, "word")?;
        number(field(&mut t, "lex_id")?, 16, "lex_id")?;
        lemmas.push(clean_lemma(word));
    }
    let p_cnt = number(field(&mut t, "p_cnt")?, 10, "p_cnt")?;
    let mut hypernyms = Vec::new();
    for _ in 0..p_cnt {
        let symbol = field(&mut t, "pointer symbol")?;
        let target_offset = number(field(&mut t, "pointer offset")?, 10, "pointer offset")?;
        let target = field(&mut t, "pointer part of speech")?;
        let Some(target_pos) = Pos::from_ss_type(target) else {
            return Err(format!("unknown pointer part of speech {target:?}"));
        };
        if symbol == "@" || symbol == "@i" {
            hypernyms.push(format!("{}{target_offset:08}", target_pos.file_letter()));
        }
        number(
            field(&mut t, "pointer source/target")?,
            16,
            "pointer source/target",
        )?;
    }
    if pos == Pos::Verb {
        let f_cnt = number(field(&mut t, "f_cnt")?, 10, "f_cnt")?;
        for _ in 0..f_cnt {
            let plus = field(&mut t, "frame marker")?;
            if plus != "+" {
                return Err(format!("verb frame starts with {plus:?}, not \"+\""));
            }
            number(field(&mut t, "frame number")?, 10, "frame number")?;
            number(field(&mut t, "frame word number")?, 16, "frame word number")?;
        }
    }
    if let Some(extra) = t.next() {
        return Err(format!("unexpected field {extra:?} before the gloss"));
    }
    let (definition, examples) = parse_gloss(gloss);
    Ok(Synset {
        offset,
        lex_filenum,
        pos,
        lemmas,
        definition,
        examples,
        hypernyms,
    })
}

fn clean_lemma(word: &str) -> String {
    let word = ["(a)", "(p)", "(ip)"]
        .iter()
        .find_map(|m| word.strip_suffix(m))
        .unwrap_or(word);
    word.replace('_', " ")
}

/// Splits a gloss into its definition and its quoted examples. A gloss with an odd number of
/// quotes (a handful of WordNet's typos) keeps its definition but no examples, because where
/// such an example ends cannot be known.
fn parse_gloss(gloss: &str) -> (String, Vec<String>) {
    let gloss = gloss.trim();
    let Some(q) = gloss.find('"') else {
        return (trim_definition(gloss), Vec::new());
    };
    let definition = trim_definition(&gloss[..q]);
    let rest = &gloss[q..];
    if !rest.matches('"').count().is_multiple_of(2) {
        return (definition, Vec::new());
    }
    let examples = rest
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    (definition, examples)
}

fn trim_definition(s: &str) -> String {
    s.trim().trim_end_matches(';').trim().to_string()
}

/// Where the source files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The folder with `data.noun` etc. (`assets/wordnet`).
    pub wordnet: PathBuf,
    /// The corpora root that `activation_store::corpus` reads (`assets/corpora`).
    pub corpora: PathBuf,
}

impl Sources {
    /// The layout `scripts/fetch_assets.py` writes under an asset cache folder.
    pub fn in_assets(assets: &Path) -> Self {
        Sources {
            wordnet: assets.join("wordnet"),
            corpora: assets.join("corpora"),
        }
    }
}

impl Default for Sources {
    /// `$SAE_ASSETS`, or `assets/` at the workspace root: the same cache the fetch script fills.
    fn default() -> Self {
        match std::env::var_os("SAE_ASSETS") {
            Some(a) => Sources::in_assets(Path::new(&a)),
            None => Sources::in_assets(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets")),
        }
    }
}

/// What one exchange of a conversation asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// What a word means (WordNet definition).
    Define,
    /// Another word for a word (a second lemma of the same synset).
    Synonym,
    /// A sentence using a word (a WordNet example sentence).
    Sentence,
    /// Which work a corpus passage is from.
    Source,
    /// The next sentences of a corpus passage.
    Continue,
    /// How many words a corpus sentence has.
    Count,
}

impl Task {
    pub const ALL: [Task; 6] = [
        Task::Define,
        Task::Synonym,
        Task::Sentence,
        Task::Source,
        Task::Continue,
        Task::Count,
    ];

    /// The name used in [`Conversation::task`].
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Define => "define",
            Task::Synonym => "synonym",
            Task::Sentence => "sentence",
            Task::Source => "source",
            Task::Continue => "continue",
            Task::Count => "count",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The source item an exchange was made from, kept so that the split and the answers can be
/// checked after the fact.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A synset, by [`Synset::key`].
    Synset(String),
    /// A corpus document, by its id.
    Document(String),
}

/// One training or eval conversation: user and assistant turns, alternating, user first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// `{split}-{seed}-{index}`, unique within one [`build`] call.
    pub id: String,
    /// The task of each exchange, joined by `+` (`define`, or `define+source` for two).
    pub task: String,
    pub messages: Vec<ChatMessage>,
    /// The source item of each exchange, in order.
    pub origins: Vec<Origin>,
}

impl Conversation {
    /// The task names of the exchanges, in order.
    pub fn tasks(&self) -> impl Iterator<Item = &str> {
        self.task.split('+')
    }

    /// Checks the invariants the fine-tuning code relies on: user and assistant alternate,
    /// user first, and there is one task and one origin per exchange.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.messages.is_empty() || !self.messages.len().is_multiple_of(2) {
            return Err(format!(
                "{} messages; expected user/assistant pairs",
                self.messages.len()
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            let want = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            if m.role != want {
                return Err(format!("message {i} is {:?}, expected {want:?}", m.role));
            }
        }
        let exchanges = self.messages.len() / 2;
        if self.tasks().count() != exchanges || self.origins.len() != exchanges {
            return Err(format!(
                "{exchanges} exchanges but task {:?} and {} origins",
                self.task,
                self.origins.len()
            ));
        }
        Ok(())
    }
}

/// Human-readable name of the work a corpus document belongs to, or `None` for a document id
/// this module does not know how to name (it is then never used for the `source` task, so no
/// answer names a work wrongly).
pub fn work_title(doc_id: &str) -> Option<String> {
    let mut parts = doc_id.split('/');
    let corpus = parts.next()?;
    let name = parts.next()?;
    match corpus {
        "austen" => {
            let title = match name {
                "emma" => "Emma",
                "mansfieldpark" => "Mansfield Park",
                "northangerabbey" => "Northanger Abbey",
                "persuasion" => "Persuasion",
                "prideprejudice" => "Pride and Prejudice",
                "sensesensibility" => "Sense and Sensibility",
                _ => return None,
            };
            Some(format!("{title} by Jane Austen"))
        }
        "moby-dick" => Some("Moby-Dick by Herman Melville".into()),
        "shakespeare" => {
            let title = shakespeare_title(name)?;
            Some(format!("{title} by William Shakespeare"))
        }
        "sotu" => {
            // `1790_george_washington_n`: year, the president's names, party letter(s).
            let words: Vec<&str> = name.split('_').collect();
            let [year, names @ .., _party] = words.as_slice() else {
                return None;
            };
            if names.is_empty() || year.len() != 4 || !year.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(format!(
                "the State of the Union address of {year} by {}",
                president_name(names)?
            ))
        }
        _ => None,
    }
}

fn shakespeare_title(slug: &str) -> Option<&'static str> {
    Some(match slug {
        "alls_well_that_ends_well" => "All's Well That Ends Well",
        "antony_and_cleopatra" => "Antony and Cleopatra",
        "as_you_like_it" => "As You Like It",
        "comedy_of_errors" => "The Comedy of Errors",
        "coriolanus" => "Coriolanus",
        "cymbeline" => "Cymbeline",
        "hamlet" => "Hamlet",
        "henry_iv_part_1" => "Henry IV, Part 1",
        "henry_iv_part_2" => "Henry IV, Part 2",
        "henry_v" => "Henry V",
        "henry_vi_part_1" => "Henry VI, Part 1",
        "henry_vi_part_2" => "Henry VI, Part 2",
        "henry_vi_part_3" => "Henry VI, Part 3",
        "henry_viii" => "Henry VIII",
        "john" => "King John",
        "julius_caesar" => "Julius Caesar",
        "lear" => "King Lear",
        "lovers_complaint" => "A Lover's Complaint",
        "loves_labours_lost" => "Love's Labour's Lost",
        "macbeth" => "Macbeth",
        "measure_for_measure" => "Measure for Measure",
        "merchant_of_venice" => "The Merchant of Venice",
        "merry_wives_of_windsor" => "The Merry Wives of Windsor",
        "midsummer_nights_dream" => "A Midsummer Night's Dream",
        "much_ado_about_nothing" => "Much Ado About Nothing",
        "othello" => "Othello",
        "passionate_pilgrim" => "The Passionate Pilgrim",
        "pericles" => "Pericles",
        "phoenix_and_the_turtle" => "The Phoenix and the Turtle",
        "rape_of_lucrece" => "The Rape of Lucrece",
        "richard_ii" => "Richard II",
        "richard_iii" => "Richard III",
        "romeo_and_juliet" => "Romeo and Juliet",
        "sonnets" => "the Sonnets",
        "taming_of_the_shrew" => "The Taming of the Shrew",
        "tempest" => "The Tempest",
        "timon_of_athens" => "Timon of Athens",
        "tragedy_of_titus_andronicus" => "Titus Andronicus",
        "troilus_and_cressida" => "Troilus and Cressida",
        "twelfth_night" => "Twelfth Night",
        "two_gentlemen_of_verona" => "The Two Gentlemen of Verona",
        "winters_tale" => "The Winter's Tale",
        _ => return None,
    })
}

/// `["ulysses", "s", "grant"]` → "Ulysses S. Grant"; `["william", "mc", "kinley"]` →
/// "William McKinley" (the file names split "McKinley" in two).
fn president_name(words: &[&str]) -> Option<String> {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if w.is_empty() || !w.bytes().all(|b| b.is_ascii_lowercase()) {
            return None;
        }
        if w == "mc" && i + 1 < words.len() {
            out.push(format!("Mc{}", capitalize(words[i + 1])));
            i += 2;
            continue;
        }
        let mut name = capitalize(w);
        if w.len() == 1 {
            name.push('.');
        }
        out.push(name);
        i += 1;
    }
    Some(out.join(" "))
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A sentence of a corpus paragraph, with the checks that decide where it may be used.
#[derive(Debug, Clone)]
struct Sentence {
    text: String,
    words: usize,
    /// Plain prose: no markup, headings, stage directions or stray characters.
    clean: bool,
    /// Ends with a bare full stop, so it can be an answer.
    full_stop: bool,
    /// Every word is letters (and apostrophes) with at most one punctuation mark after it, so
    /// its word count is unambiguous.
    countable: bool,
}

impl Sentence {
    fn new(text: &str) -> Self {
        let words = text.split_whitespace().count();
        let clean = is_clean_sentence(text, words);
        Sentence {
            text: text.to_string(),
            words,
            clean,
            full_stop: text.ends_with('.'),
            countable: clean && (5..=20).contains(&words) && all_plain_words(text),
        }
    }
}

const ABBREVIATIONS: [&str; 38] = [
    "Mr", "Mrs", "Ms", "Dr", "St", "Mt", "Messrs", "Mme", "Mlle", "Capt", "Col", "Gen", "Lt",
    "Sgt", "Adm", "Rev", "Hon", "Gov", "Sen", "Rep", "Prof", "Jr", "Sr", "No", "Esq", "Vol", "Ch",
    "Co", "Inc", "Ltd", "vs", "etc", "Jan", "Feb", "Aug", "Sept", "Oct", "Nov",
];

fn is_closing(c: char) -> bool {
    matches!(c, '"' | '”' | '’' | '\'' | ')')
}

fn is_opening(c: char) -> bool {
    matches!(c, '"' | '“' | '‘' | '\'' | '(')
}

/// Whether the text before a full stop ends in an abbreviation or an initial, after which an
/// uppercase word does not start a new sentence.
fn ends_in_abbreviation(before: &str) -> bool {
    let word = before
        .rsplit(' ')
        .next()
        .unwrap_or("")
        .trim_start_matches(is_opening);
    if ABBREVIATIONS.contains(&word) || word.contains('.') {
        return true;
    }
    let mut chars = word.chars();
    matches!((chars.next(), chars.next()), (Some(c), None) if c.is_uppercase())
}

/// Splits whitespace-normalised prose after `.`, `!` or `?` (and any closing quotes) when a
/// space and an uppercase letter (possibly after an opening quote) follow. Simple, and wrong
/// only by merging sentences, which the length limits then filter out.
fn split_sentences(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        if matches!(c, '.' | '!' | '?') {
            let mut j = i + 1;
            while j < chars.len() && is_closing(chars[j].1) {
                j += 1;
            }
            if j < chars.len() && chars[j].1 == ' ' {
                let mut k = j + 1;
                while k < chars.len() && is_opening(chars[k].1) {
                    k += 1;
                }
                let upper_next = k < chars.len() && chars[k].1.is_uppercase();
                if upper_next && !(c == '.' && ends_in_abbreviation(&text[start..at])) {
                    let end = chars[j].0;
                    out.push(text[start..end].trim());
                    start = end + 1;
                    i = j + 1;
                    continue;
                }
            }
        }
        i += 1;
    }
    let tail = text[start..].trim();
    if !tail.is_empty() {
        out.push(tail);
    }
    out
}

fn is_clean_sentence(s: &str, words: usize) -> bool {
    if !(4..=45).contains(&words) || s.contains("--") {
        return false;
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || " .,;:!?'\"()-$%&“”‘’—".contains(c);
    if !s.chars().all(allowed) {
        return false;
    }
    let first = s.trim_start_matches(is_opening).chars().next();
    if !first.is_some_and(|c| c.is_ascii_uppercase()) {
        return false;
    }
    let body = s.trim_end_matches(is_closing);
    if !body.ends_with(['.', '!', '?']) {
        return false;
    }
    if s.matches('(').count() != s.matches(')').count() {
        return false;
    }
    // Headings, speaker names and acronym soup: any all-caps word of three or more letters.
    !s.split(|c: char| !c.is_ascii_alphabetic())
        .any(|w| w.len() >= 3 && w.bytes().all(|b| b.is_ascii_uppercase()))
}

fn all_plain_words(s: &str) -> bool {
    s.split_whitespace().all(|t| {
        let t = t.strip_suffix([',', '.', ';', ':', '!', '?']).unwrap_or(t);
        t.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && t.chars()
                .all(|c| c.is_ascii_alphabetic() || c == '\'' || c == '’')
    })
}

/// Quotes must open and close inside a passage, or it reads as a fragment of dialogue.
fn balanced_quotes(s: &str) -> bool {
    s.matches('"').count().is_multiple_of(2) && s.matches('“').count() == s.matches('”').count()
}

/// A play's speeches start with the speaker's name on its own line (`Hor.`, `LADY MACBETH.`).
fn is_speaker_label(line: &str) -> bool {
    line.ends_with('.')
        && line.split_whitespace().count() <= 4
        && line
            .chars()
            .all(|c| c.is_ascii_alphabetic() || c == ' ' || c == '.' || c == '\'')
}

/// A document cut into paragraphs of sentences, each paragraph whitespace-normalised so that a
/// run of its sentences joined by single spaces is a substring of the whitespace-normalised
/// document.
fn paragraphs(doc: &Document) -> Vec<Vec<Sentence>> {
    let play = doc.corpus() == CorpusName::Shakespeare.as_str();
    doc.text
        .split("\n\n")
        .map(|para| {
            let mut lines: Vec<&str> = para
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if play && lines.len() > 1 && is_speaker_label(lines[0]) {
                lines.remove(0);
            }
            let joined = lines.join(" ");
            let normal = joined.split_whitespace().collect::<Vec<_>>().join(" ");
            split_sentences(&normal)
                .into_iter()
                .map(Sentence::new)
                .collect()
        })
        .collect()
}

/// A run of sentences in one paragraph: `len` sentences from `start`, then `next` more (the
/// answer of a `continue` exchange; 0 for a `source` passage).
#[derive(Debug, Clone, Copy)]
struct Window {
    doc: u32,
    para: u32,
    start: u32,
    len: u8,
    next: u8,
}

/// The candidate items of each task for one split.
#[derive(Debug, Default)]
struct Pools {
    /// Synsets with a usable definition and at least one usable lemma.
    define: Vec<u32>,
    /// Synsets with at least two distinct usable lemmas.
    synonym: Vec<u32>,
    /// (synset, lemma, example) where the example is a sentence that uses the lemma.
    sentence: Vec<(u32, u16, u16)>,
    /// Passages, grouped by corpus so that each corpus is asked about equally often.
    source: Vec<Vec<Window>>,
    continuation: Vec<Vec<Window>>,
    count: Vec<Vec<Window>>,
}

impl Pools {
    fn size(&self, task: Task) -> usize {
        match task {
            Task::Define => self.define.len(),
            Task::Synonym => self.synonym.len(),
            Task::Sentence => self.sentence.len(),
            Task::Source => self.source.iter().map(Vec::len).sum(),
            Task::Continue => self.continuation.iter().map(Vec::len).sum(),
            Task::Count => self.count.iter().map(Vec::len).sum(),
        }
    }
}

/// How many source items fall into each split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub train_synsets: usize,
    pub eval_synsets: usize,
    pub train_documents: usize,
    pub eval_documents: usize,
}

/// The parsed sources with every task's candidates precomputed, so that several
/// [`Material::build`] calls (train and eval, several seeds) parse the files once.
pub struct Material {
    synsets: Vec<Synset>,
    documents: Vec<Document>,
    paragraphs: Vec<Vec<Vec<Sentence>>>,
    /// Number of synsets each lowercased lemma is in: a word with several senses is answered
    /// as "can mean", not "means".
    senses: HashMap<String, u32>,
    pools: [Pools; 2],
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("synsets", &self.synsets.len())
            .field("documents", &self.documents.len())
            .finish_non_exhaustive()
    }
}

/// A lemma that reads as an ordinary word in a question: lowercase (no proper names), at most
/// three words.
fn usable_lemma(l: &str) -> bool {
    (2..=30).contains(&l.len())
        && l.split(' ').count() <= 3
        && l.starts_with(|c: char| c.is_ascii_lowercase())
        && l.chars()
            .all(|c| c.is_ascii_lowercase() || c == ' ' || c == '-' || c == '\'')
}

/// A definition that can follow "meaning" in an answer.
fn usable_definition(d: &str) -> bool {
    let words = d.split_whitespace().count();
    (1..=35).contains(&words)
        && !d.starts_with('(')
        && !d.contains(['`', '"', '[', ']', '|'])
        && d.matches('(').count() == d.matches(')').count()
        && d.ends_with(|c: char| c.is_ascii_alphanumeric() || c == ')' || c == '.')
}

/// An example that is a whole sentence, not a phrase like "able to swim" or a trailing-off
/// "Now the next problem is...": WordNet's sentences start with a capital or a subject pronoun.
fn usable_example(e: &str) -> bool {
    let words: Vec<&str> = e.split_whitespace().collect();
    if !(4..=20).contains(&words.len()) {
        return false;
    }
    if !e
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " ,;:'-().".contains(c))
        || e.matches('(').count() != e.matches(')').count()
        || e.contains("..")
    {
        return false;
    }
    let first = words[0];
    let pronoun = ["i", "he", "she", "it", "we", "they", "you", "there"].contains(&first);
    pronoun || first.starts_with(|c: char| c.is_ascii_uppercase())
}

/// Whether `word` is `lemma` or a regular inflection of it (suffers, improved, stopping).
fn is_form_of(word: &str, lemma: &str) -> bool {
    if word == lemma {
        return true;
    }
    let Some(suffix) = word.strip_prefix(lemma) else {
        let stem = lemma
            .strip_suffix('e')
            .or_else(|| lemma.strip_suffix('y'))
            .unwrap_or(lemma);
        return stem != lemma
            && word.strip_prefix(stem).is_some_and(|s| {
                if lemma.ends_with('e') {
                    s == "ing"
                } else {
                    s == "ies" || s == "ied"
                }
            });
    };
    match suffix {
        "s" | "es" | "ed" | "d" | "ing" => true,
        _ => {
            // stop → stopped, stopping: the last letter doubled.
            let last = lemma.chars().last();
            let mut s = suffix.chars();
            s.next() == last && matches!(s.as_str(), "ed" | "ing")
        }
    }
}

/// Whether `text` uses `lemma` (or an inflection of each of its words) as whole words.
fn mentions(text: &str, lemma: &str) -> bool {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_ascii_alphabetic() || c == '\'' || c == '-'))
        .filter(|w| !w.is_empty())
        .collect();
    let parts: Vec<&str> = lemma.split(' ').collect();
    words
        .windows(parts.len())
        .any(|win| win.iter().zip(&parts).all(|(w, l)| is_form_of(w, l)))
}

/// `s` with a capital first letter and a full stop at the end.
fn as_sentence(s: &str) -> String {
    let mut out = capitalize(s.trim());
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

fn word_count(s: &str) -> usize {
    s.split_whitespace().count()
}

fn pick<'a, R: Rng>(rng: &mut R, options: &[&'a str]) -> &'a str {
    options[rng.random_range(0..options.len())]
}

const DEFINE_QUESTIONS: [&str; 5] = [
    "What does \"{w}\" mean?",
    "What is the meaning of \"{w}\"?",
    "Define \"{w}\".",
    "Can you tell me what \"{w}\" means?",
    "What's the definition of the word \"{w}\"?",
];
const SYNONYM_QUESTIONS: [&str; 4] = [
    "Give me a synonym for \"{w}\".",
    "What is another word for \"{w}\"?",
    "What's a synonym of \"{w}\"?",
    "Can you suggest a word that means the same as \"{w}\"?",
];
const SENTENCE_QUESTIONS: [&str; 4] = [
    "Use \"{w}\" in a sentence.",
    "Give me an example sentence with the word \"{w}\".",
    "Can you write a sentence that uses \"{w}\"?",
    "Show me how to use \"{w}\" in a sentence.",
];
const SOURCE_QUESTIONS: [&str; 4] = [
    "Which text is this passage from?",
    "Where does this passage come from?",
    "Can you identify the source of this passage?",
    "What work is this excerpt taken from?",
];
const CONTINUE_QUESTIONS: [&str; 4] = [
    "Continue this passage:",
    "How does this passage continue?",
    "Write what comes next in this text:",
    "What follows this passage?",
];
const COUNT_QUESTIONS: [&str; 3] = [
    "How many words are in this sentence?",
    "Count the words in this sentence:",
    "How many words does this sentence have?",
];
/// Openings of a second question, so that it reads as part of the same conversation.
const FOLLOW_UPS: [&str; 4] = ["", "Thanks. ", "Thank you. ", "OK. "];

struct Exchange {
    user: String,
    assistant: String,
    origin: Origin,
}

impl Material {
    /// Reads WordNet and all four corpora.
    ///
    /// # Errors
    /// Those of [`read_wordnet`] and of `activation_store::load_corpora`.
    pub fn load(sources: &Sources) -> Result<Self> {
        let synsets = read_wordnet(&sources.wordnet)?;
        let documents = load_corpora(&sources.corpora, &CorpusName::ALL)?;
        Ok(Material::from_parts(synsets, documents))
    }

    /// Material from already-read synsets and documents (for example small hand-made ones).
    pub fn from_parts(synsets: Vec<Synset>, documents: Vec<Document>) -> Self {
        let mut senses: HashMap<String, u32> = HashMap::new();
        for s in &synsets {
            let mut seen = HashSet::new();
            for l in &s.lemmas {
                let l = l.to_lowercase();
                if seen.insert(l.clone()) {
                    *senses.entry(l).or_default() += 1;
                }
            }
        }
        let paragraphs: Vec<Vec<Vec<Sentence>>> = documents.iter().map(paragraphs).collect();
        let mut pools = [Pools::default(), Pools::default()];
        for (i, s) in synsets.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { break };
            let pool = &mut pools[s.split().index()];
            let lemmas = distinct_usable_lemmas(s);
            if usable_definition(&s.definition) && !lemmas.is_empty() {
                pool.define.push(i);
                if lemmas.len() >= 2 {
                    pool.synonym.push(i);
                }
            }
            for &li in &lemmas {
                for (ei, e) in s.examples.iter().enumerate() {
                    if usable_example(e)
                        && mentions(e, &s.lemmas[li])
                        && let (Ok(li), Ok(ei)) = (u16::try_from(li), u16::try_from(ei))
                    {
                        pool.sentence.push((i, li, ei));
                    }
                }
            }
        }
        let mut by_corpus: [BTreeMap<&str, [Vec<Window>; 3]>; 2] = Default::default();
        for (d, (doc, paras)) in documents.iter().zip(&paragraphs).enumerate() {
            let Ok(d) = u32::try_from(d) else { break };
            let groups = by_corpus[document_split(&doc.id).index()]
                .entry(doc.corpus())
                .or_default();
            let titled = work_title(&doc.id).is_some();
            for (p, sentences) in paras.iter().enumerate() {
                let Ok(p) = u32::try_from(p) else { break };
                for start in 0..sentences.len() {
                    let Ok(s) = u32::try_from(start) else { break };
                    let at = |len: usize, next: usize| Window {
                        doc: d,
                        para: p,
                        start: s,
                        len: len as u8,
                        next: next as u8,
                    };
                    if titled && let Some(len) = source_passage(sentences, start) {
                        groups[0].push(at(len, 0));
                    }
                    if let Some((len, next)) = continuation(sentences, start) {
                        groups[1].push(at(len, next));
                    }
                    if sentences[start].countable {
                        groups[2].push(at(1, 0));
                    }
                }
            }
        }
        for (pool, corpora) in pools.iter_mut().zip(by_corpus) {
            for [source, cont, count] in corpora.into_values() {
                for (dest, windows) in [
                    (&mut pool.source, source),
                    (&mut pool.continuation, cont),
                    (&mut pool.count, count),
                ] {
                    if !windows.is_empty() {
                        dest.push(windows);
                    }
                }
            }
        }
        Material {
            synsets,
            documents,
            paragraphs,
            senses,
            pools,
        }
    }

    pub fn synsets(&self) -> &[Synset] {
        &self.synsets
    }

    pub fn documents(&self) -> &[Document] {
        &self.documents
    }

    /// How many synsets and documents each split has (all of them, usable for a task or not).
    pub fn split_counts(&self) -> SplitCounts {
        let eval_synsets = self
            .synsets
            .iter()
            .filter(|s| s.split() == Split::Eval)
            .count();
        let eval_documents = self
            .documents
            .iter()
            .filter(|d| document_split(&d.id) == Split::Eval)
            .count();
        SplitCounts {
            train_synsets: self.synsets.len() - eval_synsets,
            eval_synsets,
            train_documents: self.documents.len() - eval_documents,
            eval_documents,
        }
    }

    /// How many candidate items each task has in `split` (a task with none is left out of
    /// that split's conversations).
    pub fn pool_sizes(&self, split: Split) -> Vec<(Task, usize)> {
        let pools = &self.pools[split.index()];
        Task::ALL.iter().map(|&t| (t, pools.size(t))).collect()
    }

    /// `n` distinct conversations of `split`, the same for the same material, split, `n` and
    /// `seed`; the first `k` of them are those `build(split, k, seed)` returns. Tasks are
    /// drawn evenly among those with candidates; about 15% of conversations have a second
    /// exchange on a different task.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the split has no candidates at all, or too few to make `n`
    /// distinct conversations.
    pub fn build(&self, split: Split, n: usize, seed: u64) -> Result<Vec<Conversation>> {
        let pools = &self.pools[split.index()];
        let tasks: Vec<Task> = Task::ALL
            .into_iter()
            .filter(|&t| pools.size(t) > 0)
            .collect();
        if tasks.is_empty() {
            if n == 0 {
                return Ok(Vec::new());
            }
            return Err(Error::invalid(
                "conversation sources",
                format!("no synset or passage is usable for the {split} split"),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut seen: HashSet<Vec<String>> = HashSet::new();
        let mut out = Vec::with_capacity(n);
        let max_draws = n.saturating_mul(20).saturating_add(1000);
        let mut draws = 0usize;
        while out.len() < n {
            draws += 1;
            if draws > max_draws {
                return Err(Error::invalid(
                    "conversation count",
                    format!(
                        "only {} distinct {split} conversations after {max_draws} draws; \
                         ask for fewer than {n}",
                        out.len()
                    ),
                ));
            }
            let first = tasks[rng.random_range(0..tasks.len())];
            let mut chosen = vec![first];
            if tasks.len() >= 2 && rng.random_bool(TWO_EXCHANGE_SHARE) {
                let others: Vec<Task> = tasks.iter().copied().filter(|&t| t != first).collect();
                chosen.push(others[rng.random_range(0..others.len())]);
            }
            let mut messages = Vec::with_capacity(2 * chosen.len());
            let mut origins = Vec::with_capacity(chosen.len());
            for (k, &task) in chosen.iter().enumerate() {
                let ex = self.exchange(task, pools, &mut rng);
                let user = if k == 0 {
                    ex.user
                } else {
                    format!("{}{}", pick(&mut rng, &FOLLOW_UPS), ex.user)
                };
                messages.push(ChatMessage::user(user));
                messages.push(ChatMessage::assistant(ex.assistant));
                origins.push(ex.origin);
            }
            let key: Vec<String> = messages.iter().map(|m| m.content.clone()).collect();
            if !seen.insert(key) {
                continue;
            }
            out.push(Conversation {
                id: format!("{split}-{seed}-{:06}", out.len()),
                task: chosen
                    .iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join("+"),
                messages,
                origins,
            });
        }
        Ok(out)
    }

    fn polysemous(&self, lemma: &str) -> bool {
        self.senses
            .get(&lemma.to_lowercase())
            .is_some_and(|&n| n > 1)
    }

    /// "to get better" for verbs, whose WordNet definitions are bare infinitives.
    fn meaning(&self, s: &Synset) -> String {
        let d = s.definition.trim_end_matches('.');
        if s.pos == Pos::Verb && !d.starts_with("to ") {
            format!("to {d}")
        } else {
            d.to_string()
        }
    }

    fn sentence_text(&self, w: Window, from: usize, count: usize) -> String {
        let para = &self.paragraphs[w.doc as usize][w.para as usize];
        para[from..from + count]
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn exchange(&self, task: Task, pools: &Pools, rng: &mut ChaCha8Rng) -> Exchange {
        match task {
            Task::Define => {
                let s =
                    &self.synsets[pools.define[rng.random_range(0..pools.define.len())] as usize];
                let lemmas = distinct_usable_lemmas(s);
                let lemma = &s.lemmas[lemmas[rng.random_range(0..lemmas.len())]];
                let user = pick(rng, &DEFINE_QUESTIONS).replace("{w}", lemma);
                let (pos, article, meaning) = (s.pos.name(), s.pos.article(), self.meaning(s));
                let mut assistant = if self.polysemous(lemma) {
                    format!(
                        "\"{lemma}\" has several meanings. As {article} {pos}, it can mean {meaning}."
                    )
                } else {
                    format!("\"{lemma}\" is {article} {pos} meaning {meaning}.")
                };
                let examples: Vec<&String> = s
                    .examples
                    .iter()
                    .filter(|e| usable_example(e) && mentions(e, lemma))
                    .collect();
                if !examples.is_empty() && rng.random_bool(0.5) {
                    let e = as_sentence(examples[rng.random_range(0..examples.len())]);
                    if word_count(&assistant) + word_count(&e) + 2 <= MAX_ANSWER_WORDS {
                        assistant.push_str(&format!(" For example: \"{e}\""));
                    }
                }
                Exchange {
                    user,
                    assistant,
                    origin: Origin::Synset(s.key()),
                }
            }
            Task::Synonym => {
                let s =
                    &self.synsets[pools.synonym[rng.random_range(0..pools.synonym.len())] as usize];
                let lemmas = distinct_usable_lemmas(s);
                let i = rng.random_range(0..lemmas.len());
                let j = (i + 1 + rng.random_range(0..lemmas.len() - 1)) % lemmas.len();
                let (a, b) = (&s.lemmas[lemmas[i]], &s.lemmas[lemmas[j]]);
                let user = pick(rng, &SYNONYM_QUESTIONS).replace("{w}", a);
                let mean = if self.polysemous(a) || self.polysemous(b) {
                    "can mean"
                } else {
                    "mean"
                };
                let meaning = self.meaning(s);
                let assistant = if rng.random_bool(0.5) {
                    format!("\"{b}\" is a synonym: both {mean} {meaning}.")
                } else {
                    format!("You could say \"{b}\". Both words {mean} {meaning}.")
                };
                Exchange {
                    user,
                    assistant,
                    origin: Origin::Synset(s.key()),
                }
            }
            Task::Sentence => {
                let (si, li, ei) = pools.sentence[rng.random_range(0..pools.sentence.len())];
                let s = &self.synsets[si as usize];
                let lemma = &s.lemmas[li as usize];
                Exchange {
                    user: pick(rng, &SENTENCE_QUESTIONS).replace("{w}", lemma),
                    assistant: as_sentence(&s.examples[ei as usize]),
                    origin: Origin::Synset(s.key()),
                }
            }
            Task::Source | Task::Continue | Task::Count => {
                let groups = match task {
                    Task::Source => &pools.source,
                    Task::Continue => &pools.continuation,
                    _ => &pools.count,
                };
                let group = &groups[rng.random_range(0..groups.len())];
                let w = group[rng.random_range(0..group.len())];
                let doc = &self.documents[w.doc as usize];
                let start = w.start as usize;
                let text = self.sentence_text(w, start, usize::from(w.len));
                let (user, assistant) = match task {
                    Task::Source => {
                        // Only documents with a title get source windows.
                        let work = work_title(&doc.id).unwrap_or_default();
                        (
                            format!("{}\n\n{text}", pick(rng, &SOURCE_QUESTIONS)),
                            format!("This passage is from {work}."),
                        )
                    }
                    Task::Continue => (
                        format!("{}\n\n{text}", pick(rng, &CONTINUE_QUESTIONS)),
                        self.sentence_text(w, start + usize::from(w.len), usize::from(w.next)),
                    ),
                    _ => {
                        let n = word_count(&text);
                        let assistant = if rng.random_bool(0.5) {
                            format!("That sentence has {n} words.")
                        } else {
                            format!("There are {n} words in that sentence.")
                        };
                        (
                            format!("{}\n\n{text}", pick(rng, &COUNT_QUESTIONS)),
                            assistant,
                        )
                    }
                };
                Exchange {
                    user,
                    assistant,
                    origin: Origin::Document(doc.id.clone()),
                }
            }
        }
    }
}

/// Indices of a synset's usable lemmas, without case-insensitive repeats.
fn distinct_usable_lemmas(s: &Synset) -> Vec<usize> {
    let mut seen = HashSet::new();
    s.lemmas
        .iter()
        .enumerate()
        .filter(|(_, l)| usable_lemma(l) && seen.insert(l.to_lowercase()))
        .map(|(i, _)| i)
        .collect()
}

/// A `source` passage starting at `start`: the fewest sentences (2 to 4) that reach 40 words,
/// if that stays within 90 words.
fn source_passage(sentences: &[Sentence], start: usize) -> Option<usize> {
    let mut words = 0;
    for len in 1..=4 {
        let s = sentences.get(start + len - 1)?;
        if !s.clean {
            return None;
        }
        words += s.words;
        if len >= 2 && words >= 40 {
            let text = join(&sentences[start..start + len]);
            return (words <= 90 && balanced_quotes(&text)).then_some(len);
        }
    }
    None
}

/// A `continue` item starting at `start`: 2-3 sentences of context (the fewest that reach 25
/// words), then one sentence to predict, or two when the first is short. The predicted
/// sentences end with a full stop, like every answer.
fn continuation(sentences: &[Sentence], start: usize) -> Option<(usize, usize)> {
    let mut words = 0;
    let mut len = 0;
    for l in 1..=3 {
        let s = sentences.get(start + l - 1)?;
        if !s.clean {
            return None;
        }
        words += s.words;
        if l >= 2 && words >= 25 {
            len = l;
            break;
        }
    }
    if len == 0 || words > 90 || !balanced_quotes(&join(&sentences[start..start + len])) {
        return None;
    }
    let target = |i: usize| {
        sentences
            .get(i)
            .filter(|s| s.clean && s.full_stop && balanced_quotes(&s.text))
    };
    let first = target(start + len)?;
    let mut next = 1;
    if first.words < 12
        && let Some(second) = target(start + len + 1)
        && first.words + second.words <= 50
    {
        next = 2;
    }
    (first.words <= 50).then_some((len, next))
}

fn join(sentences: &[Sentence]) -> String {
    sentences
        .iter()
        .map(|s| s.text.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads WordNet and the corpora and builds `n` conversations of `split`; see
/// [`Material::build`]. To build both splits, load a [`Material`] once instead.
///
/// # Errors
/// Those of [`Material::load`] and [`Material::build`].
pub fn build(sources: &Sources, split: Split, n: usize, seed: u64) -> Result<Vec<Conversation>> {
    Material::load(sources)?.build(split, n, seed)
}

/// Writes one JSON conversation per line atomically (`atomic-write-file`: a temporary file,
/// fsynced and renamed into place), so a reader never sees half a file.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_jsonl(path: &Path, conversations: &[Conversation]) -> Result<()> {
    let written = (|| -> std::io::Result<()> {
        let mut w = BufWriter::new(atomic_write_file::AtomicWriteFile::open(path)?);
        for c in conversations {
            serde_json::to_writer(&mut w, c)?;
            w.write_all(b"\n")?;
        }
        w.into_inner().map_err(|e| e.into_error())?.commit()
    })();
    written.map_err(|e| Error::io(path, e))
}

/// Reads what [`write_jsonl`] wrote, checking each conversation's structure.
///
/// # Errors
/// [`Error::Io`] naming the file, [`Error::Parse`] naming the file and line of a line that is
/// not a valid conversation.
pub fn read_jsonl(path: &Path) -> Result<Vec<Conversation>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parse_error = |message: String| Error::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let c: Conversation = serde_json::from_str(line).map_err(|e| parse_error(e.to_string()))?;
        c.validate().map_err(parse_error)?;
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_after_quotes_but_not_after_titles() {
        let s = split_sentences(
            "\"I know.\" She said Mr. Darcy came. Did he? \"Yes!\" Then F. Scott left.",
        );
        assert_eq!(
            s,
            [
                "\"I know.\"",
                "She said Mr. Darcy came.",
                "Did he?",
                "\"Yes!\"",
                "Then F. Scott left."
            ]
        );
    }

    #[test]
    fn inflections_count_as_mentions() {
        assert!(mentions(
            "This author really suffers in translation",
            "suffer"
        ));
        assert!(mentions("Her performance in school picked up", "pick up"));
        assert!(mentions("we were improving", "improve"));
        assert!(mentions("he stopped", "stop"));
        assert!(!mentions("a catalog of items", "cat"));
    }

    #[test]
    fn presidents_are_named_like_people() {
        assert_eq!(
            work_title("sotu/1897_william_mc_kinley_r").as_deref(),
            Some("the State of the Union address of 1897 by William McKinley")
        );
        assert_eq!(
            work_title("sotu/1870_ulysses_s_grant_r").as_deref(),
            Some("the State of the Union address of 1870 by Ulysses S. Grant")
        );
        assert_eq!(work_title("sotu/notayear_x_r"), None);
    }
}
