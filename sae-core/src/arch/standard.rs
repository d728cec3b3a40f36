//! Standard ReLU SAE with an L1 penalty, trained with the Towards Monosemanticity recipe
//! (Bricken et al. 2023, <https://transformer-circuits.pub/2023/monosemantic-features>):
//! pre-encoder bias tied to `b_dec` (initialised by the trainer to the geometric median of a
//! sample), unit-norm decoder rows with the parallel gradient component removed, and resampling of
//! dead features as in the paper's appendix.
//!
//! Forward: `a = ReLU((x - b_dec) W_enc + b_enc)`, `x̂ = a W_dec + b_dec`.
//! Loss (as SAELens 6.54): `Σ_d (x̂ - x)² + λ Σ_f a_f ||W_dec[f]||`, averaged over tokens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Batch, DecoderNorm, FileTensor, Sae, StepContext, StepOutput, TrainableSae, centered,
    check_params, export_tensors, host_preacts, init_linear, per_feature_sums, reconstruction,
    relu_family_backward, select_codes, unit_norm_constrain,
};
use crate::SparseCodes;
use crate::config::{CommonConfig, SaeConfig, StandardConfig};
use crate::error::Result;
use crate::kernels;
use crate::params::Params;

/// Training options for the standard SAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardTraining {
    /// L1 coefficient λ (multiplied by the trainer's warm-up factor).
    #[serde(default = "default_l1")]
    pub l1_coefficient: f32,
    /// Decoder-row constraint; the recipe's is `unit`.
    #[serde(default = "default_unit")]
    pub decoder_norm: DecoderNorm,
    /// Row norm at init when `decoder_norm` is `free`.
    #[serde(default = "default_init_norm")]
    pub decoder_init_norm: f32,
    /// Subtract `b_dec` before encoding.
    #[serde(default = "yes")]
    pub apply_b_dec_to_input: bool,
}

fn default_l1() -> f32 {
    5.0
}
fn default_unit() -> DecoderNorm {
    DecoderNorm::Unit
}
pub(crate) fn default_init_norm() -> f32 {
    0.1
}
fn yes() -> bool {
    true
}

impl Default for StandardTraining {
    fn default() -> Self {
        StandardTraining {
            l1_coefficient: default_l1(),
            decoder_norm: DecoderNorm::Unit,
            decoder_init_norm: default_init_norm(),
            apply_b_dec_to_input: true,
        }
    }
}

/// A standard (ReLU + L1) SAE.
#[derive(Debug, Clone)]
pub struct StandardSae {
    d_in: usize,
    d_sae: usize,
    pub cfg: StandardTraining,
    params: Params,
}

impl StandardSae {
    /// Fresh random weights (see `init_linear` in `src/arch/mod.rs`).
    pub fn init(d_in: usize, d_sae: usize, cfg: StandardTraining, seed: u64) -> Self {
        let norm = match cfg.decoder_norm {
            DecoderNorm::Unit => 1.0,
            DecoderNorm::Free => cfg.decoder_init_norm,
        };
        StandardSae {
            d_in,
            d_sae,
            params: init_linear(d_in, d_sae, norm, seed),
            cfg,
        }
    }

    /// Wraps existing parameters (internal layout), checking names and shapes.
    ///
    /// With a unit-norm decoder, rows that are not unit norm are rescaled and the scale folded
    /// into the encoder row and bias (ReLU is positively homogeneous, so outputs do not change).
    ///
    /// # Errors
    /// Missing parameter or wrong shape.
    pub fn from_params(
        d_in: usize,
        d_sae: usize,
        cfg: StandardTraining,
        mut params: Params,
    ) -> Result<Self> {
        check_params(&params, "standard", &expected(d_in, d_sae))?;
        if cfg.decoder_norm == DecoderNorm::Unit {
            fold_decoder_norms(&mut params, d_in)?;
        }
        Ok(StandardSae {
            d_in,
            d_sae,
            cfg,
            params,
        })
    }
}

fn expected(d_in: usize, d_sae: usize) -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("W_enc", vec![d_sae, d_in]),
        ("b_enc", vec![d_sae]),
        ("W_dec", vec![d_sae, d_in]),
        ("b_dec", vec![d_in]),
    ]
}

/// Rescales decoder rows to unit norm, moving each norm into the feature's encoder row and bias.
pub(crate) fn fold_decoder_norms(params: &mut Params, d_in: usize) -> Result<()> {
    let norms = kernels::row_norms(params.data("W_dec")?, d_in);
    if norms.iter().all(|n| (n - 1.0).abs() < 1e-6) {
        return Ok(());
    }
    let [w_enc, b_enc, w_dec] = params.many_mut(["W_enc", "b_enc", "W_dec"])?;
    for (f, &nf) in norms.iter().enumerate() {
        if nf > 0.0 {
            w_dec[f * d_in..(f + 1) * d_in]
                .iter_mut()
                .for_each(|v| *v /= nf);
            w_enc[f * d_in..(f + 1) * d_in]
                .iter_mut()
                .for_each(|v| *v *= nf);
            b_enc[f] *= nf;
        }
    }
    Ok(())
}

fn relu_codes(pre: &[f32], b_enc: &[f32], n: usize, d_sae: usize) -> SparseCodes {
    select_codes(pre, n, d_sae, |row, _buf, out| {
        for (f, (&p, &b)) in row.iter().zip(b_enc).enumerate() {
            let v = p + b;
            if v > 0.0 {
                out.push((f as u32, v));
            }
        }
    })
}

impl Sae for StandardSae {
    fn architecture(&self) -> &str {
        "standard"
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
        pre.with_slice(|p| relu_codes(p, b_enc, n, self.d_sae))
    }
}

impl TrainableSae for StandardSae {
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
        let codes = pre.with_slice(|s| relu_codes(s, b_enc, n, d_sae))?;
        drop(pre);
        let (d_xhat, sq, mse, dots) = reconstruction(p, d_in, &codes, batch.x)?;
        let w_dec = p.data("W_dec")?;
        let norms = kernels::row_norms(w_dec, d_in);
        let lambda = self.cfg.l1_coefficient * ctx.sparsity_scale;
        let per_tok = lambda / n as f32;
        let mut g_pre = dots;
        let mut sparsity = 0.0f64;
        for ((g, &f), &a) in g_pre.iter_mut().zip(&codes.features).zip(&codes.values) {
            let nf = norms[f as usize];
            *g += per_tok * nf;
            sparsity += (a * nf) as f64;
        }
        let sparsity_loss = per_tok as f64 * sparsity;
        let act_sums = per_feature_sums(&codes, &codes.values);
        let dec_extra: Vec<f32> = act_sums
            .iter()
            .zip(&norms)
            .map(|(&s, &nf)| if nf > 0.0 { per_tok * s / nf } else { 0.0 })
            .collect();
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
            None,
            Some(&dec_extra),
        )?;
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
            SaeConfig::Standard(StandardConfig { common }),
            export_tensors(params, self.d_in, self.d_sae),
        ))
    }

    /// Towards Monosemanticity, appendix "Neuron resampling": inputs are drawn with probability
    /// proportional to the square of their squared reconstruction error; each dead feature's
    /// decoder row becomes the drawn input normalised to unit norm, its encoder row the same
    /// direction scaled to 0.2 × the mean encoder-row norm of the live features, its bias zero.
    fn resample_dead(
        &mut self,
        dead: &[usize],
        batch: &Batch<'_>,
        per_token_sq_err: &[f32],
        seed: u64,
    ) -> Result<Vec<usize>> {
        if dead.is_empty() {
            return Ok(Vec::new());
        }
        let d_in = self.d_in;
        let picks = resample_picks(dead, per_token_sq_err, batch.n, seed);
        if picks.is_empty() {
            return Ok(Vec::new());
        }
        let mut is_dead = vec![false; self.d_sae];
        dead.iter().for_each(|&f| is_dead[f] = true);
        let enc_norms = kernels::row_norms(self.params.data("W_enc")?, d_in);
        let live: Vec<f32> = enc_norms
            .iter()
            .zip(&is_dead)
            .filter(|(_, d)| !**d)
            .map(|(n, _)| *n)
            .collect();
        let mean_live = mean_live_norm(&live);
        let [w_enc, b_enc, w_dec] = self.params.many_mut(["W_enc", "b_enc", "W_dec"])?;
        let mut reset = Vec::new();
        for (f, t) in picks {
            let x = &batch.x[t * d_in..(t + 1) * d_in];
            let norm = kernels::dot(x, x).sqrt();
            if norm == 0.0 {
                continue;
            }
            for i in 0..d_in {
                let u = x[i] / norm;
                w_dec[f * d_in + i] = u;
                w_enc[f * d_in + i] = u * 0.2 * mean_live;
            }
            b_enc[f] = 0.0;
            reset.push(f);
        }
        Ok(reset)
    }
}

/// Which token each dead feature is resampled from, as `(feature, token)` in the order of
/// `dead`: tokens drawn with probability proportional to their squared reconstruction error,
/// squared (Anthropic's recipe), from a ChaCha stream seeded with `seed`. Empty when the batch
/// has no error to draw from. Shared by the host path and the device path, which draw the same.
pub(crate) fn resample_picks(
    dead: &[usize],
    per_token_sq_err: &[f32],
    n: usize,
    seed: u64,
) -> Vec<(usize, usize)> {
    if dead.is_empty() || n == 0 {
        return Vec::new();
    }
    let mut cumulative = Vec::with_capacity(per_token_sq_err.len());
    let mut acc = 0.0;
    for &e in per_token_sq_err {
        acc += (e as f64) * (e as f64);
        cumulative.push(acc);
    }
    let total = acc;
    if total <= 0.0 || !total.is_finite() {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    dead.iter()
        .map(|&f| {
            let u: f64 = rng.random::<f64>() * total;
            (f, cumulative.partition_point(|&c| c < u).min(n - 1))
        })
        .collect()
}

/// The mean of the live features' encoder norms (1 with none live): resampled encoder rows are
/// set to 0.2 of it.
pub(crate) fn mean_live_norm(live: &[f32]) -> f32 {
    if live.is_empty() {
        1.0
    } else {
        live.iter().sum::<f32>() / live.len() as f32
    }
}
