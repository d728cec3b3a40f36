//! Scaling laws for sparse autoencoders: how loss falls with compute, features and steps.
//!
//! The anchors are Anthropic's *Scaling Monosemanticity* (2024), where at a fixed compute budget
//! the optimal number of features and of steps are power laws in compute and the loss at the
//! optimum is one too, and Gao et al. (OpenAI, 2024), whose TopK SAEs on GPT-4 follow
//! `L(C) = 0.09 + 0.056 · C^-0.084` at the compute frontier. This crate fits such laws to runs:
//!
//! * [`fit::fit_offset_power_law`]: `y = a + b · x^-α` with an irreducible term `a`, by
//!   Levenberg-Marquardt on the residuals of `ln y` (so that every decade of `x` weighs alike),
//!   started from the best of a grid over `a`; [`fit::fit_power_law`]: `y = c · x^β` by least
//!   squares on logs.
//! * [`fit::bootstrap`]: 95% intervals of every parameter by refitting on resampled runs.
//! * [`fit::assess`]: whether a power law holds at all. A fit always returns numbers; the verdict
//!   says when they mean nothing (the law explains little of the variance, the exponent's interval
//!   contains 0, or the residuals run in long same-sign stretches, the mark of a curve of another
//!   shape).
//! * [`frontier`]: the compute frontier of a set of runs, the best run per compute bin (for
//!   `N_opt(C)` and `S_opt(C)`), and the honest test of a law: fit on the runs with at most a
//!   quarter of the largest compute and predict the frontier at the largest.
//! * [`tokens_to_convergence`]: per dictionary size, the budget at which the loss comes within
//!   5% of its fitted asymptote, and how that grows with the number of features.
//!
//! Recovering Gao et al.'s frontier law from points on it:
//!
//! ```
//! use scaling::fit_offset_power_law;
//!
//! let compute: Vec<f64> = (0..8).map(|i| 10f64.powi(i)).collect();
//! let loss: Vec<f64> = compute.iter().map(|c| 0.09 + 0.056 * c.powf(-0.084)).collect();
//! let fitted = fit_offset_power_law(&compute, &loss).unwrap();
//! assert!((fitted.law.a - 0.09).abs() < 1e-3 && (fitted.law.alpha - 0.084).abs() < 1e-3);
//! ```
//!
//! The linear algebra is 3x3 (three parameters at most), solved here by Cholesky on `ndarray`
//! arrays; LAPACK (`ndarray-linalg`) would make a system OpenBLAS a build requirement of the
//! workspace for no gain at this size.

mod convergence;
mod error;
mod fit;
mod frontier;

pub use convergence::{
    Convergence, ConvergencePoint, DoublingConvergence, doubling_convergence, tokens_to_convergence,
};
pub use error::{Result, ScalingError};
pub use fit::{
    Bootstrap, Fitted, Law, MIN_R2_LOG, OffsetPowerLaw, ParamInterval, PowerLaw, Quality, Verdict,
    assess, bootstrap, fit_offset_power_law, fit_power_law,
};
pub use frontier::{Extrapolation, best_per_bin, extrapolate, frontier};
