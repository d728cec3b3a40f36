//! The crate's one error type.

/// Data a law cannot be fitted to, named with what was expected.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ScalingError {
    /// Too few points, mismatched lengths, values that are not positive and finite.
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// The iterative fit found no finite optimum.
    #[error("the fit did not converge: {0}")]
    NoFit(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, ScalingError>;

pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> ScalingError {
    ScalingError::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}
