//! Mean activation norms per layer of a base model and its chat model, and their ratio.
//!
//! Kissane et al. traced the one collapse of base-to-chat transfer they saw (Gemma v1 2B: the
//! base SAE's loss recovered on the chat model about 0.25) to the two models' residual norms
//! differing about 8x. This is the measurement that tells whether a pair is at risk.

use std::path::Path;

use candle_core::Tensor;
use metrics::plots::{Mark, Scatter, plot_scatter};
use serde::{Deserialize, Serialize};
use transformer_hooks::{HookPoint, Model, Site};

use crate::capture::capture;
use crate::error::Result;

/// One hook's mean activation norm in both models.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NormRow {
    pub hook: String,
    pub layer: usize,
    pub site: String,
    pub base: f64,
    pub chat: f64,
    /// `chat / base`.
    pub ratio: f64,
}

/// The residual stream after each block and the MLP neurons of each block.
pub fn profile_hooks(n_layers: usize) -> Vec<HookPoint> {
    (0..n_layers)
        .flat_map(|l| {
            [
                HookPoint::Block(l, Site::ResidPost),
                HookPoint::Block(l, Site::MlpPost),
            ]
        })
        .collect()
}

/// Mean norm at every hook of [`profile_hooks`] for both models on the same batches (BOS
/// skipped), one row per hook.
///
/// # Errors
/// A forward failure in either model.
pub fn norm_profile(base: &Model, chat: &Model, batches: &[Tensor]) -> Result<Vec<NormRow>> {
    let hooks = profile_hooks(base.config().n_layers);
    let mut rows = Vec::with_capacity(hooks.len());
    let mut sums = vec![(0.0f64, 0.0f64, 0usize); hooks.len()];
    // One batch at a time: all layers' activations of all batches would not fit in memory.
    for b in batches {
        let one = std::slice::from_ref(b);
        let (cb, cc) = (
            capture(base, &hooks, one, 1, None)?,
            capture(chat, &hooks, one, 1, None)?,
        );
        for (i, (rb, rc)) in cb.iter().zip(&cc).enumerate() {
            let n = rb.n();
            sums[i].0 += rb.mean_norm() * n as f64;
            sums[i].1 += rc.mean_norm() * n as f64;
            sums[i].2 += n;
        }
    }
    for (h, (sb, sc, n)) in hooks.iter().zip(sums) {
        let (b, c) = (sb / n.max(1) as f64, sc / n.max(1) as f64);
        let (layer, site) = match h {
            HookPoint::Block(l, s) => (*l, s.suffix().to_string()),
            _ => (0, h.to_string()),
        };
        rows.push(NormRow {
            hook: h.to_string(),
            layer,
            site,
            base: b,
            chat: c,
            ratio: c / b,
        });
    }
    Ok(rows)
}

/// Two PNGs: the mean norms of both models per layer (log scale), and their ratio.
///
/// # Errors
/// A plot that cannot be drawn or written.
pub fn plot_norms(rows: &[NormRow], norms_png: &Path, ratio_png: &Path) -> Result<()> {
    let series = |site: &str, f: &dyn Fn(&NormRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r.site == site)
            .map(|r| (r.layer as f64, f(r)))
            .collect()
    };
    let mut norms = Vec::new();
    for site in ["hook_resid_post", "mlp.hook_post"] {
        norms.push(Scatter {
            name: format!("base {site}"),
            points: series(site, &|r| r.base),
            mark: Mark::Line,
        });
        norms.push(Scatter {
            name: format!("chat {site}"),
            points: series(site, &|r| r.chat),
            mark: Mark::Dots,
        });
    }
    plot_scatter(
        &norms,
        "Mean activation norm per layer",
        "layer",
        "mean L2 norm",
        (false, true),
        norms_png,
    )?;
    let ratios: Vec<Scatter> = ["hook_resid_post", "mlp.hook_post"]
        .iter()
        .map(|site| Scatter {
            name: site.to_string(),
            points: series(site, &|r| r.ratio),
            mark: Mark::Line,
        })
        .collect();
    plot_scatter(
        &ratios,
        "Chat / base mean activation norm",
        "layer",
        "ratio",
        (false, false),
        ratio_png,
    )?;
    Ok(())
}
