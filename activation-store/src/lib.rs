//! From registry corpora to a crash-safe, shuffled activation cache that streams to the trainer.
//!
//! The data flow, one module per step (`src/`), every item at `activation_store::Item`:
//!
//! 1. `corpus`: the pinned corpora (`scripts/fetch_assets.py`) as clean documents with stable ids
//!    ([`load_corpora`]); [`rdata`] reads the Austen novels out of R's lazy-load format.
//! 2. `windows`: a split by document id ([`SplitSpec`]), tokenization
//!    ([`tokenize_documents`]), fixed windows `BOS + text` that never cross a document boundary
//!    ([`WindowPlan`]), and token counts per split ([`corpus_report`]).
//! 3. [`harvest()`]: a model behind [`ActivationSource`] runs over the windows; the activations of
//!    one or more hooks are written as shards with per-row provenance and a JSON manifest
//!    ([`Manifest`]), committed crash-safely ([`CacheWriter`], [`write_atomic`]) so that a killed harvest resumes without
//!    a lost or duplicated row.
//! 4. [`ActivationStore`]: opens and verifies a cache; [`HookActivations::batches`] streams
//!    `[batch, d_in]` f32 tensors in a shuffled order that holds every row exactly once per epoch
//!    ([`BatchStream`]).
//!
//! ```no_run
//! use activation_store::{ActivationStore, StreamConfig};
//! # fn main() -> activation_store::Result<()> {
//! let cache = ActivationStore::open("runs/cache")?;
//! let acts = cache.hook("blocks.15.mlp.hook_post")?;
//! for batch in acts.batches(StreamConfig { epochs: Some(1), ..StreamConfig::new(4096) })? {
//!     let batch = batch?; // [4096, d_in] f32
//! #   let _ = batch;
//! }
//! # Ok(()) }
//! ```

// Every item has one path, `activation_store::Item`; `rdata` (the R data reader behind the
// corpora) stays a namespace.
mod cache;
mod corpus;
mod error;
mod harvest;
mod hooked;
mod manifest;
mod pinned;
pub mod rdata;
mod stream;
mod windows;
mod writer;

pub use cache::{ActivationStore, HookActivations, PlanInfo, VerifyReport};
pub use corpus::{
    CorpusName, Document, clean_text, default_corpora_root, load_corpora, load_corpus,
    strip_gutenberg,
};
pub use error::{Error, Result};
pub use harvest::{
    ActivationSource, HarvestConfig, HarvestSummary, ModelIdentity, SyntheticSource, harvest,
    sha256_file,
};
pub use hooked::HookedModel;
pub use manifest::{
    CacheSettings, FileInfo, HookInfo, HookShard, Manifest, Provenance, ShardInfo, SourceInfo,
    StoreDtype, shard_path,
};
pub use stream::{BatchStream, Shuffle, StreamConfig};
pub use windows::{
    CorpusReport, Encode, Split, SplitCounts, SplitSpec, TokenizedDocument, WindowPlan, WindowSpan,
    chunk_ranges, corpus_report, tokenize_documents,
};
pub use writer::{CacheWriter, ShardBuilder, write_atomic};
