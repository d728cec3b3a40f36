//! Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen and Nanda 2025,
//! <https://arxiv.org/abs/2503.17547>; SAELens's `matryoshka_batchtopk`): a BatchTopK SAE whose
//! dictionary is read as nested prefixes, `matryoshka_widths` `w_1 < w_2 < … < d_sae`. Besides
//! the full reconstruction, every inner prefix must reconstruct the input on its own:
//!
//! ```text
//! loss = ||x - x̂||² + Σ_{j < last} ||x - (b_dec + Σ_{f < w_j} a_f W_dec[f])||² (+ AuxK)
//! ```
//!
//! (squared errors summed over dimensions, averaged over tokens, as SAELens's inner losses). The
//! early features then carry the general concepts that the later, specific ones would otherwise
//! absorb. Selection, the learned inference threshold, AuxK on the full reconstruction and the
//! saved form (JumpReLU with one shared threshold) are [`super::batchtopk`]'s.

use serde::{Deserialize, Serialize};

use super::batchtopk::{BatchTopKSae, BatchTopKTraining};
use super::standard::default_init_norm;
use super::{Batch, DecoderNorm, FileTensor, Sae, StepContext, StepOutput, TrainableSae};
use crate::SparseCodes;
use crate::config::{CommonConfig, SaeConfig};
use crate::error::{Result, SaeError};
use crate::params::Params;

/// Training options for Matryoshka BatchTopK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatryoshkaTraining {
    /// Mean active features per token over a batch.
    pub k: f32,
    /// Prefix widths, strictly increasing; `d_sae` is the last (appended when missing).
    pub matryoshka_widths: Vec<usize>,
    /// Rate of the inference threshold's moving average.
    #[serde(default = "default_lr")]
    pub topk_threshold_lr: f64,
    /// Dead latents used by AuxK per token; `None` is `d_in / 2`.
    #[serde(default)]
    pub aux_k: Option<usize>,
    /// AuxK coefficient.
    #[serde(default = "super::topk::default_aux")]
    pub aux_loss_coefficient: f32,
    /// Decoder-row constraint.
    #[serde(default = "unit")]
    pub decoder_norm: DecoderNorm,
    /// Row norm at init when `decoder_norm` is `free`.
    #[serde(default = "default_init_norm")]
    pub decoder_init_norm: f32,
    /// Subtract `b_dec` before encoding.
    #[serde(default = "yes")]
    pub apply_b_dec_to_input: bool,
}

fn default_lr() -> f64 {
    0.01
}
fn unit() -> DecoderNorm {
    DecoderNorm::Unit
}
fn yes() -> bool {
    true
}

impl MatryoshkaTraining {
    /// `k` per token on average, prefixes `widths` (then `d_sae`), BatchTopK's defaults otherwise.
    pub fn new(k: f32, widths: Vec<usize>) -> Self {
        let b = BatchTopKTraining::new(k);
        MatryoshkaTraining {
            k,
            matryoshka_widths: widths,
            topk_threshold_lr: b.topk_threshold_lr,
            aux_k: b.aux_k,
            aux_loss_coefficient: b.aux_loss_coefficient,
            decoder_norm: b.decoder_norm,
            decoder_init_norm: b.decoder_init_norm,
            apply_b_dec_to_input: b.apply_b_dec_to_input,
        }
    }

    fn batch_topk(&self) -> BatchTopKTraining {
        BatchTopKTraining {
            k: self.k,
            topk_threshold_lr: self.topk_threshold_lr,
            aux_k: self.aux_k,
            aux_loss_coefficient: self.aux_loss_coefficient,
            decoder_norm: self.decoder_norm,
            decoder_init_norm: self.decoder_init_norm,
            apply_b_dec_to_input: self.apply_b_dec_to_input,
        }
    }

    /// The widths with `d_sae` last, checked.
    pub(crate) fn widths(&self, d_sae: usize) -> Result<Vec<usize>> {
        let mut w = self.matryoshka_widths.clone();
        if w.last() != Some(&d_sae) {
            w.push(d_sae);
        }
        if w[0] == 0 || w.windows(2).any(|p| p[0] >= p[1]) || w.iter().any(|&v| v > d_sae) {
            return Err(SaeError::config(
                "matryoshka_widths",
                format!(
                    "{:?}: must be strictly increasing, from at least 1 up to d_sae = {d_sae}",
                    self.matryoshka_widths
                ),
            ));
        }
        Ok(w)
    }
}

/// A Matryoshka BatchTopK SAE in training.
#[derive(Debug, Clone)]
pub struct MatryoshkaSae {
    base: BatchTopKSae,
    pub cfg: MatryoshkaTraining,
    /// Prefix widths, `d_sae` last.
    widths: Vec<usize>,
}

impl MatryoshkaSae {
    /// Fresh random weights (BatchTopK's init).
    ///
    /// # Errors
    /// `k` outside `(0, d_sae]`, widths not increasing or past `d_sae`.
    pub fn init(d_in: usize, d_sae: usize, cfg: MatryoshkaTraining, seed: u64) -> Result<Self> {
        let widths = cfg.widths(d_sae)?;
        Ok(MatryoshkaSae {
            base: BatchTopKSae::init(d_in, d_sae, cfg.batch_topk(), seed)?,
            cfg,
            widths,
        })
    }

    /// Wraps existing parameters (internal layout) and inference threshold.
    ///
    /// # Errors
    /// Missing parameter or wrong shape, invalid widths.
    pub fn from_params(
        d_in: usize,
        d_sae: usize,
        cfg: MatryoshkaTraining,
        params: Params,
        threshold: f64,
    ) -> Result<Self> {
        let widths = cfg.widths(d_sae)?;
        Ok(MatryoshkaSae {
            base: BatchTopKSae::from_params(d_in, d_sae, cfg.batch_topk(), params, threshold)?,
            cfg,
            widths,
        })
    }

    /// The prefix widths, `d_sae` last.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }
}

impl Sae for MatryoshkaSae {
    fn architecture(&self) -> &str {
        "matryoshka_batchtopk"
    }
    fn d_in(&self) -> usize {
        self.base.d_in()
    }
    fn d_sae(&self) -> usize {
        self.base.d_sae()
    }
    fn params(&self) -> &Params {
        self.base.params()
    }
    /// Inference form: JumpReLU with the learned global threshold (as BatchTopK).
    fn encode_host(&self, x: &[f32], n: usize) -> Result<SparseCodes> {
        self.base.encode_host(x, n)
    }
}

impl TrainableSae for MatryoshkaSae {
    fn params_mut(&mut self) -> &mut Params {
        self.base.params_mut()
    }

    fn forward_backward(
        &self,
        batch: &Batch<'_>,
        ctx: &StepContext<'_>,
        grads: &mut Params,
    ) -> Result<StepOutput> {
        let inner = &self.widths[..self.widths.len() - 1];
        self.base.forward_backward_nested(batch, ctx, grads, inner)
    }

    fn constrain_gradients(&self, grads: &mut Params) -> Result<()> {
        self.base.constrain_gradients(grads)
    }

    fn after_optimizer_step(&mut self, out: &StepOutput) -> Result<()> {
        self.base.after_optimizer_step(out)
    }

    fn unit_norm_decoder(&self) -> bool {
        self.base.unit_norm_decoder()
    }

    /// Saved as SAELens saves it: JumpReLU with one shared threshold (the prefixes only shape
    /// training; at inference the SAE is a BatchTopK SAE).
    fn export(
        &self,
        params: &Params,
        common: CommonConfig,
    ) -> Result<(SaeConfig, Vec<FileTensor>)> {
        self.base.export(params, common)
    }

    fn state_json(&self) -> serde_json::Value {
        self.base.state_json()
    }

    fn load_state_json(&mut self, v: &serde_json::Value) -> Result<()> {
        self.base.load_state_json(v)
    }
}
