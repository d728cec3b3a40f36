//! Gated SAE (Rajamanoharan et al. 2024, <https://arxiv.org/abs/2404.16014>): one encoder
//! product `h = (x - b_dec) W_enc` decides which features fire (`h + b_gate > 0`) and, rescaled
//! per feature, how strongly (`ReLU(h · exp(r_mag) + b_mag)`). The L1 penalty falls on the gate
//! path, `ReLU(π_gate) · ||W_dec[f]||`, and an auxiliary loss makes the gate path alone
//! reconstruct the input.
//!
//! The auxiliary reconstruction follows SAELens 6.54: it uses the live `W_dec` and `b_dec` (the
//! paper stops their gradient there), which keeps the whole loss differentiable and checkable
//! against finite differences.

use serde::{Deserialize, Serialize};

use super::standard::default_init_norm;
use super::{
    Batch, DecoderNorm, FileTensor, Sae, StepContext, StepOutput, TrainableSae, centered,
    check_params, export_tensors, init_linear, linear_backward, per_feature_sums, select_codes,
    unit_norm_constrain,
};
use crate::SparseCodes;
use crate::config::{CommonConfig, GatedConfig, SaeConfig};
use crate::error::Result;
use crate::kernels::{self, PairSet};
use crate::params::{Param, Params};

/// Training options for gated SAEs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatedTraining {
    /// L1 coefficient λ on the gate path.
    #[serde(default = "one")]
    pub l1_coefficient: f32,
    /// Decoder-row constraint (free in SAELens).
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
fn free() -> DecoderNorm {
    DecoderNorm::Free
}
fn yes() -> bool {
    true
}

impl Default for GatedTraining {
    fn default() -> Self {
        GatedTraining {
            l1_coefficient: one(),
            decoder_norm: DecoderNorm::Free,
            decoder_init_norm: default_init_norm(),
            apply_b_dec_to_input: true,
        }
    }
}

/// A gated SAE.
#[derive(Debug, Clone)]
pub struct GatedSae {
    d_in: usize,
    d_sae: usize,
    pub cfg: GatedTraining,
    params: Params,
}

fn expected(d_in: usize, d_sae: usize) -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("W_enc", vec![d_sae, d_in]),
        ("b_gate", vec![d_sae]),
        ("b_mag", vec![d_sae]),
        ("r_mag", vec![d_sae]),
        ("W_dec", vec![d_sae, d_in]),
        ("b_dec", vec![d_in]),
    ]
}

impl GatedSae {
    /// Fresh random weights; `b_gate`, `b_mag`, `r_mag` start at zero (SAELens).
    pub fn init(d_in: usize, d_sae: usize, cfg: GatedTraining, seed: u64) -> Self {
        let norm = match cfg.decoder_norm {
            DecoderNorm::Unit => 1.0,
            DecoderNorm::Free => cfg.decoder_init_norm,
        };
        let lin = init_linear(d_in, d_sae, norm, seed);
        let take = |name: &str| lin.get(name).map(|p| p.data.clone()).unwrap_or_default();
        let params = Params::new(vec![
            Param::new("W_enc", &[d_sae, d_in], true, take("W_enc")),
            Param::zeros("b_gate", &[d_sae], true),
            Param::zeros("b_mag", &[d_sae], true),
            Param::zeros("r_mag", &[d_sae], true),
            Param::new("W_dec", &[d_sae, d_in], true, take("W_dec")),
            Param::zeros("b_dec", &[d_in], false),
        ]);
        GatedSae {
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
        cfg: GatedTraining,
        params: Params,
    ) -> Result<Self> {
        check_params(&params, "gated", &expected(d_in, d_sae))?;
        Ok(GatedSae {
            d_in,
            d_sae,
            cfg,
            params,
        })
    }

    /// Gate-open pairs with `h` as value.
    fn gate_pairs(
        &self,
        x: &[f32],
        n: usize,
        device: &candle_core::Device,
    ) -> Result<(Vec<f32>, SparseCodes)> {
        let p = &self.params;
        let xc = centered(p, x, self.d_in, self.cfg.apply_b_dec_to_input)?;
        let pre =
            kernels::encoder_preacts(&xc, n, self.d_in, p.data("W_enc")?, self.d_sae, device)?;
        let b_gate = p.data("b_gate")?;
        let cand = pre.with_slice(|s| {
            select_codes(s, n, self.d_sae, |row, _buf, out| {
                for (f, (&h, &bg)) in row.iter().zip(b_gate).enumerate() {
                    if h + bg > 0.0 {
                        out.push((f as u32, h));
                    }
                }
            })
        })?;
        Ok((xc, cand))
    }
}

impl Sae for GatedSae {
    fn architecture(&self) -> &str {
        "gated"
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
    fn encode_host(&self, x: &[f32], n: usize) -> Result<SparseCodes> {
        let (_, mut cand) = self.gate_pairs(x, n, &candle_core::Device::Cpu)?;
        let (b_mag, r_mag) = (self.params.data("b_mag")?, self.params.data("r_mag")?);
        for (v, &f) in cand.values.iter_mut().zip(&cand.features) {
            let f = f as usize;
            *v = (*v * r_mag[f].exp() + b_mag[f]).max(0.0);
        }
        super::jumprelu::compact(&mut cand);
        Ok(cand)
    }
}

impl TrainableSae for GatedSae {
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
        let (xc, cand) = self.gate_pairs(batch.x, n, ctx.device)?;
        let (b_gate, b_mag, r_mag) = (p.data("b_gate")?, p.data("b_mag")?, p.data("r_mag")?);
        let scale: Vec<f32> = r_mag.iter().map(|r| r.exp()).collect();
        let np = cand.nnz();
        let mut mag_act = vec![0.0f32; np];
        let mut gate_act = vec![0.0f32; np];
        for i in 0..np {
            let f = cand.features[i] as usize;
            let h = cand.values[i];
            mag_act[i] = (h * scale[f] + b_mag[f]).max(0.0);
            gate_act[i] = h + b_gate[f];
        }
        let codes = SparseCodes {
            values: mag_act,
            ..cand.clone()
        };
        let gate_codes = SparseCodes {
            values: gate_act,
            ..cand.clone()
        };
        let w_dec = p.data("W_dec")?;
        let (d_xhat, sq, mse, g_a) = super::reconstruction(p, d_in, &codes, batch.x)?;
        let (d_aux, _, aux_loss, g_aux) = super::reconstruction(p, d_in, &gate_codes, batch.x)?;
        let norms = kernels::row_norms(w_dec, d_in);
        let lambda = self.cfg.l1_coefficient * ctx.sparsity_scale;
        let per_tok = lambda / n as f32;
        let mut enc_coef = vec![0.0f32; np];
        let mut g_b_gate = vec![0.0f32; d_sae];
        let mut g_b_mag = vec![0.0f32; d_sae];
        let mut g_r_mag = vec![0.0f32; d_sae];
        let mut sparsity = 0.0f64;
        for i in 0..np {
            let f = cand.features[i] as usize;
            let h = cand.values[i];
            let g_mag = if codes.values[i] > 0.0 { g_a[i] } else { 0.0 };
            let g_gate = per_tok * norms[f] + g_aux[i];
            sparsity += (gate_codes.values[i] * norms[f]) as f64;
            enc_coef[i] = g_gate + g_mag * scale[f];
            g_b_gate[f] += g_gate;
            g_b_mag[f] += g_mag;
            g_r_mag[f] += g_mag * h * scale[f];
        }
        let sparsity_loss = per_tok as f64 * sparsity;
        let gate_sums = per_feature_sums(&gate_codes, &gate_codes.values);
        let dec_extra: Vec<f32> = gate_sums
            .iter()
            .zip(&norms)
            .map(|(&s, &nf)| if nf > 0.0 { per_tok * s / nf } else { 0.0 })
            .collect();
        let sets = [
            PairSet {
                offsets: &codes.offsets,
                features: &codes.features,
                dec_coef: Some(&codes.values),
                dec_vecs: &d_xhat,
                enc_coef: Some(&enc_coef),
            },
            PairSet {
                offsets: &gate_codes.offsets,
                features: &gate_codes.features,
                dec_coef: Some(&gate_codes.values),
                dec_vecs: &d_aux,
                enc_coef: None,
            },
        ];
        let mut b_dec_direct = kernels::sum_rows(&d_xhat, d_in, 1.0);
        for (a, b) in b_dec_direct
            .iter_mut()
            .zip(kernels::sum_rows(&d_aux, d_in, 1.0))
        {
            *a += b;
        }
        linear_backward(
            p,
            grads,
            d_in,
            d_sae,
            self.cfg.apply_b_dec_to_input,
            &sets,
            &xc,
            b_dec_direct,
            Some(&dec_extra),
        )?;
        grads.data_mut("b_gate")?.copy_from_slice(&g_b_gate);
        grads.data_mut("b_mag")?.copy_from_slice(&g_b_mag);
        grads.data_mut("r_mag")?.copy_from_slice(&g_r_mag);
        let mut codes = codes;
        super::jumprelu::compact(&mut codes);
        Ok(StepOutput {
            loss: mse + sparsity_loss + aux_loss,
            mse,
            sparsity_loss,
            aux_loss,
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
        Ok(())
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
            SaeConfig::Gated(GatedConfig { common }),
            export_tensors(params, self.d_in, self.d_sae),
        ))
    }
}
