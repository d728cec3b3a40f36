//! TopK SAE with the AuxK loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
//! <https://arxiv.org/abs/2406.04093>): each token keeps its k largest pre-activations (then
//! ReLU, as SAELens does); dead latents (judged by the trainer's tokens-since-fired window) are
//! trained to reconstruct the main residual through their own top `aux_k` pre-activations. The
//! encoder starts as the decoder's transpose and decoder rows are kept at unit norm.
//!
//! Loss: `Σ_d (x̂ - x)² + α · min(n_dead / aux_k, 1) · Σ_d (ê_aux - (x - x̂))²`, token-averaged.

use serde::{Deserialize, Serialize};

use super::standard::default_init_norm;
use super::{
    Batch, DecoderNorm, FileTensor, Sae, StepContext, StepOutput, TrainableSae, centered,
    check_params, dead_features_aux, export_tensors, host_preacts, init_linear, reconstruction,
    relu_family_backward, select_codes, unit_norm_constrain,
};
use crate::SparseCodes;
use crate::config::{CommonConfig, SaeConfig, TopKConfig};
use crate::error::{Result, SaeError};
use crate::kernels;
use crate::params::Params;

/// Training options for TopK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopKTraining {
    /// Active features per token.
    pub k: usize,
    /// Dead latents used by AuxK per token; `None` is SAELens's `d_in / 2`.
    #[serde(default)]
    pub aux_k: Option<usize>,
    /// AuxK coefficient α (the paper's 1/32).
    #[serde(default = "default_aux")]
    pub aux_loss_coefficient: f32,
    /// Decoder-row constraint (OpenAI's recipe keeps rows at unit norm).
    #[serde(default = "unit")]
    pub decoder_norm: DecoderNorm,
    /// Row norm at init when `decoder_norm` is `free`.
    #[serde(default = "default_init_norm")]
    pub decoder_init_norm: f32,
    /// Subtract `b_dec` before encoding.
    #[serde(default = "yes")]
    pub apply_b_dec_to_input: bool,
}

pub(crate) fn default_aux() -> f32 {
    1.0 / 32.0
}
fn unit() -> DecoderNorm {
    DecoderNorm::Unit
}
fn yes() -> bool {
    true
}

impl TopKTraining {
    /// Defaults with the given k.
    pub fn new(k: usize) -> Self {
        TopKTraining {
            k,
            aux_k: None,
            aux_loss_coefficient: default_aux(),
            decoder_norm: DecoderNorm::Unit,
            decoder_init_norm: default_init_norm(),
            apply_b_dec_to_input: true,
        }
    }
}

/// A TopK SAE.
#[derive(Debug, Clone)]
pub struct TopKSae {
    d_in: usize,
    d_sae: usize,
    pub cfg: TopKTraining,
    params: Params,
}

impl TopKSae {
    /// Fresh random weights.
    ///
    /// # Errors
    /// If `k` is 0 or larger than `d_sae`.
    pub fn init(d_in: usize, d_sae: usize, cfg: TopKTraining, seed: u64) -> Result<Self> {
        check_k(cfg.k, d_sae)?;
        let norm = match cfg.decoder_norm {
            DecoderNorm::Unit => 1.0,
            DecoderNorm::Free => cfg.decoder_init_norm,
        };
        Ok(TopKSae {
            d_in,
            d_sae,
            params: init_linear(d_in, d_sae, norm, seed),
            cfg,
        })
    }

    /// Wraps existing parameters (internal layout). Unlike the ReLU SAE, decoder norms cannot be
    /// folded away without changing which features win, so rows are left as they are.
    ///
    /// # Errors
    /// Missing parameter, wrong shape, bad k.
    pub fn from_params(
        d_in: usize,
        d_sae: usize,
        cfg: TopKTraining,
        params: Params,
    ) -> Result<Self> {
        check_k(cfg.k, d_sae)?;
        check_params(
            &params,
            "topk",
            &[
                ("W_enc", vec![d_sae, d_in]),
                ("b_enc", vec![d_sae]),
                ("W_dec", vec![d_sae, d_in]),
                ("b_dec", vec![d_in]),
            ],
        )?;
        Ok(TopKSae {
            d_in,
            d_sae,
            cfg,
            params,
        })
    }
}

fn check_k(k: usize, d_sae: usize) -> Result<()> {
    if k == 0 || k > d_sae {
        return Err(SaeError::config(
            "k",
            format!("must be in 1..={d_sae} (d_sae), got {k}"),
        ));
    }
    Ok(())
}

pub(crate) fn topk_codes(
    pre: &[f32],
    b_enc: &[f32],
    n: usize,
    d_sae: usize,
    k: usize,
) -> SparseCodes {
    select_codes(pre, n, d_sae, |row, buf, out| {
        kernels::top_k(
            row.iter()
                .zip(b_enc)
                .enumerate()
                .map(|(f, (&p, &b))| (f as u32, p + b)),
            k,
            buf,
            out,
        );
        out.retain(|&(_, v)| v > 0.0);
        out.sort_unstable_by_key(|&(f, _)| f);
    })
}

impl Sae for TopKSae {
    fn architecture(&self) -> &str {
        "topk"
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
        let pre = host_preacts(
            &self.params,
            x,
            n,
            self.d_in,
            self.d_sae,
            self.cfg.apply_b_dec_to_input,
        )?;
        let b_enc = self.params.data("b_enc")?;
        pre.with_slice(|p| topk_codes(p, b_enc, n, self.d_sae, self.cfg.k))
    }
}

impl TrainableSae for TopKSae {
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
        let xc = centered(p, batch.x, d_in, self.cfg.apply_b_dec_to_input)?;
        let pre = kernels::encoder_preacts(&xc, n, d_in, p.data("W_enc")?, d_sae, ctx.device)?;
        let b_enc = p.data("b_enc")?;
        let codes = pre.with_slice(|s| topk_codes(s, b_enc, n, d_sae, self.cfg.k))?;
        let (d_xhat, sq, mse, dots) = reconstruction(p, d_in, &codes, batch.x)?;
        let g_pre = dots;
        let aux = dead_features_aux(
            &pre,
            p,
            ctx,
            &d_xhat,
            n,
            d_in,
            d_sae,
            self.cfg.aux_k,
            self.cfg.aux_loss_coefficient,
        )?;
        drop(pre);
        relu_family_backward(
            p,
            grads,
            d_in,
            d_sae,
            self.cfg.apply_b_dec_to_input,
            &codes,
            &g_pre,
            &d_xhat,
            &xc,
            &[],
            aux.as_ref(),
            None,
        )?;
        let aux_loss = aux.as_ref().map_or(0.0, |a| a.loss);
        Ok(StepOutput {
            loss: mse + aux_loss,
            mse,
            sparsity_loss: 0.0,
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

    fn max_l0(&self) -> Option<usize> {
        Some(self.cfg.k)
    }

    fn export(
        &self,
        params: &Params,
        mut common: CommonConfig,
    ) -> Result<(SaeConfig, Vec<FileTensor>)> {
        common.apply_b_dec_to_input = self.cfg.apply_b_dec_to_input;
        Ok((
            SaeConfig::TopK(TopKConfig {
                k: self.cfg.k,
                rescale_acts_by_decoder_norm: false,
                common,
            }),
            export_tensors(params, self.d_in, self.d_sae),
        ))
    }
}
