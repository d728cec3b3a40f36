//! The crate's one error type (for setting up and serving; a bad request is an HTTP answer,
//! not an error of the server).

/// What can stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// Model, SAE and statistics that do not go together, or limits out of range.
    #[error("cannot serve: {0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Steering(#[from] steering::SteeringError),
    #[error(transparent)]
    Model(#[from] transformer_hooks::Error),
    #[error(transparent)]
    Sae(#[from] sae_core::SaeError),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, ChatError>;
