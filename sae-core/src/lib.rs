//! Sparse autoencoders (SAEs) for interpretability: the major architectures, trained fast on the
//! CPU with hand-written sparse gradients, saved and loaded the way SAELens and sparsify do.
//!
//! # Architectures
//!
//! | `architecture` | file, type | recipe |
//! |---|---|---|
//! | `standard` | `src/arch/standard.rs`, [`StandardSae`] | ReLU + L1, Towards Monosemanticity (tied pre-encoder bias, geometric-median `b_dec`, unit-norm decoder, resampling) |
//! | `topk` | `src/arch/topk.rs`, [`TopKSae`] | TopK + AuxK (Gao et al. 2024) |
//! | `batchtopk` | `src/arch/batchtopk.rs`, [`BatchTopKSae`] | BatchTopK with a learned inference threshold (saved as `jumprelu`) |
//! | `matryoshka_batchtopk` | `src/arch/matryoshka.rs`, [`MatryoshkaSae`] | BatchTopK whose nested prefixes must each reconstruct the input (Bussmann et al. 2025; saved as `jumprelu`) |
//! | `jumprelu` | `src/arch/jumprelu.rs`, [`JumpReluSae`] | JumpReLU, straight-through threshold gradient, L0 penalty |
//! | `gated` | `src/arch/gated.rs`, [`GatedSae`] | Gated SAE with its auxiliary loss |
//!
//! All implement [`Sae`] (inference) and [`TrainableSae`] (one hand-written forward + backward
//! pass). The hot step never goes through candle's autograd: the dense encoder product is a
//! candle GEMM, everything else runs over the active (token, feature) pairs only ([`kernels`]).
//!
//! # Loading and running a saved SAE
//!
//! ```no_run
//! # fn main() -> sae_core::Result<()> {
//! use candle_core::{Device, Tensor};
//! let sae = sae_core::SaeModel::load("runs/my_sae")?; // SAELens v6, older SAELens, or sparsify
//! println!("reads {:?}", sae.hook_name());
//! let x = Tensor::randn(0f32, 1.0, (8, sae.d_in()), &Device::Cpu)?;
//! let acts = sae.encode(&x)?; // [8, d_sae]
//! let x_hat = sae.decode(&acts)?; // [8, d_in]
//! # let _ = x_hat; Ok(()) }
//! ```
//!
//! # Training
//!
//! ```no_run
//! # fn main() -> sae_core::Result<()> {
//! use sae_core::{ArchitectureConfig, IterSource, Progress, TopKTraining, Trainer, TrainerConfig};
//! # let batches: Vec<candle_core::Tensor> = vec![];
//! let mut cfg = TrainerConfig::new(1536, 12288, ArchitectureConfig::TopK(TopKTraining::new(32)), 10_000);
//! cfg.metadata.hook_name = Some("blocks.15.mlp.hook_post".into());
//! let mut trainer = Trainer::new(cfg)?;
//! let mut source = IterSource(batches.into_iter().map(Ok::<_, sae_core::SaeError>));
//! let log = trainer.train(&mut source, Progress::Bar)?;
//! trainer.save("runs/my_sae")?; // cfg.json + sae_weights.safetensors + sparsity.safetensors
//! # let _ = log; Ok(()) }
//! ```
//!
//! Several SAEs can share one stream ([`train_many`]): each batch is read and checked once.
//!
//! # Adding an architecture
//!
//! Implement [`Sae`] and [`TrainableSae`] (the kernels in [`kernels`] do the sparse work), then
//! run the property kit (feature `testkit`) on it:
//!
//! ```ignore
//! sae_core::testkit::check_architecture("my_arch", |d_in, d_sae, seed| MySae::init(d_in, d_sae, seed),
//!     &sae_core::testkit::KitOptions::default());
//! ```
//!
//! `tests/sae_testkit_external.rs` at the workspace root does exactly this for an architecture
//! defined outside this crate.

// Every item has one path: `sae_core::Item`, and three namespaces: `io` (SAELens-format files),
// `kernels` (the host kernels an architecture is written with) and `testkit`.
mod arch;
mod codes;
mod config;
mod custom_ops;
mod device;
mod error;
mod fused_adam;
pub mod io;
pub mod kernels;
mod model;
#[cfg(feature = "nccl")]
mod nccl;
mod optim;
mod pairs;
mod params;
#[cfg(feature = "testkit")]
pub mod testkit;
mod trainer;

pub use arch::{
    Batch, BatchTopKSae, BatchTopKTraining, DecoderNorm, FileTensor, GatedSae, GatedTraining,
    JumpReluSae, JumpReluTraining, MatryoshkaSae, MatryoshkaTraining, Sae, StandardSae,
    StandardTraining, StepContext, StepOutput, TopKSae, TopKTraining, TrainableSae, transpose,
};
pub use codes::SparseCodes;
pub use config::{
    ARCHITECTURES, CommonConfig, GatedConfig, JumpReluConfig, NormalizeActivations,
    SAELENS_FORMAT_VERSION, SaeConfig, SaeMetadata, StandardConfig, TopKConfig,
};
pub use device::{
    Collective, DeviceOptions, DeviceStep, DeviceStepScalars, DeviceTrainer, InProcess, TOP_K_CHUNK,
};
pub use error::{Result, SaeError};
pub use model::SaeModel;
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use optim::{Adam, grad_norm};
pub use params::{Param, Params};
pub use trainer::{
    ActivationNormalization, ArchitectureConfig, BDecInit, BatchSource, HostBatch, IterSource,
    KEEP_CHECKPOINTS, Progress, TrainMetrics, Trainer, TrainerConfig, available_memory_bytes,
    geometric_median, train_many, training_bytes,
};

/// Folds an input scale `s` into SAELens-named parameters: an SAE trained on `s·x` becomes one
/// that reads `x` (`W_enc · s`, `W_dec / s`, `b_dec / s`; pre-activations and thresholds unchanged).
///
/// # Errors
/// If `W_enc`, `W_dec` or `b_dec` is missing.
pub fn fold_activation_scale(params: &mut Params, s: f32) -> Result<()> {
    if s == 1.0 {
        return Ok(());
    }
    params.data_mut("W_enc")?.iter_mut().for_each(|v| *v *= s);
    params.data_mut("W_dec")?.iter_mut().for_each(|v| *v /= s);
    params.data_mut("b_dec")?.iter_mut().for_each(|v| *v /= s);
    Ok(())
}
