//! Reconstruction metrics, spliced NLL and loss recovered, KL, and the feature-ablation study.
//!
//! - [`reconstruction`]: L0, MSE, FVU / explained variance, cosine, dead and dense fractions and
//!   the feature-density histogram, streamed over batches of held-out activations.
//! - [`plots`]: PNG plots of those (plotters with a bundled font).
//! - [`html`]: self-contained feature pages in the style of Towards Monosemanticity.

pub mod error;
pub mod html;
pub mod plots;
pub mod reconstruction;

pub use error::{MetricsError, Result};
pub use reconstruction::{
    DEFAULT_DENSE_THRESHOLD, DensityHistogram, FeatureDensity, ReconstructionAccumulator,
    ReconstructionMetrics,
};
