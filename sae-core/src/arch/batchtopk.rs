//! BatchTopK SAE (Bussmann et al. 2024, <https://arxiv.org/abs/2412.06410>): the `k · n`
//! largest ReLU'd pre-activations of the whole batch are kept, so tokens get a variable number of
//! features averaging k. A global threshold θ is learned during training as an exponential moving
//! average of the smallest kept activation (SAELens's `topk_threshold`, rate `topk_threshold_lr`);
//! at inference the SAE is a JumpReLU SAE with every threshold equal to θ, which is how it is
//! saved (as SAELens does). AuxK as in [`super::topk`].

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::standard::default_init_norm;
use super::{
    Batch, DecoderNorm, FileTensor, PartialReconstruction, Sae, StepContext, StepOutput,
    TrainableSae, centered, check_params, dead_features_aux, export_tensors, host_preacts,
    init_linear, reconstruction, relu_family_backward, select_codes, unit_norm_constrain,
};
use crate::SparseCodes;
use crate::config::{CommonConfig, JumpReluConfig, SaeConfig};
use crate::error::{Result, SaeError};
use crate::kernels;
use crate::params::{Param, Params};

/// Training options for BatchTopK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchTopKTraining {
    /// Mean active features per token over a batch.
    pub k: f32,
    /// Rate of the threshold's moving average.
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

impl BatchTopKTraining {
    pub fn new(k: f32) -> Self {
        BatchTopKTraining {
            k,
            topk_threshold_lr: default_lr(),
            aux_k: None,
            aux_loss_coefficient: super::topk::default_aux(),
            decoder_norm: DecoderNorm::Unit,
            decoder_init_norm: default_init_norm(),
            apply_b_dec_to_input: true,
        }
    }
}

/// A BatchTopK SAE in training.
#[derive(Debug, Clone)]
pub struct BatchTopKSae {
    d_in: usize,
    d_sae: usize,
    pub cfg: BatchTopKTraining,
    params: Params,
    /// Learned inference threshold θ (f64, as SAELens keeps it).
    pub threshold: f64,
}

impl BatchTopKSae {
    /// Fresh random weights.
    ///
    /// # Errors
    /// If `k` is not in `(0, d_sae]`.
    pub fn init(d_in: usize, d_sae: usize, cfg: BatchTopKTraining, seed: u64) -> Result<Self> {
        if !(cfg.k > 0.0 && cfg.k <= d_sae as f32) {
            return Err(SaeError::config(
                "k",
                format!("must be in (0, {d_sae}] (d_sae), got {}", cfg.k),
            ));
        }
        let norm = match cfg.decoder_norm {
            DecoderNorm::Unit => 1.0,
            DecoderNorm::Free => cfg.decoder_init_norm,
        };
        Ok(BatchTopKSae {
            d_in,
            d_sae,
            params: init_linear(d_in, d_sae, norm, seed),
            cfg,
            threshold: 0.0,
        })
    }

    /// Wraps existing parameters (internal layout) and threshold.
    ///
    /// # Errors
    /// Missing parameter or wrong shape.
    pub fn from_params(
        d_in: usize,
        d_sae: usize,
        cfg: BatchTopKTraining,
        params: Params,
        threshold: f64,
    ) -> Result<Self> {
        check_params(
            &params,
            "batchtopk",
            &[
                ("W_enc", vec![d_sae, d_in]),
                ("b_enc", vec![d_sae]),
                ("W_dec", vec![d_sae, d_in]),
                ("b_dec", vec![d_in]),
            ],
        )?;
        Ok(BatchTopKSae {
            d_in,
            d_sae,
            cfg,
            params,
            threshold,
        })
    }
}

impl BatchTopKSae {
    /// One training step whose loss adds, for every width `w` of `inner_widths`, the error of
    /// reconstructing from the selected features below `w` (Matryoshka's nested prefixes;
    /// [`super::matryoshka`]). Those terms are reported in `aux_loss`, beside AuxK; `mse` stays
    /// the full reconstruction's. With no widths it is the BatchTopK step.
    pub(crate) fn forward_backward_nested(
        &self,
        batch: &Batch<'_>,
        ctx: &StepContext<'_>,
        grads: &mut Params,
        inner_widths: &[usize],
    ) -> Result<StepOutput> {
        let (n, d_in, d_sae) = (batch.n, self.d_in, self.d_sae);
        let p = &self.params;
        let xc = centered(p, batch.x, d_in, self.cfg.apply_b_dec_to_input)?;
        let pre = kernels::encoder_preacts(&xc, n, d_in, p.data("W_enc")?, d_sae, ctx.device)?;
        let b_enc = p.data("b_enc")?;
        let m = ((self.cfg.k as f64 * n as f64) as usize).max(1);
        let codes = pre.with_slice(|s| batch_topk_codes(s, b_enc, n, d_sae, m))?;
        let (d_xhat, sq, mse, dots) = reconstruction(p, d_in, &codes, batch.x)?;
        let mut partials = Vec::with_capacity(inner_widths.len());
        let mut inner_loss = 0.0;
        for &w in inner_widths {
            let c = prefix(&codes, w);
            let (d, _, loss, g) = reconstruction(p, d_in, &c, batch.x)?;
            inner_loss += loss;
            partials.push(PartialReconstruction {
                codes: c,
                d_xhat: d,
                dots: g,
            });
        }
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
            &partials,
            aux.as_ref(),
            None,
        )?;
        let aux_loss = aux.as_ref().map_or(0.0, |a| a.loss) + inner_loss;
        Ok(StepOutput {
            loss: mse + aux_loss,
            mse,
            sparsity_loss: 0.0,
            aux_loss,
            codes,
            per_token_sq_err: sq,
        })
    }
}

/// The pairs of `codes` whose feature is below `width`.
fn prefix(codes: &SparseCodes, width: usize) -> SparseCodes {
    let mut out = SparseCodes {
        n_tokens: codes.n_tokens,
        d_sae: codes.d_sae,
        offsets: Vec::with_capacity(codes.n_tokens + 1),
        features: Vec::new(),
        values: Vec::new(),
    };
    out.offsets.push(0);
    for t in 0..codes.n_tokens {
        let (fs, vs) = codes.row(t);
        for (&f, &v) in fs.iter().zip(vs) {
            if (f as usize) < width {
                out.features.push(f);
                out.values.push(v);
            }
        }
        out.offsets.push(out.features.len());
    }
    out
}

/// The `m` largest positive values of `pre + b_enc` over the whole `[n, d_sae]` batch.
///
/// A strided sample gives a threshold that (almost always) leaves a little more than `m`
/// candidates; the exact cut is then a selection over the candidates only.
pub(crate) fn batch_topk_codes(
    pre: &[f32],
    b_enc: &[f32],
    n: usize,
    d_sae: usize,
    m: usize,
) -> SparseCodes {
    let total = n * d_sae;
    let stride = (total / 200_000).max(1);
    let mut sample: Vec<f32> = (0..total)
        .step_by(stride)
        .map(|i| (pre[i] + b_enc[i % d_sae]).max(0.0))
        .collect();
    let want = ((m as f64 / total as f64) * sample.len() as f64 * 1.25).ceil() as usize + 64;
    let mut cut = if want < sample.len() {
        sample.select_nth_unstable_by(want, |a, b| b.total_cmp(a));
        sample[want]
    } else {
        0.0
    };
    loop {
        let cand = select_codes(pre, n, d_sae, |row, _buf, out| {
            for (f, (&p, &b)) in row.iter().zip(b_enc).enumerate() {
                let v = p + b;
                if v > cut {
                    out.push((f as u32, v));
                }
            }
        });
        if cand.nnz() >= m || cut <= 0.0 {
            if cand.nnz() <= m {
                return cand;
            }
            let mut vals = cand.values.clone();
            vals.select_nth_unstable_by(m - 1, |a, b| b.total_cmp(a));
            let v_m = vals[m - 1];
            let above = cand.values.iter().filter(|&&v| v > v_m).count();
            let mut ties_left = m - above;
            let mut rows: Vec<Vec<(u32, f32)>> = Vec::with_capacity(n);
            for t in 0..n {
                let (fs, vs) = cand.row(t);
                let mut r = Vec::new();
                for (&f, &v) in fs.iter().zip(vs) {
                    if v > v_m {
                        r.push((f, v));
                    } else if v == v_m && ties_left > 0 {
                        ties_left -= 1;
                        r.push((f, v));
                    }
                }
                rows.push(r);
            }
            let mut c = SparseCodes::from_rows(d_sae, rows);
            c.n_tokens = n;
            return c;
        }
        cut = 0.0;
    }
}

/// JumpReLU inference with one threshold: `ReLU(v) · [v > θ]`.
pub(crate) fn threshold_codes(
    pre: &[f32],
    b_enc: &[f32],
    thr: &[f32],
    n: usize,
    d_sae: usize,
) -> SparseCodes {
    select_codes(pre, n, d_sae, |row, _buf, out| {
        for (f, ((&p, &b), &th)) in row.iter().zip(b_enc).zip(thr).enumerate() {
            let v = p + b;
            if v > th && v > 0.0 {
                out.push((f as u32, v));
            }
        }
    })
}

impl Sae for BatchTopKSae {
    fn architecture(&self) -> &str {
        "batchtopk"
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
    /// Inference form: JumpReLU with the learned global threshold.
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
        let thr = vec![self.threshold as f32; self.d_sae];
        pre.with_slice(|p| threshold_codes(p, b_enc, &thr, n, self.d_sae))
    }
}

impl TrainableSae for BatchTopKSae {
    fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    fn forward_backward(
        &self,
        batch: &Batch<'_>,
        ctx: &StepContext<'_>,
        grads: &mut Params,
    ) -> Result<StepOutput> {
        self.forward_backward_nested(batch, ctx, grads, &[])
    }

    fn constrain_gradients(&self, grads: &mut Params) -> Result<()> {
        if self.cfg.decoder_norm == DecoderNorm::Unit {
            unit_norm_constrain(&self.params, grads, self.d_in)?;
        }
        Ok(())
    }

    /// Renormalises the decoder and moves θ toward the smallest kept activation.
    fn after_optimizer_step(&mut self, out: &StepOutput) -> Result<()> {
        if self.cfg.decoder_norm == DecoderNorm::Unit {
            kernels::normalize_rows(self.params.data_mut("W_dec")?, self.d_in);
        }
        let min_pos = out
            .codes
            .values
            .par_iter()
            .copied()
            .filter(|&v| v > 0.0)
            .reduce(|| f32::INFINITY, f32::min);
        if min_pos.is_finite() {
            let lr = self.cfg.topk_threshold_lr;
            self.threshold = (1.0 - lr) * self.threshold + lr * min_pos as f64;
        }
        Ok(())
    }

    fn unit_norm_decoder(&self) -> bool {
        self.cfg.decoder_norm == DecoderNorm::Unit
    }

    /// Saved as SAELens does: a JumpReLU SAE whose thresholds all equal θ.
    fn export(
        &self,
        params: &Params,
        mut common: CommonConfig,
    ) -> Result<(SaeConfig, Vec<FileTensor>)> {
        common.apply_b_dec_to_input = self.cfg.apply_b_dec_to_input;
        let mut tensors = export_tensors(params, self.d_in, self.d_sae);
        let thr = Param::new(
            "threshold",
            &[self.d_sae],
            true,
            vec![self.threshold as f32; self.d_sae],
        );
        tensors.push((thr.name, thr.shape, thr.data));
        Ok((SaeConfig::JumpRelu(JumpReluConfig { common }), tensors))
    }

    fn state_json(&self) -> serde_json::Value {
        serde_json::json!({ "topk_threshold": self.threshold })
    }

    fn load_state_json(&mut self, v: &serde_json::Value) -> Result<()> {
        self.threshold = v
            .get("topk_threshold")
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| SaeError::config("trainer state", "missing `topk_threshold`"))?;
        Ok(())
    }
}
