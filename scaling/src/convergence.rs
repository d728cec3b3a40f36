//! Tokens to convergence as the dictionary grows (OpenAI, 2024: roughly `n^0.6`).
//!
//! For each dictionary size the loss is taken against the training budget (each run's schedule
//! ends at its own budget, so the curve is the loss a run of that length reaches), fitted as
//! `L(S) = a + b · S^-ρ`, and the run counts as converged where the fit comes within a fraction
//! (5% by default) of its asymptote `a`: `S_conv = (b / (fraction · a))^(1/ρ)`. Where that lies
//! beyond the largest budget measured it is an extrapolation of the fit, and flagged as one. The
//! model-free figure beside it is how much the last doubling of the budget still bought.
//!
//! [`doubling_convergence`] is the criterion that needs no fit: the budget from which doubling
//! the tokens lowers the loss by less than a set fraction, read off the measured curve (the
//! fall over each step between budgets, per doubling, interpolated in log tokens). It exists
//! only inside the budgets measured; beyond them it is `None`, never a guess.

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
    open_unit("fraction", fraction)?;
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

/// One dictionary size's curve read without a fit: what each doubling of the budget bought.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DoublingConvergence {
    /// Features.
    pub n: f64,
    /// `(S, fall)` per step between budgets: `1 - (L_{i+1} / L_i)^(1 / log2(S_{i+1} / S_i))`, the
    /// relative fall of the loss per doubling of the tokens, at `S = sqrt(S_i · S_{i+1} / 2)`, the
    /// start of the doubling in the middle of the step (`S_i` when budgets double).
    pub falls: Vec<(f64, f64)>,
    /// The budget from which a doubling buys less than the fraction: where `falls` crosses it,
    /// linear in `log S`; the smallest budget when the first fall is already below it; `None`
    /// when no measured fall is.
    pub tokens: Option<f64>,
}

/// The budget from which a doubling of the tokens lowers the loss by less than `max_fall`
/// (module docs), for one curve `[(tokens, loss)]` of at least 3 budgets.
///
/// # Errors
/// `max_fall` outside (0, 1); fewer than 3 budgets; a budget or loss that is not positive and
/// finite; two equal budgets.
pub fn doubling_convergence(
    n: f64,
    curve: &[(f64, f64)],
    max_fall: f64,
) -> Result<DoublingConvergence> {
    open_unit("max_fall", max_fall)?;
    let mut curve = curve.to_vec();
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    if curve.len() < 3 {
        return Err(invalid(
            format!("curve of n = {n}"),
            format!("{} budgets; the criterion needs at least 3", curve.len()),
        ));
    }
    if let Some(bad) = curve
        .iter()
        .find(|(s, l)| !(s.is_finite() && *s > 0.0 && l.is_finite() && *l > 0.0))
    {
        return Err(invalid(
            format!("curve of n = {n}"),
            format!(
                "({}, {}): budgets and losses must be positive",
                bad.0, bad.1
            ),
        ));
    }
    if let Some(w) = curve.windows(2).find(|w| w[1].0 <= w[0].0) {
        return Err(invalid(
            format!("curve of n = {n}"),
            format!("the budget {} appears twice", w[0].0),
        ));
    }
    let falls: Vec<(f64, f64)> = curve
        .windows(2)
        .map(|w| {
            let doublings = (w[1].0 / w[0].0).log2();
            // A fall averaged over several doublings belongs to the doubling in the middle of
            // the step: the one that starts at sqrt(S_i · S_{i+1} / 2) (S_i itself for a step of
            // one doubling).
            (
                (w[0].0 * w[1].0 / 2.0).sqrt(),
                1.0 - (w[1].1 / w[0].1).powf(1.0 / doublings),
            )
        })
        .collect();
    let tokens = if falls[0].1 < max_fall {
        Some(falls[0].0)
    } else {
        falls.windows(2).find_map(|w| {
            let ((s0, f0), (s1, f1)) = (w[0], w[1]);
            (f0 >= max_fall && f1 < max_fall).then(|| {
                let t = (f0 - max_fall) / (f0 - f1);
                (s0.ln() + t * (s1.ln() - s0.ln())).exp()
            })
        })
    };
    Ok(DoublingConvergence { n, falls, tokens })
}

/// A fraction strictly between 0 and 1, or an error naming the parameter.
fn open_unit(name: &str, x: f64) -> Result<()> {
    if x > 0.0 && x < 1.0 {
        Ok(())
    } else {
        Err(invalid(name, format!("{x}: must be in (0, 1)")))
    }
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

    /// On `L = a + b·S^-ρ` the fall per doubling is `1 - L(2S)/L(S)`, which falls with `S`;
    /// the budget where it equals 5% is found here by bisection on the law itself, and the
    /// criterion, reading only the curve at budgets a doubling apart, must land on it (up to
    /// the log-linear interpolation between budgets).
    #[test]
    fn doubling_convergence_finds_where_a_known_curve_flattens() {
        let (a, b, rho) = (0.2, 3.0, 0.4);
        let law = |s: f64| a + b * s.powf(-rho);
        let fall = |s: f64| 1.0 - law(2.0 * s) / law(s);
        let (mut lo, mut hi) = (1e2f64, 1e9f64);
        assert!(fall(lo) > 0.05 && fall(hi) < 0.05);
        for _ in 0..200 {
            let mid = (lo * hi).sqrt();
            if fall(mid) > 0.05 { lo = mid } else { hi = mid }
        }
        let want = lo;
        let curve: Vec<(f64, f64)> = (0..16)
            .map(|i| {
                let s = 1e3 * 2f64.powi(i);
                (s, law(s))
            })
            .collect();
        let c = doubling_convergence(512.0, &curve, 0.05).unwrap();
        let got = c.tokens.unwrap();
        assert!((got / want - 1.0).abs() < 0.1, "{got} vs {want}");
        assert_eq!(c.falls.len(), 15);
        assert!((c.falls[3].1 - fall(8e3)).abs() < 1e-12, "{:?}", c.falls[3]);
        // Budgets four times apart: the fall per doubling is the square root of the step's.
        let sparse: Vec<(f64, f64)> = curve.iter().step_by(2).copied().collect();
        let c4 = doubling_convergence(512.0, &sparse, 0.05).unwrap();
        let step = 1.0 - law(4e3) / law(1e3);
        assert!((c4.falls[0].1 - (1.0 - (1.0 - step).sqrt())).abs() < 1e-12);
        assert!((c4.falls[0].0 - 2f64.sqrt() * 1e3).abs() < 1e-9);
        let got4 = c4.tokens.unwrap();
        assert!((got4 / want - 1.0).abs() < 0.1, "{got4} vs {want}");
    }

    #[test]
    fn doubling_convergence_is_none_beyond_the_budgets_and_first_when_already_flat() {
        let steep: Vec<(f64, f64)> = (0..5).map(|i| (2f64.powi(i), 0.5f64.powi(i))).collect();
        let c = doubling_convergence(64.0, &steep, 0.05).unwrap();
        assert_eq!(c.tokens, None, "{c:?}");
        let flat: Vec<(f64, f64)> = (0..5)
            .map(|i| (2f64.powi(i), 1.0 - 0.001 * f64::from(i)))
            .collect();
        let c = doubling_convergence(64.0, &flat, 0.05).unwrap();
        assert_eq!(c.tokens, Some(1.0));
        let e = doubling_convergence(64.0, &steep[..2], 0.05)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n = 64") && e.contains("2 budgets"), "{e}");
        let e = doubling_convergence(64.0, &steep, 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_fall"), "{e}");
        let mut dup = steep.clone();
        dup[1].0 = dup[0].0;
        let e = doubling_convergence(64.0, &dup, 0.05)
            .unwrap_err()
            .to_string();
        assert!(e.contains("appears twice"), "{e}");
    }
}
