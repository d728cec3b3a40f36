//! Sparse autoencoders for interpretability research on real language models.
//!
//! This root crate only re-exports the workspace's research crates, so that the programs in
//! `examples/` and the cross-crate tests in `tests/` can reach all of them through one name.
//! Each crate is usable on its own from another project.

pub mod cli;
pub mod wordnet;

pub use activation_store;
pub use metrics;
pub use sae_core;
pub use scaling;
pub use sft;
pub use steer_chat;
pub use steering;
pub use transfer;
pub use transformer_hooks;
