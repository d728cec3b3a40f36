//! Power-law fits in log space, bootstrap intervals, and the verdict on whether a law holds.

use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ScalingError, invalid};

/// A law `y(x)` with named parameters, one of which is its exponent.
pub trait Law: Clone {
    /// The law's value at `x`.
    fn at(&self, x: f64) -> f64;
    /// Parameters by name, in a fixed order.
    fn params(&self) -> Vec<(&'static str, f64)>;
    /// The name of the exponent among [`Law::params`].
    fn exponent_name(&self) -> &'static str;
}

/// `y = a + b · x^(-alpha)`: falls as a power of `x` towards the irreducible `a` (≥ 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OffsetPowerLaw {
    pub a: f64,
    pub b: f64,
    pub alpha: f64,
}

impl Law for OffsetPowerLaw {
    fn at(&self, x: f64) -> f64 {
        self.a + self.b * x.powf(-self.alpha)
    }
    fn params(&self) -> Vec<(&'static str, f64)> {
        vec![("a", self.a), ("b", self.b), ("alpha", self.alpha)]
    }
    fn exponent_name(&self) -> &'static str {
        "alpha"
    }
}

/// `y = c · x^beta`, e.g. the optimal number of features as compute grows.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PowerLaw {
    pub c: f64,
    pub beta: f64,
}

impl Law for PowerLaw {
    fn at(&self, x: f64) -> f64 {
        self.c * x.powf(self.beta)
    }
    fn params(&self) -> Vec<(&'static str, f64)> {
        vec![("c", self.c), ("beta", self.beta)]
    }
    fn exponent_name(&self) -> &'static str {
        "beta"
    }
}

/// How well a law fits, in log space.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Points fitted.
    pub n: usize,
    /// Root mean square of `ln y - ln ŷ`: 0.01 is a 1% typical error.
    pub rmse_log: f64,
    /// Share of the variance of `ln y` the law explains.
    pub r2_log: f64,
}

/// A fitted law and its quality.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fitted<L> {
    pub law: L,
    pub quality: Quality,
}

/// Points a law can be fitted to: equal lengths, at least `min` points, positive finite values,
/// at least three distinct `x`.
fn check(x: &[f64], y: &[f64], min: usize) -> Result<()> {
    if x.len() != y.len() {
        return Err(invalid(
            "points",
            format!("{} x values but {} y values", x.len(), y.len()),
        ));
    }
    if x.len() < min {
        return Err(invalid(
            "points",
            format!("{} given, the law needs at least {min}", x.len()),
        ));
    }
    for (i, (&a, &b)) in x.iter().zip(y).enumerate() {
        if !(a.is_finite() && a > 0.0 && b.is_finite() && b > 0.0) {
            return Err(invalid(
                format!("point {i}"),
                format!("({a}, {b}): both must be positive and finite (they are fitted in logs)"),
            ));
        }
    }
    let mut xs = x.to_vec();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    if xs.len() < 3 {
        return Err(invalid(
            "points",
            format!("{} distinct x values; a law needs at least 3", xs.len()),
        ));
    }
    Ok(())
}

fn quality(law: &impl Law, x: &[f64], y: &[f64]) -> Quality {
    let ly: Vec<f64> = y.iter().map(|v| v.ln()).collect();
    let mean = ly.iter().sum::<f64>() / ly.len() as f64;
    let sse: f64 = x
        .iter()
        .zip(&ly)
        .map(|(&x, &l)| (l - law.at(x).ln()).powi(2))
        .sum();
    let sst: f64 = ly.iter().map(|l| (l - mean).powi(2)).sum();
    Quality {
        n: x.len(),
        rmse_log: (sse / x.len() as f64).sqrt(),
        r2_log: if sst > 0.0 { 1.0 - sse / sst } else { 0.0 },
    }
}

/// Ordinary least squares of `v` on `u`: (intercept, slope).
fn ols(u: &[f64], v: &[f64]) -> (f64, f64) {
    let n = u.len() as f64;
    let (mu, mv) = (u.iter().sum::<f64>() / n, v.iter().sum::<f64>() / n);
    let cov: f64 = u.iter().zip(v).map(|(a, b)| (a - mu) * (b - mv)).sum();
    let var: f64 = u.iter().map(|a| (a - mu).powi(2)).sum();
    let slope = cov / var;
    (mv - slope * mu, slope)
}

/// Fits `y = c · x^beta` by least squares on `(ln x, ln y)`.
///
/// # Errors
/// Fewer than 3 points or distinct `x`, mismatched lengths, values that are not positive.
pub fn fit_power_law(x: &[f64], y: &[f64]) -> Result<Fitted<PowerLaw>> {
    check(x, y, 3)?;
    let lx: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    let ly: Vec<f64> = y.iter().map(|v| v.ln()).collect();
    let (ic, slope) = ols(&lx, &ly);
    let law = PowerLaw {
        c: ic.exp(),
        beta: slope,
    };
    Ok(Fitted {
        quality: quality(&law, x, y),
        law,
    })
}

/// Fits `y = a + b · x^-alpha` (`a ≥ 0`) by least squares on `ln y`: the start is the best of a
/// grid over `a` (for a fixed `a`, `ln(y - a)` is linear in `ln x`), then Levenberg-Marquardt on
/// `(a, ln b, alpha)`.
///
/// # Errors
/// Fewer than 4 points, fewer than 3 distinct `x`, values that are not positive, no finite fit.
pub fn fit_offset_power_law(x: &[f64], y: &[f64]) -> Result<Fitted<OffsetPowerLaw>> {
    check(x, y, 4)?;
    let lx: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    let ly: Vec<f64> = y.iter().map(|v| v.ln()).collect();
    let y_min = y.iter().copied().fold(f64::INFINITY, f64::min);
    // Residuals of ln y for p = (a, ln b, alpha).
    let sse = |p: &[f64; 3]| -> f64 {
        lx.iter()
            .zip(&ly)
            .map(|(&u, &l)| (l - (p[0] + (p[1] - p[2] * u).exp()).ln()).powi(2))
            .sum()
    };
    const GRID: usize = 200;
    let mut p = [0.0; 3];
    let mut best = f64::INFINITY;
    for i in 0..GRID {
        let a = y_min * i as f64 / GRID as f64;
        let lz: Vec<f64> = y.iter().map(|v| (v - a).ln()).collect();
        let (ic, slope) = ols(&lx, &lz);
        let q = [a, ic, -slope];
        let s = sse(&q);
        if s.is_finite() && s < best {
            best = s;
            p = q;
        }
    }
    if !best.is_finite() {
        return Err(ScalingError::NoFit(
            "no starting point gives a finite error".into(),
        ));
    }
    let n = x.len();
    let mut lambda = 1e-3;
    for _ in 0..500 {
        let mut jac = Array2::<f64>::zeros((n, 3));
        let mut r = Array1::<f64>::zeros(n);
        for i in 0..n {
            let power = (p[1] - p[2] * lx[i]).exp();
            let m = p[0] + power;
            r[i] = ly[i] - m.ln();
            jac[[i, 0]] = -1.0 / m;
            jac[[i, 1]] = -power / m;
            jac[[i, 2]] = power * lx[i] / m;
        }
        let a = jac.t().dot(&jac);
        let g = jac.t().dot(&r);
        let mut stepped = false;
        while lambda < 1e12 {
            let mut damped = a.clone();
            for k in 0..3 {
                damped[[k, k]] += lambda * a[[k, k]].max(1e-12);
            }
            let Some(delta) = solve_spd(&damped, &(-&g)) else {
                lambda *= 4.0;
                continue;
            };
            let q = [(p[0] + delta[0]).max(0.0), p[1] + delta[1], p[2] + delta[2]];
            let s = sse(&q);
            if s.is_finite() && s <= best {
                let gain = best - s;
                p = q;
                best = s;
                lambda = (lambda / 3.0).max(1e-12);
                stepped = gain > 1e-15 * (1.0 + best);
                break;
            }
            lambda *= 4.0;
        }
        if !stepped {
            break;
        }
    }
    let law = OffsetPowerLaw {
        a: p[0],
        b: p[1].exp(),
        alpha: p[2],
    };
    if !(law.b.is_finite() && law.alpha.is_finite()) {
        return Err(ScalingError::NoFit(format!("{law:?}")));
    }
    Ok(Fitted {
        quality: quality(&law, x, y),
        law,
    })
}

/// Solves `a x = b` for a symmetric positive definite `a` (Cholesky); `None` if it is not.
fn solve_spd(a: &Array2<f64>, b: &Array1<f64>) -> Option<Array1<f64>> {
    let n = b.len();
    let mut l = Array2::<f64>::zeros((n, n));
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[[i, k]] * l[[j, k]]).sum();
            if i == j {
                let d = a[[i, i]] - s;
                if !(d > 0.0 && d.is_finite()) {
                    return None;
                }
                l[[i, i]] = d.sqrt();
            } else {
                l[[i, j]] = (a[[i, j]] - s) / l[[j, j]];
            }
        }
    }
    let mut z = Array1::<f64>::zeros(n);
    for i in 0..n {
        z[i] = (b[i] - (0..i).map(|k| l[[i, k]] * z[k]).sum::<f64>()) / l[[i, i]];
    }
    let mut x = Array1::<f64>::zeros(n);
    for i in (0..n).rev() {
        x[i] = (z[i] - (i + 1..n).map(|k| l[[k, i]] * x[k]).sum::<f64>()) / l[[i, i]];
    }
    Some(x)
}

/// A parameter with its bootstrap 95% interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamInterval {
    pub name: String,
    /// From the fit on all points.
    pub estimate: f64,
    /// 2.5th and 97.5th percentiles over the resamples.
    pub lo: f64,
    pub hi: f64,
}

impl ParamInterval {
    /// Whether `v` lies in the interval.
    pub fn contains(&self, v: f64) -> bool {
        self.lo <= v && v <= self.hi
    }
}

/// Bootstrap intervals of every parameter of a law.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub params: Vec<ParamInterval>,
    pub resamples: usize,
    /// Resamples that could not be fitted (e.g. fewer than three distinct x drawn).
    pub failed: usize,
}

impl Bootstrap {
    /// The interval of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&ParamInterval> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// Refits `fit` on `resamples` draws of the points with replacement (a ChaCha8 stream seeded by
/// `seed`) and takes the 2.5th and 97.5th percentile of each parameter.
///
/// # Errors
/// The fit on all points fails, or more than half of the resamples do.
pub fn bootstrap<L: Law>(
    x: &[f64],
    y: &[f64],
    fit: impl Fn(&[f64], &[f64]) -> Result<Fitted<L>>,
    resamples: usize,
    seed: u64,
) -> Result<Bootstrap> {
    let full = fit(x, y)?;
    if resamples < 20 {
        return Err(invalid(
            "resamples",
            format!("{resamples}: at least 20 for a 95% interval"),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let names = full.law.params();
    let mut draws: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); names.len()];
    let mut failed = 0;
    let (mut xs, mut ys) = (Vec::with_capacity(x.len()), Vec::with_capacity(x.len()));
    for _ in 0..resamples {
        xs.clear();
        ys.clear();
        for _ in 0..x.len() {
            let i = rng.random_range(0..x.len());
            xs.push(x[i]);
            ys.push(y[i]);
        }
        match fit(&xs, &ys) {
            Ok(f) => {
                for (d, (_, v)) in draws.iter_mut().zip(f.law.params()) {
                    d.push(v);
                }
            }
            Err(_) => failed += 1,
        }
    }
    if failed * 2 > resamples {
        return Err(ScalingError::NoFit(format!(
            "only {} of {resamples} bootstrap resamples could be fitted",
            resamples - failed
        )));
    }
    let pct = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let params = names
        .iter()
        .zip(&mut draws)
        .map(|((name, est), d)| {
            d.sort_by(f64::total_cmp);
            ParamInterval {
                name: (*name).to_string(),
                estimate: *est,
                lo: pct(d, 0.025),
                hi: pct(d, 0.975),
            }
        })
        .collect();
    Ok(Bootstrap {
        params,
        resamples,
        failed,
    })
}

/// Whether a fitted power law describes the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    Holds,
    /// Why not.
    NoLaw(String),
}

/// The law's share of the variance of `ln y` below which no law is claimed.
pub const MIN_R2_LOG: f64 = 0.8;

/// Judges a fit: no law when it explains less than [`MIN_R2_LOG`] of the variance of `ln y`,
/// when the exponent's interval contains 0 (no trend), or when the residuals, ordered by `x`,
/// change sign far less often than chance would (Wald-Wolfowitz runs test, z < -2.58, with at
/// least 10 points): the data curve away from any power law.
pub fn assess<L: Law>(fitted: &Fitted<L>, boot: &Bootstrap, x: &[f64], y: &[f64]) -> Verdict {
    let q = fitted.quality;
    if q.r2_log < MIN_R2_LOG {
        return Verdict::NoLaw(format!(
            "the law explains {:.0}% of the variance of log y (at least {:.0}% needed)",
            100.0 * q.r2_log,
            100.0 * MIN_R2_LOG
        ));
    }
    if let Some(e) = boot.get(fitted.law.exponent_name())
        && e.contains(0.0)
    {
        return Verdict::NoLaw(format!(
            "the exponent's 95% interval [{:.3}, {:.3}] contains 0: no trend",
            e.lo, e.hi
        ));
    }
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let signs: Vec<bool> = order
        .iter()
        .map(|&i| y[i].ln() - fitted.law.at(x[i]).ln())
        .filter(|r| *r != 0.0)
        .map(|r| r > 0.0)
        .collect();
    let n1 = signs.iter().filter(|s| **s).count() as f64;
    let n2 = signs.len() as f64 - n1;
    let n = n1 + n2;
    if n >= 10.0 && n1 > 0.0 && n2 > 0.0 {
        let runs = 1 + signs.windows(2).filter(|w| w[0] != w[1]).count();
        let mu = 2.0 * n1 * n2 / n + 1.0;
        let var = 2.0 * n1 * n2 * (2.0 * n1 * n2 - n) / (n * n * (n - 1.0));
        let z = (runs as f64 - mu) / var.sqrt();
        if z < -2.58 {
            return Verdict::NoLaw(format!(
                "the residuals change sign {} times in {n} points where about {:.0} is \
                 expected (z = {z:.1}): the data curve away from a power law",
                runs - 1,
                mu - 1.0
            ));
        }
    }
    Verdict::Holds
}
