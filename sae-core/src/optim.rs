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
    pub fn step(
        &mut self,
        params: &mut Params,
        grads: &Params,
        lr: f64,
        grad_scale: f32,
        step: u64,
    ) -> Result<()> {
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
                    let k = AdamChunk {
                        b1,
                        b2,
                        step_size,
                        inv_sqrt_bc2,
                        eps,
                        grad_scale,
                    };
                    k.run(pc, gc, mc, vc);
                    pc.iter().copied().find(|v| !v.is_finite())
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

/// The fused per-chunk update, compiled twice (AVX2 + FMA and baseline) so that it vectorises.
struct AdamChunk {
    b1: f32,
    b2: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    grad_scale: f32,
}

impl AdamChunk {
    #[inline(always)]
    fn body(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let gi = g[i] * self.grad_scale;
            let mi = self.b1 * m[i] + (1.0 - self.b1) * gi;
            let vi = self.b2 * v[i] + (1.0 - self.b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] -= self.step_size * mi / (vi.sqrt() * self.inv_sqrt_bc2 + self.eps);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn body_avx2(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        self.body(p, g, m, v)
    }

    fn run(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { self.body_avx2(p, g, m, v) };
        }
        self.body(p, g, m, v)
    }
}

/// Global L2 norm of all gradients, summed in a fixed order.
pub fn grad_norm(grads: &Params) -> f64 {
    grads
        .iter()
        .map(|p| {
            p.data
                .par_chunks(CHUNK)
                .map(|c| crate::kernels::dot(c, c) as f64)
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
