//! JumpReLU SAE (Rajamanoharan et al. 2024, <https://arxiv.org/abs/2407.14435>):
//! `a = v · H(v - θ)` with a learned per-feature threshold θ and an L0 penalty. The step function
//! has no useful derivative, so θ gets the paper's straight-through estimate with a rectangle
//! kernel of bandwidth ε (SAELens 6.54's `JumpReLU`/`Step` with `ste_to_input = false`):
//!
//! * `∂a/∂v = H(v - θ)`, `∂a/∂θ ≈ -(θ/ε) K((v - θ)/ε)`;
//! * `∂H(v - θ)/∂θ ≈ -(1/ε) K((v - θ)/ε)`, `K(u) = 1{|u| < 1/2}`.
//!
//! θ is a direct parameter clamped at 0 after each step, as in SAELens 6.54. Loss:
//! `Σ_d (x̂ - x)² + λ Σ_f H(v_f - θ_f)`, token-averaged. Only pairs with `v > θ - ε/2` carry any
//! gradient, so the step stays sparse once L0 is low.

use serde::{Deserialize, Serialize};

use super::standard::default_init_norm;
use super::{
    Batch, DecoderNorm, FileTensor, Sae, StepContext, StepOutput, TrainableSae, centered,
    check_params, export_tensors, host_preacts, init_linear, linear_backward, select_codes,
    unit_norm_constrain,
};
use crate::SparseCodes;
use crate::config::{CommonConfig, JumpReluConfig, SaeConfig};
use crate::error::Result;
use crate::kernels::{self, PairSet};
use crate::params::{Param, Params};

/// Training options for JumpReLU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JumpReluTraining {
    /// L0 coefficient λ (multiplied by the trainer's warm-up factor).
    #[serde(default = "one")]
    pub l0_coefficient: f32,
    /// Kernel bandwidth ε of the straight-through estimator.
    #[serde(default = "bandwidth")]
    pub bandwidth: f32,
    /// Initial threshold.
    #[serde(default = "init_thr")]
    pub init_threshold: f32,
    /// Decoder-row constraint (free in the paper and SAELens).
    #[serde(default = "free")]
    pub decoder_norm: DecoderNorm,
    /// Row norm at init when `decoder_norm` is `free`.
    #[serde(default = "default_init_norm")]
    pub decoder_init_norm: f32,
    /// Subtract `b_dec` before encoding.
    #[serde(default = "yes")]
    pub apply_b_dec_to_input: bool,
}

fn one() -> f32 {
    1.0
}
fn bandwidth() -> f32 {
    0.05
}
fn init_thr() -> f32 {
    0.01
}
fn free() -> DecoderNorm {
    DecoderNorm::Free
}
fn yes() -> bool {
    true
}

impl Default for JumpReluTraining {
    fn default() -> Self {
        JumpReluTraining {
            l0_coefficient: one(),
            bandwidth: bandwidth(),
            init_threshold: init_thr(),
            decoder_norm: DecoderNorm::Free,
            decoder_init_norm: default_init_norm(),
            apply_b_dec_to_input: true,
        }
    }
}

/// A JumpReLU SAE.
#[derive(Debug, Clone)]
pub struct JumpReluSae {
    d_in: usize,
    d_sae: usize,
    pub cfg: JumpReluTraining,
    params: Params,
}

impl JumpReluSae {
    /// Fresh random weights, every threshold at `init_threshold`.
    pub fn init(d_in: usize, d_sae: usize, cfg: JumpReluTraining, seed: u64) -> Self {
        let norm = match cfg.decoder_norm {
            DecoderNorm::Unit => 1.0,
            DecoderNorm::Free => cfg.decoder_init_norm,
        };
        let mut params = init_linear(d_in, d_sae, norm, seed);
        params.list.push(Param::new(
            "threshold",
            &[d_sae],
            true,
            vec![cfg.init_threshold.max(0.0); d_sae],
        ));
        JumpReluSae {
            d_in,
            d_sae,
            cfg,
            params,
        }
    }

    /// Wraps existing parameters (internal layout).
    ///
    /// # Errors
    /// Missing parameter or wrong shape.
    pub fn from_params(
        d_in: usize,
        d_sae: usize,
        cfg: JumpReluTraining,
        params: Params,
    ) -> Result<Self> {
        check_params(
            &params,
            "jumprelu",
            &[
                ("W_enc", vec![d_sae, d_in]),
                ("b_enc", vec![d_sae]),
                ("W_dec", vec![d_sae, d_in]),
                ("b_dec", vec![d_in]),
                ("threshold", vec![d_sae]),
            ],
        )?;
        Ok(JumpReluSae {
            d_in,
            d_sae,
            cfg,
            params,
        })
    }
}

impl Sae for JumpReluSae {
    fn architecture(&self) -> &str {
        "jumprelu"
    }
    fn d_in(&self) -> usize {
        self.d_in
    }
    fn d_sae(&self) -> usize {
        self.d_sae
    }
    fn params(&self) -> &Params {
        &self.params
    }
    /// SAELens inference: `ReLU(v) · [v > θ]`.
    fn encode_host(&self, x: &[f32], n: usize) -> Result<SparseCodes> {
        let pre = host_preacts(
            &self.params,
            x,
            n,
            self.d_in,
            self.d_sae,
            self.cfg.apply_b_dec_to_input,
        )?;
        let b_enc = self.params.data("b_enc")?;
        let thr = self.params.data("threshold")?;
        pre.with_slice(|p| super::batchtopk::threshold_codes(p, b_enc, thr, n, self.d_sae))
    }
}

impl TrainableSae for JumpReluSae {
    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    fn forward_backward(
        &self,
        batch: &Batch<'_>,
        ctx: &StepContext<'_>,
        grads: &mut Params,
    ) -> Result<StepOutput> {
        let (n, d_in, d_sae) = (batch.n, self.d_in, self.d_sae);
        let p = &self.params;
        let eps = self.cfg.bandwidth;
        let xc = centered(p, batch.x, d_in, self.cfg.apply_b_dec_to_input)?;
        let pre = kernels::encoder_preacts(&xc, n, d_in, p.data("W_enc")?, d_sae, ctx.device)?;
        let b_enc = p.data("b_enc")?;
        let thr = p.data("threshold")?;
        // Candidates: every pair that is active or inside the estimator's window; value = v.
        let cand = pre.with_slice(|s| {
            select_codes(s, n, d_sae, |row, _buf, out| {
                for (f, ((&pv, &b), &th)) in row.iter().zip(b_enc).zip(thr).enumerate() {
                    let v = pv + b;
                    if v > th - 0.5 * eps {
                        out.push((f as u32, v));
                    }
                }
            })
        })?;
        drop(pre);
        let acts: Vec<f32> = cand
            .features
            .iter()
            .zip(&cand.values)
            .map(|(&f, &v)| if v > thr[f as usize] { v } else { 0.0 })
            .collect();
        let codes = SparseCodes {
            values: acts,
            ..cand.clone()
        };
        let (d_xhat, sq, mse, g_a) = super::reconstruction(p, d_in, &codes, batch.x)?;
        let lambda = self.cfg.l0_coefficient * ctx.sparsity_scale;
        let per_tok = lambda / n as f32;
        let mut g_pre = vec![0.0f32; g_a.len()];
        let mut g_thr = vec![0.0f32; d_sae];
        let mut l0_count = 0u64;
        for i in 0..g_a.len() {
            let f = cand.features[i] as usize;
            let v = cand.values[i];
            let th = thr[f];
            if v > th {
                g_pre[i] = g_a[i];
                l0_count += 1;
            }
            if ((v - th) / eps).abs() < 0.5 {
                g_thr[f] += -(th / eps) * g_a[i] - per_tok / eps;
            }
        }
        let sparsity_loss = per_tok as f64 * l0_count as f64;
        let sets = [PairSet {
            offsets: &codes.offsets,
            features: &codes.features,
            dec_coef: Some(&codes.values),
            dec_vecs: &d_xhat,
            enc_coef: Some(&g_pre),
        }];
        let b_dec_direct = kernels::sum_rows(&d_xhat, d_in, 1.0);
        let g_b_enc = linear_backward(
            p,
            grads,
            d_in,
            d_sae,
            self.cfg.apply_b_dec_to_input,
            &sets,
            &xc,
            b_dec_direct,
            None,
        )?;
        grads.data_mut("b_enc")?.copy_from_slice(&g_b_enc);
        grads.data_mut("threshold")?.copy_from_slice(&g_thr);
        let mut codes = codes;
        compact(&mut codes);
        Ok(StepOutput {
            loss: mse + sparsity_loss,
            mse,
            sparsity_loss,
            aux_loss: 0.0,
            codes,
            per_token_sq_err: sq,
        })
    }

    fn constrain_gradients(&self, grads: &mut Params) -> Result<()> {
        if self.cfg.decoder_norm == DecoderNorm::Unit {
            unit_norm_constrain(&self.params, grads, self.d_in)?;
        }
        Ok(())
    }

    fn after_optimizer_step(&mut self, _out: &StepOutput) -> Result<()> {
        if self.cfg.decoder_norm == DecoderNorm::Unit {
            kernels::normalize_rows(self.params.data_mut("W_dec")?, self.d_in);
        }
        self.params
            .data_mut("threshold")?
            .iter_mut()
            .for_each(|t| *t = t.max(0.0));
        Ok(())
    }

    fn pseudo_gradient_params(&self) -> &[&str] {
        &["threshold"]
    }

    fn unit_norm_decoder(&self) -> bool {
        self.cfg.decoder_norm == DecoderNorm::Unit
    }

    fn export(
        &self,
        params: &Params,
        mut common: CommonConfig,
    ) -> Result<(SaeConfig, Vec<FileTensor>)> {
        common.apply_b_dec_to_input = self.cfg.apply_b_dec_to_input;
        Ok((
            SaeConfig::JumpRelu(JumpReluConfig { common }),
            export_tensors(params, self.d_in, self.d_sae),
        ))
    }
}

/// Drops zero-valued pairs (inactive candidates) so codes hold only firing features.
pub(crate) fn compact(codes: &mut SparseCodes) {
    let mut offsets = Vec::with_capacity(codes.offsets.len());
    offsets.push(0);
    let mut features = Vec::new();
    let mut values = Vec::new();
    for t in 0..codes.n_tokens {
        let (fs, vs) = codes.row(t);
        for (&f, &v) in fs.iter().zip(vs) {
            if v != 0.0 {
                features.push(f);
                values.push(v);
            }
        }
        offsets.push(features.len());
    }
    codes.offsets = offsets;
    codes.features = features;
    codes.values = values;
}
