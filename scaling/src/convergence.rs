//! Tokens to convergence as the dictionary grows (OpenAI, 2024: roughly `n^0.6`).
//!
//! For each dictionary size the loss is taken against the training budget (each run's schedule
//! ends at its own budget, so the curve is the loss a run of that length reaches), fitted as
//! `L(S) = a + b · S^-ρ`, and the run counts as converged where the fit comes within a fraction
//! (5% by default) of its asymptote `a`: `S_conv = (b / (fraction · a))^(1/ρ)`. Where that lies
//! beyond the largest budget measured it is an extrapolation of the fit, and flagged as one. The
//! model-free figure beside it is how much the last doubling of the budget still bought.

use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid};
use crate::fit::{Fitted, OffsetPowerLaw, PowerLaw, fit_offset_power_law, fit_power_law};

/// One dictionary size's loss-against-budget curve and where it converges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvergencePoint {
    /// Features.
    pub n: f64,
    /// `L(S) = a + b · S^-ρ` (`alpha` is ρ).
    pub fit: Fitted<OffsetPowerLaw>,
    /// Tokens at which the fit is within `fraction` of `a`; `None` if the fit has no positive
    /// asymptote or exponent.
    pub tokens_to_converge: Option<f64>,
    /// Whether `tokens_to_converge` lies beyond the largest budget measured.
    pub beyond_largest_budget: bool,
    /// `1 - L(largest) / L(second largest)`: what the last doubling (or step) of the budget
    /// bought, measured.
    pub fall_over_last_step: f64,
}

/// Every size's convergence point, and `S_conv ∝ n^δ` over the sizes that have one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Convergence {
    pub fraction: f64,
    pub points: Vec<ConvergencePoint>,
    /// `S_conv = c · n^beta` (`beta` is δ); `None` with fewer than three sizes converging.
    pub law: Option<Fitted<PowerLaw>>,
    /// Whether every point of the law is an extrapolation beyond the budgets measured.
    pub all_extrapolated: bool,
}

/// Fits each curve (`(n, [(tokens, loss)])`, at least 4 budgets each) and the power law of the
/// convergence points in `n`.
///
/// # Errors
/// `fraction` outside (0, 1), a curve with fewer than 4 budgets or invalid values, a fit that
/// fails.
pub fn tokens_to_convergence(
    curves: &[(f64, Vec<(f64, f64)>)],
    fraction: f64,
) -> Result<Convergence> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(invalid(
            "fraction",
            format!("{fraction}: must be in (0, 1)"),
        ));
    }
    let mut points = Vec::with_capacity(curves.len());
    for (n, curve) in curves {
        let mut curve = curve.clone();
        curve.sort_by(|a, b| a.0.total_cmp(&b.0));
        if curve.len() < 4 {
            return Err(invalid(
                format!("curve of n = {n}"),
                format!("{} budgets; the fit needs at least 4", curve.len()),
            ));
        }
        let (s, l): (Vec<f64>, Vec<f64>) = curve.iter().copied().unzip();
        let fit = fit_offset_power_law(&s, &l)?;
        let OffsetPowerLaw { a, b, alpha } = fit.law;
        let tokens = (a > 0.0 && b > 0.0 && alpha > 0.0)
            .then(|| (b / (fraction * a)).powf(1.0 / alpha))
            .filter(|t| t.is_finite());
        let largest = s[s.len() - 1];
        points.push(ConvergencePoint {
            n: *n,
            fit,
            tokens_to_converge: tokens,
            beyond_largest_budget: tokens.is_none_or(|t| t > largest),
            fall_over_last_step: 1.0 - l[l.len() - 1] / l[l.len() - 2],
        });
    }
    let converging: Vec<&ConvergencePoint> = points
        .iter()
        .filter(|p| p.tokens_to_converge.is_some())
        .collect();
    let law = if converging.len() >= 3 {
        let (x, y): (Vec<f64>, Vec<f64>) = converging
            .iter()
            .filter_map(|p| Some((p.n, p.tokens_to_converge?)))
            .unzip();
        Some(fit_power_law(&x, &y)?)
    } else {
        None
    };
    Ok(Convergence {
        fraction,
        all_extrapolated: converging.iter().all(|p| p.beyond_largest_budget),
        points,
        law,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Curves made from a known law: asymptote `a_n`, convergence at `S_conv = 1e4 · n^0.6`
    /// within 5%. The fit must find δ = 0.6 and each `S_conv`.
    #[test]
    fn recovers_a_known_convergence_law() {
        let rho = 0.5;
        let curves: Vec<(f64, Vec<(f64, f64)>)> = [256.0f64, 512.0, 1024.0, 2048.0, 4096.0]
            .iter()
            .map(|&n| {
                let a = 0.3 * n.powf(-0.2);
                let s_conv = 1e4 * n.powf(0.6);
                let b = 0.05 * a * s_conv.powf(rho);
                let curve = (0..6)
                    .map(|i| {
                        let s = 1e4 * 4f64.powi(i);
                        (s, a + b * s.powf(-rho))
                    })
                    .collect();
                (n, curve)
            })
            .collect();
        let c = tokens_to_convergence(&curves, 0.05).unwrap();
        let law = c.law.as_ref().unwrap();
        assert!((law.law.beta - 0.6).abs() < 0.02, "{law:?}");
        for p in &c.points {
            let want = 1e4 * p.n.powf(0.6);
            let got = p.tokens_to_converge.unwrap();
            assert!(
                (got / want - 1.0).abs() < 0.05,
                "n {}: {got} vs {want}",
                p.n
            );
            assert!(p.fall_over_last_step > 0.0);
        }
    }

    #[test]
    fn too_few_budgets_or_a_bad_fraction_are_named() {
        let short = vec![(64.0, vec![(1.0, 0.5), (2.0, 0.4), (4.0, 0.35)])];
        let e = tokens_to_convergence(&short, 0.05).unwrap_err().to_string();
        assert!(e.contains("n = 64") && e.contains("3 budgets"), "{e}");
        let e = tokens_to_convergence(&short, 1.5).unwrap_err().to_string();
        assert!(e.contains("fraction"), "{e}");
    }
}
