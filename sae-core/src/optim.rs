//! Adam with state that can be saved (candle-nn's `AdamW` keeps its moments private), fused over
//! all parameters in one rayon pass with gradient-norm clipping folded in.

use rayon::prelude::*;

use crate::error::{Result, SaeError};
use crate::params::Params;

/// Elements per rayon task in the fused update.
const CHUNK: usize = 1 << 14;

/// Adam (Kingma & Ba), in PyTorch's formulation so that it matches SAELens's optimizer.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken.
    pub t: u64,
    /// First moments, laid out like the parameters.
    pub m: Params,
    /// Second moments.
    pub v: Params,
}

impl Adam {
    pub fn new(params: &Params, beta1: f64, beta2: f64, eps: f64) -> Self {
        Adam {
            beta1,
            beta2,
            eps,
            t: 0,
            m: params.zeros_like(),
            v: params.zeros_like(),
        }
    }

    /// One update `p -= lr · m̂ / (sqrt(v̂) + eps)` with gradients multiplied by `grad_scale`
    /// (the clipping factor).
    ///
    /// # Errors
    /// [`SaeError::NonFiniteTraining`] naming the parameter if an updated value is NaN or
    /// infinite (`step` is used in the message).
    pub fn step(&mut self, params: &mut Params, grads: &Params, lr: f64, grad_scale: f32, step: u64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let eps = self.eps as f32;
        for (((p, g), m), v) in params
            .list
            .iter_mut()
            .zip(&grads.list)
            .zip(&mut self.m.list)
            .zip(&mut self.v.list)
        {
            let bad = p
                .data
                .par_chunks_mut(CHUNK)
                .zip(g.data.par_chunks(CHUNK))
                .zip(m.data.par_chunks_mut(CHUNK))
                .zip(v.data.par_chunks_mut(CHUNK))
                .map(|(((pc, gc), mc), vc)| {
                    let mut bad = None;
                    for i in 0..pc.len() {
                        let gi = gc[i] * grad_scale;
                        let mi = b1 * mc[i] + (1.0 - b1) * gi;
                        let vi = b2 * vc[i] + (1.0 - b2) * gi * gi;
                        mc[i] = mi;
                        vc[i] = vi;
                        let np = pc[i] - step_size * mi / (vi.sqrt() * inv_sqrt_bc2 + eps);
                        if !np.is_finite() && bad.is_none() {
                            bad = Some(np);
                        }
                        pc[i] = np;
                    }
                    bad
                })
                .collect::<Vec<Option<f32>>>()
                .into_iter()
                .flatten()
                .next();
            if let Some(value) = bad {
                return Err(SaeError::NonFiniteTraining {
                    step,
                    what: format!("parameter {}", p.name),
                    value: value as f64,
                });
            }
        }
        Ok(())
    }

    /// Clears both moments of feature rows `features` in every per-feature parameter (done when
    /// resampling re-initialises those features).
    pub fn reset_rows(&mut self, features: &[usize]) {
        for moments in [&mut self.m, &mut self.v] {
            for p in moments.list.iter_mut().filter(|p| p.per_feature) {
                let r = p.row_len();
                for &f in features {
                    if let Some(row) = p.data.get_mut(f * r..(f + 1) * r) {
                        row.fill(0.0);
                    }
                }
            }
        }
    }
}

/// Global L2 norm of all gradients, summed in a fixed order.
pub fn grad_norm(grads: &Params) -> f64 {
    grads
        .iter()
        .map(|p| {
            p.data
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect::<Vec<f64>>()
                .into_iter()
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Param;

    /// Two steps of PyTorch's Adam on a hand-computed example.
    #[test]
    fn matches_torch_formula() {
        let mut p = Params::new(vec![Param::new("w", &[2], false, vec![1.0, -2.0])]);
        let g = Params::new(vec![Param::new("w", &[2], false, vec![0.5, -1.0])]);
        let mut adam = Adam::new(&p, 0.9, 0.999, 1e-8);
        adam.step(&mut p, &g, 0.1, 1.0, 0).unwrap();
        // First step: m̂ = g, v̂ = g², update = lr · sign(g) (up to eps).
        assert!((p.list[0].data[0] - 0.9).abs() < 1e-6);
        assert!((p.list[0].data[1] + 1.9).abs() < 1e-6);
        adam.step(&mut p, &g, 0.1, 1.0, 1).unwrap();
        assert!((p.list[0].data[0] - 0.8).abs() < 1e-5);
    }
}
