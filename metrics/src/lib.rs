//! Reconstruction metrics, spliced NLL and loss recovered, KL, and the feature-ablation study.
//!
//! Not built yet: this crate will own the metrics of issue #5.
