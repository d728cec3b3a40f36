//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while steering: each variant names the thing and what was
/// expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SteeringError {
    /// A feature index past the SAE's dictionary.
    #[error("feature {feature} does not exist: the SAE has {d_sae} features")]
    NoSuchFeature { feature: usize, d_sae: usize },
    /// The SAE reads another width than the hook produces, or names another hook.
    #[error("the SAE does not fit hook `{hook}`: {reason}")]
    SaeHook { hook: String, reason: String },
    /// An argument outside its valid range.
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// A file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose contents are not what was expected.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// Drawing a plot failed.
    #[error("plotting {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
    #[error(transparent)]
    Sae(#[from] sae_core::SaeError),
    #[error(transparent)]
    Model(#[from] transformer_hooks::Error),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Store(#[from] activation_store::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, SteeringError>;

impl SteeringError {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        SteeringError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SteeringError::Io {
            path: path.into(),
            source,
        }
    }
}
