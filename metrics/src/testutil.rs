//! Toy models and hand-built SAEs for unit tests.

use candle_core::{DType, Device, Tensor};
use sae_core::StandardConfig;
use sae_core::{
    CommonConfig, DecoderNorm, Param, Params, SaeConfig, SaeModel, StandardSae, StandardTraining,
};

use crate::error::Result;
use crate::spliced::{HookEdit, SpliceTarget};

/// A causal toy "transformer": the hook's activation at position p is the mean of the token
/// embeddings up to p plus the current token's embedding; logits are `h · W_U + b`.
pub struct ToyModel {
    pub embed: Vec<f32>,
    pub w_u: Vec<f32>,
    pub vocab: usize,
    pub d: usize,
}

fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 33) as f64 / (1u64 << 31) as f64) as f32 * 2.0 - 1.0
}

impl ToyModel {
    pub fn new(vocab: usize, d: usize, seed: u64) -> Self {
        let mut s = seed;
        let embed = (0..vocab * d).map(|_| lcg(&mut s) * 1.5).collect();
        let w_u = (0..d * vocab).map(|_| lcg(&mut s)).collect();
        Self {
            embed,
            w_u,
            vocab,
            d,
        }
    }

    /// The hook's clean activations for one sequence, on the host.
    pub fn hook_acts(&self, toks: &[u32]) -> Vec<f32> {
        let d = self.d;
        let mut out = vec![0.0; toks.len() * d];
        let mut run = vec![0.0f32; d];
        for (p, &t) in toks.iter().enumerate() {
            let e = &self.embed[t as usize * d..(t as usize + 1) * d];
            for j in 0..d {
                run[j] += e[j];
                out[p * d + j] = run[j] / (p + 1) as f32 + e[j];
            }
        }
        out
    }

    /// Logits from (possibly edited) hook activations, on the host: `[t, vocab]`.
    pub fn logits_from(&self, h: &[f32]) -> Vec<f32> {
        let (d, v) = (self.d, self.vocab);
        let t = h.len() / d;
        let mut out = vec![0.0; t * v];
        for p in 0..t {
            for k in 0..v {
                let mut s = 0.0;
                for j in 0..d {
                    s += h[p * d + j] * self.w_u[j * v + k];
                }
                out[p * v + k] = s;
            }
        }
        out
    }
}

impl SpliceTarget for ToyModel {
    fn hook_name(&self) -> String {
        "blocks.0.mlp.hook_post".into()
    }
    fn hook_width(&self) -> usize {
        self.d
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn forward(&mut self, tokens: &Tensor, edit: Option<&mut HookEdit<'_>>) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let ids = tokens.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut h = Vec::with_capacity(b * t * self.d);
        for row in &ids {
            h.extend(self.hook_acts(row));
        }
        let mut h = Tensor::from_vec(h, (b, t, self.d), &Device::Cpu)?;
        if let Some(f) = edit {
            h = f(&h)?;
        }
        let hv = h.flatten_all()?.to_vec1::<f32>()?;
        let mut logits = Vec::with_capacity(b * t * self.vocab);
        for bi in 0..b {
            logits.extend(self.logits_from(&hv[bi * t * self.d..(bi + 1) * t * self.d]));
        }
        Ok(Tensor::from_vec(logits, (b, t, self.vocab), &Device::Cpu)?)
    }
}

/// A ReLU SAE with the given decoder (`d_sae x d_in`) and its transpose as encoder, no biases:
/// for tests that supply their own codes and need only the decoder's rows.
pub fn sae_with_decoder(d_in: usize, d_sae: usize, w_dec: Vec<f32>) -> SaeModel {
    let mut w_enc = vec![0.0; d_sae * d_in];
    for f in 0..d_sae {
        for j in 0..d_in {
            w_enc[f * d_in + j] = w_dec[f * d_in + j];
        }
    }
    standard(d_in, d_sae, w_enc, w_dec)
}

fn standard(d_in: usize, d_sae: usize, w_enc: Vec<f32>, w_dec: Vec<f32>) -> SaeModel {
    standard_with_biases(d_in, d_sae, w_enc, vec![0.0; d_sae], w_dec, vec![0.0; d_in])
}

fn standard_with_biases(
    d_in: usize,
    d_sae: usize,
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    w_dec: Vec<f32>,
    b_dec: Vec<f32>,
) -> SaeModel {
    let params = Params::new(vec![
        Param::new("W_enc", &[d_sae, d_in], true, w_enc),
        Param::new("b_enc", &[d_sae], true, b_enc),
        Param::new("W_dec", &[d_sae, d_in], true, w_dec),
        Param::new("b_dec", &[d_in], false, b_dec),
    ]);
    let cfg = StandardTraining {
        decoder_norm: DecoderNorm::Free,
        ..StandardTraining::default()
    };
    let sae = StandardSae::from_params(d_in, d_sae, cfg, params).expect("valid toy SAE");
    let scfg = SaeConfig::Standard(StandardConfig {
        common: CommonConfig::new(d_in, d_sae),
    });
    SaeModel::from_parts(scfg, Box::new(sae), None)
}

/// A ReLU SAE with features ±e_j: ReLU(x)·I + ReLU(-x)·(-I) = x, a perfect reconstruction.
pub fn perfect_sae(d: usize) -> SaeModel {
    let mut w = vec![0.0; 2 * d * d];
    for j in 0..d {
        w[j * d + j] = 1.0;
        w[(d + j) * d + j] = -1.0;
    }
    standard(d, 2 * d, w.clone(), w)
}

/// [`perfect_sae`]'s codes of rows `x` (`d` wide): `ReLU(x)` then `ReLU(-x)`, row by row.
pub fn perfect_sae_codes(x: &[f32], d: usize) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|r| {
            let pos: Vec<f32> = r.iter().map(|v| v.max(0.0)).collect();
            let neg: Vec<f32> = r.iter().map(|v| (-v).max(0.0)).collect();
            pos.into_iter().chain(neg)
        })
        .collect()
}

/// An SAE whose decoder is zero: its reconstruction is the zero vector (zero-ablation).
pub fn zero_sae(d: usize) -> SaeModel {
    let mut w = vec![0.0; 2 * d * d];
    for j in 0..d {
        w[j * d + j] = 1.0;
        w[(d + j) * d + j] = -1.0;
    }
    standard(d, 2 * d, w, vec![0.0; 2 * d * d])
}

/// Encoder as [`perfect_sae`], decoder keeping only the +e_j features: reconstructs ReLU(x),
/// an SAE that is neither perfect nor useless, with every coordinate active.
pub fn positive_part_sae(d: usize) -> SaeModel {
    let mut w = vec![0.0; 2 * d * d];
    for j in 0..d {
        w[j * d + j] = 1.0;
        w[(d + j) * d + j] = -1.0;
    }
    let mut dec = w.clone();
    dec[d * d..].iter_mut().for_each(|x| *x = 0.0);
    standard(d, 2 * d, w, dec)
}

/// A ReLU SAE with seeded random weights and biases, `b_dec` included: an imperfect SAE whose
/// reconstruction has an error and whose decoder is affine, not linear, in the codes.
pub fn random_sae(d_in: usize, d_sae: usize, seed: u64) -> SaeModel {
    let mut st = seed;
    let mut draw =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| scale * lcg(&mut st)).collect() };
    let w_enc = draw(d_sae * d_in, 1.0);
    let b_enc = draw(d_sae, 0.1);
    let w_dec = draw(d_sae * d_in, 0.5);
    let b_dec = draw(d_in, 0.3);
    standard_with_biases(d_in, d_sae, w_enc, b_enc, w_dec, b_dec)
}
