//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `sae-core`; each variant names the thing and what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SaeError {
    /// A tensor or buffer had the wrong shape.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        what: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// The input's last dimension did not match the SAE's `d_in`.
    #[error("input to {what}: expected d_in = {expected}, got {got}")]
    WrongDIn {
        what: String,
        expected: usize,
        got: usize,
    },
    /// A batch contained NaN or infinity.
    #[error("{what} contains a non-finite value ({value}) at row {row}, column {col}")]
    NonFiniteInput {
        what: String,
        row: usize,
        col: usize,
        value: f32,
    },
    /// Training produced NaN or infinity in the loss or the weights.
    #[error("training step {step}: {what} became non-finite ({value})")]
    NonFiniteTraining { step: u64, what: String, value: f64 },
    /// Batches on the device path held NaN or infinity (counted on the device, and reported when
    /// the host reads a step back, since a check at every step would make the device wait).
    #[error(
        "training batches up to step {step} held {count} NaN or infinite values: the activations \
         fed to the trainer are broken"
    )]
    NonFiniteBatches { step: u64, count: u64 },
    /// A file lacked a tensor that the architecture needs.
    #[error("{file}: missing tensor `{name}` (this {architecture} SAE needs {expected:?})")]
    MissingTensor {
        file: PathBuf,
        name: String,
        architecture: String,
        expected: Vec<String>,
    },
    /// A safetensors file could not be parsed (truncated, corrupt, or not safetensors).
    #[error("{file}: not a readable safetensors file ({reason})")]
    CorruptFile { file: PathBuf, reason: String },
    /// A tensor had a dtype this crate cannot read.
    #[error("{file}: tensor `{name}` has dtype {dtype}, expected F32, F16, BF16 or F64")]
    UnsupportedDtype {
        file: PathBuf,
        name: String,
        dtype: String,
    },
    /// `cfg.json` named an architecture this crate does not know.
    #[error("{file}: unknown architecture `{name}`, expected one of {expected:?}")]
    UnknownArchitecture {
        file: PathBuf,
        name: String,
        expected: Vec<String>,
    },
    /// A config could not be parsed or failed validation.
    #[error("config {what}: {reason}")]
    InvalidConfig { what: String, reason: String },
    /// The file exists in a layout or with options this crate refuses to load, with the reason.
    #[error("{file}: unsupported: {reason}")]
    Unsupported { file: PathBuf, reason: String },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// JSON (de)serialisation failed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The batch source failed.
    #[error("batch source: {0}")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A checkpoint could not be resumed.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`SaeError`].
pub type Result<T, E = SaeError> = std::result::Result<T, E>;

impl SaeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SaeError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(what: impl Into<String>, reason: impl Into<String>) -> Self {
        SaeError::InvalidConfig {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
