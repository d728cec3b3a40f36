//! The crate's one error type.

use std::path::PathBuf;

/// What an intervention closure may fail with: any error, so that `?` works on candle's errors,
/// another crate's errors and `anyhow` alike inside the closure.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in `transformer-hooks`; each variant names the thing at fault and
/// what was expected of it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint is of an architecture this crate does not implement.
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    /// The checkpoint lacks a tensor the architecture needs.
    #[error("{path}: missing tensor `{name}` (needed by the {arch} architecture)")]
    MissingTensor {
        path: PathBuf,
        name: String,
        arch: String,
    },
    /// A tensor (weight, input, or an intervention's result) has the wrong shape.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        what: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A GGUF file could not be parsed or a tensor in it could not be read (truncated, corrupt).
    #[error("{path}: not a readable GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },
    /// A safetensors file could not be parsed or read (truncated, corrupt).
    #[error("{path}: not a readable safetensors checkpoint: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    /// A metadata entry (GGUF key or config.json field) is missing or has an unusable value.
    #[error("{path}: metadata `{key}`: {reason}")]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A string is not a TransformerLens hook name this crate knows.
    #[error("unknown hook point `{name}`: {reason}")]
    UnknownHookPoint { name: String, reason: String },
    /// A hook point is well formed but does not exist in this model.
    #[error("hook point `{hook}` does not exist in this model: {reason}")]
    HookNotInModel { hook: String, reason: String },
    /// A hook point was asked of a cache that did not capture it.
    #[error("hook point `{hook}` was not captured (captured: {captured:?})")]
    NotCaptured { hook: String, captured: Vec<String> },
    /// A token id is not below the vocabulary size.
    #[error(
        "token id {id} at (batch {batch}, position {position}) is out of range: the vocabulary has {vocab_size} tokens"
    )]
    TokenOutOfRange {
        id: i64,
        batch: usize,
        position: usize,
        vocab_size: usize,
    },
    /// An intervention closure returned an error.
    #[error("intervention at `{hook}` failed: {source}")]
    Intervention {
        hook: String,
        #[source]
        source: BoxError,
    },
    /// The tokenizer could not be built, or failed on an input.
    #[error("tokenizer ({what}): {reason}")]
    Tokenizer { what: String, reason: String },
    /// An argument is out of its valid range (empty input, zero temperature, ...).
    #[error("invalid {what}: {reason}")]
    InvalidInput { what: String, reason: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn metadata(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Metadata {
            path: path.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}
