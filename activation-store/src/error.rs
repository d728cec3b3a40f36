//! The crate's one error type: every variant names the file, hook or setting it is about, so a
//! failed harvest or a bad cache can be fixed without reading the source.

use std::path::PathBuf;

/// Everything that can go wrong between a corpus file and a batch of activations.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed on a file or folder.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A write hit ENOSPC. The half-written shard stays a temporary file and is removed on the
    /// next run; the cache's committed shards are untouched.
    #[error("disk full while writing {path}: free space and run the harvest again to resume")]
    DiskFull { path: PathBuf },
    /// A corpus file does not have the layout the reader expects.
    #[error("corpus file {path}: {what}")]
    CorpusFormat { path: PathBuf, what: String },
    /// The tokenizer failed on a document.
    #[error("tokenizing document {doc}: {message}")]
    Tokenize { doc: String, message: String },
    /// `manifest.json` (or `plan.json`) is missing fields or is not JSON.
    #[error("manifest {path}: {what}")]
    Manifest { path: PathBuf, what: String },
    /// The cache was made with other settings than the caller expects: another model, hook,
    /// context length, dtype... Resuming or reading it would mix incompatible rows.
    #[error("cache {path} was made with {field} = {found}, but {expected} was asked for")]
    ManifestMismatch {
        path: PathBuf,
        field: &'static str,
        expected: String,
        found: String,
    },
    /// The caller asked for a hook the cache does not hold.
    #[error("cache {path} has no hook {hook}; it holds {available:?}")]
    HookNotInCache {
        path: PathBuf,
        hook: String,
        available: Vec<String>,
    },
    /// A shard's length disagrees with the manifest: truncated, or appended to.
    #[error("shard {path} has {found} bytes, the manifest says {expected}: truncated or corrupt")]
    ShardSize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// A shard's sha256 disagrees with the manifest: its bytes changed after it was committed.
    #[error("shard {path} has sha256 {found}, the manifest says {expected}: corrupt")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// The model produced NaN or infinity; storing it would poison every SAE trained on the cache.
    #[error("hook {hook} gave a non-finite value at window {window}, position {position}")]
    NonFinite {
        hook: String,
        window: u64,
        position: u32,
    },
    /// A tensor had another shape than expected.
    #[error("{what}: expected shape {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    /// A setting is out of range or contradicts another.
    #[error("invalid setting {field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    /// The model (transformer-hooks) failed: loading, tokenizing, a hook name, a forward pass.
    #[error(transparent)]
    Model(#[from] transformer_hooks::Error),
    /// Another activation source failed.
    #[error("activation source: {0}")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The background prefetch thread stopped without sending its error (it panicked).
    #[error("the prefetch thread stopped unexpectedly: {0}")]
    Prefetch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error, turning ENOSPC into [`Error::DiskFull`] so a full disk reads as such.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::StorageFull || source.raw_os_error() == Some(28) {
            Error::DiskFull { path }
        } else {
            Error::Io { op, path, source }
        }
    }
}

/// Attaches a path and an operation to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
