//! The compute frontier of a set of runs, the best run per compute bin, and extrapolation.

use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid};
use crate::fit::{Law, OffsetPowerLaw, fit_offset_power_law};

fn check(compute: &[f64], loss: &[f64]) -> Result<()> {
    if compute.len() != loss.len() {
        return Err(invalid(
            "runs",
            format!("{} compute values but {} losses", compute.len(), loss.len()),
        ));
    }
    if let Some(i) = (0..compute.len())
        .find(|&i| !(compute[i].is_finite() && compute[i] > 0.0 && loss[i].is_finite()))
    {
        return Err(invalid(
            format!("run {i}"),
            format!(
                "compute {} and loss {}: compute must be positive, both finite",
                compute[i], loss[i]
            ),
        ));
    }
    Ok(())
}

/// The runs on the compute frontier, by increasing compute: each has a lower loss than every
/// run of at most its compute.
///
/// # Errors
/// Mismatched lengths, compute that is not positive, values that are not finite.
pub fn frontier(compute: &[f64], loss: &[f64]) -> Result<Vec<usize>> {
    check(compute, loss)?;
    let mut order: Vec<usize> = (0..compute.len()).collect();
    order.sort_by(|&a, &b| {
        compute[a]
            .total_cmp(&compute[b])
            .then(loss[a].total_cmp(&loss[b]))
    });
    let mut best = f64::INFINITY;
    Ok(order
        .into_iter()
        .filter(|&i| {
            let keep = loss[i] < best;
            best = best.min(loss[i]);
            keep
        })
        .collect())
}

/// The best run (lowest loss) in each compute bin, bins `1 / bins_per_decade` of a decade wide
/// in log10 compute, by increasing compute: the points behind `N_opt(C)` and `S_opt(C)` when the
/// grid was laid out at matched compute.
///
/// # Errors
/// As [`frontier`], and `bins_per_decade` not positive.
pub fn best_per_bin(compute: &[f64], loss: &[f64], bins_per_decade: f64) -> Result<Vec<usize>> {
    check(compute, loss)?;
    if !(bins_per_decade.is_finite() && bins_per_decade > 0.0) {
        return Err(invalid(
            "bins_per_decade",
            format!("{bins_per_decade}: must be positive"),
        ));
    }
    let mut best: std::collections::BTreeMap<i64, usize> = Default::default();
    for i in 0..compute.len() {
        let bin = (compute[i].log10() * bins_per_decade).floor() as i64;
        let e = best.entry(bin).or_insert(i);
        if loss[i] < loss[*e] {
            *e = i;
        }
    }
    Ok(best.into_values().collect())
}

/// The test of a compute law: fitted on the runs with at most `C_max / fraction` compute,
/// its prediction at `C_max` beside the measured frontier there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Extrapolation {
    /// The largest compute among the runs.
    pub c_max: f64,
    /// Runs the law was fitted to (those with compute ≤ `c_max / fraction`), and how many of
    /// them were on their frontier.
    pub fit_runs: usize,
    pub frontier_points: usize,
    pub law: OffsetPowerLaw,
    pub predicted: f64,
    /// The frontier's loss at `c_max`: the lowest loss of any run.
    pub measured: f64,
    /// `(predicted - measured) / measured`.
    pub relative_error: f64,
}

/// Fits `L(C) = a + b · C^-alpha` to the frontier of the runs with compute ≤ `C_max / fraction`
/// and predicts the frontier at `C_max`.
///
/// # Errors
/// Fewer than 4 frontier runs below the cut, `fraction` ≤ 1, invalid runs, a fit that fails.
pub fn extrapolate(compute: &[f64], loss: &[f64], fraction: f64) -> Result<Extrapolation> {
    check(compute, loss)?;
    if !(fraction.is_finite() && fraction > 1.0) {
        return Err(invalid("fraction", format!("{fraction}: must be above 1")));
    }
    let c_max = compute.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let cut: Vec<usize> = (0..compute.len())
        .filter(|&i| compute[i] <= c_max / fraction)
        .collect();
    let (c, l): (Vec<f64>, Vec<f64>) = cut.iter().map(|&i| (compute[i], loss[i])).unzip();
    let front = frontier(&c, &l)?;
    if front.len() < 4 {
        return Err(invalid(
            "runs",
            format!(
                "{} runs with compute ≤ C_max / {fraction}, {} of them on the frontier; the fit \
                 needs at least 4",
                cut.len(),
                front.len()
            ),
        ));
    }
    let (fc, fl): (Vec<f64>, Vec<f64>) = front.iter().map(|&i| (c[i], l[i])).unzip();
    let fit = fit_offset_power_law(&fc, &fl)?;
    let predicted = fit.law.at(c_max);
    let measured = loss.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Extrapolation {
        c_max,
        fit_runs: cut.len(),
        frontier_points: front.len(),
        law: fit.law,
        predicted,
        measured,
        relative_error: (predicted - measured) / measured,
    })
}
