//! An SAE architecture defined outside `sae-core` runs the same property kit as the built-in ones.
//!
//! `TanhSae` is a ReLU SAE with Anthropic's 2024 tanh sparsity penalty, `λ Σ_f tanh(c · a_f)`
//! (unit-norm decoder rows), written against `sae-core`'s public traits and kernels only. It
//! saves as a SAELens `standard` SAE, since at inference it is one.

use candle_core::Device;
use sae_workbench::sae_core::SparseCodes;
use sae_workbench::sae_core::kernels::{self, PairSet};
use sae_workbench::sae_core::testkit::{KitOptions, check_architecture};
use sae_workbench::sae_core::transpose;
use sae_workbench::sae_core::{
    Batch, CommonConfig, FileTensor, Param, Params, Result, Sae, SaeConfig, StandardConfig,
    StepContext, StepOutput, TrainableSae,
};

struct TanhSae {
    d_in: usize,
    d_sae: usize,
    lambda: f32,
    c: f32,
    params: Params,
}

impl TanhSae {
    fn init(d_in: usize, d_sae: usize, seed: u64) -> Self {
        let mut w = sae_workbench::sae_core::testkit::gaussian_batch(d_sae, d_in, 1.0, seed);
        kernels::normalize_rows(&mut w, d_in);
        TanhSae {
            d_in,
            d_sae,
            lambda: 0.05,
            c: 4.0,
            params: Params::new(vec![
                Param::new("W_enc", &[d_sae, d_in], true, w.clone()),
                Param::zeros("b_enc", &[d_sae], true),
                Param::new("W_dec", &[d_sae, d_in], true, w),
                Param::zeros("b_dec", &[d_in], false),
            ]),
        }
    }

    fn codes(&self, x: &[f32], n: usize, device: &Device) -> Result<(Vec<f32>, SparseCodes)> {
        let p = &self.params;
        let xc = kernels::center(x, self.d_in, Some(p.data("b_dec")?));
        let pre =
            kernels::encoder_preacts(&xc, n, self.d_in, p.data("W_enc")?, self.d_sae, device)?;
        let b = p.data("b_enc")?;
        let dense = pre.with_slice(|s| {
            s.chunks(self.d_sae)
                .flat_map(|row| row.iter().zip(b).map(|(v, bb)| (v + bb).max(0.0)))
                .collect::<Vec<f32>>()
        })?;
        Ok((xc, SparseCodes::from_dense(&dense, n, self.d_sae)))
    }
}

impl Sae for TanhSae {
    fn architecture(&self) -> &str {
        "tanh_relu"
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
        Ok(self.codes(x, n, &Device::Cpu)?.1)
    }
}

impl TrainableSae for TanhSae {
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
        let (xc, codes) = self.codes(batch.x, n, ctx.device)?;
        let w_dec = p.data("W_dec")?;
        let (d_xhat, sq, g_a) = kernels::decode_residual_dots(
            &codes.offsets,
            &codes.features,
            &codes.values,
            w_dec,
            d_in,
            Some(p.data("b_dec")?),
            batch.x,
            2.0 / n as f32,
        );
        let mse = kernels::sum_f64(&sq) / n as f64;
        let lam = self.lambda * ctx.sparsity_scale / n as f32;
        let mut sparsity = 0.0f64;
        let g_pre: Vec<f32> = g_a
            .iter()
            .zip(&codes.values)
            .map(|(g, &a)| {
                let t = (self.c * a).tanh();
                sparsity += t as f64;
                g + lam * self.c * (1.0 - t * t)
            })
            .collect();
        let sets = [PairSet {
            offsets: &codes.offsets,
            features: &codes.features,
            dec_coef: Some(&codes.values),
            dec_vecs: &d_xhat,
            enc_coef: Some(&g_pre),
        }];
        let [g_w_enc, g_b_enc, g_w_dec, g_b_dec] =
            grads.many_mut(["W_enc", "b_enc", "W_dec", "b_dec"])?;
        let g_bias = kernels::feature_rows(d_sae, d_in, &sets, &xc, g_w_dec, g_w_enc);
        g_b_enc.copy_from_slice(&g_bias);
        let direct = kernels::sum_rows(&d_xhat, d_in, 1.0);
        let through_enc = kernels::weighted_row_sum(&g_bias, p.data("W_enc")?, d_in);
        for ((g, a), b) in g_b_dec.iter_mut().zip(direct).zip(through_enc) {
            *g = a - b;
        }
        let sparsity_loss = lam as f64 * sparsity;
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
        kernels::remove_parallel_component(
            self.params.data("W_dec")?,
            grads.data_mut("W_dec")?,
            self.d_in,
        );
        Ok(())
    }

    fn after_optimizer_step(&mut self, _out: &StepOutput) -> Result<()> {
        kernels::normalize_rows(self.params.data_mut("W_dec")?, self.d_in);
        Ok(())
    }

    fn unit_norm_decoder(&self) -> bool {
        true
    }

    fn export(
        &self,
        params: &Params,
        common: CommonConfig,
    ) -> Result<(SaeConfig, Vec<FileTensor>)> {
        let tensors = params
            .iter()
            .map(|p| {
                if p.name == "W_enc" {
                    (
                        p.name.clone(),
                        vec![self.d_in, self.d_sae],
                        transpose(&p.data, self.d_sae, self.d_in),
                    )
                } else {
                    (p.name.clone(), p.shape.clone(), p.data.clone())
                }
            })
            .collect();
        Ok((SaeConfig::Standard(StandardConfig { common }), tensors))
    }
}

#[test]
fn external_architecture_passes_the_kit() {
    check_architecture(
        "tanh_relu (external)",
        TanhSae::init,
        &KitOptions::default(),
    );
}
