//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while building data or fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// One line of a line-oriented file (WordNet data, JSONL) is malformed; the line number lets
    /// the file be fixed or re-fetched without a debugger.
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A pinned asset is not on disk; `fetch` is the command that puts it there.
    #[error("{path} not found; run `{fetch}` to fetch it")]
    MissingAsset { path: PathBuf, fetch: String },
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },
    #[error(transparent)]
    Model(#[from] transformer_hooks::Error),
    #[error(transparent)]
    Corpus(#[from] activation_store::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }
}
