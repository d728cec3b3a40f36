//! SAE training that stays on a candle device: parameters, Adam's moments, the batch, the codes
//! and the dead-feature counters are tensors on one [`Device`], and a step is candle tensor ops
//! from the encoder product to Adam, so that a GPU step moves no `[batch, d_sae]` matrix across
//! the bus (the host path, [`crate::Trainer`], uploads `W_enc` and downloads the pre-activations
//! at every step). The host reads back only the scalars it asks for ([`DeviceStep::host`]).
//!
//! Every architecture runs here, each the host step operation for operation: TopK (top-k then
//! ReLU, AuxK on the dead features as SAELens's `calculate_topk_aux_loss`), BatchTopK (the
//! batch's `k · n` largest, AuxK, the inference threshold's moving average), Matryoshka
//! BatchTopK (BatchTopK plus each prefix's reconstruction), JumpReLU (per-feature thresholds
//! trained by the straight-through estimate, L0 penalty) and the standard ReLU SAE with its L1
//! penalty weighted by decoder norms (both with the trainer's penalty warm-up), and gated (the
//! gate deciding, the magnitude path scaling, the gate path's own reconstruction and L1). All share the rest: the
//! unit-norm projection of the decoder gradient, global-norm clipping, Adam with bias
//! correction, renormalised decoder rows and the firing counters. It runs on `Device::Cpu` too,
//! where tests check it against the host path step by step.
//!
//! TopK works on the selected (token, feature) pairs for the main reconstruction: the decode and
//! the dot products back to each pair read the decoder rows of each token's k features where
//! they are (`crate::pairs`).
//! Their gradients reach `W_enc` and `W_dec` one of two ways ([`DeviceTrainer::with_dense_pairs`]):
//! each pair's row added in place (`crate::pairs`, a loop on the CPU and an atomic-add kernel on
//! CUDA), `2 · k · d_in` FLOPs a token; or scattered into `[batch, d_sae]` code matrices that go
//! through dense products, CUDA's default until that kernel has run on a GPU.
//! AuxK's `aux_k` per token (d_in / 2 by default) would make gathered pairs `batch x aux_k x
//! d_in`, so its codes are scattered into a matrix and go through dense products, as the
//! standard SAE's codes do (a ReLU SAE early in training fires on half its features) and
//! BatchTopK's (a token may take any number of the batch's codes): over the dead features'
//! columns and rows alone while they are few, over every feature when they are many, and not
//! at all when none is dead ([`DeadSet`]; docs/gpu.md has the arithmetic). The top-k is
//! candle's `arg_sort_last_dim`, whose CUDA kernel sorts a row in shared memory, 4 bytes a
//! column padded to a power of two, so rows wider than [`TOP_K_CHUNK`] are first cut to the
//! entries of the `k` blocks with the largest maxima, or ranked in chunks of that width whose
//! winners are ranked again ([`top_k_indices`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{D, DType, Device, Tensor};

use crate::DecoderNorm;
use crate::error::{Result, SaeError};
use crate::params::{Param, Params};
use crate::trainer::{
    ArchitectureConfig, BDecInit, DensityStats, TrainMetrics, Trainer, TrainerConfig,
    b_dec_from_data, input_scale, row_norm_sum,
};

/// Parameter order, as the host SAEs of these architectures keep them; JumpReLU adds its
/// per-feature `threshold` after them.
const NAMES: [&str; 4] = ["W_enc", "b_enc", "W_dec", "b_dec"];
const JUMPRELU_NAMES: [&str; 5] = ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"];
/// Gated: the gate's bias takes the encoder bias's place, the magnitude path's two after.
const GATED_NAMES: [&str; 6] = ["W_enc", "b_gate", "W_dec", "b_dec", "r_mag", "b_mag"];

/// Rows wider than this are ranked in chunks by `top_k_indices`: candle's CUDA arg-sort keeps
/// a row's indices in shared memory padded to a power of two, and 4,096 columns (16 KiB) leave
/// room for several blocks per multiprocessor; 16,384 would already pass the default 48 KiB.
pub const TOP_K_CHUNK: usize = 4096;

/// Elements (64 MiB of f32) per row block of the in-place gradient sums and Adam's update: large
/// enough that a block's kernels run at full rate, small beside a million-feature matrix (2^31).
pub const UPDATE_BLOCK: usize = 1 << 24;

/// Halvings of the interval that holds BatchTopK's batch threshold: from `[0, max]` to well under
/// one f32 step at any threshold above `max / 2^16`.
const THRESHOLD_BISECTIONS: usize = 40;

/// AuxK works on the dead features' own columns and rows (`DeadSet`) while at most one
/// feature in this many is dead, and through dense products over every feature beyond that:
/// the compact copies (the dead rows of `W_dec` and two gradients of that size, 3/16 of a
/// matrix at the limit) grow toward the matrices themselves as the products they save shrink.
pub const COMPACT_AUX_SHARE: usize = 16;

/// BatchTopK's codes go through the step as (token, feature) pairs, each token's threshold
/// candidates, while the candidates per token are at most one feature in this many, and as
/// dense `[rows, d_sae]` matrices beyond: a pair reads its decoder row where it is (memory
/// bound, and four times per pair), where the dense products run at the matrix units' rate.
pub const BATCH_PAIRS_SHARE: usize = 8;

/// What sets an architecture's codes and penalty; the rest of the step is shared.
#[derive(Debug, Clone)]
enum Rule {
    TopK {
        k: usize,
        /// AuxK's size as configured: the loss scale is `min(n_dead / aux_k, 1)`.
        aux_k: usize,
        aux_coefficient: f64,
    },
    /// ReLU codes, penalty `l1 · Σ_f a_f ||W_dec[f]||` per token (before the warm-up factor).
    Standard { l1: f64 },
    /// `a = v · H(v - θ)` with a learned θ per feature (parameter 4), penalty `l0 · Σ_f H(v_f -
    /// θ_f)` per token, θ trained by the straight-through estimate of bandwidth `bandwidth`.
    JumpRelu { l0: f64, bandwidth: f64 },
    /// Gated: `h + b_gate > 0` decides, `ReLU(h · exp(r_mag) + b_mag)` is the code; L1 of the
    /// gate path weighted by decoder norms, and the gate path's own reconstruction in the loss.
    Gated { l1: f64 },
    /// The batch's `k · n` largest ReLU'd pre-activations, AuxK as TopK, and for Matryoshka the
    /// reconstructions from each prefix of `inner_widths` features added to the loss.
    BatchTopK {
        k: f64,
        threshold_lr: f64,
        aux_k: usize,
        aux_coefficient: f64,
        inner_widths: Vec<usize>,
    },
}

/// How a device trainer spends memory and precision; the defaults are f32 everywhere and the
/// whole batch in one pass. At a million features (d_in 2,048) the training state alone is
/// 48 GiB of weights and moments in f32: `moments: BF16` takes 16 GiB off, `weights: BF16` 8 more
/// (with bf16 products), and `token_chunk` bounds the `[batch, d_sae]` temporaries (16 GiB each
/// at a batch of 4,096).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Operands of the matrix products ([`DeviceTrainer::with_compute_dtype`]).
    pub compute: DType,
    /// Tokens per pass ([`DeviceTrainer::with_token_chunk`]); `None`: the whole batch.
    pub token_chunk: Option<usize>,
    /// Adam's moments' dtype ([`DeviceTrainer::with_moment_dtype`]).
    pub moments: DType,
    /// `W_enc`'s and `W_dec`'s dtype ([`DeviceTrainer::with_weight_dtype`]).
    pub weights: DType,
}

impl DeviceOptions {
    /// Whether the device path takes these options (every architecture takes the same ones).
    ///
    /// # Errors
    /// A configuration error naming the option: a compute dtype other than f32, bf16 or f16;
    /// moments other than f32 or bf16; weights other than f32 or bf16, or bf16 weights with
    /// products in another dtype; a token chunk of 0 rows.
    pub fn check(&self) -> Result<()> {
        check_compute(self.compute)?;
        check_moments(self.moments)?;
        check_weights(self.weights, self.compute)?;
        if let Some(rows) = self.token_chunk {
            check_token_chunk(rows)?;
        }
        Ok(())
    }
}

fn check_compute(dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(SaeError::config(
            "compute dtype",
            format!("{dtype:?}: expected f32, bf16 or f16"),
        ));
    }
    Ok(())
}

fn check_moments(dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(SaeError::config(
            "moment dtype",
            format!("{dtype:?}: expected f32 or bf16"),
        ));
    }
    Ok(())
}

/// bf16 weights take their products in bf16: with f32 products every product would first copy
/// a weight matrix to f32 (8 GiB at a million features), the memory they were to save.
fn check_weights(weights: DType, compute: DType) -> Result<()> {
    match weights {
        DType::F32 => Ok(()),
        DType::BF16 if compute == DType::BF16 => Ok(()),
        DType::BF16 => Err(SaeError::config(
            "weight dtype",
            format!("bf16 weights need bf16 products (the compute dtype is {compute:?})"),
        )),
        other => Err(SaeError::config(
            "weight dtype",
            format!("{other:?}: expected f32 or bf16"),
        )),
    }
}

fn check_token_chunk(rows: usize) -> Result<()> {
    if rows == 0 {
        return Err(SaeError::config(
            "token chunk",
            "0 rows: expected at least one token per pass",
        ));
    }
    Ok(())
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            compute: DType::F32,
            token_chunk: None,
            moments: DType::F32,
            weights: DType::F32,
        }
    }
}

/// An SAE trainer on a device (any architecture, resampling included), started from a host [`Trainer`] (its
/// configuration, weights, Adam state and counters), so that both start from the same point.
pub struct DeviceTrainer {
    cfg: TrainerConfig,
    /// Parameter names, in the order of `params`, `m` and `v`.
    names: &'static [&'static str],
    rule: Rule,
    apply_b_dec: bool,
    unit_norm: bool,
    device: Device,
    /// `W_enc [d_sae, d_in]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`.
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    adam_t: u64,
    step: u64,
    tokens_seen: u64,
    scale: Option<f32>,
    needs_data_init: bool,
    /// Tokens since each feature last fired (f64: exact well past 2^24 tokens).
    tokens_since_fired: Tensor,
    /// A bound on those counters, kept on the host (their largest when last read, plus the
    /// tokens since): while it is under the dead window no feature can be dead, and AuxK's
    /// dead set needs no read.
    since_fired_bound: u64,
    /// Fires per feature in the density window, which restarts every `log_every` steps.
    window_fires: Tensor,
    window_tokens: u64,
    lifetime_fires: Tensor,
    /// NaN or infinite values seen in the batches so far (f64, 0-dimensional), read with a step.
    bad_values: Tensor,
    /// BatchTopK's inference threshold θ (f64, 0-dimensional; zero for the other rules).
    topk_threshold: Tensor,
    /// The dtype of the matrix products' operands (f32 by default; bf16 or f16 run them on a
    /// GPU's tensor cores, accumulating in f32). The weights' own dtype is `params[0]`'s
    /// ([`DeviceTrainer::with_weight_dtype`]); Adam's state is `moments`; the rest stays f32.
    compute: DType,
    /// Rows of the batch per pass (`None`: the whole batch), see [`DeviceTrainer::with_token_chunk`].
    token_chunk: Option<usize>,
    /// BatchTopK: how many of each token's largest pre-activations are kept as candidates for
    /// the batch threshold (0 before the first step; doubled whenever too few, see
    /// `threshold_from_candidates`). Atomic so that a pass, which borrows the trainer, can
    /// double it.
    candidates: AtomicUsize,
    /// Elements per row block of the in-place gradient sums and updates.
    update_block: usize,
    /// The dtype Adam's moments are kept in (f32, or bf16 to halve them; the update itself is
    /// computed in f32).
    moments: DType,
    /// The replicas this one trains with (data parallel); `None`: alone.
    collective: Option<Arc<dyn Collective>>,
    /// TopK's pair gradients through two scattered `[rows, d_sae]` code matrices and dense
    /// products (the default on CUDA) instead of each pair's row added in place (the default
    /// elsewhere); see [`DeviceTrainer::with_dense_pairs`].
    dense_pairs: bool,
    /// Features AuxK may take on their own rows at most (`d_sae / COMPACT_AUX_SHARE`).
    compact_aux_limit: usize,
    /// BatchTopK's candidates per token up to which its codes go as pairs (`d_sae /
    /// BATCH_PAIRS_SHARE`), see [`DeviceTrainer::with_batch_pairs_limit`].
    batch_pairs_limit: usize,
    /// Where the steps' time goes, when asked for ([`DeviceTrainer::with_phase_timing`]).
    phases: Option<std::sync::Mutex<PhaseClock>>,
    /// Our own ops (`crate::fused_adam`'s Adam, `crate::pairs`' decode and dot products of
    /// TopK's pairs), or candle tensor ops where those cannot run (no NVRTC on a CUDA machine).
    own_kernels: bool,
}

/// Time per phase of the steps, summed over steps: each phase ends with the device
/// synchronised, so that its kernels are timed alone.
#[derive(Default)]
struct PhaseClock {
    since: Option<std::time::Instant>,
    totals: Vec<(&'static str, std::time::Duration)>,
}

impl std::fmt::Debug for DeviceTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTrainer")
            .field("d_in", &self.cfg.d_in)
            .field("d_sae", &self.cfg.d_sae)
            .field("rule", &self.rule)
            .field("step", &self.step)
            .field("device", &self.device)
            .finish()
    }
}

/// One step's scalars, still on the device: reading them is the host's choice (every
/// `log_every` steps, say), since each read waits for the device.
#[derive(Debug, Clone)]
pub struct DeviceStep {
    pub step: u64,
    pub lr: f64,
    /// The L1 warm-up factor this step used (1 for TopK).
    pub sparsity_scale: f32,
    /// `mse + sparsity_loss + aux_loss`, 0-dimensional.
    pub loss: Tensor,
    pub mse: Tensor,
    /// The L1 penalty (0 for TopK).
    pub sparsity_loss: Tensor,
    pub aux_loss: Tensor,
    /// Mean active features per token.
    pub l0: Tensor,
    /// Squared error over the batch's variance about its mean.
    pub fvu: Tensor,
    /// Global gradient norm before clipping.
    pub grad_norm: Tensor,
    pub tokens_seen: u64,
    /// The counters after this step (tensors are immutable, so these are free snapshots).
    tokens_since_fired: Tensor,
    window_fires: Tensor,
    window_tokens: u64,
    bad_values: Tensor,
}

/// [`DeviceStep`] read back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceStepScalars {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub mse: f64,
    pub sparsity_loss: f64,
    pub aux_loss: f64,
    pub l0: f64,
    pub fvu: f64,
    pub grad_norm: f64,
}

impl DeviceStep {
    /// Copies the scalars to the host.
    ///
    /// # Errors
    /// [`SaeError::NonFiniteBatches`] when a batch so far held NaN or infinity;
    /// [`SaeError::NonFiniteTraining`] when the loss or the gradient norm is NaN or infinite
    /// (the host path checks every step; here the check happens when the host looks).
    pub fn host(&self) -> Result<DeviceStepScalars> {
        // One copy from the device for all eight scalars (each read waits for the device).
        let parts = [
            &self.bad_values,
            &self.loss,
            &self.mse,
            &self.sparsity_loss,
            &self.aux_loss,
            &self.l0,
            &self.fvu,
            &self.grad_norm,
        ]
        .iter()
        .map(|t| t.to_dtype(DType::F64)?.reshape(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
        let v = Tensor::cat(&parts, 0)?.to_vec1::<f64>()?;
        let [bad, loss, mse, sparsity_loss, aux_loss, l0, fvu, grad_norm] = v[..] else {
            return Err(SaeError::config("device step", "expected eight scalars"));
        };
        if bad > 0.0 {
            return Err(SaeError::NonFiniteBatches {
                step: self.step,
                count: bad as u64,
            });
        }
        let s = DeviceStepScalars {
            step: self.step,
            lr: self.lr,
            loss,
            mse,
            sparsity_loss,
            aux_loss,
            l0,
            fvu,
            grad_norm,
        };
        for (what, value) in [("loss", s.loss), ("gradient norm", s.grad_norm)] {
            if !value.is_finite() {
                return Err(SaeError::NonFiniteTraining {
                    step: self.step,
                    what: what.into(),
                    value,
                });
            }
        }
        Ok(s)
    }

    /// The step's full metrics, as the host path reports them (the firing statistics read the
    /// `d_sae` counters, so this costs more than [`DeviceStep::host`]).
    ///
    /// # Errors
    /// As [`DeviceStep::host`].
    pub fn metrics(&self, cfg: &TrainerConfig) -> Result<TrainMetrics> {
        let s = self.host()?;
        let density = DensityStats::new(
            cfg,
            &counts(&self.tokens_since_fired)?,
            &counts(&self.window_fires)?,
            self.window_tokens,
        );
        Ok(TrainMetrics {
            step: s.step + 1,
            tokens_seen: self.tokens_seen,
            lr: s.lr,
            sparsity_scale: self.sparsity_scale,
            loss: s.loss,
            mse: s.mse,
            sparsity_loss: s.sparsity_loss,
            aux_loss: s.aux_loss,
            fvu: s.fvu,
            l0: s.l0,
            grad_norm: s.grad_norm,
            dead_fraction: density.dead_fraction,
            dense_fraction: density.dense_fraction,
            log10_density_histogram: density.histogram,
            density_window_tokens: self.window_tokens,
        })
    }
}

impl DeviceTrainer {
    /// Copies a host trainer onto `device`.
    ///
    /// # Errors
    /// Candle errors from the copy; a configuration error for a Matryoshka SAE whose widths do
    /// not fit.
    pub fn from_trainer(trainer: &Trainer, device: &Device) -> Result<Self> {
        let cfg = trainer.config().clone();
        let (rule, apply_b_dec, decoder_norm) = match &cfg.sae {
            ArchitectureConfig::TopK(t) => (
                Rule::TopK {
                    k: t.k,
                    aux_k: crate::arch::aux_k_size(t.aux_k, cfg.d_in),
                    aux_coefficient: f64::from(t.aux_loss_coefficient),
                },
                t.apply_b_dec_to_input,
                t.decoder_norm,
            ),
            ArchitectureConfig::Standard(t) => (
                Rule::Standard {
                    l1: f64::from(t.l1_coefficient),
                },
                t.apply_b_dec_to_input,
                t.decoder_norm,
            ),
            ArchitectureConfig::JumpRelu(t) => (
                Rule::JumpRelu {
                    l0: f64::from(t.l0_coefficient),
                    bandwidth: f64::from(t.bandwidth),
                },
                t.apply_b_dec_to_input,
                t.decoder_norm,
            ),
            ArchitectureConfig::Gated(t) => (
                Rule::Gated {
                    l1: f64::from(t.l1_coefficient),
                },
                t.apply_b_dec_to_input,
                t.decoder_norm,
            ),
            ArchitectureConfig::BatchTopK(t) => (
                Rule::BatchTopK {
                    k: f64::from(t.k),
                    threshold_lr: t.topk_threshold_lr,
                    aux_k: crate::arch::aux_k_size(t.aux_k, cfg.d_in),
                    aux_coefficient: f64::from(t.aux_loss_coefficient),
                    inner_widths: Vec::new(),
                },
                t.apply_b_dec_to_input,
                t.decoder_norm,
            ),
            ArchitectureConfig::Matryoshka(t) => {
                let mut widths = t.widths(cfg.d_sae)?;
                widths.pop(); // the last is d_sae, the main reconstruction
                (
                    Rule::BatchTopK {
                        k: f64::from(t.k),
                        threshold_lr: t.topk_threshold_lr,
                        aux_k: crate::arch::aux_k_size(t.aux_k, cfg.d_in),
                        aux_coefficient: f64::from(t.aux_loss_coefficient),
                        inner_widths: widths,
                    },
                    t.apply_b_dec_to_input,
                    t.decoder_norm,
                )
            }
        };
        let threshold = trainer
            .sae()
            .state_json()
            .get("topk_threshold")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0);
        let upload = |p: &Param| -> Result<Tensor> {
            Ok(Tensor::from_slice(&p.data, p.shape.as_slice(), device)?)
        };
        let names: &'static [&'static str] = match rule {
            Rule::JumpRelu { .. } => &JUMPRELU_NAMES,
            Rule::Gated { .. } => &GATED_NAMES,
            _ => &NAMES,
        };
        let pick = |set: &Params| -> Result<Vec<Tensor>> {
            names
                .iter()
                .map(|name| {
                    let p = set.iter().find(|p| p.name == *name).ok_or_else(|| {
                        SaeError::config("device training", format!("no parameter {name}"))
                    })?;
                    upload(p)
                })
                .collect()
        };
        let adam = trainer.adam();
        let u64s = |v: &[u64]| -> Result<Tensor> {
            let f: Vec<f64> = v.iter().map(|&t| t as f64).collect();
            Ok(Tensor::from_vec(f, v.len(), device)?)
        };
        Ok(DeviceTrainer {
            names,
            rule,
            apply_b_dec,
            unit_norm: decoder_norm == DecoderNorm::Unit,
            device: device.clone(),
            params: pick(trainer.sae().params())?,
            m: pick(&adam.m)?,
            v: pick(&adam.v)?,
            adam_t: adam.t,
            step: trainer.step_count(),
            tokens_seen: trainer.tokens_seen(),
            scale: trainer.activation_scale(),
            needs_data_init: trainer.needs_data_init(),
            tokens_since_fired: u64s(trainer.tokens_since_fired())?,
            since_fired_bound: trainer
                .tokens_since_fired()
                .iter()
                .copied()
                .max()
                .unwrap_or(0),
            window_fires: u64s(trainer.window_fires())?,
            window_tokens: trainer.window_tokens(),
            lifetime_fires: u64s(trainer.lifetime_fires())?,
            bad_values: Tensor::zeros((), DType::F64, device)?,
            topk_threshold: Tensor::new(threshold, device)?,
            compute: DType::F32,
            token_chunk: None,
            candidates: AtomicUsize::new(0),
            update_block: UPDATE_BLOCK,
            moments: DType::F32,
            collective: None,
            dense_pairs: device.is_cuda(),
            compact_aux_limit: cfg.d_sae / COMPACT_AUX_SHARE,
            batch_pairs_limit: cfg.d_sae / BATCH_PAIRS_SHARE,
            phases: None,
            own_kernels: match crate::fused_adam::ready_on(device)
                .and_then(|()| crate::pairs::ready_on(device))
            {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "our kernels cannot run here ({e}): candle's tensor ops instead"
                    );
                    false
                }
            },
            cfg,
        })
    }

    /// Trains as one replica of a data-parallel group: every replica starts from the same
    /// trainer and steps on its own part of each batch, and the step sums across the group
    /// what the loss sums over tokens (gradients, squared errors, firing counts, the first
    /// batch's norms and `b_dec`), so that every replica takes the step one device would take
    /// on the whole batch and stays identical to the others. World size 1 is the plain step.
    pub fn with_collective(mut self, collective: Arc<dyn Collective>) -> Self {
        self.collective = Some(collective);
        self
    }

    /// Runs the matrix products with operands in `dtype` (f32, bf16 or f16), results and
    /// accumulation in f32: on a GPU, bf16 products take the tensor cores' bf16 rate (twice
    /// TF32's on an H100) and half the memory traffic. The weights stay f32 (master weights),
    /// so updates smaller than bf16's resolution are not lost, unless they are kept in bf16
    /// themselves ([`DeviceTrainer::with_weight_dtype`]).
    ///
    /// # Errors
    /// A configuration error for any other dtype, or for products other than bf16 of bf16
    /// weights.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Result<Self> {
        check_compute(dtype)?;
        check_weights(self.params[0].dtype(), dtype)?;
        self.compute = dtype;
        Ok(self)
    }

    /// Applies every option of `opts`.
    ///
    /// # Errors
    /// Those of [`DeviceTrainer::with_compute_dtype`], [`DeviceTrainer::with_token_chunk`],
    /// [`DeviceTrainer::with_moment_dtype`] and [`DeviceTrainer::with_weight_dtype`].
    pub fn with_options(self, opts: &DeviceOptions) -> Result<Self> {
        // The weights' dtype before the products' and after, so that either change passes.
        let mut d = self
            .with_weight_dtype(DType::F32)?
            .with_compute_dtype(opts.compute)?
            .with_weight_dtype(opts.weights)?
            .with_moment_dtype(opts.moments)?;
        if let Some(rows) = opts.token_chunk {
            d = d.with_token_chunk(rows)?;
        }
        Ok(d)
    }

    /// Runs each step's forward and backward on `rows` tokens of the batch at a time, adding up
    /// the gradients, so that the `[batch, d_sae]` temporaries (pre-activations, AuxK's ranking
    /// and codes, their gradients: about eight) become `[rows, d_sae]`: at a million features a
    /// batch of 4,096 needs 16 GiB for each, a chunk of 512 needs 2 GiB. The step is the same
    /// up to the order of the sums; each chunk costs a pass over `W_enc` and `W_dec` (memory
    /// traffic, not FLOPs).
    ///
    /// BatchTopK and Matryoshka, whose threshold ranks the whole batch's pre-activations, take
    /// one more pass for it: each chunk's encoder product again, keeping only each token's
    /// largest values (see `chunked_threshold`), so their step costs one more encoder product
    /// (about a fifth more FLOPs) and one host read of a flag. Replicas of a group must all
    /// chunk or all not.
    ///
    /// # Errors
    /// A configuration error for 0 rows.
    pub fn with_token_chunk(mut self, rows: usize) -> Result<Self> {
        check_token_chunk(rows)?;
        self.token_chunk = Some(rows);
        Ok(self)
    }

    /// Row ranges of `t` (`[rows, ...]`) of at most `update_block` elements (one row at least),
    /// over which the gradient sums, projections and Adam's update go in place.
    fn row_blocks(&self, t: &Tensor) -> Result<Vec<(usize, usize)>> {
        let rows = t.dim(0)?;
        let per_row = (t.elem_count() / rows.max(1)).max(1);
        let block = (self.update_block / per_row).max(1);
        Ok((0..rows)
            .step_by(block)
            .map(|s| (s, block.min(rows - s)))
            .collect())
    }

    /// Sets the element count of the row blocks that gradients and updates go through in place
    /// (default [`UPDATE_BLOCK`]); tests use small blocks to cross many block edges.
    #[doc(hidden)]
    pub fn with_update_block(mut self, elements: usize) -> Self {
        self.update_block = elements.max(1);
        self
    }

    /// Sets how many of each token's largest pre-activations BatchTopK's threshold starts from
    /// (they double whenever too few); tests start low to cross the doubling.
    #[doc(hidden)]
    pub fn with_threshold_candidates(self, per_token: usize) -> Self {
        self.candidates.store(per_token.max(1), Ordering::Relaxed);
        self
    }

    /// Sets how TopK's main (token, feature) pairs reach the gradients of `W_enc`, `W_dec` and
    /// `b_enc`. Pair rows (`false`, the CPU's default): each pair's row is added in place,
    /// `2 · k · d_in` FLOPs a token (`crate::pairs`: a loop on the CPU, an atomic-add kernel on
    /// CUDA, where the order of the additions, so the last bits, vary from run to run). Dense
    /// (`true`, CUDA's default until the kernel has been run and timed on a GPU): the codes and
    /// their gradients are scattered along each token's row into two `[rows, d_sae]` matrices
    /// that go through the products the standard SAE's codes do, `4 · d_sae · d_in` FLOPs a
    /// token, in cuBLAS's fixed order. (candle's own CUDA scatter along rows is no option: one
    /// thread per column walks every pair in turn.)
    pub fn with_dense_pairs(mut self, dense: bool) -> Self {
        self.dense_pairs = dense;
        self
    }

    /// Runs Adam's update as three element-wise passes of our own and TopK's decode and pair
    /// gradients' dot products as ops of our own (the default wherever they can run), or all as
    /// candle tensor ops (`false`; the fallback where NVRTC cannot compile the kernels). Tests
    /// take both ways.
    #[doc(hidden)]
    pub fn with_own_kernels(mut self, on: bool) -> Self {
        self.own_kernels = on;
        self
    }

    /// Whether our own ops run (see [`DeviceTrainer::with_own_kernels`]).
    pub fn own_kernels(&self) -> bool {
        self.own_kernels
    }

    /// Times each phase of every step from now on (inputs, encoder, top-k, decode, the pairs'
    /// gradients, AuxK, the group's sums, clipping, Adam, counters; [`DeviceTrainer::phase_times`]).
    /// The device is synchronised at each phase's end, which takes away the overlap of the
    /// host's launches with the device's work: a timed step is slower, and its phases say where
    /// the device's time goes, not how long an untimed step takes.
    pub fn with_phase_timing(mut self, on: bool) -> Self {
        self.phases = on.then(Default::default);
        self
    }

    /// Seconds spent in each phase over the steps timed so far, in the order the phases first
    /// ran (empty unless [`DeviceTrainer::with_phase_timing`]).
    pub fn phase_times(&self) -> Vec<(&'static str, f64)> {
        self.phases
            .as_ref()
            .and_then(|c| c.lock().ok())
            .map(|c| {
                c.totals
                    .iter()
                    .map(|(n, d)| (*n, d.as_secs_f64()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ends phase `name` when phases are timed: waits for the device and adds the time since the
    /// last phase ended (or the step began, `name` `None`) to `name`'s total.
    fn mark(&self, name: Option<&'static str>) -> Result<()> {
        let Some(clock) = &self.phases else {
            return Ok(());
        };
        self.device.synchronize()?;
        let now = std::time::Instant::now();
        let mut c = clock
            .lock()
            .map_err(|_| SaeError::config("phase timing", "a step panicked while timing"))?;
        if let (Some(name), Some(since)) = (name, c.since) {
            let spent = now - since;
            match c.totals.iter_mut().find(|(n, _)| *n == name) {
                Some((_, t)) => *t += spent,
                None => c.totals.push((name, spent)),
            }
        }
        c.since = Some(now);
        Ok(())
    }

    /// Sets how many dead features AuxK takes on their own rows at most (default
    /// `d_sae / COMPACT_AUX_SHARE`); tests force either side.
    #[doc(hidden)]
    pub fn with_compact_aux_limit(mut self, features: usize) -> Self {
        self.compact_aux_limit = features;
        self
    }

    /// Sets up to how many threshold candidates per token BatchTopK's codes go through the step
    /// as (token, feature) pairs (default `d_sae / BATCH_PAIRS_SHARE`; 0: always as dense
    /// matrices); tests force either side.
    #[doc(hidden)]
    pub fn with_batch_pairs_limit(mut self, candidates: usize) -> Self {
        self.batch_pairs_limit = candidates;
        self
    }

    /// Whether BatchTopK's codes go as pairs with `per_token` candidates a token: our ops read
    /// the pairs' rows (candle's gather would write `[rows, per_token, d_in]` out), and few
    /// enough candidates.
    fn batch_pairs(&self, per_token: usize) -> bool {
        self.own_kernels && per_token <= self.batch_pairs_limit
    }

    /// How many of each token's largest pre-activations BatchTopK's threshold keeps now (0
    /// before its first step).
    #[doc(hidden)]
    pub fn threshold_candidates(&self) -> usize {
        self.candidates.load(Ordering::Relaxed)
    }

    /// Keeps Adam's two moments in `dtype`: bf16 halves them (at a million features and
    /// d_in 2,048, from 32 to 16 GiB), with the update computed in f32 from them and rounded
    /// back. Checkpoints hold the moments as f32 (exactly the bf16 values), so a resumed run
    /// continues bit for bit.
    ///
    /// # Errors
    /// A configuration error for a dtype other than f32 or bf16 (f16's range would flush the
    /// second moment of small gradients to zero); candle errors from the conversion.
    pub fn with_moment_dtype(mut self, dtype: DType) -> Result<Self> {
        check_moments(dtype)?;
        for t in self.m.iter_mut().chain(self.v.iter_mut()) {
            *t = t.to_dtype(dtype)?;
        }
        self.moments = dtype;
        Ok(self)
    }

    /// Keeps `W_enc` and `W_dec` in `dtype`: bf16 halves them (at a million features and d_in
    /// 2,048, from 16 to 8 GiB) and the products read them as they are, with no copy in bf16
    /// first; the biases stay f32. Adam computes each update in f32 and rounds the weight back
    /// with stochastic rounding (`fused_adam::bf16_stochastic`: a weight of 0.03 has bf16
    /// steps of about 1.2e-4, and an Adam step of `lr` = 1e-4 rounded to nearest would never
    /// move it; rounded stochastically it moves by `lr` on average), its random bits a hash of
    /// the seed, the step and the element, so that runs, replicas and a resumed run take the
    /// same bits. Gradients and Adam's arithmetic stay f32; checkpoints hold the weights as f32
    /// (the bf16 values exactly).
    ///
    /// # Errors
    /// A configuration error for a dtype other than f32 or bf16, for bf16 weights with products
    /// in another dtype ([`DeviceTrainer::with_compute_dtype`] first), or where our kernels
    /// cannot run (the stochastic rounding is theirs); candle errors from the conversion.
    pub fn with_weight_dtype(mut self, dtype: DType) -> Result<Self> {
        check_weights(dtype, self.compute)?;
        if dtype != DType::F32 && !self.own_kernels {
            return Err(SaeError::config(
                "weight dtype",
                "bf16 weights are rounded by our Adam kernels, which cannot run here",
            ));
        }
        for i in [0, 2] {
            self.params[i] = self.params[i].to_dtype(dtype)?;
        }
        Ok(self)
    }

    /// `a b` with the operands in the compute dtype, the result in f32.
    /// Operands in a layout cuBLAS cannot take (a column block of a wider matrix, transposed)
    /// are copied first, on every device, so that the CPU runs what the GPU will.
    fn mm(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (a, b) = (gemm_operand(a)?, gemm_operand(b)?);
        let (a, b) = (&a, &b);
        if self.compute == DType::F32 {
            return Ok(a.matmul(b)?);
        }
        Ok(a.to_dtype(self.compute)?
            .matmul(&b.to_dtype(self.compute)?)?
            .to_dtype(DType::F32)?)
    }

    /// The element-wise minimum of `t` over the group (the identity alone).
    /// Each row's L2 norm of a weight matrix, in f32, a row block at a time: the squares are a
    /// block's temporary, not a matrix's (8 GiB at a million features), whatever the dtype.
    fn row_norms(&self, w: &Tensor) -> Result<Tensor> {
        let mut parts = Vec::new();
        for (start, len) in self.row_blocks(w)? {
            let b = w.narrow(0, start, len)?.to_dtype(DType::F32)?;
            parts.push(b.sqr()?.sum(1)?.sqrt()?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn min_over_group(&self, t: Tensor) -> Result<Tensor> {
        match &self.collective {
            Some(c) if c.world_size() > 1 => c.all_reduce_min(&t),
            _ => Ok(t),
        }
    }

    /// The element-wise maximum of `t` over the group.
    fn max_over_group(&self, t: Tensor) -> Result<Tensor> {
        Ok(self.min_over_group(t.neg()?)?.neg()?)
    }

    /// Sums `t` over the group (the identity alone).
    fn sum_over_group(&self, t: Tensor) -> Result<Tensor> {
        match &self.collective {
            Some(c) if c.world_size() > 1 => c.all_reduce_sum(&t),
            _ => Ok(t),
        }
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }
    pub fn tokens_seen(&self) -> u64 {
        self.tokens_seen
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights, copied to the host in the host trainer's layout (normalised units).
    ///
    /// # Errors
    /// Candle errors from the copy.
    pub fn params_host(&self) -> Result<Params> {
        to_host(self.names, &self.params)
    }

    /// Fails if any batch so far held NaN or infinity (one read from the device).
    ///
    /// # Errors
    /// [`SaeError::NonFiniteBatches`]; candle errors from the read.
    pub fn check_inputs(&self) -> Result<()> {
        let bad = self.bad_values.to_scalar::<f64>()?;
        if bad > 0.0 {
            return Err(SaeError::NonFiniteBatches {
                step: self.step,
                count: bad as u64,
            });
        }
        Ok(())
    }

    /// Hands the run back to a host trainer (the one it started from, or one of the same
    /// configuration): its weights, Adam state and counters become this run's, so that
    /// [`Trainer::save`] and [`Trainer::checkpoint`] write it, and a checkpoint resumed with
    /// [`Trainer::resume`] and [`DeviceTrainer::from_trainer`] continues it exactly.
    ///
    /// # Errors
    /// [`SaeError::NonFiniteBatches`] when a batch held NaN or infinity (nothing is written); a
    /// configuration error when `trainer` has another configuration; candle errors.
    pub fn write_to(&self, trainer: &mut Trainer) -> Result<()> {
        self.check_inputs()?;
        if trainer.config() != &self.cfg {
            return Err(SaeError::config(
                "device training",
                "the trainer to write to has another configuration",
            ));
        }
        trainer.set_device_state(crate::trainer::DeviceState {
            params: to_host(self.names, &self.params)?,
            adam_m: to_host(self.names, &self.m)?,
            adam_v: to_host(self.names, &self.v)?,
            adam_t: self.adam_t,
            step: self.step,
            tokens_seen: self.tokens_seen,
            scale: self.scale,
            needs_data_init: self.needs_data_init,
            tokens_since_fired: counts(&self.tokens_since_fired)?,
            window_fires: counts(&self.window_fires)?,
            window_tokens: self.window_tokens,
            lifetime_fires: counts(&self.lifetime_fires)?,
        })?;
        if matches!(self.rule, Rule::BatchTopK { .. }) {
            let theta = self.topk_threshold.to_scalar::<f64>()?;
            trainer
                .sae_mut()
                .load_state_json(&serde_json::json!({ "topk_threshold": theta }))?;
        }
        Ok(())
    }

    /// BatchTopK's inference threshold θ so far (0 for the other architectures).
    ///
    /// # Errors
    /// Candle errors from the read.
    pub fn topk_threshold(&self) -> Result<f64> {
        Ok(self.topk_threshold.to_scalar::<f64>()?)
    }

    /// One training step on a `[n, d_in]` batch (any device, any float dtype; it is moved to
    /// this trainer's device as f32).
    ///
    /// # Errors
    /// [`SaeError::WrongDIn`] for a batch of another width; candle errors.
    pub fn step(&mut self, batch: &Tensor) -> Result<DeviceStep> {
        let d_in = self.cfg.d_in;
        let (n, got) = batch.dims2()?;
        if got != d_in {
            return Err(SaeError::WrongDIn {
                what: "training batch".into(),
                expected: d_in,
                got,
            });
        }
        self.mark(None)?;
        let mut x = batch.to_device(&self.device)?.to_dtype(DType::F32)?;
        // `x - x` is NaN exactly where x is NaN or infinite (one pass for both).
        #[allow(clippy::eq_op)]
        let bad = (&x - &x)?.ne(0f32)?.to_dtype(DType::F64)?.sum_all()?;
        self.bad_values = (&self.bad_values + bad)?;
        // Tokens in the whole step: every sum over tokens is divided by it.
        let n_total = match &self.collective {
            Some(c) if c.world_size() > 1 => c
                .all_reduce_sum(&Tensor::new(n as f64, &self.device)?)?
                .to_scalar::<f64>()? as usize,
            _ => n,
        };
        let scale = match self.scale {
            Some(s) => s,
            None => self.first_batch_scale(&x, n_total)?,
        };
        if scale != 1.0 {
            x = (x * f64::from(scale))?;
        }
        let first = std::mem::take(&mut self.needs_data_init);
        let target_l0 = self.cfg.encoder_bias_init_l0;
        if first && (self.cfg.b_dec_init != BDecInit::Zeros || target_l0.is_some()) {
            // The first batch's inits read the whole group's rows, gathered once.
            let whole = self.gather_rows(&x)?;
            self.init_b_dec(&whole)?;
            if let Some(target) = target_l0 {
                let centred = if self.apply_b_dec {
                    whole.broadcast_sub(&self.params[3])?
                } else {
                    whole
                };
                self.init_encoder_bias(&centred, target)?;
            }
        }
        let xc = if self.apply_b_dec {
            x.broadcast_sub(&self.params[3])?
        } else {
            x.clone()
        };
        let sparsity_scale = self.cfg.sparsity_scale_at(self.step);
        self.mark(Some("inputs"))?;
        // The tokens go through the passes in chunks of `token_chunk` rows (all at once by
        // default): every `[rows, d_sae]` temporary shrinks with the chunk, and the passes' sums
        // over tokens add up across chunks. BatchTopK's threshold is the whole batch's: with
        // chunks it is found first, in a pass of its own.
        let rows = self.token_chunk.map_or(n, |c| c.min(n)).max(1);
        let threshold = match self.rule {
            Rule::BatchTopK { k, .. } if self.token_chunk.is_some() => {
                Some(self.chunked_threshold(&xc, rows, n_total, k)?)
            }
            _ => None,
        };
        self.mark(Some("threshold"))?;
        // `W_enc`'s and `W_dec`'s gradients are summed in place into one pair of matrices.
        let acc = MatrixGrads::zeros(self.cfg.d_sae, self.cfg.d_in, &self.device)?;
        let dead = self.dead_set()?;
        self.mark(Some("dead set"))?;
        let mut sums: Option<Pass> = None;
        let mut min_kept = None;
        // An empty batch still takes one (empty) pass, so that replicas stay in step.
        for start in (0..n.max(1)).step_by(rows) {
            let len = rows.min(n - start);
            let (x, xc) = if len == n {
                (x.clone(), xc.clone())
            } else {
                (x.narrow(0, start, len)?, xc.narrow(0, start, len)?)
            };
            let pass = self.chunk_pass(
                &x,
                &xc,
                n_total,
                sparsity_scale,
                &acc,
                &dead,
                threshold.as_ref(),
                &mut min_kept,
            )?;
            sums = Some(match sums {
                None => pass,
                Some(a) => a.add(pass)?,
            });
        }
        let Some(pass) = sums else {
            unreachable!("at least one pass ran")
        };
        dead.write_back(self, &acc)?;
        drop(dead);
        self.mark(Some("auxk"))?;
        let Pass {
            g_b_enc,
            g_b_dec,
            g_h_sum,
            extra,
            sq_err,
            sparsity_loss,
            aux_loss,
            fires,
            active,
            token_sq_err,
        } = pass;
        // The passes sum over this replica's tokens; the losses are the group's.
        let sq_err = self.sum_over_group(sq_err)?;
        let sparsity_loss = self.sum_over_group(sparsity_loss)?;
        let aux_loss = self.sum_over_group(aux_loss)?;
        let mse = (&sq_err / n_total as f64)?;
        let mut g_b_dec = g_b_dec;
        if self.apply_b_dec {
            let through = g_h_sum.as_ref().unwrap_or(&g_b_enc);
            let w_enc = &self.params[0];
            let back = if w_enc.dtype() == DType::F32 {
                through.unsqueeze(0)?.matmul(w_enc)?
            } else {
                self.mm(&through.unsqueeze(0)?, w_enc)?
            };
            g_b_dec = (g_b_dec - back.squeeze(0)?)?;
        }
        // Each replica's gradients are its tokens' share of the whole batch's mean.
        let MatrixGrads {
            w_enc: g_w_enc,
            w_dec: g_w_dec,
        } = acc;
        let g_w_enc = self.sum_over_group(g_w_enc)?.contiguous()?;
        let g_b_enc = self.sum_over_group(g_b_enc)?;
        let g_w_dec = self.sum_over_group(g_w_dec)?.contiguous()?;
        let g_b_dec = self.sum_over_group(g_b_dec)?;
        if self.unit_norm {
            // Remove each row's component along its decoder row (in place, by row blocks).
            let w_dec = &self.params[2];
            for (start, len) in self.row_blocks(&g_w_dec)? {
                let g = g_w_dec.narrow(0, start, len)?;
                let w = w_dec.narrow(0, start, len)?.to_dtype(DType::F32)?;
                let ww = w.sqr()?.sum_keepdim(1)?.maximum(1e-30)?;
                let c = ((&g * &w)?.sum_keepdim(1)? / ww)?;
                g_w_dec.slice_set(&(g - w.broadcast_mul(&c)?)?, 0, start)?;
            }
        }
        let mut grads = vec![g_w_enc, g_b_enc, g_w_dec, g_b_dec];
        for g in extra {
            grads.push(self.sum_over_group(g)?);
        }
        self.mark(Some("gradient sums"))?;
        let mut norm_sq = Tensor::zeros((), DType::F32, &self.device)?;
        for g in &grads {
            for (start, len) in self.row_blocks(g)? {
                norm_sq = (norm_sq + g.narrow(0, start, len)?.sqr()?.sum_all()?)?;
            }
        }
        let grad_norm = norm_sq.sqrt()?;
        let clip = match self.cfg.grad_clip_norm {
            Some(c) => {
                let scaled = ((&grad_norm + 1e-6)?.recip()? * c)?;
                grad_norm.gt(c)?.where_cond(&scaled, &scaled.ones_like()?)?
            }
            None => Tensor::ones((), DType::F32, &self.device)?,
        };
        self.mark(Some("norm and clip"))?;

        // Adam, as `optim::Adam::step`.
        let lr = self.cfg.lr_at(self.step);
        self.adam_t += 1;
        let (b1, b2) = (self.cfg.adam_beta1, self.cfg.adam_beta2);
        let bc1 = 1.0 - b1.powi(self.adam_t as i32);
        let bc2 = 1.0 - b2.powi(self.adam_t as i32);
        let step_size = lr / bc1;
        let inv_sqrt_bc2 = 1.0 / bc2.sqrt();
        // In place: three element-wise passes a parameter (`crate::fused_adam`), or tensor ops
        // by row blocks, whose temporaries are a block's, not a matrix's (at a million features
        // each `W_enc`-sized temporary is 8 GiB). The moments are stored as kept (bf16 rounds
        // there) and the update reads what is stored.
        for (i, g) in grads.iter().enumerate() {
            let (p, m_all, v_all) = (&self.params[i], &self.m[i], &self.v[i]);
            if !self.own_kernels && p.dtype() != DType::F32 {
                return Err(SaeError::config(
                    "weight dtype",
                    "bf16 weights are rounded by our Adam kernels, which are off",
                ));
            }
            if self.own_kernels {
                crate::fused_adam::update_moment(m_all, g, &clip, b1, false)?;
                crate::fused_adam::update_moment(v_all, g, &clip, b2, true)?;
                // Stochastic rounding's bits (bf16 weights): from the seed, the step and the
                // parameter, the same on every replica and in a resumed run.
                let seed = crate::fused_adam::mix64(
                    self.cfg.seed ^ crate::fused_adam::mix64(self.adam_t * 8 + i as u64),
                );
                crate::fused_adam::update_weights(
                    p,
                    m_all,
                    v_all,
                    step_size,
                    inv_sqrt_bc2,
                    self.cfg.adam_eps,
                    seed,
                )?;
            } else {
                for (start, len) in self.row_blocks(g)? {
                    let g = g.narrow(0, start, len)?.broadcast_mul(&clip)?;
                    let m_old = m_all.narrow(0, start, len)?.to_dtype(DType::F32)?;
                    let v_old = v_all.narrow(0, start, len)?.to_dtype(DType::F32)?;
                    let m = ((m_old * b1)? + (&g * (1.0 - b1))?)?.to_dtype(self.moments)?;
                    let v = ((v_old * b2)? + (g.sqr()? * (1.0 - b2))?)?.to_dtype(self.moments)?;
                    let (m32, v32) = (m.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
                    let denom = ((v32.sqrt()? * inv_sqrt_bc2)? + self.cfg.adam_eps)?;
                    let w = (p.narrow(0, start, len)? - ((m32 / denom)? * step_size)?)?;
                    p.slice_set(&w, 0, start)?;
                    m_all.slice_set(&m, 0, start)?;
                    v_all.slice_set(&v, 0, start)?;
                }
            }
            if i == 2 && self.unit_norm {
                // Decoder rows back to unit norm, by row blocks.
                for (start, len) in self.row_blocks(p)? {
                    let w = p.narrow(0, start, len)?.to_dtype(DType::F32)?;
                    let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
                    let safe = norm.gt(0.0)?.where_cond(&norm, &norm.ones_like()?)?;
                    p.slice_set(&w.broadcast_div(&safe)?.to_dtype(p.dtype())?, 0, start)?;
                }
            }
        }
        if matches!(self.rule, Rule::JumpRelu { .. }) {
            // Thresholds stay at or above zero, as SAELens clamps them.
            self.params[4] = self.params[4].relu()?;
        }
        self.mark(Some("adam"))?;

        // θ moves toward the smallest activation kept, when one was (BatchTopK).
        if let (Some(min), Rule::BatchTopK { threshold_lr, .. }) = (min_kept, &self.rule) {
            let min = self.min_over_group(min)?.to_dtype(DType::F64)?;
            let moved = ((&self.topk_threshold * (1.0 - threshold_lr))? + (&min * *threshold_lr)?)?;
            self.topk_threshold = min
                .lt(f64::INFINITY)?
                .where_cond(&moved, &self.topk_threshold)?;
        }

        // Firing counters.
        let fires = self.sum_over_group(fires.to_dtype(DType::F64)?)?;
        let fired = fires.gt(0.0)?;
        let later = (&self.tokens_since_fired + n_total as f64)?;
        self.tokens_since_fired = fired.where_cond(&later.zeros_like()?, &later)?;
        self.since_fired_bound = self.since_fired_bound.saturating_add(n_total as u64);
        self.window_fires = (&self.window_fires + &fires)?;
        self.window_tokens += n_total as u64;
        self.lifetime_fires = (&self.lifetime_fires + fires)?;

        // Dead features resampled after this step's update, as the host trainer does.
        if self.cfg.resample_at_steps.contains(&(self.step + 1)) {
            self.resample_dead(&x, token_sq_err.as_ref())?;
        }

        // With replicas, each one's variance is about its own part's mean.
        let var = self.sum_over_group(x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.sum_all()?)?;
        let fvu = (&sq_err / var.maximum(f32::MIN_POSITIVE)?)?;
        let l0 = (self.sum_over_group(active)? / n_total as f64)?;
        let out = DeviceStep {
            step: self.step,
            lr,
            sparsity_scale,
            loss: ((&mse + &sparsity_loss)? + &aux_loss)?,
            mse,
            sparsity_loss,
            aux_loss,
            l0,
            fvu,
            grad_norm,
            tokens_seen: self.tokens_seen + n_total as u64,
            tokens_since_fired: self.tokens_since_fired.clone(),
            window_fires: self.window_fires.clone(),
            window_tokens: self.window_tokens,
            bad_values: self.bad_values.clone(),
        };
        self.step += 1;
        self.tokens_seen += n_total as u64;
        if self.step.is_multiple_of(self.cfg.log_every) {
            self.window_fires = self.window_fires.zeros_like()?;
            self.window_tokens = 0;
        }
        self.mark(Some("counters and metrics"))?;
        Ok(out)
    }

    /// The encoder product and the rule's pass on `x` (a chunk of the batch, `xc` its centred
    /// rows). BatchTopK keeps what is above `threshold` (found here on the chunk, which is then
    /// the whole batch, when `None`) and lowers `min_kept` to the smallest activation it kept.
    #[allow(clippy::too_many_arguments)]
    fn chunk_pass(
        &self,
        x: &Tensor,
        xc: &Tensor,
        n_total: usize,
        sparsity_scale: f32,
        acc: &MatrixGrads,
        dead: &DeadSet,
        threshold: Option<&Tensor>,
        min_kept: &mut Option<Tensor>,
    ) -> Result<Pass> {
        let h = self.mm(xc, &self.params[0].t()?)?;
        // Pre-activations with the encoder bias (the gate's bias for gated).
        let pre = h.broadcast_add(&self.params[1])?.contiguous()?;
        self.mark(Some("encoder"))?;
        let h = matches!(self.rule, Rule::Gated { .. }).then_some(h);
        let penalty_scale = f64::from(sparsity_scale);
        Ok(match &self.rule {
            &Rule::TopK {
                k,
                aux_k,
                aux_coefficient,
            } => self.topk_pass(x, xc, &pre, n_total, acc, dead, k, aux_k, aux_coefficient)?,
            &Rule::Standard { l1 } => {
                let pass = self.standard_pass(x, xc, &pre, n_total, acc, l1 * penalty_scale)?;
                self.mark(Some("codes and gradients"))?;
                pass
            }
            &Rule::Gated { l1 } => {
                let pass =
                    self.gated_pass(x, xc, &pre, h.as_ref(), n_total, acc, l1 * penalty_scale)?;
                self.mark(Some("codes and gradients"))?;
                pass
            }
            &Rule::JumpRelu { l0, bandwidth } => {
                let pass =
                    self.jumprelu_pass(x, xc, &pre, n_total, acc, l0 * penalty_scale, bandwidth)?;
                self.mark(Some("codes and gradients"))?;
                pass
            }
            Rule::BatchTopK {
                k,
                aux_k,
                aux_coefficient,
                inner_widths,
                ..
            } => {
                let (pass, min) = self.batchtopk_pass(
                    x,
                    xc,
                    &pre,
                    threshold,
                    *k,
                    n_total,
                    acc,
                    dead,
                    inner_widths,
                    *aux_k,
                    *aux_coefficient,
                )?;
                *min_kept = Some(match min_kept.take() {
                    Some(m) => m.minimum(&min)?,
                    None => min,
                });
                pass
            }
        })
    }

    /// TopK's codes, reconstruction and gradients: the main decode on (token, feature) pairs,
    /// AuxK on the dead features through dense products.
    #[allow(clippy::too_many_arguments)]
    fn topk_pass(
        &self,
        x: &Tensor,
        xc: &Tensor,
        pre: &Tensor,
        n_total: usize,
        acc: &MatrixGrads,
        dead: &DeadSet,
        k: usize,
        aux_k: usize,
        aux_coefficient: f64,
    ) -> Result<Pass> {
        // Main reconstruction from each token's k largest, then ReLU, as (token, feature) pairs:
        // never a `[n, d_sae]` code matrix.
        let k = k.min(self.cfg.d_sae);
        let idx = top_k_indices(pre, k)?;
        self.mark(Some("top-k"))?;
        let vals = pre.gather(&idx, 1)?.relu()?;
        let on = vals.gt(0.0)?.to_dtype(DType::F32)?; // a zero after ReLU is not a code
        let pairs = Pairs {
            idx: &idx,
            vals: &vals,
            on: &on,
            prefixes: &[],
        };
        self.pairs_and_aux_pass(
            x,
            xc,
            pre,
            &pairs,
            n_total,
            acc,
            dead,
            aux_k,
            aux_coefficient,
        )
    }

    /// The pass of codes that are (token, feature) pairs (TopK's, BatchTopK's as candidates):
    /// their reconstruction and gradients (`pairs_pass`), then AuxK on the dead features.
    #[allow(clippy::too_many_arguments)]
    fn pairs_and_aux_pass(
        &self,
        x: &Tensor,
        xc: &Tensor,
        pre: &Tensor,
        pairs: &Pairs<'_>,
        n_total: usize,
        acc: &MatrixGrads,
        dead: &DeadSet,
        aux_k: usize,
        aux_coefficient: f64,
    ) -> Result<Pass> {
        let p = self.pairs_pass(x, xc, pairs, n_total, acc)?;
        let aux = self.aux_pass(xc, pre, &p.diff, n_total, acc, dead, aux_k, aux_coefficient)?;
        self.mark(Some("auxk"))?;
        Ok(Pass {
            g_b_enc: (p.g_b_enc + aux.g_b_enc)?,
            g_b_dec: p.g_b_dec,
            g_h_sum: None,
            extra: Vec::new(),
            sq_err: p.sq_err,
            sparsity_loss: Tensor::zeros((), DType::F32, &self.device)?,
            aux_loss: match p.inner_loss {
                Some(l) => (aux.loss + l)?,
                None => aux.loss,
            },
            fires: p.fires,
            active: pairs.on.sum_all()?,
            token_sq_err: None,
        })
    }

    /// The reconstruction from (token, feature) pairs and its gradients, for TopK and for
    /// BatchTopK's candidates. Each of Matryoshka's prefixes (inner widths) reconstructs from
    /// the pairs of its features alone, and its error joins the loss and the gradients. The decode and the dot products back to each pair are our ops (or, without
    /// them, the pairs' rows gathered: TopK only); the weight gradients go to the pairs' rows
    /// (`add_pair_rows`) or, with `dense_pairs`, through code matrices scattered along each
    /// token's row and dense products.
    fn pairs_pass(
        &self,
        x: &Tensor,
        xc: &Tensor,
        pairs: &Pairs<'_>,
        n_total: usize,
        acc: &MatrixGrads,
    ) -> Result<PairsOut> {
        let Pairs {
            idx,
            vals,
            on,
            prefixes,
        } = *pairs;
        let (d_in, d_sae) = (self.cfg.d_in, self.cfg.d_sae);
        let (n, k) = idx.dims2()?;
        let (w_dec, b_dec) = (&self.params[2], &self.params[3]);
        let flat = idx.flatten_all()?;
        // Our ops read the pairs' decoder rows where they are; candle's way gathers them into a
        // `[n · k, d_in]` matrix first.
        let rows = if self.own_kernels {
            None
        } else {
            Some(w_dec.index_select(&flat, 0)?.reshape((n, k, d_in))?)
        };
        let decode = |a: &Tensor| -> Result<Tensor> {
            let decoded = match &rows {
                Some(rows) => rows.broadcast_mul(&a.unsqueeze(2)?)?.sum(1)?,
                None => crate::pairs::decode_pairs(&flat, a, w_dec)?,
            };
            Ok(decoded.broadcast_add(b_dec)?)
        };
        let dots = |d: &Tensor| -> Result<Tensor> {
            Ok(match &rows {
                Some(rows) => rows.broadcast_mul(&d.unsqueeze(1)?)?.sum(2)?,
                None => crate::pairs::pair_dots(&flat, d, w_dec, k)?,
            })
        };
        // Scattered along each token's row (a thread per token on CUDA) into a code matrix.
        let scattered = |v: &Tensor| -> Result<Tensor> {
            let m = Tensor::zeros((n, d_sae), DType::F32, &self.device)?;
            m.scatter_add_set(idx, v, 1)?;
            Ok(m)
        };
        // `W_dec`'s gradient from codes `a` and their tokens' reconstruction gradients `d`.
        let add_dec = |a: &Tensor, d: &Tensor| -> Result<()> {
            if self.dense_pairs {
                acc.add_dec(self, &scattered(a)?, d)
            } else {
                crate::pairs::add_pair_rows(&acc.w_dec, &flat, a, d)
            }
        };
        let diff = (decode(vals)? - x)?;
        let sq_err = diff.sqr()?.sum_all()?;
        let d_xhat = (&diff * (2.0 / n_total as f64))?;
        let mut g_pairs = dots(&d_xhat)?;
        let mut g_b_dec = column_sums(&d_xhat)?;
        self.mark(Some("decode"))?;
        add_dec(vals, &d_xhat)?;
        let mut inner_loss = None;
        for &w in prefixes {
            let keep = idx.lt(w as u32)?.to_dtype(DType::F32)?;
            let a_w = (vals * &keep)?;
            let diff_w = (decode(&a_w)? - x)?;
            let loss_w = (diff_w.sqr()?.sum_all()? / n_total as f64)?;
            inner_loss = Some(match inner_loss {
                Some(l) => (l + loss_w)?,
                None => loss_w,
            });
            let d_w = (diff_w * (2.0 / n_total as f64))?;
            g_pairs = (g_pairs + (dots(&d_w)? * &keep)?)?;
            add_dec(&a_w, &d_w)?;
            g_b_dec = (g_b_dec + column_sums(&d_w)?)?;
        }
        let g_pairs = (g_pairs * on)?;
        let (g_b_enc, fires) = if self.dense_pairs {
            let fires = column_sums(&scattered(on)?)?;
            let g_codes = scattered(&g_pairs)?;
            acc.add_enc(self, &g_codes, xc)?;
            (column_sums(&g_codes)?, fires)
        } else {
            crate::pairs::add_pair_rows(&acc.w_enc, &flat, &g_pairs, xc)?;
            (
                per_feature_sums(&flat, &g_pairs, d_sae)?,
                per_feature_sums(&flat, on, d_sae)?,
            )
        };
        self.mark(Some("pair gradients"))?;
        Ok(PairsOut {
            diff,
            sq_err,
            g_b_enc,
            g_b_dec,
            fires,
            inner_loss,
        })
    }

    /// JumpReLU: `a = v · H(v - θ)`, dense. The straight-through estimate with a rectangle kernel
    /// of width `bandwidth` gives θ the gradient `-(θ/ε) ∂L/∂a - λ/(n ε)` from every pair within
    /// `ε/2` of it (SAELens's `JumpReLU` and `Step`).
    #[allow(clippy::too_many_arguments)]
    fn jumprelu_pass(
        &self,
        x: &Tensor,
        xc: &Tensor,
        pre: &Tensor,
        n_total: usize,
        acc: &MatrixGrads,
        lambda: f64,
        bandwidth: f64,
    ) -> Result<Pass> {
        let (w_dec, b_dec, theta) = (&self.params[2], &self.params[3], &self.params[4]);
        let theta_row = theta.unsqueeze(0)?;
        let on = pre.broadcast_gt(&theta_row)?.to_dtype(DType::F32)?;
        let a = (pre * &on)?;
        let x_hat = self.mm(&a, w_dec)?.broadcast_add(b_dec)?;
        let diff = (&x_hat - x)?;
        let sq_err = diff.sqr()?.sum_all()?;
        let d_xhat = (&diff * (2.0 / n_total as f64))?;
        let g_a = self.mm(&d_xhat, &w_dec.t()?)?;
        let per_tok = lambda / n_total as f64;
        let active = on.sum_all()?;
        let sparsity_loss = (&active * per_tok)?;
        let window = (pre.broadcast_sub(&theta_row)?.abs()? / bandwidth)?
            .lt(0.5)?
            .to_dtype(DType::F32)?;
        let through_a = g_a.broadcast_mul(&(theta_row.neg()? / bandwidth)?)?;
        let g_threshold = column_sums(&((through_a - per_tok / bandwidth)? * window)?)?;
        let g_pre = (g_a * &on)?;
        acc.add_enc(self, &g_pre, xc)?;
        acc.add_dec(self, &a, &d_xhat)?;
        Ok(Pass {
            g_b_enc: column_sums(&g_pre)?,
            g_b_dec: column_sums(&d_xhat)?,
            g_h_sum: None,
            extra: vec![g_threshold],
            sq_err,
            sparsity_loss,
            aux_loss: Tensor::zeros((), DType::F32, &self.device)?,
            fires: column_sums(&on)?,
            active,
            token_sq_err: None,
        })
    }

    /// Gated: `π = h + b_gate` (`pre`) decides which features fire, `ReLU(h · exp(r_mag) + b_mag)`
    /// is the code; the loss adds the L1 of `ReLU(π)` weighted by decoder norms and the error of
    /// reconstructing from `ReLU(π)` alone (with the live `W_dec` and `b_dec`, as SAELens). Dense.
    #[allow(clippy::too_many_arguments)]
    fn gated_pass(
        &self,
        x: &Tensor,
        xc: &Tensor,
        pre: &Tensor,
        h: Option<&Tensor>,
        n_total: usize,
        acc: &MatrixGrads,
        lambda: f64,
    ) -> Result<Pass> {
        let h = h.ok_or_else(|| SaeError::config("device training", "gated needs h"))?;
        let (w_dec, b_dec) = (&self.params[2], &self.params[3]);
        let (r_mag, b_mag) = (&self.params[4], &self.params[5]);
        let gate_on = pre.gt(0.0)?.to_dtype(DType::F32)?;
        let scale = r_mag.exp()?.unsqueeze(0)?;
        let mag_pre = h
            .broadcast_mul(&scale)?
            .broadcast_add(&b_mag.unsqueeze(0)?)?;
        let mag_on = (mag_pre.gt(0.0)?.to_dtype(DType::F32)? * &gate_on)?;
        let a = (mag_pre.relu()? * &gate_on)?;
        let gate_codes = pre.relu()?;
        // The main reconstruction and the gate path's.
        let diff = (self.mm(&a, w_dec)?.broadcast_add(b_dec)? - x)?;
        let sq_err = diff.sqr()?.sum_all()?;
        let d_xhat = (&diff * (2.0 / n_total as f64))?;
        let adiff = (self.mm(&gate_codes, w_dec)?.broadcast_add(b_dec)? - x)?;
        let aux_sq = adiff.sqr()?.sum_all()?;
        let aux_loss = (aux_sq / n_total as f64)?;
        let d_aux = (&adiff * (2.0 / n_total as f64))?;
        let l1 = self.decoder_norm_l1(&gate_codes, lambda / n_total as f64, acc)?;
        let sparsity_loss = l1.loss;
        let g_mag = (self.mm(&d_xhat, &w_dec.t()?)? * &mag_on)?;
        let g_gate = (self.mm(&d_aux, &w_dec.t()?)?.broadcast_add(&l1.g_codes)? * &gate_on)?;
        let enc_coef = (&g_gate + g_mag.broadcast_mul(&scale)?)?;
        acc.add_dec(self, &a, &d_xhat)?;
        acc.add_dec(self, &gate_codes, &d_aux)?;
        let g_r_mag = column_sums(&(&g_mag * h.broadcast_mul(&scale)?)?)?;
        acc.add_enc(self, &enc_coef, xc)?;
        Ok(Pass {
            g_b_enc: column_sums(&g_gate)?,
            g_b_dec: (column_sums(&d_xhat)? + column_sums(&d_aux)?)?,
            g_h_sum: Some(column_sums(&enc_coef)?),
            extra: vec![g_r_mag, column_sums(&g_mag)?],
            sq_err,
            sparsity_loss,
            aux_loss,
            fires: column_sums(&mag_on)?,
            active: mag_on.sum_all()?,
            token_sq_err: None,
        })
    }

    /// The L1 penalty weighted by decoder norms that the standard and gated SAEs put on their
    /// codes `acts` (`[n, d_sae]`), `per_tok · Σ_t Σ_f a_tf ||W_dec[f]||`: the loss summed over the
    /// group, its gradient on each code, `per_tok · ||W_dec[f]||` (`[1, d_sae]`), and on `W_dec`,
    /// `per_tok · Σ_t a_tf · W_dec[f] / ||W_dec[f]||` (zero for a zero row).
    fn decoder_norm_l1(
        &self,
        acts: &Tensor,
        per_tok: f64,
        acc: &MatrixGrads,
    ) -> Result<DecoderNormL1> {
        let w_dec = &self.params[2];
        let norms = self.row_norms(w_dec)?; // [d_sae]
        let penalty = acts.broadcast_mul(&norms.unsqueeze(0)?)?.sum_all()?;
        let nonzero = norms.gt(0.0)?;
        let safe = nonzero.where_cond(&norms, &norms.ones_like()?)?;
        let coef = ((column_sums(acts)? * per_tok)? / safe)?
            .broadcast_mul(&nonzero.to_dtype(DType::F32)?)?;
        let coef = coef.unsqueeze(1)?;
        for (start, len) in self.row_blocks(w_dec)? {
            let g = w_dec
                .narrow(0, start, len)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&coef.narrow(0, start, len)?)?;
            add_rows(&acc.w_dec, &g, start)?;
        }
        Ok(DecoderNormL1 {
            loss: (penalty * per_tok)?,
            g_codes: (&norms * per_tok)?.unsqueeze(0)?,
        })
    }

    /// AuxK on the features dead before this step (`dead`), given the main reconstruction's
    /// error `diff = x̂ - x`: their top `aux_k` pre-activations (no ReLU) reconstruct the
    /// residual without b_dec, scaled by `min(n_dead / aux_k, 1)` (SAELens's
    /// `calculate_topk_aux_loss`). With `aux_k` in the hundreds (d_in / 2 by default) gathered
    /// pairs would take `batch x aux_k x d_in` floats (34 GB at 4,096 x 1,024 x 2,048), so the
    /// codes are scattered into a matrix, over the dead features' own columns when they are few
    /// and over every feature when they are many.
    #[allow(clippy::too_many_arguments)]
    fn aux_pass(
        &self,
        xc: &Tensor,
        pre: &Tensor,
        diff: &Tensor,
        n_total: usize,
        acc: &MatrixGrads,
        dead: &DeadSet,
        aux_k: usize,
        aux_coefficient: f64,
    ) -> Result<AuxOut> {
        let (n, d_sae) = pre.dims2()?;
        let count = match dead {
            DeadSet::None => {
                return Ok(AuxOut {
                    loss: Tensor::zeros((), DType::F32, &self.device)?,
                    g_b_enc: Tensor::zeros(d_sae, DType::F32, &self.device)?,
                });
            }
            DeadSet::Few { rows, .. } => rows.len(),
            DeadSet::Many { count, .. } => *count,
        };
        let aux_c = (count as f64 / aux_k as f64).min(1.0) * aux_coefficient;
        let w_dec = &self.params[2];
        // The ranked columns: the dead features' own (`Few`), or every feature's with the live
        // ones pushed below every dead one by an offset row (0 for dead, -1e30 otherwise, which
        // absorbs any pre-activation): the ranking matrix in one pass, no mask beside it.
        let (ranked, w, width) = match dead {
            DeadSet::Few { idx, .. } => (
                pre.index_select(idx, 1)?,
                w_dec.index_select(idx, 0)?,
                count,
            ),
            DeadSet::Many { mask, .. } => {
                let offset = ((mask.ones_like()? - mask)? * -1e30)?.unsqueeze(0)?;
                (pre.broadcast_add(&offset)?, w_dec.clone(), d_sae)
            }
            DeadSet::None => unreachable!("returned above"),
        };
        let ak = aux_k.min(width);
        let aidx = top_k_indices(&ranked, ak)?;
        let vals = match dead {
            DeadSet::Few { .. } => ranked.gather(&aidx, 1)?,
            _ => pre.gather(&aidx, 1)?,
        };
        drop(ranked);
        // Over every feature, live ones that still land in the top (fewer than `aux_k` dead)
        // count 0, which is the host's `min(aux_k, n_dead)`.
        let chosen = match dead {
            DeadSet::Many { mask, .. } => mask
                .index_select(&aidx.flatten_all()?, 0)?
                .reshape((n, ak))?,
            _ => vals.ones_like()?,
        };
        // Scattered in place into fresh zeros: two `[n, width]` matrices, not three.
        let aux_codes = Tensor::zeros((n, width), DType::F32, &self.device)?;
        aux_codes.scatter_add_set(&aidx, &(vals * &chosen)?, 1)?;
        let aux_mask = Tensor::zeros((n, width), DType::F32, &self.device)?;
        aux_mask.scatter_add_set(&aidx, &chosen, 1)?;
        let adiff = (self.mm(&aux_codes, &w)? + diff)?; // recon_aux - (x - x̂)
        let aux_sq = adiff.sqr()?.sum_all()?;
        let aux_loss = ((aux_sq * aux_c)? / n_total as f64)?;
        let d_aux = (adiff * (aux_c * 2.0 / n_total as f64))?;
        let into = match dead {
            DeadSet::Few { grads, .. } => grads,
            _ => acc,
        };
        // `W_dec`'s part first, so that the codes are freed before the encoder's gradient exists.
        into.add_dec(self, &aux_codes, &d_aux)?;
        drop(aux_codes);
        let g_pre_aux = (self.mm(&d_aux, &w.t()?)? * &aux_mask)?;
        drop(aux_mask);
        into.add_enc(self, &g_pre_aux, xc)?;
        let g_b_enc = match dead {
            DeadSet::Few { inv, .. } => Tensor::cat(
                &[
                    &column_sums(&g_pre_aux)?,
                    &Tensor::zeros(1, DType::F32, &self.device)?,
                ],
                0,
            )?
            .index_select(inv, 0)?,
            _ => column_sums(&g_pre_aux)?,
        };
        Ok(AuxOut {
            loss: aux_loss,
            g_b_enc,
        })
    }

    /// The features dead before this step, for AuxK (none for the rules without it). Unless the
    /// counters' bound says that none can be, one host read of the counters, which also
    /// tightens the bound: in a run where every feature fires now and then, a read every
    /// `window - largest counter` tokens, not every step.
    fn dead_set(&mut self) -> Result<DeadSet> {
        if !matches!(self.rule, Rule::TopK { .. } | Rule::BatchTopK { .. }) {
            return Ok(DeadSet::None);
        }
        let window = self.cfg.dead_window_tokens;
        if self.since_fired_bound < window {
            return Ok(DeadSet::None);
        }
        let since = self.tokens_since_fired.to_vec1::<f64>()?;
        self.since_fired_bound = since.iter().fold(0.0f64, |m, &v| m.max(v)) as u64;
        let rows: Vec<u32> = (0u32..)
            .zip(&since)
            .filter_map(|(f, &t)| (t >= window as f64).then_some(f))
            .collect();
        let count = rows.len();
        if count == 0 {
            return Ok(DeadSet::None);
        }
        if count > self.compact_aux_limit {
            return Ok(DeadSet::Many {
                mask: self
                    .tokens_since_fired
                    .ge(window as f64)?
                    .to_dtype(DType::F32)?,
                count,
            });
        }
        let mut inv = vec![count as u32; self.cfg.d_sae];
        for (at, &f) in (0u32..).zip(&rows) {
            inv[f as usize] = at;
        }
        Ok(DeadSet::Few {
            idx: Tensor::new(rows.as_slice(), &self.device)?,
            inv: Tensor::new(inv.as_slice(), &self.device)?,
            grads: MatrixGrads::zeros(count, self.cfg.d_in, &self.device)?,
            rows,
        })
    }

    /// The threshold that keeps BatchTopK's `m` largest of `values` (ReLU'd pre-activations,
    /// `[tokens, columns]`; of the whole group's tokens with replicas): bisection on the device,
    /// every halving one pass over `values` and, with replicas, one scalar all-reduce. Ties at
    /// the threshold all pass (the host keeps exactly `m`); with fewer positive values than
    /// that, all of them pass.
    ///
    /// `exact_above`: when `values` holds only each token's largest entries, the group's
    /// largest smallest-kept entry `c`; counts at or above `c` are exact, and below it too few.
    /// Returns the threshold and, then, whether a halving below `c` was decided on a count
    /// that fell short of `m` (the only way the decisions, so the threshold, could differ from
    /// the bisection over every entry).
    fn bisect(
        &self,
        values: &Tensor,
        m: f64,
        exact_above: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        // A replica without rows has no values: 0 is below or at everyone's (all are ReLU'd).
        let local_max = extreme_or(values, 0.0, |v| v.max(0))?;
        let mut hi = self.max_over_group(local_max)?;
        let mut lo = hi.zeros_like()?;
        let mut short = match exact_above {
            Some(_) => Some(Tensor::zeros((), DType::U8, &self.device)?),
            None => None,
        };
        for _ in 0..THRESHOLD_BISECTIONS {
            let mid = ((&lo + &hi)? * 0.5)?;
            // Per row in f32 (exact below 2^24 features), over rows in f64.
            let above = values
                .broadcast_gt(&mid)?
                .to_dtype(DType::F32)?
                .sum(1)?
                .to_dtype(DType::F64)?
                .sum_all()?;
            let enough = self.sum_over_group(above)?.ge(m)?;
            if let (Some(c), Some(s)) = (exact_above, short.as_mut()) {
                let wrong = (mid.lt(c)? * enough.eq(0u8)?)?;
                *s = s.maximum(&wrong)?;
            }
            lo = enough.where_cond(&mid, &lo)?;
            hi = enough.where_cond(&hi, &mid)?;
        }
        Ok((lo, short))
    }

    /// BatchTopK's threshold over a batch that goes through the passes in chunks of `rows`:
    /// one pass of encoder products keeps each token's largest ReLU'd pre-activations, and
    /// the threshold is found on those (`threshold_from_candidates`).
    fn chunked_threshold(
        &self,
        xc: &Tensor,
        rows: usize,
        n_total: usize,
        k: f64,
    ) -> Result<Tensor> {
        let n = xc.dim(0)?;
        self.threshold_from_candidates(k, n_total, |per_token| {
            let mut kept = Vec::new();
            for start in (0..n).step_by(rows) {
                let len = rows.min(n - start);
                let pre = self
                    .mm(&xc.narrow(0, start, len)?, &self.params[0].t()?)?
                    .broadcast_add(&self.params[1])?
                    .relu()?
                    .contiguous()?;
                let idx = top_k_indices(&pre, per_token)?;
                kept.push(pre.gather(&idx, 1)?);
            }
            Ok(if kept.is_empty() {
                Tensor::zeros((0, per_token), DType::F32, &self.device)?
            } else {
                Tensor::cat(&kept, 0)?
            })
        })
    }

    /// The threshold that keeps the group's `k · n_total` largest ReLU'd pre-activations,
    /// found on each token's `C` largest (`candidates_of(C)`, `[tokens, C]`, largest first)
    /// rather than on every value: the bisection's 40 halvings then pass over `[tokens, C]`,
    /// not `[tokens, d_sae]` (C starts at the power of two at or above `4k`). Every count at or
    /// above the largest of the tokens' smallest candidates is the full count; a halving below
    /// it that found too few could have found enough over every value, so then the candidates
    /// double and are taken again (one flag read by the host per try). The threshold is then
    /// the one the bisection over every value finds. When the codes are to go as pairs
    /// (`batch_pairs`), the candidates also double while the threshold is below that largest
    /// smallest candidate: a token whose every candidate is kept may have more codes than
    /// candidates. At or above it, every token's codes are among its candidates (a value
    /// outside them is at most its smallest candidate), so its candidates are its pairs.
    fn threshold_from_candidates(
        &self,
        k: f64,
        n_total: usize,
        mut candidates_of: impl FnMut(usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let d_sae = self.cfg.d_sae;
        let m = batch_topk_count(k, n_total);
        if self.candidates.load(Ordering::Relaxed) == 0 {
            let start = ((4.0 * k).ceil() as usize).next_power_of_two();
            self.candidates.store(start, Ordering::Relaxed);
        }
        loop {
            let per_token = self.candidates.load(Ordering::Relaxed).min(d_sae);
            let values = candidates_of(per_token)?;
            if per_token == d_sae {
                return Ok(self.bisect(&values, m, None)?.0);
            }
            let smallest = values.narrow(1, per_token - 1, 1)?;
            let c = self.max_over_group(extreme_or(&smallest, 0.0, |v| v.max(0))?)?;
            let (lo, short) = self.bisect(&values, m, Some(&c))?;
            let Some(mut retry) = short else {
                return Ok(lo);
            };
            if self.batch_pairs(per_token) {
                retry = retry.maximum(&c.gt(&lo)?)?;
            }
            if retry.to_scalar::<u8>()? == 0 {
                return Ok(lo);
            }
            self.candidates
                .store((2 * per_token).min(d_sae), Ordering::Relaxed);
        }
    }

    /// BatchTopK's codes: what of the ReLU'd pre-activations is above `threshold` (the batch's
    /// `k · n` largest: the chunked threshold, or with `None` the bisection over this pass's
    /// values, then the whole batch). While each token's threshold candidates are few
    /// (`batch_pairs`), they hold all its codes and go through the step as (token, feature)
    /// pairs, as TopK's do; beyond, the codes are dense, as the standard SAE's.
    /// Returns the pass and the smallest activation kept in it (infinite when none was).
    #[allow(clippy::too_many_arguments)]
    fn batchtopk_pass(
        &self,
        x: &Tensor,
        xc: &Tensor,
        pre: &Tensor,
        threshold: Option<&Tensor>,
        k: f64,
        n_total: usize,
        acc: &MatrixGrads,
        dead: &DeadSet,
        inner_widths: &[usize],
        aux_k: usize,
        aux_coefficient: f64,
    ) -> Result<(Pass, Tensor)> {
        let d_sae = self.cfg.d_sae;
        let (w_dec, b_dec) = (&self.params[2], &self.params[3]);
        let r = pre.relu()?;
        // The last try's candidates, when the threshold is found here.
        let mut candidates = None;
        let threshold = match threshold {
            Some(t) => t.clone(),
            None => self.threshold_from_candidates(k, n_total, |per_token| {
                let idx = top_k_indices(&r, per_token)?;
                let values = r.gather(&idx, 1)?;
                candidates = Some(idx);
                Ok(values)
            })?,
        };
        let per_token = self.candidates.load(Ordering::Relaxed).min(d_sae);
        if self.batch_pairs(per_token) {
            let idx = match candidates {
                Some(idx) => idx,
                None => top_k_indices(&r, per_token)?,
            };
            self.mark(Some("threshold"))?;
            let values = r.gather(&idx, 1)?;
            drop(r);
            let (on, vals, min_kept) = above_threshold(&values, &threshold)?;
            let pairs = Pairs {
                idx: &idx,
                vals: &vals,
                on: &on,
                prefixes: inner_widths,
            };
            let pass = self.pairs_and_aux_pass(
                x,
                xc,
                pre,
                &pairs,
                n_total,
                acc,
                dead,
                aux_k,
                aux_coefficient,
            )?;
            return Ok((pass, min_kept));
        }
        self.mark(Some("threshold"))?;
        let (on, a, min_kept) = above_threshold(&r, &threshold)?;
        drop(r);
        let x_hat = self.mm(&a, w_dec)?.broadcast_add(b_dec)?;
        let diff = (&x_hat - x)?;
        let sq_err = diff.sqr()?.sum_all()?;
        let d_xhat = (&diff * (2.0 / n_total as f64))?;
        let mut g_a = self.mm(&d_xhat, &w_dec.t()?)?;
        acc.add_dec(self, &a, &d_xhat)?;
        let mut g_b_dec = column_sums(&d_xhat)?;
        // Matryoshka: each prefix's own reconstruction (b_dec included) joins the loss.
        let mut inner_loss = Tensor::zeros((), DType::F32, &self.device)?;
        for &w in inner_widths {
            let keep = Tensor::arange(0u32, d_sae as u32, &self.device)?
                .lt(w as u32)?
                .to_dtype(DType::F32)?
                .unsqueeze(0)?;
            let a_w = a.broadcast_mul(&keep)?;
            let diff_w = (self.mm(&a_w, w_dec)?.broadcast_add(b_dec)? - x)?;
            let sq_w = diff_w.sqr()?.sum_all()?;
            inner_loss = (inner_loss + (sq_w / n_total as f64)?)?;
            let d_w = (diff_w * (2.0 / n_total as f64))?;
            g_a = (g_a + self.mm(&d_w, &w_dec.t()?)?.broadcast_mul(&keep)?)?;
            acc.add_dec(self, &a_w, &d_w)?;
            g_b_dec = (g_b_dec + column_sums(&d_w)?)?;
        }
        let g_pre = (g_a * &on)?;
        acc.add_enc(self, &g_pre, xc)?;
        self.mark(Some("codes and gradients"))?;
        let aux = self.aux_pass(xc, pre, &diff, n_total, acc, dead, aux_k, aux_coefficient)?;
        self.mark(Some("auxk"))?;
        let pass = Pass {
            g_b_enc: (column_sums(&g_pre)? + aux.g_b_enc)?,
            g_b_dec,
            g_h_sum: None,
            extra: Vec::new(),
            sq_err,
            sparsity_loss: Tensor::zeros((), DType::F32, &self.device)?,
            aux_loss: (aux.loss + inner_loss)?,
            fires: column_sums(&on)?,
            active: on.sum_all()?,
            token_sq_err: None,
        };
        Ok((pass, min_kept))
    }

    /// The standard SAE's ReLU codes, reconstruction and L1 penalty `lambda · Σ_f a_f
    /// ||W_dec[f]||` per token, all dense: codes `[n, d_sae]` and products through them.
    fn standard_pass(
        &self,
        x: &Tensor,
        xc: &Tensor,
        pre: &Tensor,
        n_total: usize,
        acc: &MatrixGrads,
        lambda: f64,
    ) -> Result<Pass> {
        let (w_dec, b_dec) = (&self.params[2], &self.params[3]);
        let a = pre.relu()?;
        let on = pre.gt(0.0)?.to_dtype(DType::F32)?;
        let x_hat = self.mm(&a, w_dec)?.broadcast_add(b_dec)?;
        let diff = (&x_hat - x)?;
        let sq_err = diff.sqr()?.sum_all()?;
        let d_xhat = (&diff * (2.0 / n_total as f64))?;
        let l1 = self.decoder_norm_l1(&a, lambda / n_total as f64, acc)?;
        let g_pre = (self.mm(&d_xhat, &w_dec.t()?)?.broadcast_add(&l1.g_codes)? * &on)?;
        acc.add_dec(self, &a, &d_xhat)?;
        acc.add_enc(self, &g_pre, xc)?;
        let sparsity_loss = l1.loss;
        Ok(Pass {
            g_b_enc: column_sums(&g_pre)?,
            g_b_dec: column_sums(&d_xhat)?,
            g_h_sum: None,
            extra: Vec::new(),
            sq_err,
            sparsity_loss,
            aux_loss: Tensor::zeros((), DType::F32, &self.device)?,
            fires: column_sums(&on)?,
            active: on.sum_all()?,
            // Resampling draws tokens by their error (the only rule that resamples).
            token_sq_err: Some(diff.sqr()?.sum(1)?),
        })
    }

    /// Resamples the dead features as the host path does (`Standard::resample_dead`), with the
    /// weights and Adam's state staying here: the host reads the firing counters, the tokens'
    /// errors and the encoder's row norms (a few floats per feature and token), draws the same
    /// tokens from the same stream, and the rows are written in place. `x` is this step's
    /// (scaled) batch, `token_sq_err` its tokens' squared errors.
    ///
    /// Replicas first gather the whole batch's errors and rows, so that each draws what one
    /// device would and writes the same rows.
    fn resample_dead(&mut self, x: &Tensor, token_sq_err: Option<&Tensor>) -> Result<()> {
        let Some(token_sq_err) = token_sq_err else {
            return Err(SaeError::config(
                "resample_at_steps",
                "only the standard SAE resamples dead features",
            ));
        };
        // The group's tokens and their errors, in one gather (an all-reduce).
        let d_in = x.dim(1)?;
        let both = Tensor::cat(&[x, &token_sq_err.unsqueeze(1)?], 1)?;
        let both = self.gather_rows(&both)?;
        let x = &both.narrow(1, 0, d_in)?.contiguous()?;
        let token_sq_err = &both.narrow(1, d_in, 1)?.squeeze(1)?;
        let n = x.dim(0)?;
        let window = self.cfg.dead_window_tokens as f64;
        let since = self.tokens_since_fired.to_vec1::<f64>()?;
        let dead: Vec<usize> = (0..since.len()).filter(|&f| since[f] >= window).collect();
        let errors = token_sq_err.to_vec1::<f32>()?;
        // The same stream as the host's: its seed mixes in the step count after this step.
        let step = self.step + 1;
        let seed = self.cfg.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let picks = crate::arch::standard::resample_picks(&dead, &errors, n, seed);
        if picks.is_empty() {
            return Ok(());
        }
        let w_enc = &self.params[0];
        let enc_norms = self.row_norms(w_enc)?.to_vec1::<f32>()?;
        let live: Vec<f32> = (0..since.len())
            .filter(|&f| since[f] < window)
            .map(|f| enc_norms[f])
            .collect();
        let mean_live = crate::arch::standard::mean_live_norm(&live);
        // A drawn input of norm zero leaves its feature as it is (the host skips it too).
        let tokens: Vec<u32> = picks.iter().map(|&(_, t)| t as u32).collect();
        let rows = x.index_select(&Tensor::new(tokens.as_slice(), &self.device)?, 0)?;
        let norms = rows.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        let kept: Vec<usize> = (0..picks.len()).filter(|&i| norms[i] != 0.0).collect();
        if kept.is_empty() {
            return Ok(());
        }
        let sel = Tensor::new(
            kept.iter()
                .map(|&i| i as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &self.device,
        )?;
        let rows = rows.index_select(&sel, 0)?;
        let unit = rows.broadcast_div(&rows.sqr()?.sum_keepdim(1)?.sqrt()?)?;
        let features: Vec<u32> = kept.iter().map(|&i| picks[i].0 as u32).collect();
        let k = features.len();
        let f = Tensor::new(features.as_slice(), &self.device)?;
        let f_rows = f.unsqueeze(1)?.broadcast_as((k, d_in))?.contiguous()?;
        // Decoder rows: the unit inputs; encoder rows: the same, at 0.2 of the live mean norm;
        // encoder biases zero; those rows' Adam moments zero; the features count as just fired.
        let (enc, dec) = (self.params[0].dtype(), self.params[2].dtype());
        self.params[2].scatter_set(&f_rows, &unit.to_dtype(dec)?, 0)?;
        let enc_rows = (&unit * f64::from(0.2 * mean_live))?.to_dtype(enc)?;
        self.params[0].scatter_set(&f_rows, &enc_rows, 0)?;
        let zeros = Tensor::zeros(k, DType::F32, &self.device)?;
        self.params[1].scatter_set(&f, &zeros, 0)?;
        for i in 0..3 {
            let (idx, shape) = if i == 1 {
                (&f, vec![k])
            } else {
                (&f_rows, vec![k, d_in])
            };
            let z = Tensor::zeros(shape, self.moments, &self.device)?;
            self.m[i].scatter_set(idx, &z, 0)?;
            self.v[i].scatter_set(idx, &z, 0)?;
        }
        self.tokens_since_fired
            .scatter_set(&f, &Tensor::zeros(k, DType::F64, &self.device)?, 0)?;
        Ok(())
    }

    /// The input scale from the first batch, as the host trainer fixes it (one read).
    fn first_batch_scale(&mut self, x: &Tensor, n_total: usize) -> Result<f32> {
        let s = input_scale(
            self.cfg.normalize_activations,
            self.cfg.d_in,
            n_total,
            || {
                let local = row_norm_sum(&x.flatten_all()?.to_vec1::<f32>()?, self.cfg.d_in);
                Ok(self
                    .sum_over_group(Tensor::new(local, &self.device)?)?
                    .to_scalar::<f64>()?)
            },
        )?;
        if !self.needs_data_init && s != 1.0 {
            // Loaded weights read raw inputs: express them in normalised units, as the host does.
            let mut p = self.params_host()?;
            crate::fold_activation_scale(&mut p, 1.0 / s)?;
            for (t, q) in self.params.iter_mut().zip(p.iter()) {
                *t = Tensor::from_slice(&q.data, q.shape.as_slice(), &self.device)?;
            }
        }
        self.scale = Some(s);
        Ok(s)
    }

    /// `b_dec` from the first batch (once per run, on the host: the geometric median is an
    /// iterative solve that is not worth a kernel) from the whole group's rows `x`, so that
    /// replicas start where one device would.
    fn init_b_dec(&mut self, x: &Tensor) -> Result<()> {
        let d_in = self.cfg.d_in;
        if self.cfg.b_dec_init == BDecInit::Zeros {
            return Ok(());
        }
        let n = x.dim(0)?;
        // No rows, no estimate (a mean of none is NaN).
        if n > 0
            && let Some(b) =
                b_dec_from_data(self.cfg.b_dec_init, &x.flatten_all()?.to_vec1()?, n, d_in)
        {
            self.params[3] = Tensor::from_vec(b, d_in, &self.device)?;
        }
        Ok(())
    }

    /// Sets the encoder bias (`b_enc`; `b_gate` for gated) so that each feature fires on about
    /// `target / d_sae` of the first batch, as the host path's first step does
    /// ([`TrainerConfig::encoder_bias_init_l0`]): minus the feature's `r`-th largest
    /// pre-activation on the centred rows `xc` (the whole group's), `r = target / d_sae · n`.
    /// A block of features at a time, each block's `[features, n]` products ranked along the
    /// tokens, from whichever end is nearer the `r`-th.
    fn init_encoder_bias(&mut self, xc: &Tensor, target: usize) -> Result<()> {
        let (n, d_sae) = (xc.dim(0)?, self.cfg.d_sae);
        if n == 0 {
            return Ok(());
        }
        let r = ((target as f64 / d_sae as f64) * n as f64)
            .round()
            .clamp(0.0, (n - 1) as f64) as usize;
        let bias = Tensor::zeros(d_sae, DType::F32, &self.device)?;
        let xt = gemm_operand(&xc.t()?)?;
        let rows = (self.update_block / n).max(1);
        for start in (0..d_sae).step_by(rows) {
            let len = rows.min(d_sae - start);
            // In f32 whatever the compute dtype: the host's products are f32.
            let w = self.params[0].narrow(0, start, len)?.to_dtype(DType::F32)?;
            let h = gemm_operand(&w)?.matmul(&xt)?;
            // The r-th largest is the smallest of the r + 1 largest, or the largest of the
            // n - r smallest.
            let b = if r < n / 2 {
                h.gather(&top_k_indices(&h, r + 1)?, 1)?.min(1)?.neg()?
            } else {
                // The smallest of `-h`'s top `n - r` is minus the largest of those entries.
                let low = h.neg()?;
                low.gather(&top_k_indices(&low, n - r)?, 1)?.min(1)?
            };
            bias.slice_set(&b, 0, start)?;
        }
        self.params[1] = bias;
        Ok(())
    }

    /// This replica's rows `t` (`[n, ...]`) and every other replica's, in rank order: the whole
    /// batch, as one device would hold it (alone, `t` itself). An all-reduce of sums into which
    /// each replica writes its own rows; for the few steps that need the batch itself (the data
    /// inits, resampling), not for every step.
    fn gather_rows(&self, t: &Tensor) -> Result<Tensor> {
        let Some(c) = self.collective.as_ref().filter(|c| c.world_size() > 1) else {
            return Ok(t.clone());
        };
        let n = t.dim(0)?;
        let mut mine = vec![0f64; c.world_size()];
        mine[c.rank()] = n as f64;
        let counts = c
            .all_reduce_sum(&Tensor::new(mine.as_slice(), &self.device)?)?
            .to_vec1::<f64>()?;
        let offset: f64 = counts[..c.rank()].iter().sum();
        let mut dims = t.dims().to_vec();
        dims[0] = counts.iter().sum::<f64>() as usize;
        let whole = Tensor::zeros(dims, t.dtype(), &self.device)?;
        if n > 0 {
            whole.slice_set(&t.contiguous()?, 0, offset as usize)?;
        }
        c.all_reduce_sum(&whole)
    }
}

/// Sums across the replicas of a data-parallel group. NCCL's all-reduce is the transport on
/// GPUs (`Nccl`, behind the `nccl` feature); [`InProcess`] joins replicas that are threads of
/// one process, which checks the data-parallel step on the CPU. Every replica makes the same
/// calls in the same order, whatever its share of the batch (none included).
pub trait Collective: Send + Sync {
    fn world_size(&self) -> usize;
    /// This replica's place in the group, `0..world_size`: its rows come at that place in the
    /// whole batch.
    fn rank(&self) -> usize;
    /// The element-wise sum of `t` over every replica, the same tensor for each of them. Every
    /// replica must call it the same number of times, in the same order.
    ///
    /// # Errors
    /// Shape or device errors; a replica that left the group.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// The element-wise minimum of `t` over every replica (BatchTopK's smallest kept value),
    /// called in step as [`Collective::all_reduce_sum`] is.
    ///
    /// # Errors
    /// As [`Collective::all_reduce_sum`].
    fn all_reduce_min(&self, t: &Tensor) -> Result<Tensor>;
}

/// The replicas of a group that are threads of this process: each takes one member
/// ([`InProcess::group`]) and calls [`Collective::all_reduce_sum`] in step with the others.
/// Contributions are summed in rank order, so every replica gets the same bits. A member that is
/// dropped (its trainer failed, or its thread panicked) leaves the group: the others' waiting
/// and later calls fail naming it, instead of waiting for it forever.
pub struct InProcess {
    rank: usize,
    shared: Arc<InProcessShared>,
}

struct InProcessShared {
    size: usize,
    state: std::sync::Mutex<GroupState>,
    turn: std::sync::Condvar,
}

/// What the members share: each one's contribution to the call under way, and a barrier's
/// count of arrivals, whose generation moves on when the last one arrives.
struct GroupState {
    slots: Vec<Option<Tensor>>,
    arrived: usize,
    generation: u64,
    left: Option<usize>,
}

impl InProcess {
    /// The `size` members of a new group, rank 0 first.
    pub fn group(size: usize) -> Vec<Arc<InProcess>> {
        let shared = Arc::new(InProcessShared {
            size,
            state: std::sync::Mutex::new(GroupState {
                slots: vec![None; size],
                arrived: 0,
                generation: 0,
                left: None,
            }),
            turn: std::sync::Condvar::new(),
        });
        (0..size)
            .map(|rank| {
                Arc::new(InProcess {
                    rank,
                    shared: shared.clone(),
                })
            })
            .collect()
    }
}

impl Collective for InProcess {
    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce(t, |acc, p| Ok((acc + p)?))
    }

    fn all_reduce_min(&self, t: &Tensor) -> Result<Tensor> {
        self.reduce(t, |acc, p| Ok(acc.minimum(p)?))
    }
}

impl InProcess {
    fn reduce(
        &self,
        t: &Tensor,
        fold: impl Fn(Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut state = self.lock()?;
        state.slots[self.rank] = Some(t.clone());
        state = self.all_arrive(state)?;
        let sum = {
            let mut parts = state.slots.iter().flatten();
            let first = parts.next().ok_or_else(Self::poisoned)?.clone();
            parts.try_fold(first, &fold)?
        };
        // No replica overwrites its slot for the next call before all have read this one.
        drop(self.all_arrive(state)?);
        Ok(sum)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, GroupState>> {
        self.shared.state.lock().map_err(|_| Self::poisoned())
    }

    fn poisoned() -> SaeError {
        SaeError::config("collective", "a replica panicked holding the group's lock")
    }

    /// Waits until every member has arrived here, or fails once one has left the group.
    fn all_arrive<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, GroupState>,
    ) -> Result<std::sync::MutexGuard<'a, GroupState>> {
        let gone = |rank: usize| {
            SaeError::config(
                "collective",
                format!(
                    "replica {rank} of {} left the group (its trainer failed or was dropped) \
                     before this all-reduce",
                    self.shared.size
                ),
            )
        };
        if let Some(rank) = state.left {
            return Err(gone(rank));
        }
        state.arrived += 1;
        if state.arrived == self.shared.size {
            state.arrived = 0;
            state.generation += 1;
            self.shared.turn.notify_all();
            return Ok(state);
        }
        let generation = state.generation;
        while state.generation == generation {
            if let Some(rank) = state.left {
                return Err(gone(rank));
            }
            state = self.shared.turn.wait(state).map_err(|_| Self::poisoned())?;
        }
        Ok(state)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Whoever waits for this member now would wait forever: wake them to fail. A member
        // dropped after the group's last call (the usual end) wakes no one.
        if let Ok(mut state) = self.shared.state.lock() {
            state.left.get_or_insert(self.rank);
            self.shared.turn.notify_all();
        }
    }
}

/// See [`DeviceTrainer::decoder_norm_l1`].
struct DecoderNormL1 {
    loss: Tensor,
    g_codes: Tensor,
}

/// The features AuxK trains in one step: those dead before it. Every chunk of the step sees the
/// same set, and so does every replica of a group (their firing counters are the group's).
enum DeadSet {
    /// None is dead (or the rule has no AuxK): AuxK adds nothing, and none of it runs, as
    /// SAELens skips it.
    None,
    /// At most [`DeviceTrainer::with_compact_aux_limit`]'s features: AuxK ranks, decodes and
    /// differentiates their own columns and rows, `8 · count · d_in` FLOPs a token, into
    /// gradients of their own that join the full ones once per step ([`DeadSet::write_back`]).
    Few {
        /// The dead features, ascending, `[count]` u32 on the device and on the host.
        idx: Tensor,
        rows: Vec<u32>,
        /// Each feature's place among the dead ones, `count` for a live one: results go back
        /// to every feature by a gather from them with a zero appended.
        inv: Tensor,
        grads: MatrixGrads,
    },
    /// More: a mask over every feature (`[d_sae]` f32, 1 for dead), through dense products,
    /// `8 · d_sae · d_in` FLOPs a token.
    Many { mask: Tensor, count: usize },
}

impl DeadSet {
    /// Adds the dead features' own gradients into the rows of the full ones, after every
    /// chunk: with our ops, into those rows alone (one addend each, so the same bits every
    /// run); with candle's, by gathers through `inv`, a row block at a time (skipping blocks
    /// without a dead feature), not a scatter: candle's CUDA scatter along rows walks the rows
    /// one after another.
    fn write_back(&self, sae: &DeviceTrainer, acc: &MatrixGrads) -> Result<()> {
        let DeadSet::Few {
            idx,
            rows,
            inv,
            grads,
        } = self
        else {
            return Ok(());
        };
        if sae.own_kernels {
            // Each dead row once: `crate::pairs`' row adds, one pair per row, touch only them.
            let ones = Tensor::ones((rows.len(), 1), DType::F32, idx.device())?;
            for (own, full) in [(&grads.w_enc, &acc.w_enc), (&grads.w_dec, &acc.w_dec)] {
                crate::pairs::add_pair_rows(full, idx, &ones, own)?;
            }
            return Ok(());
        }
        for (own, full) in [(&grads.w_enc, &acc.w_enc), (&grads.w_dec, &acc.w_dec)] {
            let zero = Tensor::zeros((1, own.dim(1)?), DType::F32, own.device())?;
            let padded = Tensor::cat(&[own, &zero], 0)?;
            for (start, len) in sae.row_blocks(full)? {
                let first = rows.partition_point(|&f| (f as usize) < start);
                if rows.get(first).is_none_or(|&f| f as usize >= start + len) {
                    continue;
                }
                add_rows(
                    full,
                    &padded.index_select(&inv.narrow(0, start, len)?, 0)?,
                    start,
                )?;
            }
        }
        Ok(())
    }
}

/// AuxK's loss and gradients.
struct AuxOut {
    loss: Tensor,
    g_b_enc: Tensor,
}

/// One rule's forward and backward on this replica's tokens (or a chunk of them): the gradients
/// (`g_b_dec` is the reconstruction's part only; the encoder's part through the centring is
/// added after), the squared error, the penalties and the firing counts, all summed over those
/// tokens (the step sums them over the group).
struct Pass {
    g_b_enc: Tensor,
    g_b_dec: Tensor,
    /// The gradient of the encoder product `h = xc W_encᵀ` summed over tokens, which reaches
    /// `b_dec` through the centring; `None` when it is `g_b_enc` (every rule but gated).
    g_h_sum: Option<Tensor>,
    /// Gradients of the parameters after the first four, in order (this replica's part).
    extra: Vec<Tensor>,
    sq_err: Tensor,
    sparsity_loss: Tensor,
    aux_loss: Tensor,
    /// Tokens each feature fired on, `[d_sae]` f32.
    fires: Tensor,
    /// Active (token, feature) pairs, 0-dimensional.
    active: Tensor,
    /// Each token's squared error, `[tokens]`, where the rule resamples dead features.
    token_sq_err: Option<Tensor>,
}

impl Pass {
    /// The sum of two chunks' passes (every field is a sum over their tokens).
    fn add(self, o: Pass) -> Result<Pass> {
        let g_h_sum = match (self.g_h_sum, o.g_h_sum) {
            (Some(a), Some(b)) => Some((a + b)?),
            (None, None) => None,
            _ => unreachable!("one rule for every chunk"),
        };
        let extra = self
            .extra
            .into_iter()
            .zip(o.extra)
            .map(|(a, b)| Ok((a + b)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Pass {
            g_b_enc: (self.g_b_enc + o.g_b_enc)?,
            g_b_dec: (self.g_b_dec + o.g_b_dec)?,
            g_h_sum,
            extra,
            sq_err: (self.sq_err + o.sq_err)?,
            sparsity_loss: (self.sparsity_loss + o.sparsity_loss)?,
            aux_loss: (self.aux_loss + o.aux_loss)?,
            fires: (self.fires + o.fires)?,
            active: (self.active + o.active)?,
            token_sq_err: match (self.token_sq_err, o.token_sq_err) {
                (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
                _ => None,
            },
        })
    }
}

/// The gradients of `W_enc` and `W_dec` (`[d_sae, d_in]` each), which every pass and chunk adds
/// into in place: a million-feature step holds one pair of them, not one per term.
/// Codes as (token, feature) pairs: `idx` `[n, kk]` u32 features, `vals` their codes (zero
/// where a pair is no code), `on` 1 where it is; Matryoshka's inner widths in `prefixes`.
struct Pairs<'a> {
    idx: &'a Tensor,
    vals: &'a Tensor,
    on: &'a Tensor,
    prefixes: &'a [usize],
}

/// What [`DeviceTrainer::pairs_pass`] gives the pass: the reconstruction error `x̂ - x` (for
/// AuxK), its squared sum, the bias gradients, the firing counts and the prefixes' losses.
struct PairsOut {
    diff: Tensor,
    sq_err: Tensor,
    g_b_enc: Tensor,
    g_b_dec: Tensor,
    fires: Tensor,
    inner_loss: Option<Tensor>,
}

struct MatrixGrads {
    w_enc: Tensor,
    w_dec: Tensor,
}

impl MatrixGrads {
    fn zeros(d_sae: usize, d_in: usize, device: &Device) -> Result<Self> {
        Ok(MatrixGrads {
            w_enc: Tensor::zeros((d_sae, d_in), DType::F32, device)?,
            w_dec: Tensor::zeros((d_sae, d_in), DType::F32, device)?,
        })
    }

    /// `W_enc`'s gradient from pre-activation gradients `g` (`[t, d_sae]`) of centred inputs
    /// `xc`: `gᵀ xc`, a row block at a time.
    fn add_enc(&self, sae: &DeviceTrainer, g: &Tensor, xc: &Tensor) -> Result<()> {
        for (start, len) in sae.row_blocks(&self.w_enc)? {
            let part = sae.mm(&g.narrow(1, start, len)?.t()?, xc)?;
            add_rows(&self.w_enc, &part, start)?;
        }
        Ok(())
    }

    /// `W_dec`'s gradient from codes `a` (`[t, d_sae]`) and reconstruction gradients `d`:
    /// `aᵀ d`, a row block at a time.
    fn add_dec(&self, sae: &DeviceTrainer, a: &Tensor, d: &Tensor) -> Result<()> {
        for (start, len) in sae.row_blocks(&self.w_dec)? {
            let part = sae.mm(&a.narrow(1, start, len)?.t()?, d)?;
            add_rows(&self.w_dec, &part, start)?;
        }
        Ok(())
    }
}

/// `Σ v` per feature over (token, feature) pairs (`features`: `[t·k]` u32, `v`: `[t, k]`), as
/// `[d_sae]`: the pairs' rows of a `[t, 1]` column of ones, added into a `[d_sae, 1]` column.
fn per_feature_sums(features: &Tensor, v: &Tensor, d_sae: usize) -> Result<Tensor> {
    let sums = Tensor::zeros((d_sae, 1), DType::F32, v.device())?;
    let ones = Tensor::ones((v.dim(0)?, 1), DType::F32, v.device())?;
    crate::pairs::add_pair_rows(&sums, features, v, &ones)?;
    Ok(sums.squeeze(1)?)
}

/// The sums over the rows (tokens) of `t` (`[n, c]`), as `[c]`: a product with a row of ones
/// (in f32 as `t` is, whatever the compute dtype), which reads `t` once and in order on every
/// device. candle's reduction over a leading dimension gives each output a block of threads
/// that reads its column with strided loads, an index computed per element: at `[4,096,
/// 65,536]` about eight times the traffic of the matrix itself.
fn column_sums(t: &Tensor) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if rows == 0 {
        // No product with an inner dimension of zero (a replica without rows).
        return Ok(Tensor::zeros(cols, t.dtype(), t.device())?);
    }
    let ones = Tensor::ones((1, rows), t.dtype(), t.device())?;
    Ok(ones.matmul(&gemm_operand(t)?)?.squeeze(0)?)
}

/// `t` itself when cuBLAS can read it as a matrix, row-major (`[r, c]` with strides `[c, 1]`)
/// or column-major (strides `[1, r]`), as candle's CUDA matmul requires; a contiguous copy
/// otherwise. A narrowed `[r, c]` view of a wider matrix has a leading dimension of its parent's
/// width, which candle's CUDA matmul refuses ("non-contiguous") where the CPU's accepts it.
fn gemm_operand(t: &Tensor) -> Result<Tensor> {
    let ok = match (t.dims(), t.stride()) {
        (&[r, c], &[s0, s1]) => {
            ((s1 == 1 || c == 1) && (s0 == c || r == 1))
                || ((s1 == r || c == 1) && (s0 == 1 || r == 1))
        }
        _ => t.is_contiguous(),
    };
    Ok(if ok { t.clone() } else { t.contiguous()? })
}

/// `acc[start..start + rows] += part` in place (`part` is `[rows, ...]`).
fn add_rows(acc: &Tensor, part: &Tensor, start: usize) -> Result<()> {
    let len = part.dim(0)?;
    let sum = (acc.narrow(0, start, len)? + part)?;
    acc.slice_set(&sum, 0, start)?;
    Ok(())
}

/// A counter tensor (f64 on the device) as host counts.
fn counts(t: &Tensor) -> Result<Vec<u64>> {
    Ok(t.to_vec1::<f64>()?.into_iter().map(|v| v as u64).collect())
}

/// Tensors in `names`' order as host parameters (`b_dec` is the one not per feature).
fn to_host(names: &[&str], set: &[Tensor]) -> Result<Params> {
    let list = names
        .iter()
        .zip(set)
        .map(|(name, t)| {
            Ok(Param::new(
                name,
                t.dims(),
                *name != "b_dec",
                t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Params::new(list))
}

/// `reduce` over all of `t`'s values flattened, or `empty` (0-dimensional f32) when it has none
/// (candle refuses to reduce nothing; a replica may have no rows).
/// BatchTopK's codes among ReLU'd pre-activations `values`: 1 where above `threshold` (as
/// f32), the values there (zero elsewhere), and the smallest of them (infinite when none is).
fn above_threshold(values: &Tensor, threshold: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let mask = values.broadcast_gt(threshold)?;
    let on = mask.to_dtype(DType::F32)?;
    let codes = (values * &on)?;
    let kept = mask.where_cond(
        values,
        &Tensor::full(f32::INFINITY, values.dims(), values.device())?,
    )?;
    Ok((on, codes, extreme_or(&kept, f32::INFINITY, |v| v.min(0))?))
}

fn extreme_or(
    t: &Tensor,
    empty: f32,
    reduce: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    if t.elem_count() == 0 {
        return Ok(Tensor::new(empty, t.device())?);
    }
    Ok(reduce(&t.flatten_all()?)?)
}

/// How many codes BatchTopK keeps in a batch of `n_total` tokens (at least one).
fn batch_topk_count(k: f64, n_total: usize) -> f64 {
    ((k * n_total as f64) as usize).max(1) as f64
}

/// Each row's `k` largest entries' column indices, `[rows, k]` u32, largest first. Ties may
/// pick different columns than a full sort (the values are the same).
///
/// Rows wider than one sort takes ([`TOP_K_CHUNK`], or `2k`) are first cut to candidates
/// (`top_k_by_blocks`) where their width allows, else ranked in chunks (`top_k_chunked`).
pub(crate) fn top_k_indices(t: &Tensor, k: usize) -> Result<Tensor> {
    let one_sort = TOP_K_CHUNK.max((2 * k).next_power_of_two());
    let cols = t.dim(1)?;
    if cols > one_sort
        && let Some(block) = candidate_block(cols, k)
    {
        return top_k_by_blocks(t, k, block);
    }
    top_k_chunked(t, k, one_sort)
}

/// The block width for `top_k_by_blocks` on rows of `cols`: a power of two near
/// `sqrt(cols / k)`, which makes its two rankings (the blocks' maxima, `cols / block` wide,
/// and the candidates, `k · block` wide) about equal, dividing `cols`, and leaving more than
/// `k` blocks; `None` where no block does (`top_k_chunked` then ranks the rows).
fn candidate_block(cols: usize, k: usize) -> Option<usize> {
    if k == 0 {
        return None;
    }
    let ideal = ((cols as f64 / k as f64).sqrt().log2().round().max(1.0)) as u32;
    (1..=ideal)
        .rev()
        .map(|e| 1usize << e)
        .find(|&b| cols.is_multiple_of(b) && cols / b > k && k * b < cols)
}

/// The top `k` of each row from candidates: the row is cut into blocks of `block` columns, the
/// `k` blocks with the largest maxima are kept, and the top `k` of their `k · block` entries
/// are the row's. No entry of another block can be in the row's top `k`: its block's maximum
/// is at most the `k`-th largest maximum, and those `k` maxima are `k` entries at least as
/// large. So where sorting every column costs `log² cols` passes over the row (candle's CUDA
/// sort is bitonic), this costs one pass for the maxima and two rankings of about
/// `sqrt(cols · k)` entries: at 65,536 columns and k = 32, 1,024 and 2,048 entries instead of
/// 16 sorts of 4,096 and one more.
fn top_k_by_blocks(t: &Tensor, k: usize, block: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let t = t.contiguous()?;
    let maxima = t.reshape((rows, cols / block, block))?.max(D::Minus1)?;
    let blocks = top_k_indices(&maxima, k)?;
    let first = blocks.broadcast_mul(&Tensor::new(&[block as u32], t.device())?)?;
    let within = Tensor::arange(0u32, block as u32, t.device())?.reshape((1, 1, block))?;
    let candidates = first
        .unsqueeze(2)?
        .broadcast_add(&within)?
        .reshape((rows, k * block))?;
    let best = top_k_indices(&t.gather(&candidates, 1)?, k)?;
    Ok(candidates.gather(&best, 1)?.contiguous()?)
}

fn top_k_chunked(t: &Tensor, k: usize, chunk: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if cols <= chunk {
        return Ok(t
            .contiguous()?
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, k)?
            .contiguous()?);
    }
    let full = cols / chunk;
    let body = t
        .narrow(1, 0, full * chunk)?
        .contiguous()?
        .reshape((rows * full, chunk))?;
    let local = body
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .reshape((rows, full, k))?;
    let starts = Tensor::arange_step(0u32, (full * chunk) as u32, chunk as u32, t.device())?
        .reshape((1, full, 1))?;
    let mut candidates = vec![local.broadcast_add(&starts)?.reshape((rows, full * k))?];
    let tail = cols - full * chunk;
    if tail > 0 {
        let last = t.narrow(1, full * chunk, tail)?.contiguous()?;
        let kept = last.arg_sort_last_dim(false)?.narrow(1, 0, k.min(tail))?;
        let start = Tensor::new(&[(full * chunk) as u32], t.device())?;
        candidates.push(kept.broadcast_add(&start)?);
    }
    let idx = Tensor::cat(&candidates, 1)?.contiguous()?;
    let best = top_k_chunked(&t.gather(&idx, 1)?, k, chunk)?;
    Ok(idx.gather(&best, 1)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn full_sort(t: &Tensor, k: usize) -> Vec<Vec<u32>> {
        t.arg_sort_last_dim(false)
            .unwrap()
            .narrow(1, 0, k)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    /// Chunked ranking picks each row's k largest in order, for widths that are and are not a
    /// multiple of the chunk, several levels deep, k up to half the chunk.
    #[test]
    fn chunked_top_k_is_the_full_sort() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for cols in [9, 16, 17, 40, 64, 100, 257] {
            for k in [1, 2, 3, 4] {
                let v: Vec<f32> = (0..5 * cols).map(|_| rng.random::<f32>()).collect();
                let t = Tensor::from_vec(v, (5, cols), &Device::Cpu).unwrap();
                let got: Vec<Vec<u32>> = top_k_chunked(&t, k, 8).unwrap().to_vec2().unwrap();
                assert_eq!(got, full_sort(&t, k), "{cols} columns, k {k}");
            }
        }
    }

    /// The top k from the blocks with the largest maxima is the full sort's, at the widths and
    /// k the step ranks (the main top-k, AuxK's, a width that is not a power of two), through
    /// `top_k_indices` (which takes that way for rows wider than one sort); with rows of equal
    /// entries (AuxK's live features at -1e30) the values still are the top k's.
    #[test]
    fn top_k_from_block_candidates_is_the_full_sort() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (cols, k) in [
            (8192, 1),
            (8192, 32),
            (65536, 32),
            (65536, 1024),
            (12288, 64),
        ] {
            let block = candidate_block(cols, k).expect("a block");
            let v: Vec<f32> = (0..3 * cols).map(|_| rng.random::<f32>() - 0.5).collect();
            let t = Tensor::from_vec(v, (3, cols), &Device::Cpu).unwrap();
            let want = full_sort(&t, k);
            let got: Vec<Vec<u32>> = top_k_by_blocks(&t, k, block).unwrap().to_vec2().unwrap();
            assert_eq!(got, want, "{cols} columns, k {k}, blocks of {block}");
            let got: Vec<Vec<u32>> = top_k_indices(&t, k).unwrap().to_vec2().unwrap();
            assert_eq!(got, want, "{cols} columns, k {k}, through top_k_indices");
        }
        // Ties: a few finite entries among many equal ones.
        let cols = 16384;
        let mut v = vec![-1e30f32; 2 * cols];
        for (i, x) in [(5, 3.0), (9000, 2.0), (cols + 1, 1.0), (cols + 16000, 4.0)] {
            v[i] = x;
        }
        let t = Tensor::from_vec(v, (2, cols), &Device::Cpu).unwrap();
        let got = top_k_indices(&t, 40).unwrap();
        let vals: Vec<Vec<f32>> = t.gather(&got, 1).unwrap().to_vec2().unwrap();
        let want: Vec<Vec<f32>> = t
            .gather(
                &t.arg_sort_last_dim(false)
                    .unwrap()
                    .narrow(1, 0, 40)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
                1,
            )
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(vals, want);
        assert_eq!(candidate_block(100, 60), None);
        assert_eq!(candidate_block(4097, 8), None, "an odd width has no block");
    }

    /// A column block of a wider matrix, transposed, has a leading dimension cuBLAS refuses, so
    /// it is copied; a whole matrix, plain or transposed, goes to the product as it is.
    #[test]
    fn only_operands_cublas_cannot_read_are_copied() {
        let m = Tensor::arange(0f32, 48., &Device::Cpu)
            .unwrap()
            .reshape((6, 8))
            .unwrap();
        let block = m.narrow(1, 2, 3).unwrap().t().unwrap();
        assert!(!block.is_contiguous());
        let copied = gemm_operand(&block).unwrap();
        assert!(copied.is_contiguous());
        assert_eq!(
            copied.to_vec2::<f32>().unwrap(),
            block.to_vec2::<f32>().unwrap()
        );
        for whole in [m.clone(), m.t().unwrap()] {
            let kept = gemm_operand(&whole).unwrap();
            assert_eq!(kept.stride(), whole.stride(), "{:?}", whole.dims());
        }
        // A row block of a row-major matrix keeps its layout too.
        let rows = m.narrow(0, 1, 2).unwrap();
        assert_eq!(gemm_operand(&rows).unwrap().stride(), rows.stride());
    }

    /// Rows mostly -inf (AuxK's ranking with few dead features): the finite entries come first
    /// and every index stays inside the row.
    #[test]
    fn chunked_top_k_with_masked_rows_stays_in_range() {
        let cols = 70;
        let mut v = vec![f32::NEG_INFINITY; 2 * cols];
        v[3] = 1.0;
        v[cols + 69] = 2.0;
        v[cols + 20] = 0.5;
        let t = Tensor::from_vec(v, (2, cols), &Device::Cpu).unwrap();
        let got: Vec<Vec<u32>> = top_k_chunked(&t, 4, 8).unwrap().to_vec2().unwrap();
        assert_eq!(got[0][0], 3);
        assert_eq!(&got[1][..2], &[69, 20]);
        assert!(
            got.iter().flatten().all(|&i| (i as usize) < cols),
            "{got:?}"
        );
    }
}
