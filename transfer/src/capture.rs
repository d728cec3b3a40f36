//! Activations of a model at a few hooks on a set of token windows, kept in memory as rows.
//!
//! The transfer experiment trains small SAEs on a few hundred thousand tokens of each model;
//! at 640 + 2048 floats per token that is about 1 GB per 100k tokens, small enough to keep in
//! memory and shuffle freely, so no on-disk cache is needed here.

use candle_core::Tensor;
use indicatif::ProgressBar;
use transformer_hooks::{HookPoint, Model};

use crate::error::{Error, Result};

/// Row-major activations `[n, width]` of one hook.
#[derive(Debug, Clone)]
pub struct Rows {
    pub hook: HookPoint,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Rows {
    pub fn n(&self) -> usize {
        self.data.len() / self.width.max(1)
    }

    /// Mean L2 norm of the rows: the scale an SAE's input normalisation fits.
    pub fn mean_norm(&self) -> f64 {
        mean_row_norm(&self.data, self.width)
    }
}

/// Mean L2 norm of the rows of a row-major `[n, width]` buffer (0 for no rows).
pub fn mean_row_norm(data: &[f32], width: usize) -> f64 {
    let n = data.len() / width.max(1);
    if n == 0 {
        return 0.0;
    }
    data.chunks_exact(width)
        .map(|r| {
            r.iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt()
        })
        .sum::<f64>()
        / n as f64
}

/// Captures `hooks` on every batch (`[batch, seq]` token windows), dropping the first
/// `skip_first` positions of each window (BOS, whose activations are outliers that SAEs are
/// not trained on), in one forward pass per batch that stops after the deepest hook.
///
/// # Errors
/// A hook the model lacks, a malformed batch, or a NaN/infinite activation (named by hook).
pub fn capture(
    model: &Model,
    hooks: &[HookPoint],
    batches: &[Tensor],
    skip_first: usize,
    progress: Option<&ProgressBar>,
) -> Result<Vec<Rows>> {
    let mut out: Vec<Rows> = hooks
        .iter()
        .map(|&h| Rows {
            hook: h,
            width: 0,
            data: Vec::new(),
        })
        .collect();
    if let Some(pb) = progress {
        pb.set_length(batches.len() as u64);
    }
    for b in batches {
        let cache = model.run_with_cache(b, hooks)?;
        for rows in out.iter_mut() {
            let t = cache.require(rows.hook)?;
            let (_, s, w) = t.dims3()?;
            if s <= skip_first {
                continue;
            }
            let kept = t.narrow(1, skip_first, s - skip_first)?.flatten_all()?;
            let v: Vec<f32> = kept.to_dtype(candle_core::DType::F32)?.to_vec1()?;
            if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                return Err(Error::invalid(
                    format!("activations at {}", rows.hook),
                    format!("{bad} found; the model produced non-finite values"),
                ));
            }
            rows.width = w;
            rows.data.extend(v);
        }
        if let Some(pb) = progress {
            pb.inc(1);
        }
    }
    Ok(out)
}
