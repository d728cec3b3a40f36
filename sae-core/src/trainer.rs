//! Training: a config, a [`Trainer`] that takes one batch at a time or drains a [`BatchSource`],
//! metrics per step, atomic checkpoints and bit-identical resume.
//!
//! Per step: normalise the batch (fixed factor `sqrt(d_in) / mean ||x||` from the first batch),
//! one hand-written forward + backward pass, the architecture's gradient constraint, global
//! gradient-norm clipping, Adam with warm-up/decay of the learning rate, the architecture's
//! post-step hook (decoder renormalisation, thresholds), firing statistics, and resampling where
//! the recipe has it. On save, the normalisation factor is folded into the weights
//! (`W_enc · s`, `W_dec / s`, `b_dec / s`), so the saved SAE reads raw activations.
//!
//! Everything is deterministic for a seed and a thread count: no float reduction depends on
//! scheduling, and the only randomness (init, resampling) comes from seeded ChaCha streams.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::arch::{
    Batch, BatchTopKSae, BatchTopKTraining, GatedSae, GatedTraining, JumpReluSae, JumpReluTraining,
    MatryoshkaSae, MatryoshkaTraining, StandardSae, StandardTraining, StepContext, StepOutput,
    TopKSae, TopKTraining, TrainableSae,
};
use crate::config::{CommonConfig, SaeMetadata};
use crate::error::{Result, SaeError};
use crate::io;
use crate::kernels;
use crate::model::SaeModel;
use crate::optim::{Adam, grad_norm};
use crate::params::{Param, Params};

/// Architecture and its training options, tagged by `architecture` like SAELens configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture")]
#[non_exhaustive]
pub enum ArchitectureConfig {
    #[serde(rename = "standard")]
    Standard(StandardTraining),
    #[serde(rename = "topk")]
    TopK(TopKTraining),
    #[serde(rename = "batchtopk")]
    BatchTopK(BatchTopKTraining),
    #[serde(rename = "matryoshka_batchtopk")]
    Matryoshka(MatryoshkaTraining),
    #[serde(rename = "jumprelu")]
    JumpRelu(JumpReluTraining),
    #[serde(rename = "gated")]
    Gated(GatedTraining),
}

impl ArchitectureConfig {
    /// The SAELens training-architecture name.
    pub fn name(&self) -> &'static str {
        match self {
            ArchitectureConfig::Standard(_) => "standard",
            ArchitectureConfig::TopK(_) => "topk",
            ArchitectureConfig::BatchTopK(_) => "batchtopk",
            ArchitectureConfig::Matryoshka(_) => "matryoshka_batchtopk",
            ArchitectureConfig::JumpRelu(_) => "jumprelu",
            ArchitectureConfig::Gated(_) => "gated",
        }
    }

    /// A freshly initialised SAE.
    ///
    /// # Errors
    /// Invalid options (e.g. `k > d_sae`).
    pub fn build(&self, d_in: usize, d_sae: usize, seed: u64) -> Result<Box<dyn TrainableSae>> {
        Ok(match self {
            ArchitectureConfig::Standard(c) => {
                Box::new(StandardSae::init(d_in, d_sae, c.clone(), seed))
            }
            ArchitectureConfig::TopK(c) => Box::new(TopKSae::init(d_in, d_sae, c.clone(), seed)?),
            ArchitectureConfig::BatchTopK(c) => {
                Box::new(BatchTopKSae::init(d_in, d_sae, c.clone(), seed)?)
            }
            ArchitectureConfig::Matryoshka(c) => {
                Box::new(MatryoshkaSae::init(d_in, d_sae, c.clone(), seed)?)
            }
            ArchitectureConfig::JumpRelu(c) => {
                Box::new(JumpReluSae::init(d_in, d_sae, c.clone(), seed))
            }
            ArchitectureConfig::Gated(c) => Box::new(GatedSae::init(d_in, d_sae, c.clone(), seed)),
        })
    }

    /// An SAE with the given parameters (internal layout).
    ///
    /// # Errors
    /// Missing parameters or wrong shapes.
    pub fn with_params(
        &self,
        d_in: usize,
        d_sae: usize,
        params: Params,
    ) -> Result<Box<dyn TrainableSae>> {
        Ok(match self {
            ArchitectureConfig::Standard(c) => {
                Box::new(StandardSae::from_params(d_in, d_sae, c.clone(), params)?)
            }
            ArchitectureConfig::TopK(c) => {
                Box::new(TopKSae::from_params(d_in, d_sae, c.clone(), params)?)
            }
            ArchitectureConfig::BatchTopK(c) => Box::new(BatchTopKSae::from_params(
                d_in,
                d_sae,
                c.clone(),
                params,
                0.0,
            )?),
            ArchitectureConfig::Matryoshka(c) => Box::new(MatryoshkaSae::from_params(
                d_in,
                d_sae,
                c.clone(),
                params,
                0.0,
            )?),
            ArchitectureConfig::JumpRelu(c) => {
                Box::new(JumpReluSae::from_params(d_in, d_sae, c.clone(), params)?)
            }
            ArchitectureConfig::Gated(c) => {
                Box::new(GatedSae::from_params(d_in, d_sae, c.clone(), params)?)
            }
        })
    }
}

/// How `b_dec` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    /// Geometric median of the first batch (Towards Monosemanticity), by Weiszfeld's algorithm.
    GeometricMedian,
    /// Mean of the first batch.
    Mean,
    /// Zeros.
    Zeros,
}

/// Whether inputs are scaled to a fixed mean norm during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationNormalization {
    /// Train on raw activations.
    None,
    /// Scale by `sqrt(d_in) / mean ||x||` estimated on the first batch; folded into the weights on
    /// save (SAELens's `expected_average_only_in`).
    ExpectedAverageOnlyIn,
}

/// Everything a training run needs. Field defaults are SAELens's unless noted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Width of the activations.
    pub d_in: usize,
    /// Number of features.
    pub d_sae: usize,
    /// Architecture and its options.
    pub sae: ArchitectureConfig,
    /// Optimizer steps (one batch each).
    pub total_steps: u64,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_eps: f64,
    /// Linear learning-rate warm-up from 0.
    #[serde(default)]
    pub lr_warm_up_steps: u64,
    /// Linear decay to 0 over the last this-many steps.
    #[serde(default)]
    pub lr_decay_steps: u64,
    /// Linear warm-up of the sparsity coefficient (L1 / L0) from 0.
    #[serde(default)]
    pub sparsity_warm_up_steps: u64,
    /// Clip the global gradient norm to this (SAELens clips at 1.0); `None` disables.
    #[serde(default = "default_clip")]
    pub grad_clip_norm: Option<f64>,
    /// Input normalisation (default: to mean norm sqrt(d_in)).
    #[serde(default = "default_norm")]
    pub normalize_activations: ActivationNormalization,
    /// How `b_dec` starts.
    #[serde(default = "default_bdec")]
    pub b_dec_init: BDecInit,
    /// A feature is dead after this many tokens without firing (sparsify's default, 10M).
    #[serde(default = "default_dead")]
    pub dead_window_tokens: u64,
    /// A feature is dense when it fires on more than this fraction of tokens.
    #[serde(default = "default_dense")]
    pub dense_firing_rate: f64,
    /// Steps after which dead features are resampled (architectures with a recipe: standard).
    #[serde(default)]
    pub resample_at_steps: Vec<u64>,
    /// ReLU-family SAEs (standard, gated): at the first batch, set each feature's encoder bias
    /// (`b_enc`; `b_gate` for gated) so that it fires on `target / d_sae` of that batch, i.e. an
    /// initial L0 of about `target`. From the usual zero bias about half the features fire on
    /// every token, and Adam moves a bias by at most ~lr per step, so a short run (hundreds of
    /// steps, as on a CPU) never leaves the dense regime however large the L1 coefficient; long
    /// runs don't need this. The L1 penalty still sets where L0 goes from there.
    #[serde(default)]
    pub encoder_bias_init_l0: Option<usize>,
    /// Steps between logged metrics (also the feature-density window).
    #[serde(default = "default_log")]
    pub log_every: u64,
    /// Steps between checkpoints, written under `checkpoint_dir`.
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Folder holding `step_NNNNNNNNN/` checkpoints.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Seed for init and resampling.
    #[serde(default)]
    pub seed: u64,
    /// Written into the saved `cfg.json` (`hook_name`, `model_name`, ...).
    #[serde(default)]
    pub metadata: SaeMetadata,
}

fn default_lr() -> f64 {
    3e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_norm() -> ActivationNormalization {
    ActivationNormalization::ExpectedAverageOnlyIn
}
fn default_bdec() -> BDecInit {
    BDecInit::GeometricMedian
}
fn default_dead() -> u64 {
    10_000_000
}
fn default_dense() -> f64 {
    0.1
}
fn default_log() -> u64 {
    100
}

impl TrainerConfig {
    /// A config with the defaults above.
    pub fn new(d_in: usize, d_sae: usize, sae: ArchitectureConfig, total_steps: u64) -> Self {
        TrainerConfig {
            d_in,
            d_sae,
            sae,
            total_steps,
            lr: default_lr(),
            adam_beta1: default_beta1(),
            adam_beta2: default_beta2(),
            adam_eps: default_eps(),
            lr_warm_up_steps: 0,
            lr_decay_steps: 0,
            sparsity_warm_up_steps: 0,
            grad_clip_norm: default_clip(),
            normalize_activations: default_norm(),
            b_dec_init: default_bdec(),
            dead_window_tokens: default_dead(),
            dense_firing_rate: default_dense(),
            resample_at_steps: Vec::new(),
            encoder_bias_init_l0: None,
            log_every: default_log(),
            checkpoint_every: None,
            checkpoint_dir: None,
            seed: 0,
            metadata: SaeMetadata::default(),
        }
    }

    /// Rejects inconsistent settings.
    ///
    /// # Errors
    /// [`SaeError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |w: &str, r: String| Err(SaeError::config(w, r));
        if self.d_in == 0 || self.d_sae == 0 {
            return bad(
                "d_in/d_sae",
                format!("must be positive, got {}/{}", self.d_in, self.d_sae),
            );
        }
        if self.total_steps == 0 {
            return bad("total_steps", "must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("must be positive, got {}", self.lr));
        }
        for (n, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return bad(n, format!("must be in [0, 1), got {b}"));
            }
        }
        if self.lr_warm_up_steps + self.lr_decay_steps > self.total_steps {
            return bad(
                "lr_warm_up_steps + lr_decay_steps",
                format!(
                    "{} + {} exceeds total_steps {}",
                    self.lr_warm_up_steps, self.lr_decay_steps, self.total_steps
                ),
            );
        }
        if let Some(c) = self.grad_clip_norm
            && c.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return bad("grad_clip_norm", format!("must be positive, got {c}"));
        }
        if let Some(t) = self.encoder_bias_init_l0 {
            if !matches!(
                self.sae,
                ArchitectureConfig::Standard(_) | ArchitectureConfig::Gated(_)
            ) {
                return bad(
                    "encoder_bias_init_l0",
                    "applies to the ReLU-family architectures (standard, gated)".into(),
                );
            }
            if t == 0 || t > self.d_sae {
                return bad(
                    "encoder_bias_init_l0",
                    format!("must be in 1..={}, got {t}", self.d_sae),
                );
            }
        }
        if self.log_every == 0 {
            return bad("log_every", "must be at least 1".into());
        }
        if self.checkpoint_every.is_some() && self.checkpoint_dir.is_none() {
            return bad("checkpoint_every", "needs checkpoint_dir".into());
        }
        if self.checkpoint_every == Some(0) {
            return bad("checkpoint_every", "must be at least 1".into());
        }
        if !self.resample_at_steps.is_empty()
            && !matches!(self.sae, ArchitectureConfig::Standard(_))
        {
            return bad(
                "resample_at_steps",
                format!(
                    "resampling is the standard recipe's; {} has none",
                    self.sae.name()
                ),
            );
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warm-up, constant, linear decay to 0.
    pub fn lr_at(&self, step: u64) -> f64 {
        let mut f = 1.0;
        if self.lr_warm_up_steps > 0 && step < self.lr_warm_up_steps {
            f = (step + 1) as f64 / self.lr_warm_up_steps as f64;
        }
        let decay_start = self.total_steps - self.lr_decay_steps;
        if self.lr_decay_steps > 0 && step >= decay_start {
            f = f.min((self.total_steps - step) as f64 / self.lr_decay_steps as f64);
        }
        self.lr * f
    }

    /// Sparsity-coefficient factor at `step`: linear from 0 over the warm-up, then 1.
    pub fn sparsity_scale_at(&self, step: u64) -> f32 {
        if self.sparsity_warm_up_steps == 0 {
            1.0
        } else {
            (step as f64 / self.sparsity_warm_up_steps as f64).min(1.0) as f32
        }
    }
}

/// What one step measured, in normalised units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Steps completed (this step included).
    pub step: u64,
    pub tokens_seen: u64,
    pub lr: f64,
    /// Sparsity-coefficient warm-up factor used.
    pub sparsity_scale: f32,
    pub loss: f64,
    /// Squared error summed over `d_in`, averaged over tokens.
    pub mse: f64,
    pub sparsity_loss: f64,
    pub aux_loss: f64,
    /// Fraction of variance unexplained: `Σ ||x - x̂||² / Σ ||x - mean(x)||²` over the batch.
    pub fvu: f64,
    /// Mean active features per token.
    pub l0: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Fraction of features that did not fire within `dead_window_tokens`.
    pub dead_fraction: f64,
    /// Fraction of features firing on more than `dense_firing_rate` of tokens in the density window.
    pub dense_fraction: f64,
    /// Histogram of log10 firing rates over the density window: bin `i` counts features with
    /// log10 rate in `[-(i+1), -i)` (bin 0: `[-1, 0]`); the last bin also holds features that
    /// never fired.
    pub log10_density_histogram: Vec<u32>,
    /// Tokens in the density window.
    pub density_window_tokens: u64,
}

/// Where training batches come from: `[batch, d_in]` f32 tensors on any device.
pub trait BatchSource {
    /// The next batch, or `None` when the stream ends.
    ///
    /// # Errors
    /// Whatever the source fails with (wrapped in [`SaeError::Source`]).
    fn next_batch(&mut self) -> Result<Option<Tensor>>;
    /// Skips `n` batches (used when resuming); the default pulls and drops them.
    ///
    /// # Errors
    /// As [`BatchSource::next_batch`].
    fn skip_batches(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            if self.next_batch()?.is_none() {
                break;
            }
        }
        Ok(())
    }
}

/// Adapts any iterator of `Result<Tensor, E>` into a [`BatchSource`].
pub struct IterSource<I>(pub I);

impl<I, E> BatchSource for IterSource<I>
where
    I: Iterator<Item = std::result::Result<Tensor, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn next_batch(&mut self) -> Result<Option<Tensor>> {
        match self.0.next() {
            None => Ok(None),
            Some(Ok(t)) => Ok(Some(t)),
            Some(Err(e)) => Err(SaeError::Source(e.into())),
        }
    }
}

/// Whether [`Trainer::train`] draws a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Bar,
    Hidden,
}

/// Trains one SAE.
pub struct Trainer {
    cfg: TrainerConfig,
    sae: Box<dyn TrainableSae>,
    grads: Params,
    adam: Adam,
    step: u64,
    tokens_seen: u64,
    batches_consumed: u64,
    /// Input scale; `None` until the first batch fixes it.
    scale: Option<f32>,
    /// Whether `b_dec` still has to be initialised from data.
    needs_data_init: bool,
    tokens_since_fired: Vec<u64>,
    window_fires: Vec<u64>,
    window_tokens: u64,
    lifetime_fires: Vec<u64>,
    device: Device,
    /// Whether [`train_many`] keeps this trainer's whole step on `device` ([`crate::DeviceTrainer`]).
    resident: bool,
    /// Memory and precision of the device path.
    device_options: crate::DeviceOptions,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("architecture", &self.sae.architecture())
            .field("step", &self.step)
            .field("tokens_seen", &self.tokens_seen)
            .finish()
    }
}

/// What a device run hands back to its host trainer ([`Trainer::set_device_state`]).
pub(crate) struct DeviceState {
    pub params: Params,
    pub adam_m: Params,
    pub adam_v: Params,
    pub adam_t: u64,
    pub step: u64,
    pub tokens_seen: u64,
    pub scale: Option<f32>,
    pub needs_data_init: bool,
    pub tokens_since_fired: Vec<u64>,
    pub window_fires: Vec<u64>,
    pub window_tokens: u64,
    pub lifetime_fires: Vec<u64>,
}

/// A validated host batch that several trainers can share.
#[derive(Debug, Clone)]
pub struct HostBatch {
    pub x: Vec<f32>,
    pub n: usize,
    pub d_in: usize,
}

impl HostBatch {
    /// Copies a `[n, d_in]` tensor to the host and checks it (shape, NaN/inf).
    ///
    /// # Errors
    /// [`SaeError::ShapeMismatch`], [`SaeError::WrongDIn`], [`SaeError::NonFiniteInput`].
    pub fn from_tensor(t: &Tensor, d_in: usize) -> Result<Self> {
        let (x, n) = kernels::tensor_to_host(t, d_in, "training batch")?;
        Self::from_vec(x, d_in).map(|b| HostBatch { n, ..b })
    }
    /// Wraps and checks a row-major `[n, d_in]` buffer.
    ///
    /// # Errors
    /// As [`HostBatch::from_tensor`].
    pub fn from_vec(x: Vec<f32>, d_in: usize) -> Result<Self> {
        let n = kernels::check_batch(&x, d_in, "training batch")?;
        if n == 0 {
            return Err(SaeError::ShapeMismatch {
                what: "training batch".into(),
                expected: vec![1, d_in],
                got: vec![0, d_in],
            });
        }
        Ok(HostBatch { x, n, d_in })
    }
}

impl Trainer {
    /// A trainer for a freshly initialised SAE.
    ///
    /// # Errors
    /// Invalid config.
    pub fn new(cfg: TrainerConfig) -> Result<Self> {
        cfg.validate()?;
        check_memory(cfg.d_in, cfg.d_sae)?;
        let sae = cfg.sae.build(cfg.d_in, cfg.d_sae, cfg.seed)?;
        Ok(Self::with_sae(cfg, sae, true))
    }

    /// A trainer that fine-tunes a loaded SAE (e.g. on another model's activations). The loaded
    /// weights read raw activations; with normalisation on, the first batch's factor is unfolded
    /// into them so that the function is unchanged at step 0.
    ///
    /// # Errors
    /// Invalid config, or an SAE whose shape or architecture differs from the config's.
    pub fn from_pretrained(cfg: TrainerConfig, model: SaeModel) -> Result<Self> {
        cfg.validate()?;
        if model.d_in() != cfg.d_in || model.d_sae() != cfg.d_sae {
            return Err(SaeError::ShapeMismatch {
                what: "pretrained SAE vs trainer config (d_in, d_sae)".into(),
                expected: vec![cfg.d_in, cfg.d_sae],
                got: vec![model.d_in(), model.d_sae()],
            });
        }
        let mut params = model.sae().params().clone();
        // A BatchTopK SAE is stored as JumpReLU with one shared threshold: take it back.
        let mut batch_threshold = None;
        if matches!(
            cfg.sae,
            ArchitectureConfig::BatchTopK(_) | ArchitectureConfig::Matryoshka(_)
        ) && let Ok(p) = params.get("threshold")
        {
            batch_threshold = p.data.first().map(|&v| v as f64);
            params.list.retain(|p| p.name != "threshold");
        }
        let mut sae = cfg.sae.with_params(cfg.d_in, cfg.d_sae, params)?;
        if let Some(th) = batch_threshold {
            sae.load_state_json(&serde_json::json!({ "topk_threshold": th }))?;
        }
        let mut t = Self::with_sae(cfg, sae, false);
        t.scale = None;
        Ok(t)
    }

    fn with_sae(cfg: TrainerConfig, sae: Box<dyn TrainableSae>, fresh: bool) -> Self {
        let grads = sae.params().zeros_like();
        let adam = Adam::new(sae.params(), cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps);
        let d_sae = cfg.d_sae;
        Trainer {
            sae,
            grads,
            adam,
            step: 0,
            tokens_seen: 0,
            batches_consumed: 0,
            scale: None,
            needs_data_init: fresh,
            tokens_since_fired: vec![0; d_sae],
            window_fires: vec![0; d_sae],
            window_tokens: 0,
            lifetime_fires: vec![0; d_sae],
            device: Device::Cpu,
            resident: false,
            device_options: crate::DeviceOptions::default(),
            cfg,
        }
    }

    /// Trains on `device`. On a GPU the whole step stays there ([`crate::DeviceTrainer`], through
    /// [`train_many`] and [`Trainer::train`]), the data inits and resampling included.
    pub fn with_device(mut self, device: Device) -> Self {
        self.resident = !device.is_cpu();
        self.device = device;
        self
    }

    /// Chooses the device-resident path (on or off) whatever the device, e.g. to run it on
    /// `Device::Cpu`, where it gives the host path's results to rounding.
    ///
    /// # Errors
    /// None today (every architecture runs there); kept fallible for paths that may not.
    pub fn with_device_resident(mut self, on: bool) -> Result<Self> {
        self.resident = on;
        Ok(self)
    }

    /// Sets the device path's memory and precision options (bf16 products, bf16 moments, token
    /// chunks), which the steps on the device use; the host path ignores them.
    ///
    /// # Errors
    /// A configuration error for options the device path refuses (a dtype it does not take, a
    /// token chunk of no rows), found here rather than at the first step.
    pub fn with_device_options(mut self, opts: crate::DeviceOptions) -> Result<Self> {
        opts.check()?;
        self.device_options = opts;
        Ok(self)
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }
    /// The SAE being trained (weights in normalised units).
    pub fn sae(&self) -> &dyn TrainableSae {
        self.sae.as_ref()
    }
    /// The SAE being trained, mutably (e.g. to set weights before training).
    pub fn sae_mut(&mut self) -> &mut dyn TrainableSae {
        self.sae.as_mut()
    }
    /// Steps completed.
    pub fn step_count(&self) -> u64 {
        self.step
    }
    pub fn tokens_seen(&self) -> u64 {
        self.tokens_seen
    }
    /// Batches taken from the source so far (skip this many when resuming a stream).
    pub fn batches_consumed(&self) -> u64 {
        self.batches_consumed
    }
    /// The input scale in use (1 without normalisation; `None` before the first batch).
    pub fn activation_scale(&self) -> Option<f32> {
        self.scale
    }
    /// Adam's state (for the device path, which starts from it).
    pub(crate) fn adam(&self) -> &Adam {
        &self.adam
    }
    /// Whether the first batch has still to set `b_dec`.
    pub(crate) fn needs_data_init(&self) -> bool {
        self.needs_data_init
    }
    pub(crate) fn tokens_since_fired(&self) -> &[u64] {
        &self.tokens_since_fired
    }
    pub(crate) fn lifetime_fires(&self) -> &[u64] {
        &self.lifetime_fires
    }
    pub(crate) fn window_fires(&self) -> &[u64] {
        &self.window_fires
    }
    pub(crate) fn window_tokens(&self) -> u64 {
        self.window_tokens
    }
    /// Takes over the state of a device run (see `DeviceTrainer::write_to`): weights, Adam,
    /// counters.
    pub(crate) fn set_device_state(&mut self, state: DeviceState) -> Result<()> {
        for (set, new) in [
            (self.sae.params_mut(), state.params),
            (&mut self.adam.m, state.adam_m),
            (&mut self.adam.v, state.adam_v),
        ] {
            for p in new.list {
                set.data_mut(&p.name)?.copy_from_slice(&p.data);
            }
        }
        self.adam.t = state.adam_t;
        self.batches_consumed += state.step - self.step;
        self.step = state.step;
        self.tokens_seen = state.tokens_seen;
        self.scale = state.scale;
        self.needs_data_init = state.needs_data_init;
        self.tokens_since_fired = state.tokens_since_fired;
        self.lifetime_fires = state.lifetime_fires;
        self.window_fires = state.window_fires;
        self.window_tokens = state.window_tokens;
        Ok(())
    }
    /// Whether `total_steps` have been taken.
    pub fn is_done(&self) -> bool {
        self.step >= self.cfg.total_steps
    }

    /// One step on a `[n, d_in]` tensor.
    ///
    /// # Errors
    /// Bad batch (shape, NaN/inf), non-finite loss or weights (naming the step).
    pub fn step(&mut self, batch: &Tensor) -> Result<TrainMetrics> {
        let hb = HostBatch::from_tensor(batch, self.cfg.d_in)?;
        self.step_host(&hb)
    }

    /// One step on a checked host batch (share one [`HostBatch`] between trainers).
    ///
    /// # Errors
    /// As [`Trainer::step`].
    pub fn step_host(&mut self, batch: &HostBatch) -> Result<TrainMetrics> {
        if batch.d_in != self.cfg.d_in {
            return Err(SaeError::WrongDIn {
                what: "training batch".into(),
                expected: self.cfg.d_in,
                got: batch.d_in,
            });
        }
        let (n, d_in) = (batch.n, batch.d_in);
        let scale = match self.scale {
            Some(s) => s,
            None => {
                let s = input_scale(self.cfg.normalize_activations, d_in, n, || {
                    Ok(row_norm_sum(&batch.x, d_in))
                })?;
                if !self.needs_data_init && s != 1.0 {
                    // A loaded SAE reads raw inputs: express it in normalised units.
                    crate::fold_activation_scale(self.sae.params_mut(), 1.0 / s)?;
                }
                self.scale = Some(s);
                s
            }
        };
        let x: Vec<f32> = if scale == 1.0 {
            batch.x.clone()
        } else {
            batch.x.iter().map(|v| v * scale).collect()
        };
        if self.needs_data_init {
            self.init_b_dec(&x, n)?;
            if let Some(target) = self.cfg.encoder_bias_init_l0 {
                self.init_encoder_bias_for_l0(&x, n, target)?;
            }
            self.needs_data_init = false;
        }
        let hb = Batch { x: &x, n, d_in };
        let dead: Vec<bool> = self
            .tokens_since_fired
            .iter()
            .map(|&t| t >= self.cfg.dead_window_tokens)
            .collect();
        let sparsity_scale = self.cfg.sparsity_scale_at(self.step);
        let ctx = StepContext {
            sparsity_scale,
            dead: &dead,
            device: &self.device,
        };
        let out = self.sae.forward_backward(&hb, &ctx, &mut self.grads)?;
        if !out.loss.is_finite() {
            return Err(SaeError::NonFiniteTraining {
                step: self.step,
                what: "loss".into(),
                value: out.loss,
            });
        }
        self.sae.constrain_gradients(&mut self.grads)?;
        let gnorm = grad_norm(&self.grads);
        if !gnorm.is_finite() {
            return Err(SaeError::NonFiniteTraining {
                step: self.step,
                what: "gradient norm".into(),
                value: gnorm,
            });
        }
        let clip = match self.cfg.grad_clip_norm {
            Some(c) if gnorm > c => (c / (gnorm + 1e-6)) as f32,
            _ => 1.0,
        };
        let lr = self.cfg.lr_at(self.step);
        self.adam
            .step(self.sae.params_mut(), &self.grads, lr, clip, self.step)?;
        self.sae.after_optimizer_step(&out)?;
        self.update_firing(&out, n);
        let fvu = fvu(&x, n, d_in, &out);
        self.step += 1;
        self.tokens_seen += n as u64;
        self.batches_consumed += 1;
        if self.cfg.resample_at_steps.contains(&self.step) {
            self.resample(&hb, &out)?;
        }
        let m = self.metrics(&out, lr, sparsity_scale, fvu, gnorm);
        if self.step.is_multiple_of(self.cfg.log_every) {
            self.window_fires.iter_mut().for_each(|c| *c = 0);
            self.window_tokens = 0;
        }
        Ok(m)
    }

    fn init_b_dec(&mut self, x: &[f32], n: usize) -> Result<()> {
        let d_in = self.cfg.d_in;
        let Some(b) = b_dec_from_data(self.cfg.b_dec_init, x, n, d_in) else {
            return Ok(());
        };
        if let Ok(p) = self.sae.params_mut().data_mut("b_dec") {
            p.copy_from_slice(&b);
        }
        Ok(())
    }

    /// Sets a ReLU-family SAE's encoder bias (`b_enc`; `b_gate` for gated) so that each feature
    /// fires on about `target / d_sae` of `batch` (raw activations, scaled as training scales
    /// them): the data init of [`TrainerConfig::encoder_bias_init_l0`], also usable mid-run, e.g.
    /// to time a step at a chosen L0. For JumpReLU the threshold applies on top of the bias, so
    /// L0 lands at or under `target`.
    ///
    /// # Errors
    /// [`SaeError::WrongDIn`] for a batch of another width; a config error for an architecture
    /// without an encoder bias to set this way (TopK, BatchTopK), or a target outside
    /// `1..=d_sae` (0 would silence every feature, more than `d_sae` cannot be reached).
    pub fn set_encoder_bias_for_l0(&mut self, batch: &HostBatch, target: usize) -> Result<()> {
        if target == 0 || target > self.cfg.d_sae {
            return Err(SaeError::config(
                "encoder bias for a target L0",
                format!("target {target}: must be in 1..={} (d_sae)", self.cfg.d_sae),
            ));
        }
        if batch.d_in != self.cfg.d_in {
            return Err(SaeError::WrongDIn {
                what: "batch for the encoder-bias init".into(),
                expected: self.cfg.d_in,
                got: batch.d_in,
            });
        }
        let s = self.scale.unwrap_or(1.0);
        let x: Vec<f32> = batch.x.iter().map(|v| v * s).collect();
        self.init_encoder_bias_for_l0(&x, batch.n, target)
    }

    /// bias_f = -(the `rank`-th largest pre-activation of feature f on the normalised batch `x`),
    /// rank = target / d_sae * n.
    fn init_encoder_bias_for_l0(&mut self, x: &[f32], n: usize, target: usize) -> Result<()> {
        use rayon::prelude::*;
        let (d_in, d_sae) = (self.cfg.d_in, self.cfg.d_sae);
        let (bias_name, apply_b_dec) = match &self.cfg.sae {
            ArchitectureConfig::Standard(c) => ("b_enc", c.apply_b_dec_to_input),
            ArchitectureConfig::Gated(c) => ("b_gate", c.apply_b_dec_to_input),
            ArchitectureConfig::JumpRelu(c) => ("b_enc", c.apply_b_dec_to_input),
            _ => {
                return Err(SaeError::config(
                    "encoder bias for a target L0",
                    "applies to standard, gated and jumprelu",
                ));
            }
        };
        let params = self.sae.params();
        let b_dec = if apply_b_dec {
            Some(params.data("b_dec")?)
        } else {
            None
        };
        let xc = kernels::center(x, d_in, b_dec);
        let pre =
            kernels::encoder_preacts(&xc, n, d_in, params.data("W_enc")?, d_sae, &Device::Cpu)?;
        let rank = ((target as f64 / d_sae as f64) * n as f64)
            .round()
            .clamp(0.0, n.saturating_sub(1) as f64) as usize;
        let bias: Vec<f32> = pre.with_slice(|p| {
            (0..d_sae)
                .into_par_iter()
                .map(|f| {
                    let mut col: Vec<f32> = (0..n).map(|t| p[t * d_sae + f]).collect();
                    col.select_nth_unstable_by(rank, |a, b| b.total_cmp(a));
                    -col[rank]
                })
                .collect()
        })?;
        self.sae
            .params_mut()
            .data_mut(bias_name)?
            .copy_from_slice(&bias);
        Ok(())
    }

    fn update_firing(&mut self, out: &StepOutput, n: usize) {
        let counts = out.codes.fire_counts();
        for (f, &c) in counts.iter().enumerate() {
            if c > 0 {
                self.tokens_since_fired[f] = 0;
            } else {
                self.tokens_since_fired[f] = self.tokens_since_fired[f].saturating_add(n as u64);
            }
            self.window_fires[f] += c as u64;
            self.lifetime_fires[f] += c as u64;
        }
        self.window_tokens += n as u64;
    }

    fn resample(&mut self, batch: &Batch<'_>, out: &StepOutput) -> Result<()> {
        let dead: Vec<usize> = self
            .tokens_since_fired
            .iter()
            .enumerate()
            .filter(|(_, t)| **t >= self.cfg.dead_window_tokens)
            .map(|(f, _)| f)
            .collect();
        let seed = self.cfg.seed ^ (self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let reset = self
            .sae
            .resample_dead(&dead, batch, &out.per_token_sq_err, seed)?;
        self.adam.reset_rows(&reset);
        for &f in &reset {
            self.tokens_since_fired[f] = 0;
        }
        tracing::info!(
            step = self.step,
            resampled = reset.len(),
            "resampled dead features"
        );
        Ok(())
    }

    fn metrics(
        &self,
        out: &StepOutput,
        lr: f64,
        sparsity_scale: f32,
        fvu: f64,
        gnorm: f64,
    ) -> TrainMetrics {
        let density = DensityStats::new(
            &self.cfg,
            &self.tokens_since_fired,
            &self.window_fires,
            self.window_tokens,
        );
        TrainMetrics {
            step: self.step,
            tokens_seen: self.tokens_seen,
            lr,
            sparsity_scale,
            loss: out.loss,
            mse: out.mse,
            sparsity_loss: out.sparsity_loss,
            aux_loss: out.aux_loss,
            fvu,
            l0: out.codes.l0(),
            grad_norm: gnorm,
            dead_fraction: density.dead_fraction,
            dense_fraction: density.dense_fraction,
            log10_density_histogram: density.histogram,
            density_window_tokens: self.window_tokens,
        }
    }

    /// log10 firing rate of every feature over all training so far (SAELens's `sparsity`).
    pub fn log10_feature_density(&self) -> Vec<f32> {
        let t = self.tokens_seen.max(1) as f64;
        self.lifetime_fires
            .iter()
            .map(|&c| (c as f64 / t + 1e-10).log10() as f32)
            .collect()
    }

    /// The trained SAE as an inference model reading raw activations (scale folded in).
    ///
    /// # Errors
    /// Export errors.
    pub fn to_model(&self) -> Result<SaeModel> {
        let mut params = self.sae.params().clone();
        crate::fold_activation_scale(&mut params, self.scale.unwrap_or(1.0))?;
        let mut common = CommonConfig::new(self.cfg.d_in, self.cfg.d_sae);
        common.metadata = self.cfg.metadata.clone();
        let (cfg, tensors) = self.sae.export(&params, common)?;
        let files = io::LoadedFiles {
            cfg,
            tensors: tensors
                .into_iter()
                .map(|(n, shape, data)| (n, io::HostTensor { shape, data }))
                .collect(),
            log10_sparsity: Some(self.log10_feature_density()),
            weights_file: PathBuf::from("<trainer>"),
            w_enc_feature_major: false,
        };
        SaeModel::from_files(files)
    }

    /// Saves the SAE in the SAELens v6 layout (`cfg.json`, `sae_weights.safetensors`,
    /// `sparsity.safetensors`), with the normalisation folded into the weights.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let mut params = self.sae.params().clone();
        crate::fold_activation_scale(&mut params, self.scale.unwrap_or(1.0))?;
        let mut common = CommonConfig::new(self.cfg.d_in, self.cfg.d_sae);
        common.metadata = self.cfg.metadata.clone();
        let (cfg, tensors) = self.sae.export(&params, common)?;
        io::save_sae(
            dir.as_ref(),
            &cfg,
            &tensors,
            Some(&self.log10_feature_density()),
        )
    }

    /// Writes a checkpoint folder `root/step_NNNNNNNNN` atomically (written under a temporary
    /// name, synced, renamed) and returns its path.
    ///
    /// # Errors
    /// I/O errors.
    pub fn checkpoint(&self, root: impl AsRef<Path>) -> Result<PathBuf> {
        let root = root.as_ref();
        fs::create_dir_all(root).map_err(|e| SaeError::io(root, e))?;
        let final_dir = root.join(format!("step_{:09}", self.step));
        let tmp = root.join(format!(".step_{:09}.{}.tmp", self.step, std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| SaeError::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| SaeError::io(&tmp, e))?;
        // A failed write (a full disk) leaves no half-written folder taking the space.
        self.write_checkpoint(&tmp).inspect_err(|_| {
            let _ = fs::remove_dir_all(&tmp);
        })?;
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(|e| SaeError::io(&final_dir, e))?;
        }
        fs::rename(&tmp, &final_dir).map_err(|e| SaeError::io(&final_dir, e))?;
        io::sync_dir(root)?;
        prune_checkpoints(root, &tmp)?;
        Ok(final_dir)
    }

    /// The files of a checkpoint, into `tmp`: parameters and Adam's moments, then the state.
    fn write_checkpoint(&self, tmp: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for p in self.sae.params().iter() {
            tensors.push((format!("param.{}", p.name), p.shape.clone(), &p.data));
        }
        for (prefix, set) in [("adam_m", &self.adam.m), ("adam_v", &self.adam.v)] {
            for p in set.iter() {
                tensors.push((format!("{prefix}.{}", p.name), p.shape.clone(), &p.data));
            }
        }
        let refs: Vec<(&str, &[usize], &[f32])> = tensors
            .iter()
            .map(|(n, s, d)| (n.as_str(), s.as_slice(), *d))
            .collect();
        io::write_safetensors(&tmp.join("state.safetensors"), &refs)?;
        let state = CheckpointState {
            format: 1,
            config: self.cfg.clone(),
            step: self.step,
            tokens_seen: self.tokens_seen,
            batches_consumed: self.batches_consumed,
            scale: self.scale,
            needs_data_init: self.needs_data_init,
            adam_t: self.adam.t,
            tokens_since_fired: self.tokens_since_fired.clone(),
            window_fires: self.window_fires.clone(),
            window_tokens: self.window_tokens,
            lifetime_fires: self.lifetime_fires.clone(),
            architecture_state: self.sae.state_json(),
        };
        io::write_json(&tmp.join("trainer.json"), &state)?;
        io::sync_dir(tmp)
    }

    /// The newest complete checkpoint under `root`, if any.
    pub fn latest_checkpoint(root: impl AsRef<Path>) -> Option<PathBuf> {
        let mut best: Option<(u64, PathBuf)> = None;
        for e in fs::read_dir(root.as_ref()).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("step_")
                .and_then(|s| s.parse::<u64>().ok())
                && e.path().join("trainer.json").exists()
                && best.as_ref().is_none_or(|(b, _)| n > *b)
            {
                best = Some((n, e.path()));
            }
        }
        best.map(|(_, p)| p)
    }

    /// Restores a trainer from a checkpoint folder; continuing it gives the same weights as an
    /// uninterrupted run (on CPU, same thread count), provided the batch stream continues after
    /// [`Trainer::batches_consumed`] batches.
    ///
    /// # Errors
    /// [`SaeError::Checkpoint`] for missing or inconsistent state; I/O and format errors.
    pub fn resume(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let ck = |reason: String| SaeError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let v = io::read_json(&dir.join("trainer.json"))?;
        let state: CheckpointState =
            serde_json::from_value(v).map_err(|source| SaeError::Json {
                path: dir.join("trainer.json"),
                source,
            })?;
        state.config.validate()?;
        // The sizes come from the file: refuse absurd ones before `build` allocates them.
        check_memory(state.config.d_in, state.config.d_sae)?;
        let mut tensors = io::read_safetensors(&dir.join("state.safetensors"))?;
        let template =
            state
                .config
                .sae
                .build(state.config.d_in, state.config.d_sae, state.config.seed)?;
        let mut take = |prefix: &str| -> Result<Params> {
            let mut list = Vec::new();
            for p in template.params().iter() {
                let key = format!("{prefix}.{}", p.name);
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| ck(format!("state.safetensors lacks `{key}`")))?;
                if t.shape != p.shape {
                    return Err(SaeError::ShapeMismatch {
                        what: format!("checkpoint tensor {key}"),
                        expected: p.shape.clone(),
                        got: t.shape,
                    });
                }
                list.push(Param::new(&p.name, &p.shape, p.per_feature, t.data));
            }
            Ok(Params::new(list))
        };
        let params = take("param")?;
        let m = take("adam_m")?;
        let v = take("adam_v")?;
        let mut sae =
            state
                .config
                .sae
                .with_params(state.config.d_in, state.config.d_sae, params)?;
        sae.load_state_json(&state.architecture_state)?;
        let d_sae = state.config.d_sae;
        for (what, len) in [
            ("tokens_since_fired", state.tokens_since_fired.len()),
            ("window_fires", state.window_fires.len()),
            ("lifetime_fires", state.lifetime_fires.len()),
        ] {
            if len != d_sae {
                return Err(ck(format!(
                    "{what} has {len} entries, expected d_sae = {d_sae}"
                )));
            }
        }
        let mut t = Self::with_sae(state.config, sae, state.needs_data_init);
        t.adam.m = m;
        t.adam.v = v;
        t.adam.t = state.adam_t;
        t.step = state.step;
        t.tokens_seen = state.tokens_seen;
        t.batches_consumed = state.batches_consumed;
        t.scale = state.scale;
        t.tokens_since_fired = state.tokens_since_fired;
        t.window_fires = state.window_fires;
        t.window_tokens = state.window_tokens;
        t.lifetime_fires = state.lifetime_fires;
        Ok(t)
    }

    /// Trains until `total_steps` or the end of `source`, logging every `log_every` steps (the
    /// returned metrics) and checkpointing every `checkpoint_every` steps.
    ///
    /// # Errors
    /// Source errors, bad batches, non-finite training, I/O errors when checkpointing.
    pub fn train(
        &mut self,
        source: &mut dyn BatchSource,
        progress: Progress,
    ) -> Result<Vec<TrainMetrics>> {
        train_many(std::slice::from_mut(self), source, progress).map(|mut v| v.remove(0))
    }
}

/// Bytes an SAE of `d_in x d_sae` holds while it trains: encoder and decoder, their gradients
/// and Adam's two moments of each, eight `d_sae x d_in` f32 matrices (biases and the per-step
/// buffers are small beside them). `None` if the count overflows.
pub fn training_bytes(d_in: usize, d_sae: usize) -> Option<u64> {
    (d_in as u64).checked_mul(d_sae as u64)?.checked_mul(32)
}

/// Memory the kernel reports as available now (`MemAvailable` in `/proc/meminfo`); `None`
/// where that cannot be read.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses an SAE too large to train here before any of it is allocated: an absurd `d_sae`
/// is an error naming the sizes, not an abort on a failed allocation (or, with overcommit, an
/// out-of-memory kill an hour later).
fn check_memory(d_in: usize, d_sae: usize) -> Result<()> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let need = training_bytes(d_in, d_sae).ok_or_else(|| {
        SaeError::config(
            "d_in/d_sae",
            format!("{d_sae} x {d_in} overflows a byte count"),
        )
    })?;
    match available_memory_bytes() {
        Some(avail) if need > avail => Err(SaeError::config(
            "d_sae",
            format!(
                "an SAE of {d_sae} features on {d_in} inputs needs about {:.1} GiB to train \
                 (weights, gradients, Adam's moments), and {:.1} GiB of memory is available",
                gib(need),
                gib(avail)
            ),
        )),
        _ => Ok(()),
    }
}

/// Trains several SAEs on one stream: each batch is read, copied to the host and checked once,
/// then every trainer takes its step on it (the scaling-law sweep pattern). Returns each
/// trainer's logged metrics. Trainers that are done are skipped.
///
/// A trainer at step `s` takes batch `s` of the stream, and `source` must stand at the batch of
/// the least advanced unfinished trainer (a resume skips that many). Trainers resumed from
/// different checkpoints (a process killed between writing one trainer's checkpoint and the
/// next one's) wait until the stream reaches their step, so that no trainer sees a batch twice.
///
/// # Errors
/// As [`Trainer::train`]; the error names the failing trainer's step.
pub fn train_many(
    trainers: &mut [Trainer],
    source: &mut dyn BatchSource,
    progress: Progress,
) -> Result<Vec<Vec<TrainMetrics>>> {
    let total = trainers
        .iter()
        .map(|t| t.cfg.total_steps)
        .max()
        .unwrap_or(0);
    let start = trainers
        .iter()
        .filter(|t| !t.is_done())
        .map(|t| t.step)
        .min()
        .unwrap_or(0);
    let pb = match progress {
        Progress::Bar => indicatif::ProgressBar::new(total),
        Progress::Hidden => indicatif::ProgressBar::hidden(),
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} steps ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(start);
    let mut logs: Vec<Vec<TrainMetrics>> = vec![Vec::new(); trainers.len()];
    let d_in = trainers.first().map(|t| t.cfg.d_in).unwrap_or(0);
    if trainers.iter().any(|t| t.cfg.d_in != d_in) {
        return Err(SaeError::config(
            "train_many",
            "all trainers must share d_in",
        ));
    }
    // A resident trainer's device run, made at its first step here.
    let mut resident: Vec<Option<crate::DeviceTrainer>> = trainers.iter().map(|_| None).collect();
    let mut batch_index = start;
    while trainers.iter().any(|t| !t.is_done()) {
        let Some(batch) = source.next_batch()? else {
            tracing::warn!("batch source ended before total_steps");
            break;
        };
        // The host copy (checked for NaN) only when a trainer on the host path needs it: the
        // device path counts non-finite values on the device, so a GPU batch stays there.
        let needs_host = trainers
            .iter()
            .any(|t| !t.resident && !t.is_done() && t.step <= batch_index);
        let hb = needs_host
            .then(|| HostBatch::from_tensor(&batch, d_in))
            .transpose()?;
        let mut uploaded: Option<Tensor> = None;
        let mut msg = String::new();
        for (i, t) in trainers.iter_mut().enumerate() {
            if t.is_done() || t.step > batch_index {
                continue;
            }
            let (log_every, total) = (t.cfg.log_every, t.cfg.total_steps);
            let logged = |step: u64| step.is_multiple_of(log_every) || step == total;
            if t.resident && resident[i].is_none() {
                resident[i] = Some(
                    crate::DeviceTrainer::from_trainer(t, &t.device)?
                        .with_options(&t.device_options)?,
                );
            }
            let m = if let Some(d) = resident[i].as_mut() {
                let x = match &uploaded {
                    Some(x) if x.device().same_device(d.device()) => x.clone(),
                    _ => {
                        let x = batch.to_device(d.device())?;
                        uploaded = Some(x.clone());
                        x
                    }
                };
                let out = d.step(&x)?;
                t.step = d.step_count();
                t.tokens_seen = d.tokens_seen();
                t.batches_consumed += 1;
                // Only logged steps are read back (and checked for NaN), so the device does not
                // wait on the host in between.
                if logged(t.step) {
                    Some(out.metrics(&t.cfg)?)
                } else {
                    None
                }
            } else {
                let hb = hb.as_ref().ok_or_else(|| {
                    SaeError::config("train_many", "no host copy of the batch for a host trainer")
                })?;
                let m = t.step_host(hb)?;
                logged(m.step).then_some(m)
            };
            if let Some(m) = m {
                if msg.is_empty() {
                    msg = format!("L0 {:.1} FVU {:.3}", m.l0, m.fvu);
                }
                logs[i].push(m);
            }
            if let (Some(every), Some(dir)) = (t.cfg.checkpoint_every, t.cfg.checkpoint_dir.clone())
                && t.step % every == 0
            {
                if let Some(d) = &resident[i] {
                    d.write_to(t)?;
                }
                t.checkpoint(dir)?;
            }
        }
        if !msg.is_empty() {
            pb.set_message(msg);
        }
        pb.inc(1);
        batch_index += 1;
    }
    pb.finish();
    // The trainers hold the device runs' results, for saving.
    for (t, d) in trainers.iter_mut().zip(&resident) {
        if let Some(d) = d {
            d.write_to(t)?;
        }
    }
    Ok(logs)
}

/// The input scale the first batch fixes: 1 without normalisation, else `sqrt(d_in)` over the
/// mean row norm, where `norm_sum` gives the sum of the `n` rows' norms (only asked for when
/// needed: on a device it is a read back).
pub(crate) fn input_scale(
    normalization: ActivationNormalization,
    d_in: usize,
    n: usize,
    norm_sum: impl FnOnce() -> Result<f64>,
) -> Result<f32> {
    Ok(match normalization {
        ActivationNormalization::None => 1.0,
        ActivationNormalization::ExpectedAverageOnlyIn => {
            let mean_norm = norm_sum()? / n as f64;
            if mean_norm > 0.0 {
                ((d_in as f64).sqrt() / mean_norm) as f32
            } else {
                1.0
            }
        }
    })
}

/// The sum of the row norms of a row-major `[n, d_in]` batch, in f64.
pub(crate) fn row_norm_sum(x: &[f32], d_in: usize) -> f64 {
    kernels::row_norms(x, d_in).iter().map(|&v| v as f64).sum()
}

/// `b_dec`'s initial value from a batch (already scaled), or `None` where it starts at zero.
pub(crate) fn b_dec_from_data(
    init: BDecInit,
    x: &[f32],
    n: usize,
    d_in: usize,
) -> Option<Vec<f32>> {
    match init {
        BDecInit::Zeros => None,
        BDecInit::Mean => Some(kernels::sum_rows(x, d_in, 1.0 / n as f32)),
        BDecInit::GeometricMedian => Some(geometric_median(x, n, d_in, 100, 1e-6)),
    }
}

/// The firing statistics a step reports, from the counters either training path keeps.
pub(crate) struct DensityStats {
    pub dead_fraction: f64,
    pub dense_fraction: f64,
    pub histogram: Vec<u32>,
}

impl DensityStats {
    pub(crate) fn new(
        cfg: &TrainerConfig,
        tokens_since_fired: &[u64],
        window_fires: &[u64],
        window_tokens: u64,
    ) -> Self {
        let d_sae = cfg.d_sae as f64;
        let dead = tokens_since_fired
            .iter()
            .filter(|&&t| t >= cfg.dead_window_tokens)
            .count();
        let wt = window_tokens.max(1) as f64;
        let mut histogram = vec![0u32; 11];
        let mut dense = 0usize;
        for &c in window_fires {
            let rate = c as f64 / wt;
            if rate > cfg.dense_firing_rate {
                dense += 1;
            }
            let bin = if c == 0 {
                10
            } else {
                ((-rate.log10()).floor().max(0.0) as usize).min(10)
            };
            histogram[bin] += 1;
        }
        DensityStats {
            dead_fraction: dead as f64 / d_sae,
            dense_fraction: dense as f64 / d_sae,
            histogram,
        }
    }
}

/// Checkpoints kept under a root: each holds the parameters and both Adam moments (three times
/// the SAE), so a long run that kept them all would fill the disk. The newest is complete by
/// construction (written aside and renamed); the one before it is kept in case the newest is
/// damaged afterwards.
pub const KEEP_CHECKPOINTS: usize = 2;

/// Removes all but the newest [`KEEP_CHECKPOINTS`] `step_*` folders under `root`, and the
/// half-written folders that killed runs left behind (any `.step_*.tmp` but `ours`).
fn prune_checkpoints(root: &Path, ours: &Path) -> Result<()> {
    let mut steps: Vec<(u64, PathBuf)> = Vec::new();
    for e in fs::read_dir(root)
        .map_err(|e| SaeError::io(root, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step_")
            .and_then(|s| s.parse::<u64>().ok())
        {
            steps.push((n, e.path()));
        } else if name.starts_with(".step_") && name.ends_with(".tmp") && e.path() != ours {
            fs::remove_dir_all(e.path()).map_err(|err| SaeError::io(e.path(), err))?;
        }
    }
    steps.sort_unstable_by_key(|s| std::cmp::Reverse(s.0));
    for (_, old) in steps.into_iter().skip(KEEP_CHECKPOINTS) {
        fs::remove_dir_all(&old).map_err(|e| SaeError::io(&old, e))?;
    }
    Ok(())
}

/// Everything besides the tensors that a checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    format: u32,
    config: TrainerConfig,
    step: u64,
    tokens_seen: u64,
    batches_consumed: u64,
    scale: Option<f32>,
    needs_data_init: bool,
    adam_t: u64,
    tokens_since_fired: Vec<u64>,
    window_fires: Vec<u64>,
    window_tokens: u64,
    lifetime_fires: Vec<u64>,
    architecture_state: serde_json::Value,
}

/// `Σ_t ||x_t - x̂_t||² / Σ_t ||x_t - mean(x)||²`.
fn fvu(x: &[f32], n: usize, d_in: usize, out: &StepOutput) -> f64 {
    let mean = kernels::sum_rows(x, d_in, 1.0 / n as f32);
    let mut var = 0.0f64;
    for r in x.chunks(d_in) {
        for (v, m) in r.iter().zip(&mean) {
            let e = (v - m) as f64;
            var += e * e;
        }
    }
    let err = kernels::sum_f64(&out.per_token_sq_err);
    if var > 0.0 { err / var } else { 0.0 }
}

/// Weiszfeld's algorithm for the geometric median of the rows of `x` (in f64).
pub fn geometric_median(x: &[f32], n: usize, d: usize, max_iter: usize, tol: f64) -> Vec<f32> {
    let mut y: Vec<f64> = vec![0.0; d];
    for r in x.chunks(d) {
        for (a, &b) in y.iter_mut().zip(r) {
            *a += b as f64 / n as f64;
        }
    }
    for _ in 0..max_iter {
        let mut num = vec![0.0f64; d];
        let mut den = 0.0f64;
        for r in x.chunks(d) {
            let dist = r
                .iter()
                .zip(&y)
                .map(|(&a, &b)| (a as f64 - b).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            let w = 1.0 / dist;
            den += w;
            for (acc, &a) in num.iter_mut().zip(r) {
                *acc += w * a as f64;
            }
        }
        let next: Vec<f64> = num.iter().map(|v| v / den).collect();
        let shift = next
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = y.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0);
        y = next;
        if shift <= tol * scale {
            break;
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}
