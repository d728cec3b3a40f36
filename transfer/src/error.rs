//! The crate's one error type.

/// Everything that can go wrong in a transfer evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The two models cannot be a base/chat pair: they differ in `what`.
    #[error(
        "the models are not a base/chat pair of one architecture: {what} differs (base {base}, chat {chat})"
    )]
    PairMismatch {
        what: String,
        base: String,
        chat: String,
    },
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },
    #[error(transparent)]
    Model(#[from] transformer_hooks::Error),
    #[error(transparent)]
    Sae(#[from] sae_core::SaeError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("plot {path}: {message}")]
    Plot { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }
}
