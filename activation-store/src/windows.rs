//! Deterministic document splits and fixed-length token windows.
//!
//! # The window rule at document boundaries
//! Each document is tokenized on its own, without special tokens. Its tokens are cut into
//! consecutive chunks of `context_len - 1`; every window is `[BOS] + chunk`. The last chunk of a
//! document may be shorter (it is kept, never padded with another document's text), so **no window
//! spans two documents** and no position ever attends to text from another document. Batches of
//! windows of unequal length are right-padded for the forward pass; with causal attention padding
//! cannot change earlier positions, and padded positions are never stored.
//!
//! Windows are then put in a seeded random order, so that the first N tokens of a harvest sample
//! every corpus instead of the alphabetically first documents. A window's id is its index in that
//! order.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::corpus::Document;
use crate::error::{Error, Result};

/// Which part of the corpus a document belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "validation" | "val" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            _ => Err(Error::Config {
                field: "split",
                message: format!("unknown split {s:?}; expected train, validation or test"),
            }),
        }
    }
}

/// Fractions of documents held out. A document's split depends only on its id, so adding a
/// corpus never moves an existing document to another split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Fraction of documents in the validation split (default 0.05).
    pub validation: f64,
    /// Fraction of documents in the test split (default 0.05).
    pub test: f64,
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec {
            validation: 0.05,
            test: 0.05,
        }
    }
}

impl SplitSpec {
    /// # Errors
    /// [`Error::Config`] when a fraction is negative or they sum to 1 or more.
    pub fn validate(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !ok(self.validation) || !ok(self.test) || self.validation + self.test >= 1.0 {
            return Err(Error::Config {
                field: "split fractions",
                message: format!(
                    "validation {} and test {} must be >= 0 and sum to < 1",
                    self.validation, self.test
                ),
            });
        }
        Ok(())
    }

    /// The split of a document: a uniform number from sha256 of its id, cut at the fractions.
    pub fn split_of(&self, doc_id: &str) -> Split {
        let h = Sha256::digest(format!("activation-store/split/v1\0{doc_id}").as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[..8]);
        let u = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.test {
            Split::Test
        } else if u < self.test + self.validation {
            Split::Validation
        } else {
            Split::Train
        }
    }
}

/// A text encoder: text in, token ids out, without BOS or other special tokens.
pub type Encode<'a> = &'a (dyn Fn(&str) -> Result<Vec<u32>> + Sync);

/// A document after tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedDocument {
    pub id: String,
    pub split: Split,
    pub tokens: Vec<u32>,
}

/// Tokenizes documents in parallel, tagging each with its split.
///
/// # Errors
/// [`Error::Tokenize`] naming the document the encoder failed on.
pub fn tokenize_documents(
    docs: &[Document],
    encode: Encode<'_>,
    spec: &SplitSpec,
) -> Result<Vec<TokenizedDocument>> {
    spec.validate()?;
    docs.par_iter()
        .map(|d| {
            let tokens = encode(&d.text).map_err(|e| Error::Tokenize {
                doc: d.id.clone(),
                message: e.to_string(),
            })?;
            Ok(TokenizedDocument {
                id: d.id.clone(),
                split: spec.split_of(&d.id),
                tokens,
            })
        })
        .collect()
}

/// Where a window's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpan {
    /// Index into [`WindowPlan::documents`].
    pub doc: u32,
    /// Offset of the window's first text token in the document's token sequence.
    pub start: u32,
    /// Window length including BOS (2..=context_len).
    pub len: u32,
}

/// The one windowing rule of the workspace: a document's (or a text's) `n_tokens` tokens cut into
/// consecutive chunks of `context_len - 1` tokens, each to become `[bos] + chunk` (of
/// `context_len` when there is no BOS); the last chunk is shorter. Yields each chunk's range.
/// `context_len` must be at least 2 (the callers check it and name their own argument).
pub fn chunk_ranges(
    n_tokens: usize,
    context_len: usize,
    with_bos: bool,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let chunk = (context_len - usize::from(with_bos)).max(1);
    (0..n_tokens)
        .step_by(chunk)
        .map(move |start| start..(start + chunk).min(n_tokens))
}

/// The windows of one split, in harvest order. Window `i` is `[bos] + tokens[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowPlan {
    pub split: Split,
    pub context_len: usize,
    pub bos: u32,
    pub seed: u64,
    /// Document ids, sorted.
    pub documents: Vec<String>,
    pub windows: Vec<WindowSpan>,
    /// All windows' tokens (BOS included), concatenated in window order.
    #[serde(skip)]
    tokens: Vec<u32>,
    #[serde(skip)]
    offsets: Vec<usize>,
}

impl WindowPlan {
    /// Cuts the documents of `split` into windows (see the module docs for the rule) and orders
    /// them by `seed`.
    ///
    /// # Errors
    /// [`Error::Config`] when `context_len < 2`.
    pub fn build(
        docs: &[TokenizedDocument],
        split: Split,
        context_len: usize,
        bos: u32,
        seed: u64,
    ) -> Result<Self> {
        if context_len < 2 {
            return Err(Error::Config {
                field: "context_len",
                message: format!("{context_len} leaves no room for a token after BOS"),
            });
        }
        let mut selected: Vec<&TokenizedDocument> =
            docs.iter().filter(|d| d.split == split).collect();
        selected.sort_by(|a, b| a.id.cmp(&b.id));
        let mut spans = Vec::new();
        for (di, d) in selected.iter().enumerate() {
            for r in chunk_ranges(d.tokens.len(), context_len, true) {
                spans.push(WindowSpan {
                    doc: di as u32,
                    start: r.start as u32,
                    len: r.len() as u32 + 1,
                });
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        spans.shuffle(&mut rng);
        let mut plan = WindowPlan {
            split,
            context_len,
            bos,
            seed,
            documents: selected.iter().map(|d| d.id.clone()).collect(),
            windows: spans,
            tokens: Vec::new(),
            offsets: Vec::new(),
        };
        plan.fill_tokens(|doc| &selected[doc].tokens);
        Ok(plan)
    }

    fn fill_tokens<'a>(&mut self, doc_tokens: impl Fn(usize) -> &'a [u32]) {
        self.tokens.clear();
        self.offsets.clear();
        for w in &self.windows {
            self.offsets.push(self.tokens.len());
            self.tokens.push(self.bos);
            let start = w.start as usize;
            let toks = doc_tokens(w.doc as usize);
            self.tokens
                .extend_from_slice(&toks[start..start + w.len as usize - 1]);
        }
        self.offsets.push(self.tokens.len());
    }

    /// Number of windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Window `i`'s tokens, BOS first.
    pub fn tokens(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i]..self.offsets[i + 1]]
    }

    /// The full-length windows, in plan order, up to `max_tokens` tokens (at least one window),
    /// as `[batch, context_len]` tensors: a held-out evaluation set whose batches all have one
    /// shape (the last may have fewer rows).
    ///
    /// # Errors
    /// [`Error::Config`] for `batch == 0` or a plan without a full window; tensor errors.
    pub fn full_window_batches(
        &self,
        max_tokens: usize,
        batch: usize,
        device: &candle_core::Device,
    ) -> Result<Vec<candle_core::Tensor>> {
        if batch == 0 {
            return Err(Error::Config {
                field: "batch",
                message: "0 windows per batch".into(),
            });
        }
        let full: Vec<&[u32]> = (0..self.len())
            .map(|i| self.tokens(i))
            .filter(|t| t.len() == self.context_len)
            .take(max_tokens.div_ceil(self.context_len).max(1))
            .collect();
        if full.is_empty() {
            return Err(Error::Config {
                field: "context_len",
                message: format!(
                    "the {} split has no full window of {} tokens",
                    self.split, self.context_len
                ),
            });
        }
        full.chunks(batch)
            .map(|c| {
                let flat: Vec<u32> = c.iter().flat_map(|t| t.iter().copied()).collect();
                Ok(candle_core::Tensor::from_vec(
                    flat,
                    (c.len(), self.context_len),
                    device,
                )?)
            })
            .collect()
    }

    /// Number of text tokens (BOS excluded) over all windows.
    pub fn text_tokens(&self) -> u64 {
        (self.tokens.len() - self.windows.len()) as u64
    }

    /// The document id of window `i`.
    pub fn document_of(&self, i: usize) -> &str {
        &self.documents[self.windows[i].doc as usize]
    }

    /// A fingerprint of the plan, tokens included: a resumed harvest checks it so that a changed
    /// corpus or tokenizer cannot splice different windows into one cache.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "{}\0{}\0{}\0{}\0",
            self.split, self.context_len, self.bos, self.seed
        ));
        for d in &self.documents {
            h.update(d.as_bytes());
            h.update([0]);
        }
        for w in &self.windows {
            h.update(w.doc.to_le_bytes());
            h.update(w.start.to_le_bytes());
            h.update(w.len.to_le_bytes());
        }
        for t in &self.tokens {
            h.update(t.to_le_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// Token counts of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub documents: u64,
    /// Text tokens (no BOS).
    pub tokens: u64,
    /// Windows at the report's context length.
    pub windows: u64,
    /// Text tokens per corpus.
    pub tokens_by_corpus: BTreeMap<String, u64>,
}

/// Documents, windows and tokens per split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorpusReport {
    pub context_len: usize,
    pub split_spec: SplitSpec,
    pub splits: BTreeMap<Split, SplitCounts>,
}

/// Counts documents, tokens and windows of every split.
pub fn corpus_report(
    docs: &[TokenizedDocument],
    context_len: usize,
    spec: SplitSpec,
) -> CorpusReport {
    let mut splits: BTreeMap<Split, SplitCounts> = Split::ALL
        .iter()
        .map(|&s| (s, SplitCounts::default()))
        .collect();
    let chunk = context_len.saturating_sub(1).max(1);
    for d in docs {
        let c = splits.entry(d.split).or_default();
        c.documents += 1;
        c.tokens += d.tokens.len() as u64;
        c.windows += d.tokens.len().div_ceil(chunk) as u64;
        let corpus = d.id.split('/').next().unwrap_or("").to_string();
        *c.tokens_by_corpus.entry(corpus).or_default() += d.tokens.len() as u64;
    }
    CorpusReport {
        context_len,
        split_spec: spec,
        splits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, n: u32) -> TokenizedDocument {
        TokenizedDocument {
            id: id.into(),
            split: Split::Train,
            tokens: (0..n).map(|i| 1000 * (id.len() as u32) + i).collect(),
        }
    }

    #[test]
    fn windows_never_cross_documents_and_cover_every_token_once() {
        let docs = vec![doc("a/x", 10), doc("b/yy", 3), doc("c/zzz", 4)];
        let plan = WindowPlan::build(&docs, Split::Train, 5, 7, 1).unwrap();
        // 10 -> 4+4+2, 3 -> 3, 4 -> 4: five windows.
        assert_eq!(plan.len(), 5);
        let mut seen: Vec<u32> = Vec::new();
        for i in 0..plan.len() {
            let t = plan.tokens(i);
            assert_eq!(t[0], 7, "BOS first");
            assert!(t.len() <= 5);
            let d = &docs[plan.windows[i].doc as usize];
            let s = plan.windows[i].start as usize;
            assert_eq!(&t[1..], &d.tokens[s..s + t.len() - 1]);
            seen.extend(&t[1..]);
        }
        seen.sort();
        let mut all: Vec<u32> = docs.iter().flat_map(|d| d.tokens.clone()).collect();
        all.sort();
        assert_eq!(seen, all);
        assert_eq!(plan.text_tokens(), 17);
    }

    #[test]
    fn full_window_batches_keep_only_full_windows_in_plan_order() {
        let docs = vec![doc("a/x", 10), doc("b/yy", 3), doc("c/zzz", 4)];
        // Windows of 5 (BOS + 4): a/x gives 4+4+2, b/yy 3, c/zzz 4: three full windows.
        let plan = WindowPlan::build(&docs, Split::Train, 5, 7, 1).unwrap();
        let cpu = candle_core::Device::Cpu;
        let full: Vec<Vec<u32>> = (0..plan.len())
            .map(|i| plan.tokens(i).to_vec())
            .filter(|t| t.len() == 5)
            .collect();
        assert_eq!(full.len(), 3);
        let b = plan.full_window_batches(100, 2, &cpu).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].dims(), [2, 5]);
        assert_eq!(b[1].dims(), [1, 5]);
        let rows: Vec<Vec<u32>> = b.iter().flat_map(|t| t.to_vec2::<u32>().unwrap()).collect();
        assert_eq!(rows, full);
        // 6 tokens ask for two windows; 0 tokens still give one.
        let b = plan.full_window_batches(6, 8, &cpu).unwrap();
        assert_eq!(b[0].dims(), [2, 5]);
        assert_eq!(
            plan.full_window_batches(0, 8, &cpu).unwrap()[0].dims(),
            [1, 5]
        );
        assert!(plan.full_window_batches(6, 0, &cpu).is_err());
        let short = WindowPlan::build(&docs[1..2], Split::Train, 5, 7, 1).unwrap();
        let err = short.full_window_batches(6, 2, &cpu).unwrap_err();
        assert!(err.to_string().contains("no full window of 5"), "{err}");
    }

    #[test]
    fn plan_is_deterministic_for_a_seed() {
        let docs: Vec<_> = (0..20).map(|i| doc(&format!("d/{i}"), 30)).collect();
        let a = WindowPlan::build(&docs, Split::Train, 8, 0, 5).unwrap();
        let b = WindowPlan::build(&docs, Split::Train, 8, 0, 5).unwrap();
        let c = WindowPlan::build(&docs, Split::Train, 8, 0, 6).unwrap();
        assert_eq!(a.sha256(), b.sha256());
        assert_ne!(a.sha256(), c.sha256());
    }

    #[test]
    fn split_is_by_id_and_near_the_fractions() {
        let spec = SplitSpec {
            validation: 0.1,
            test: 0.2,
        };
        let ids: Vec<String> = (0..20_000).map(|i| format!("doc/{i}")).collect();
        let mut n = BTreeMap::new();
        for id in &ids {
            *n.entry(spec.split_of(id)).or_insert(0usize) += 1;
            assert_eq!(spec.split_of(id), spec.split_of(&id.clone()));
        }
        let frac = |s| n[&s] as f64 / ids.len() as f64;
        assert!((frac(Split::Validation) - 0.1).abs() < 0.01);
        assert!((frac(Split::Test) - 0.2).abs() < 0.01);
        assert!(
            SplitSpec {
                validation: 0.6,
                test: 0.5
            }
            .validate()
            .is_err()
        );
    }
}
