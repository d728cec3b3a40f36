//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while measuring an SAE or rendering its pages.
///
/// Variants carry the name of the thing that was wrong and what was expected, so a user can
/// fix the input without reading the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// A tensor or slice had the wrong shape or length.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        what: String,
        expected: String,
        got: String,
    },
    /// The SAE reads a different width than the hook point produces.
    #[error(
        "SAE d_in {sae_d_in} does not match the width {hook_width} of hook `{hook}` in this model"
    )]
    SaeHookWidth {
        hook: String,
        sae_d_in: usize,
        hook_width: usize,
    },
    /// The model has no such hook point (wrong layer or a hook this architecture lacks).
    #[error("the model has no hook `{hook}`: {reason}")]
    UnknownHook { hook: String, reason: String },
    /// The evaluation text was empty or tokenized to fewer tokens than needed.
    #[error("text {what} is too short: {tokens} tokens, need at least {needed}")]
    TextTooShort {
        what: String,
        tokens: usize,
        needed: usize,
    },
    /// Nothing was accumulated before results were asked for.
    #[error("no {what} were accumulated: nothing to average")]
    Empty { what: String },
    /// An argument was outside its valid range.
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },
    /// A value that must be finite was NaN or infinite.
    #[error("{what} is not finite ({value})")]
    NonFinite { what: String, value: f64 },
    /// Drawing a plot failed.
    #[error("plotting {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The SAE refused an operation (wrong width, NaN input, ...).
    #[error(transparent)]
    Sae(#[from] sae_core::SaeError),
    /// The model refused an operation (unknown hook, bad tokens, ...).
    #[error(transparent)]
    Model(#[from] transformer_hooks::Error),
    /// The activation cache refused an operation (missing hook, corrupt shard, ...).
    #[error(transparent)]
    Store(#[from] activation_store::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, MetricsError>;

pub(crate) fn shape_err(
    what: impl Into<String>,
    expected: impl Into<String>,
    got: impl Into<String>,
) -> MetricsError {
    MetricsError::ShapeMismatch {
        what: what.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// `NonFinite` naming the first NaN or infinity of `values` as `what()`, or `Ok`.
pub(crate) fn check_finite(values: &[f32], what: impl FnOnce() -> String) -> Result<()> {
    match values.iter().find(|v| !v.is_finite()) {
        Some(v) => Err(MetricsError::NonFinite {
            what: what(),
            value: f64::from(*v),
        }),
        None => Ok(()),
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> MetricsError {
    let path = path.into();
    move |source| MetricsError::Io { path, source }
}
