//! The two traits every architecture implements, and the maths they share.
//!
//! [`Sae`] is inference: sparse codes for a batch and the reconstruction from codes.
//! [`TrainableSae`] adds one hand-written forward + backward pass, the hooks a recipe needs
//! around the optimizer step (decoder-norm constraint, threshold updates), and the export to the
//! SAELens inference layout. Each built-in architecture is one file in this module; adding one is
//! adding one file (and, outside this crate, implementing the two traits: see
//! `tests/sae_testkit_external.rs` at the workspace root).
//!
//! # Layout
//! Parameters use SAELens's names. One layout differs from the file: `W_enc` is kept
//! feature-major, `[d_sae, d_in]` (sparsify's `encoder.weight`), so that a feature's encoder row is
//! contiguous for the sparse gradient; it is transposed to `[d_in, d_sae]` on export.

mod batchtopk;
mod gated;
mod jumprelu;
mod matryoshka;
pub(crate) mod standard;
mod topk;

use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::SparseCodes;
use crate::config::{CommonConfig, SaeConfig};
use crate::error::{Result, SaeError};
use crate::kernels::{self, PairSet};
use crate::params::{Param, Params};

pub use batchtopk::{BatchTopKSae, BatchTopKTraining};
pub use gated::{GatedSae, GatedTraining};
pub use jumprelu::{JumpReluSae, JumpReluTraining};
pub use matryoshka::{MatryoshkaSae, MatryoshkaTraining};
pub use standard::{StandardSae, StandardTraining};
pub use topk::{TopKSae, TopKTraining};

/// A batch of activations on the host: `x` is `[n, d_in]` row-major.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub x: &'a [f32],
    pub n: usize,
    pub d_in: usize,
}

impl<'a> Batch<'a> {
    /// Wraps `x`, checking its length and that every value is finite.
    ///
    /// # Errors
    /// [`SaeError::WrongDIn`], [`SaeError::NonFiniteInput`].
    pub fn new(x: &'a [f32], d_in: usize) -> Result<Self> {
        let n = kernels::check_batch(x, d_in, "batch")?;
        Ok(Batch { x, n, d_in })
    }
}

/// What the trainer tells an architecture about the current step.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// Sparsity-coefficient warm-up factor in `[0, 1]`; the architecture multiplies its own
    /// coefficient (L1 or L0) by it.
    pub sparsity_scale: f32,
    /// Features judged dead (no activation within the trainer's window); AuxK uses them.
    pub dead: &'a [bool],
    /// Where the dense encoder product runs.
    pub device: &'a Device,
}

/// Losses and codes of one forward pass. Losses follow SAELens: squared error summed over
/// `d_in` and averaged over tokens.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// Total loss that the gradients are of.
    pub loss: f64,
    /// Reconstruction term.
    pub mse: f64,
    /// L1 / L0 penalty (after the coefficient).
    pub sparsity_loss: f64,
    /// Auxiliary terms (AuxK, gated's via-gate reconstruction, Matryoshka's inner prefixes),
    /// after their coefficients.
    pub aux_loss: f64,
    /// Feature activations used for the reconstruction.
    pub codes: SparseCodes,
    /// Per-token squared reconstruction error (for FVU and resampling).
    pub per_token_sq_err: Vec<f32>,
}

/// A tensor in file layout: (name, shape, values).
pub type FileTensor = (String, Vec<usize>, Vec<f32>);

/// Inference: codes and reconstructions on host buffers.
pub trait Sae: Send + Sync {
    /// SAELens architecture name.
    fn architecture(&self) -> &str;
    fn d_in(&self) -> usize;
    fn d_sae(&self) -> usize;
    /// Parameters (see the module docs for the layout).
    fn params(&self) -> &Params;
    /// Feature activations of `x` (`[n, d_in]`), as the SAE would compute them at inference.
    ///
    /// # Errors
    /// Wrong `d_in`, non-finite input, candle errors.
    fn encode_host(&self, x: &[f32], n: usize) -> Result<SparseCodes>;
    /// Reconstruction `[n, d_in]` from codes: `Σ a_f W_dec[f] + b_dec`.
    ///
    /// # Errors
    /// If `codes.d_sae` differs from the SAE's.
    fn decode_host(&self, codes: &SparseCodes) -> Result<Vec<f32>> {
        linear_decode(self.params(), self.d_in(), self.d_sae(), codes)
    }
}

/// Training: one hand-written forward + backward pass and the recipe's hooks.
pub trait TrainableSae: Sae {
    fn params_mut(&mut self) -> &mut Params;
    /// Loss and gradients for one batch; `grads` has the layout of [`Sae::params`] and every
    /// entry is overwritten.
    ///
    /// # Errors
    /// Candle errors from the encoder product; shape errors.
    fn forward_backward(
        &self,
        batch: &Batch<'_>,
        ctx: &StepContext<'_>,
        grads: &mut Params,
    ) -> Result<StepOutput>;
    /// Adjusts gradients before the optimizer (e.g. removes the decoder-parallel component).
    fn constrain_gradients(&self, _grads: &mut Params) -> Result<()> {
        Ok(())
    }
    /// Runs after the optimizer step (e.g. renormalises decoder rows, updates thresholds).
    fn after_optimizer_step(&mut self, _out: &StepOutput) -> Result<()> {
        Ok(())
    }
    /// Parameters whose gradient is a straight-through estimate rather than a derivative, so a
    /// finite-difference check must skip them.
    fn pseudo_gradient_params(&self) -> &[&str] {
        &[]
    }
    /// Whether decoder rows are kept at unit norm.
    fn unit_norm_decoder(&self) -> bool {
        false
    }
    /// The most features any token may activate (TopK's k).
    fn max_l0(&self) -> Option<usize> {
        None
    }
    /// The SAELens inference config and tensors (file layout) for `params` (which may be a
    /// scaled copy of [`Sae::params`]). `common` carries `d_in`, `d_sae` and metadata.
    ///
    /// # Errors
    /// Missing parameters.
    fn export(&self, params: &Params, common: CommonConfig)
    -> Result<(SaeConfig, Vec<FileTensor>)>;
    /// State beyond the parameters that a checkpoint must keep (e.g. BatchTopK's threshold).
    fn state_json(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores [`TrainableSae::state_json`].
    fn load_state_json(&mut self, _v: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// Re-initialises `dead` features from badly reconstructed inputs (Towards Monosemanticity's
    /// resampling). Returns the features that were reset, whose optimizer state the trainer then
    /// clears. Architectures without a resampling recipe return an empty list.
    fn resample_dead(
        &mut self,
        _dead: &[usize],
        _batch: &Batch<'_>,
        _per_token_sq_err: &[f32],
        _seed: u64,
    ) -> Result<Vec<usize>> {
        Ok(Vec::new())
    }
}

/// How decoder rows are treated during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderNorm {
    /// Rows kept at unit norm: the gradient component parallel to each row is removed before the
    /// optimizer step and rows are renormalised after it (Towards Monosemanticity, OpenAI TopK).
    Unit,
    /// Rows are free; initialised to norm `decoder_init_norm`.
    Free,
}

/// Random init shared by the ReLU family: decoder rows with random directions at `row_norm`, the
/// encoder as the decoder's transpose (OpenAI TopK, Anthropic's April 2024 update), zero biases.
pub(crate) fn init_linear(d_in: usize, d_sae: usize, row_norm: f32, seed: u64) -> Params {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w_dec: Vec<f32> = (0..d_sae * d_in)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    kernels::normalize_rows(&mut w_dec, d_in);
    w_dec.iter_mut().for_each(|v| *v *= row_norm);
    let w_enc = w_dec.clone();
    Params::new(vec![
        Param::new("W_enc", &[d_sae, d_in], true, w_enc),
        Param::zeros("b_enc", &[d_sae], true),
        Param::new("W_dec", &[d_sae, d_in], true, w_dec),
        Param::zeros("b_dec", &[d_in], false),
    ])
}

/// Checks that `params` holds exactly `names` with the shapes the architecture needs.
pub(crate) fn check_params(
    params: &Params,
    arch: &str,
    expected: &[(&str, Vec<usize>)],
) -> Result<()> {
    for (name, shape) in expected {
        let p = params.get(name).map_err(|_| SaeError::MissingTensor {
            file: "<parameters>".into(),
            name: name.to_string(),
            architecture: arch.to_string(),
            expected: expected.iter().map(|e| e.0.to_string()).collect(),
        })?;
        if &p.shape != shape {
            return Err(SaeError::ShapeMismatch {
                what: format!("{arch} parameter {name}"),
                expected: shape.clone(),
                got: p.shape.clone(),
            });
        }
    }
    Ok(())
}

/// Input with the pre-encoder bias removed, when the SAE ties it to `b_dec`.
pub(crate) fn centered(
    params: &Params,
    x: &[f32],
    d_in: usize,
    apply_b_dec: bool,
) -> Result<Vec<f32>> {
    Ok(kernels::center(
        x,
        d_in,
        if apply_b_dec {
            Some(params.data("b_dec")?)
        } else {
            None
        },
    ))
}

/// Inference's pre-activations on the CPU, before `b_enc`: the input centred (where the SAE
/// subtracts `b_dec`) times `W_enc`, which every architecture's `encode_host` starts from.
pub(crate) fn host_preacts(
    params: &Params,
    x: &[f32],
    n: usize,
    d_in: usize,
    d_sae: usize,
    apply_b_dec: bool,
) -> Result<kernels::PreActs> {
    let xc = centered(params, x, d_in, apply_b_dec)?;
    kernels::encoder_preacts(&xc, n, d_in, params.data("W_enc")?, d_sae, &Device::Cpu)
}

/// `Σ a_f W_dec[f] + b_dec`.
pub(crate) fn linear_decode(
    params: &Params,
    d_in: usize,
    d_sae: usize,
    codes: &SparseCodes,
) -> Result<Vec<f32>> {
    if codes.d_sae != d_sae {
        return Err(SaeError::ShapeMismatch {
            what: "codes".into(),
            expected: vec![codes.n_tokens, d_sae],
            got: vec![codes.n_tokens, codes.d_sae],
        });
    }
    codes.validate()?;
    Ok(kernels::decode_sparse(
        &codes.offsets,
        &codes.features,
        &codes.values,
        params.data("W_dec")?,
        d_in,
        Some(params.data("b_dec")?),
    ))
}

/// Gradient of the shared linear parts from per-pair coefficients.
///
/// `sets` give the decoder contributions (activation × reconstruction gradient) and encoder
/// contributions (pre-activation gradient × centred input); `b_dec_direct` is the gradient that
/// reaches `b_dec` through the decoders it is added to; `dec_extra[f]` adds `c_f · W_dec[f]` (the
/// derivative of a decoder-norm-weighted penalty). Writes `W_enc`, `W_dec`, `b_dec` in `grads`
/// and returns the per-feature sum of pre-activation gradients (the encoder-bias gradient).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    params: &Params,
    grads: &mut Params,
    d_in: usize,
    d_sae: usize,
    apply_b_dec: bool,
    sets: &[PairSet<'_>],
    xc: &[f32],
    b_dec_direct: Vec<f32>,
    dec_extra: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let [g_w_enc, g_w_dec, g_b_dec] = grads.many_mut(["W_enc", "W_dec", "b_dec"])?;
    let g_pre_sum = kernels::feature_rows(d_sae, d_in, sets, xc, g_w_dec, g_w_enc);
    let w_dec = params.data("W_dec")?;
    if let Some(extra) = dec_extra {
        use rayon::prelude::*;
        g_w_dec
            .par_chunks_mut(d_in)
            .zip(w_dec.par_chunks(d_in))
            .zip(extra.par_iter())
            .for_each(|((g, w), &c)| {
                if c != 0.0 {
                    kernels::axpy(c, w, g);
                }
            });
    }
    g_b_dec.copy_from_slice(&b_dec_direct);
    if apply_b_dec {
        let through_enc = kernels::weighted_row_sum(&g_pre_sum, params.data("W_enc")?, d_in);
        for (g, v) in g_b_dec.iter_mut().zip(through_enc) {
            *g -= v;
        }
    }
    Ok(g_pre_sum)
}

/// Export for architectures whose parameters are SAELens's (only `W_enc` transposed back).
pub(crate) fn export_tensors(params: &Params, d_in: usize, d_sae: usize) -> Vec<FileTensor> {
    params
        .iter()
        .map(|p| {
            if p.name == "W_enc" {
                (
                    p.name.clone(),
                    vec![d_in, d_sae],
                    transpose(&p.data, d_sae, d_in),
                )
            } else {
                (p.name.clone(), p.shape.clone(), p.data.clone())
            }
        })
        .collect()
}

/// Row-major `[r, c]` -> `[c, r]`.
pub fn transpose(m: &[f32], r: usize, c: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0.0f32; m.len()];
    out.par_chunks_mut(r).enumerate().for_each(|(j, row)| {
        for (i, v) in row.iter_mut().enumerate() {
            *v = m[i * c + j];
        }
    });
    out
}

/// Shared AuxK machinery (OpenAI TopK): the `k_aux` largest pre-activations among dead features
/// reconstruct the main reconstruction's residual (detached).
pub(crate) struct AuxK {
    pub offsets: Vec<usize>,
    pub features: Vec<u32>,
    pub values: Vec<f32>,
    /// `dL_aux/d recon_aux` per token, `[n, d_in]`.
    pub d_vecs: Vec<f32>,
    /// Per-pair gradient of the aux loss with respect to the pre-activation.
    pub g_pre: Vec<f32>,
    pub loss: f64,
}

/// Computes the AuxK term, following SAELens 6.54's `calculate_topk_aux_loss`:
/// `k_aux = min(aux_k, n_dead)`, loss scaled by `min(n_dead / aux_k, 1)`, no ReLU on the aux
/// activations, reconstruction without `b_dec`, residual `x - x̂` treated as a constant.
/// `pre_row(t, f)` is the pre-activation; `resid_row` is `x - x̂` per token.
#[allow(clippy::too_many_arguments)]
pub(crate) fn aux_k(
    pre: &[f32],
    b_enc: &[f32],
    d_sae: usize,
    d_in: usize,
    n: usize,
    dead: &[bool],
    aux_k: usize,
    coefficient: f32,
    residual: &[f32],
    w_dec: &[f32],
) -> Option<AuxK> {
    use rayon::prelude::*;
    let dead_idx: Vec<u32> = (0..d_sae as u32).filter(|&f| dead[f as usize]).collect();
    if dead_idx.is_empty() || aux_k == 0 || coefficient == 0.0 {
        return None;
    }
    let scale = (dead_idx.len() as f32 / aux_k as f32).min(1.0);
    let k = aux_k.min(dead_idx.len());
    let rows: Vec<Vec<(u32, f32)>> = (0..n)
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(buf, out), t| {
                let row = &pre[t * d_sae..(t + 1) * d_sae];
                kernels::top_k(
                    dead_idx
                        .iter()
                        .map(|&f| (f, row[f as usize] + b_enc[f as usize])),
                    k,
                    buf,
                    out,
                );
                out.clone()
            },
        )
        .collect();
    let codes = SparseCodes::from_rows(d_sae, rows);
    // recon - residual, then its gradient.
    let c = coefficient * scale;
    let (d_vecs, sq, g_pre) = kernels::decode_residual_dots(
        &codes.offsets,
        &codes.features,
        &codes.values,
        w_dec,
        d_in,
        None,
        residual,
        2.0 * c / n as f32,
    );
    let loss = c as f64 * kernels::sum_f64(&sq) / n as f64;
    Some(AuxK {
        offsets: codes.offsets,
        features: codes.features,
        values: codes.values,
        d_vecs,
        g_pre,
        loss,
    })
}

/// A further reconstruction from part of the selected pairs (a Matryoshka prefix), with the
/// gradient of its loss: `d_xhat` per token and `dots` per pair, as [`reconstruction`] returns.
pub(crate) struct PartialReconstruction {
    pub codes: SparseCodes,
    pub d_xhat: Vec<f32>,
    pub dots: Vec<f32>,
}

/// The ReLU family's (standard, TopK, BatchTopK, Matryoshka) backward from selected pairs: the
/// main pairs with their activations and pre-activation gradients, any partial reconstructions,
/// plus an optional AuxK term.
#[allow(clippy::too_many_arguments)]
pub(crate) fn relu_family_backward(
    params: &Params,
    grads: &mut Params,
    d_in: usize,
    d_sae: usize,
    apply_b_dec: bool,
    codes: &SparseCodes,
    g_pre: &[f32],
    d_xhat: &[f32],
    xc: &[f32],
    partials: &[PartialReconstruction],
    aux: Option<&AuxK>,
    dec_extra: Option<&[f32]>,
) -> Result<()> {
    let mut sets = vec![PairSet {
        offsets: &codes.offsets,
        features: &codes.features,
        dec_coef: Some(&codes.values),
        dec_vecs: d_xhat,
        enc_coef: Some(g_pre),
    }];
    // Every reconstruction's error gradient reaches b_dec.
    let mut b_dec_direct = kernels::sum_rows(d_xhat, d_in, 1.0);
    for r in partials {
        sets.push(PairSet {
            offsets: &r.codes.offsets,
            features: &r.codes.features,
            dec_coef: Some(&r.codes.values),
            dec_vecs: &r.d_xhat,
            enc_coef: Some(&r.dots),
        });
        for (acc, v) in b_dec_direct
            .iter_mut()
            .zip(kernels::sum_rows(&r.d_xhat, d_in, 1.0))
        {
            *acc += v;
        }
    }
    if let Some(a) = aux {
        sets.push(PairSet {
            offsets: &a.offsets,
            features: &a.features,
            dec_coef: Some(&a.values),
            dec_vecs: &a.d_vecs,
            enc_coef: Some(&a.g_pre),
        });
    }
    let g_b_enc = linear_backward(
        params,
        grads,
        d_in,
        d_sae,
        apply_b_dec,
        &sets,
        xc,
        b_dec_direct,
        dec_extra,
    )?;
    grads.data_mut("b_enc")?.copy_from_slice(&g_b_enc);
    Ok(())
}

/// `(d_xhat, per_token_sq_err, mse, dots)`, see [`reconstruction`].
pub(crate) type Reconstruction = (Vec<f32>, Vec<f32>, f64, Vec<f32>);

/// Reconstruction, its loss and its gradient for the main decode: returns
/// `(d_xhat, per_token_sq_err, mse, dots)` where `d_xhat = 2 (x̂ - x) / n` and
/// `dots[p] = d_xhat_t · W_dec[f]` for every pair (the gradient reaching each pair's activation).
pub(crate) fn reconstruction(
    params: &Params,
    d_in: usize,
    codes: &SparseCodes,
    x: &[f32],
) -> Result<Reconstruction> {
    let n = codes.n_tokens;
    let (d_xhat, sq, dots) = kernels::decode_residual_dots(
        &codes.offsets,
        &codes.features,
        &codes.values,
        params.data("W_dec")?,
        d_in,
        Some(params.data("b_dec")?),
        x,
        2.0 / n as f32,
    );
    let mse = kernels::sum_f64(&sq) / n as f64;
    Ok((d_xhat, sq, mse, dots))
}

/// `x - x̂` from `d_xhat = 2 (x̂ - x) / n`.
pub(crate) fn residual_from_grad(d_xhat: &[f32], n: usize) -> Vec<f32> {
    let s = -(n as f32) / 2.0;
    d_xhat.iter().map(|v| v * s).collect()
}

/// Unit-norm decoder hooks shared by the architectures that constrain it.
pub(crate) fn unit_norm_constrain(params: &Params, grads: &mut Params, d_in: usize) -> Result<()> {
    let w = params.data("W_dec")?;
    kernels::remove_parallel_component(w, grads.data_mut("W_dec")?, d_in);
    Ok(())
}

/// Builds codes by running `select(row, out)` on every token's pre-activation row in parallel.
pub(crate) fn select_codes<F>(pre: &[f32], n: usize, d_sae: usize, select: F) -> SparseCodes
where
    F: Fn(&[f32], &mut Vec<(u32, f32)>, &mut Vec<(u32, f32)>) + Sync,
{
    use rayon::prelude::*;
    let rows: Vec<Vec<(u32, f32)>> = (0..n)
        .into_par_iter()
        .with_min_len(4)
        .map_init(Vec::new, |buf, t| {
            let mut out = Vec::new();
            select(&pre[t * d_sae..(t + 1) * d_sae], buf, &mut out);
            out
        })
        .collect();
    let mut c = SparseCodes::from_rows(d_sae, rows);
    c.n_tokens = n;
    c
}

/// Per-pair decoder-norm weights and the penalty's decoder-row coefficients for a penalty
/// `coef/n · Σ_t Σ_f w(a_tf) · ||W_dec[f]||`: returns (Σ_pairs w·norm, per-feature Σ_t w(a_tf)).
pub(crate) fn per_feature_sums(codes: &SparseCodes, weights: &[f32]) -> Vec<f32> {
    let mut s = vec![0.0f32; codes.d_sae];
    for (&f, &w) in codes.features.iter().zip(weights) {
        s[f as usize] += w;
    }
    s
}

/// The AuxK term of a TopK-family step, or `None` when no feature is dead: reads the dead
/// features' pre-activations from `pre` and the residual from `d_xhat`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dead_features_aux(
    pre: &kernels::PreActs,
    params: &Params,
    ctx: &StepContext<'_>,
    d_xhat: &[f32],
    n: usize,
    d_in: usize,
    d_sae: usize,
    aux_k_cfg: Option<usize>,
    coefficient: f32,
) -> Result<Option<AuxK>> {
    if !ctx.dead.iter().any(|&d| d) {
        return Ok(None);
    }
    let residual = residual_from_grad(d_xhat, n);
    let (b_enc, w_dec) = (params.data("b_enc")?, params.data("W_dec")?);
    pre.with_slice(|s| {
        aux_k(
            s,
            b_enc,
            d_sae,
            d_in,
            n,
            ctx.dead,
            aux_k_size(aux_k_cfg, d_in),
            coefficient,
            &residual,
            w_dec,
        )
    })
}

/// Resolves the AuxK size: the configured value or SAELens's default `d_in / 2`.
pub(crate) fn aux_k_size(aux_k: Option<usize>, d_in: usize) -> usize {
    aux_k.unwrap_or(d_in / 2).max(1)
}
