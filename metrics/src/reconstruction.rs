//! Reconstruction metrics over held-out activations, accumulated batch by batch.
//!
//! The definitions follow SAELens and SAEBench so that numbers can be compared with theirs:
//!
//! | metric | definition |
//! |---|---|
//! | `l0` | mean over rows of the number of features with activation > 0 |
//! | `mse` | mean over rows *and* dimensions of (x - x_hat)^2 |
//! | `fvu` | sum over rows of ‖x - x_hat‖² / sum over rows of ‖x - mean(x)‖², the mean taken over the whole evaluation set |
//! | `explained_variance` | 1 - fvu |
//! | `cosine_similarity` | mean over rows of cos(x, x_hat) (0 where either is the zero vector) |
//! | `l2_ratio` | mean over rows of ‖x_hat‖ / ‖x‖ (shrinkage: below 1 when the SAE under-reconstructs) |
//! | `dead_fraction` | fraction of features that never fired (> 0) on any of the `n_tokens` rows |
//! | `dense_fraction` | fraction of features whose firing rate is above `dense_threshold` |
//!
//! The denominator of the FVU needs the mean over *all* rows, which is unknown until the end;
//! per-dimension running means and sums of squared deviations are merged batch by batch with
//! Chan's parallel formula in f64, which keeps millions of rows exact to many digits without a
//! second pass and without the cancellation of `Σx² - N·mean²`.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result, shape_err};

/// Firing counts of every feature over a number of tokens: the raw material of dead/dense
/// fractions, the feature-density histogram and the per-feature density on the index page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDensity {
    /// Rows (tokens) seen.
    pub n_tokens: u64,
    /// For each feature, on how many of those rows its activation was > 0.
    pub fire_counts: Vec<u64>,
}

/// A histogram of log10 firing rates; dead features (rate 0, log10 = -inf) are counted apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DensityHistogram {
    /// `counts.len() + 1` bin edges in log10(firing rate); bin i is `[edges[i], edges[i+1])`,
    /// the last bin closed on the right.
    pub bin_edges: Vec<f64>,
    /// Features per bin (features that fired at least once).
    pub counts: Vec<u64>,
    /// Features that never fired.
    pub n_dead: u64,
    /// Tokens the rates were measured on (the lowest measurable rate is 1 / n_tokens).
    pub n_tokens: u64,
}

impl FeatureDensity {
    /// No tokens seen yet, `d_sae` features.
    pub fn new(d_sae: usize) -> Self {
        Self {
            n_tokens: 0,
            fire_counts: vec![0; d_sae],
        }
    }

    /// Number of features.
    pub fn d_sae(&self) -> usize {
        self.fire_counts.len()
    }

    /// Per-feature firing rate (fraction of tokens with activation > 0).
    pub fn firing_rates(&self) -> Vec<f64> {
        let n = self.n_tokens.max(1) as f64;
        self.fire_counts.iter().map(|&c| c as f64 / n).collect()
    }

    /// Fraction of features that never fired over `n_tokens` tokens.
    pub fn dead_fraction(&self) -> f64 {
        if self.fire_counts.is_empty() {
            return 0.0;
        }
        let dead = self.fire_counts.iter().filter(|&&c| c == 0).count();
        dead as f64 / self.fire_counts.len() as f64
    }

    /// Fraction of features firing on more than `threshold` of the tokens (e.g. 0.1).
    pub fn dense_fraction(&self, threshold: f64) -> f64 {
        if self.fire_counts.is_empty() {
            return 0.0;
        }
        let dense = self
            .firing_rates()
            .iter()
            .filter(|&&r| r > threshold)
            .count();
        dense as f64 / self.fire_counts.len() as f64
    }

    /// Histogram of log10 firing rate from log10(1/n_tokens) (the rarest possible live feature)
    /// up to 0 (fires on every token), in `n_bins` equal bins.
    ///
    /// # Errors
    /// `InvalidArgument` if `n_bins` is 0, `Empty` if no tokens were seen.
    pub fn log10_histogram(&self, n_bins: usize) -> Result<DensityHistogram> {
        if n_bins == 0 {
            return Err(MetricsError::InvalidArgument {
                what: "n_bins".into(),
                reason: "a histogram needs at least one bin".into(),
            });
        }
        if self.n_tokens == 0 {
            return Err(MetricsError::Empty {
                what: "tokens for the feature-density histogram".into(),
            });
        }
        let lo = -(self.n_tokens as f64).log10();
        // One token gives lo == 0: widen so the single bin has a width.
        let (lo, hi) = if lo == 0.0 { (-1.0, 0.0) } else { (lo, 0.0) };
        let width = (hi - lo) / n_bins as f64;
        let bin_edges: Vec<f64> = (0..=n_bins).map(|i| lo + width * i as f64).collect();
        let mut counts = vec![0u64; n_bins];
        let mut n_dead = 0;
        for &c in &self.fire_counts {
            if c == 0 {
                n_dead += 1;
                continue;
            }
            let r = (c as f64 / self.n_tokens as f64).log10();
            let i = (((r - lo) / width).floor().max(0.0) as usize).min(n_bins - 1);
            counts[i] += 1;
        }
        Ok(DensityHistogram {
            bin_edges,
            counts,
            n_dead,
            n_tokens: self.n_tokens,
        })
    }

    /// Merges counts measured on other tokens (e.g. another shard of the evaluation set).
    ///
    /// # Errors
    /// `ShapeMismatch` if the two disagree on the number of features.
    pub fn merge(&mut self, other: &FeatureDensity) -> Result<()> {
        if other.d_sae() != self.d_sae() {
            return Err(shape_err(
                "feature density to merge",
                format!("{} features", self.d_sae()),
                format!("{} features", other.d_sae()),
            ));
        }
        self.n_tokens += other.n_tokens;
        for (a, b) in self.fire_counts.iter_mut().zip(&other.fire_counts) {
            *a += b;
        }
        Ok(())
    }
}

/// Reconstruction quality of an SAE on a set of activations. Serialises to JSON as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconstructionMetrics {
    /// Rows (tokens) the metrics were measured on.
    pub n_tokens: u64,
    /// Width of the activations.
    pub d_in: usize,
    /// Number of SAE features.
    pub d_sae: usize,
    /// Mean number of active features per token.
    pub l0: f64,
    /// Mean squared error per element.
    pub mse: f64,
    /// Fraction of variance unexplained, Σ‖x - x̂‖² / Σ‖x - mean(x)‖².
    pub fvu: f64,
    /// 1 - fvu.
    pub explained_variance: f64,
    /// Mean cosine similarity between x and x̂.
    pub cosine_similarity: f64,
    /// Mean ‖x̂‖ / ‖x‖ over rows with ‖x‖ > 0.
    pub l2_ratio: f64,
    /// Mean ‖x‖ over rows (to judge the scale of `mse`).
    pub mean_l2_norm: f64,
    /// Fraction of features never active over `n_tokens` tokens.
    pub dead_fraction: f64,
    /// Fraction of features with firing rate above `dense_threshold`.
    pub dense_fraction: f64,
    /// The firing-rate threshold used for `dense_fraction`.
    pub dense_threshold: f64,
    /// Histogram of log10 firing rates.
    pub density_histogram: DensityHistogram,
}

/// Streaming accumulator: feed batches of (x, x̂, feature activations), read
/// [`ReconstructionMetrics`] at the end. Memory is O(d_in + d_sae) whatever the number of rows.
#[derive(Debug, Clone)]
pub struct ReconstructionAccumulator {
    d_in: usize,
    n: u64,
    /// Running per-dimension mean of x.
    mean: Vec<f64>,
    /// Running per-dimension sum of squared deviations from `mean`.
    m2: Vec<f64>,
    sum_sq_err: f64,
    sum_l0: f64,
    sum_cos: f64,
    sum_l2_ratio: f64,
    n_l2_ratio: u64,
    sum_norm: f64,
    density: FeatureDensity,
}

/// Per-batch sufficient statistics, produced either on the tensor's device or from slices.
struct BatchStats {
    n: u64,
    dim_sum: Vec<f64>,
    dim_m2: Vec<f64>,
    sum_sq_err: f64,
    dot: Vec<f64>,
    x_sq: Vec<f64>,
    xh_sq: Vec<f64>,
    l0: Vec<f64>,
    fires: Vec<u64>,
}

/// Matches torch's `cosine_similarity` eps: rows with a zero vector get similarity 0.
const COS_EPS: f64 = 1e-8;

impl ReconstructionAccumulator {
    /// An empty accumulator for activations of width `d_in` and an SAE of `d_sae` features.
    pub fn new(d_in: usize, d_sae: usize) -> Self {
        Self {
            d_in,
            n: 0,
            mean: vec![0.0; d_in],
            m2: vec![0.0; d_in],
            sum_sq_err: 0.0,
            sum_l0: 0.0,
            sum_cos: 0.0,
            sum_l2_ratio: 0.0,
            n_l2_ratio: 0,
            sum_norm: 0.0,
            density: FeatureDensity::new(d_sae),
        }
    }

    /// Rows accumulated so far.
    pub fn n_tokens(&self) -> u64 {
        self.n
    }

    /// Firing counts so far.
    pub fn density(&self) -> &FeatureDensity {
        &self.density
    }

    /// Adds a batch given as tensors: `x` and `x_hat` are `[n, d_in]`, `feature_acts` is
    /// `[n, d_sae]`, any float dtype, any device. The reductions run on the tensors' device and
    /// only per-row and per-column sums come back to the host.
    ///
    /// # Errors
    /// `ShapeMismatch` naming the tensor whose shape is wrong; `NonFinite` if x or x_hat holds
    /// NaN or infinity.
    pub fn update(&mut self, x: &Tensor, x_hat: &Tensor, feature_acts: &Tensor) -> Result<()> {
        let (n, d) = x
            .dims2()
            .map_err(|_| shape_err("x", "[n, d_in]", format!("{:?}", x.dims())))?;
        if d != self.d_in {
            return Err(shape_err(
                "x",
                format!("[n, {}]", self.d_in),
                format!("{:?}", x.dims()),
            ));
        }
        if x_hat.dims() != x.dims() {
            return Err(shape_err(
                "x_hat",
                format!("{:?} (the shape of x)", x.dims()),
                format!("{:?}", x_hat.dims()),
            ));
        }
        let d_sae = self.density.d_sae();
        if feature_acts.dims() != [n, d_sae] {
            return Err(shape_err(
                "feature_acts",
                format!("[{n}, {d_sae}]"),
                format!("{:?}", feature_acts.dims()),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let active = feature_acts
            .to_dtype(DType::F32)?
            .gt(0f32)?
            .to_dtype(DType::F32)?;
        let l0 = active
            .sum(1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        // Counts within one batch are exact in f32 up to 2^24 rows.
        let fires = active
            .sum(0)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|c| c.round() as u64)
            .collect();
        self.update_dense_parts(x, x_hat, l0, fires)
    }

    fn update_dense_parts(
        &mut self,
        x: &Tensor,
        x_hat: &Tensor,
        l0: Vec<f64>,
        fires: Vec<u64>,
    ) -> Result<()> {
        let n = x.dim(0)?;
        if x.dims() != [n, self.d_in] || x_hat.dims() != x.dims() {
            return Err(shape_err(
                "x and x_hat",
                format!("both [n, {}]", self.d_in),
                format!("{:?} and {:?}", x.dims(), x_hat.dims()),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let x = x.to_dtype(DType::F32)?;
        let x_hat = x_hat.to_dtype(DType::F32)?;

        let dim_sum_t = x.sum(0)?;
        let batch_mean = (&dim_sum_t / n as f64)?;
        let dim_m2 = x.broadcast_sub(&batch_mean)?.sqr()?.sum(0)?;
        let err_sq = (&x - &x_hat)?.sqr()?.sum(1)?;
        let dot = (&x * &x_hat)?.sum(1)?;
        let x_sq = x.sqr()?.sum(1)?;
        let xh_sq = x_hat.sqr()?.sum(1)?;

        let to64 = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(t.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
        };
        let stats = BatchStats {
            n: n as u64,
            dim_sum: to64(&dim_sum_t)?,
            dim_m2: to64(&dim_m2)?,
            sum_sq_err: to64(&err_sq)?.iter().sum(),
            dot: to64(&dot)?,
            x_sq: to64(&x_sq)?,
            xh_sq: to64(&xh_sq)?,
            l0,
            fires,
        };
        self.merge_batch(stats)
    }

    /// Adds a batch whose feature activations are sparse, in CSR form as `sae_core`'s
    /// `SparseCodes` holds them: row `r`'s (feature, value) pairs are
    /// `features[offsets[r]..offsets[r + 1]]` and the same range of `values`.
    ///
    /// # Errors
    /// As [`Self::update`]; `ShapeMismatch` for inconsistent CSR arrays or a feature index out of range.
    pub fn update_sparse(
        &mut self,
        x: &Tensor,
        x_hat: &Tensor,
        offsets: &[usize],
        features: &[u32],
        values: &[f32],
    ) -> Result<()> {
        let n = x.dim(0).unwrap_or(0);
        let d_sae = self.density.d_sae();
        if offsets.len() != n + 1 || features.len() != values.len() || offsets[n] != values.len() {
            return Err(shape_err(
                "sparse feature activations",
                format!("{} offsets ending at the number of values", n + 1),
                format!(
                    "{} offsets, {} features, {} values",
                    offsets.len(),
                    features.len(),
                    values.len()
                ),
            ));
        }
        let mut l0 = vec![0.0; n];
        let mut fires = vec![0u64; d_sae];
        for r in 0..n {
            for i in offsets[r]..offsets[r + 1] {
                let f = features[i] as usize;
                if f >= d_sae {
                    return Err(shape_err(
                        "sparse feature index",
                        format!("< d_sae = {d_sae}"),
                        format!("{f}"),
                    ));
                }
                if values[i] > 0.0 {
                    l0[r] += 1.0;
                    fires[f] += 1;
                }
            }
        }
        self.update_dense_parts(x, x_hat, l0, fires)
    }

    /// Adds a batch given as row-major slices: `x` and `x_hat` of `n * d_in` values,
    /// `feature_acts` of `n * d_sae` values.
    ///
    /// # Errors
    /// As [`Self::update`].
    pub fn update_slices(&mut self, x: &[f32], x_hat: &[f32], feature_acts: &[f32]) -> Result<()> {
        let d = self.d_in;
        let d_sae = self.density.d_sae();
        if d == 0 || !x.len().is_multiple_of(d) {
            return Err(shape_err(
                "x",
                format!("a multiple of d_in = {d} values"),
                format!("{} values", x.len()),
            ));
        }
        let n = x.len() / d;
        if x_hat.len() != x.len() {
            return Err(shape_err(
                "x_hat",
                format!("{} values (as x)", x.len()),
                format!("{} values", x_hat.len()),
            ));
        }
        if feature_acts.len() != n * d_sae {
            return Err(shape_err(
                "feature_acts",
                format!("{n} rows x {d_sae} features = {} values", n * d_sae),
                format!("{} values", feature_acts.len()),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let mut dim_sum = vec![0.0f64; d];
        for row in x.chunks_exact(d) {
            for (s, &v) in dim_sum.iter_mut().zip(row) {
                *s += f64::from(v);
            }
        }
        let bm: Vec<f64> = dim_sum.iter().map(|s| s / n as f64).collect();
        let mut dim_m2 = vec![0.0f64; d];
        let (mut dot, mut x_sq, mut xh_sq) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut sum_sq_err = 0.0;
        for (r, (row, rowh)) in x.chunks_exact(d).zip(x_hat.chunks_exact(d)).enumerate() {
            for j in 0..d {
                let (a, b) = (f64::from(row[j]), f64::from(rowh[j]));
                dim_m2[j] += (a - bm[j]) * (a - bm[j]);
                sum_sq_err += (a - b) * (a - b);
                dot[r] += a * b;
                x_sq[r] += a * a;
                xh_sq[r] += b * b;
            }
        }
        let mut l0 = vec![0.0; n];
        let mut fires = vec![0u64; d_sae];
        if d_sae > 0 {
            for (r, row) in feature_acts.chunks_exact(d_sae).enumerate() {
                for (f, &a) in row.iter().enumerate() {
                    if a > 0.0 {
                        l0[r] += 1.0;
                        fires[f] += 1;
                    }
                }
            }
        }
        self.merge_batch(BatchStats {
            n: n as u64,
            dim_sum,
            dim_m2,
            sum_sq_err,
            dot,
            x_sq,
            xh_sq,
            l0,
            fires,
        })
    }

    fn merge_batch(&mut self, b: BatchStats) -> Result<()> {
        if !b.sum_sq_err.is_finite() {
            return Err(MetricsError::NonFinite {
                what: "squared reconstruction error of a batch (x or x_hat holds NaN/inf)".into(),
                value: b.sum_sq_err,
            });
        }
        // Chan et al.: merge (n_a, mean_a, M2_a) with the batch's (n_b, mean_b, M2_b).
        let (na, nb) = (self.n as f64, b.n as f64);
        let nt = na + nb;
        for j in 0..self.d_in {
            let mb = b.dim_sum[j] / nb;
            let delta = mb - self.mean[j];
            self.mean[j] += delta * nb / nt;
            self.m2[j] += b.dim_m2[j] + delta * delta * na * nb / nt;
        }
        self.n += b.n;
        self.sum_sq_err += b.sum_sq_err;
        for r in 0..b.dot.len() {
            let (nx, nh) = (b.x_sq[r].sqrt(), b.xh_sq[r].sqrt());
            self.sum_cos += b.dot[r] / (nx.max(COS_EPS) * nh.max(COS_EPS));
            self.sum_norm += nx;
            if nx > 0.0 {
                self.sum_l2_ratio += nh / nx;
                self.n_l2_ratio += 1;
            }
        }
        self.sum_l0 += b.l0.iter().sum::<f64>();
        self.density.n_tokens += b.n;
        for (c, f) in self.density.fire_counts.iter_mut().zip(&b.fires) {
            *c += f;
        }
        Ok(())
    }

    /// The metrics over everything accumulated, with `dense_threshold` for the dense fraction
    /// and a 50-bin density histogram.
    ///
    /// # Errors
    /// `Empty` if no rows were accumulated.
    pub fn finish(&self, dense_threshold: f64) -> Result<ReconstructionMetrics> {
        if self.n == 0 {
            return Err(MetricsError::Empty {
                what: "activation rows".into(),
            });
        }
        let n = self.n as f64;
        let total_var: f64 = self.m2.iter().sum();
        let fvu = if total_var > 0.0 {
            self.sum_sq_err / total_var
        } else if self.sum_sq_err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        Ok(ReconstructionMetrics {
            n_tokens: self.n,
            d_in: self.d_in,
            d_sae: self.density.d_sae(),
            l0: self.sum_l0 / n,
            mse: self.sum_sq_err / (n * self.d_in as f64),
            fvu,
            explained_variance: 1.0 - fvu,
            cosine_similarity: self.sum_cos / n,
            l2_ratio: if self.n_l2_ratio > 0 {
                self.sum_l2_ratio / self.n_l2_ratio as f64
            } else {
                0.0
            },
            mean_l2_norm: self.sum_norm / n,
            dead_fraction: self.density.dead_fraction(),
            dense_fraction: self.density.dense_fraction(dense_threshold),
            dense_threshold,
            density_histogram: self.density.log10_histogram(50)?,
        })
    }
}

/// The usual threshold for "dense" features: firing on more than 10% of tokens.
pub const DEFAULT_DENSE_THRESHOLD: f64 = 0.1;

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use candle_core::Device;

    #[test]
    fn fvu_matches_hand_computation() {
        // x rows: (1,0), (3,2); mean (2,1); Σ‖x-mean‖² = (1+1)+(1+1) = 4.
        // x_hat rows: (1,1), (2,2); Σ‖x-x̂‖² = 1 + 1 = 2; FVU = 0.5.
        let x = [1.0, 0.0, 3.0, 2.0];
        let xh = [1.0, 1.0, 2.0, 2.0];
        let acts = [1.0, 0.0, 0.0, 2.0, 3.0, 0.0];
        let mut acc = ReconstructionAccumulator::new(2, 3);
        acc.update_slices(&x, &xh, &acts).unwrap();
        let m = acc.finish(0.1).unwrap();
        assert_relative_eq!(m.fvu, 0.5, epsilon = 1e-12);
        assert_relative_eq!(m.explained_variance, 0.5, epsilon = 1e-12);
        assert_relative_eq!(m.mse, 2.0 / 4.0, epsilon = 1e-12);
        assert_relative_eq!(m.l0, 1.5, epsilon = 1e-12);
        // cos((1,0),(1,1)) = 1/√2; cos((3,2),(2,2)) = 10/(√13·√8).
        let c = (1.0 / 2f64.sqrt() + 10.0 / (13f64.sqrt() * 8f64.sqrt())) / 2.0;
        assert_relative_eq!(m.cosine_similarity, c, epsilon = 1e-12);
        // Rows of acts: (1,0,0) and (2,3,0): feature 2 never fires.
        assert_relative_eq!(m.dead_fraction, 1.0 / 3.0, epsilon = 1e-12);
        // Rates: f0 = 1.0, f1 = 0.5, f2 = 0 -> two above 0.1.
        assert_relative_eq!(m.dense_fraction, 2.0 / 3.0, epsilon = 1e-12);
        assert_eq!(acc.density().fire_counts, vec![2, 1, 0]);
    }

    #[test]
    fn streaming_equals_one_batch_and_tensor_path_equals_slices() {
        let (n, d, k) = (37, 5, 7);
        let mut state = 12345u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) as f32 * 2.0 - 1.0 + 3.0
        };
        let x: Vec<f32> = (0..n * d).map(|_| rnd()).collect();
        let xh: Vec<f32> = (0..n * d).map(|_| rnd()).collect();
        let acts: Vec<f32> = (0..n * k).map(|_| (rnd() - 3.0).max(0.0)).collect();

        let mut one = ReconstructionAccumulator::new(d, k);
        one.update_slices(&x, &xh, &acts).unwrap();
        let one = one.finish(0.1).unwrap();

        let mut many = ReconstructionAccumulator::new(d, k);
        for (lo, hi) in [(0, 1), (1, 10), (10, 11), (11, 37)] {
            many.update_slices(
                &x[lo * d..hi * d],
                &xh[lo * d..hi * d],
                &acts[lo * k..hi * k],
            )
            .unwrap();
        }
        let many = many.finish(0.1).unwrap();
        assert_relative_eq!(one.fvu, many.fvu, epsilon = 1e-12);
        assert_relative_eq!(
            one.cosine_similarity,
            many.cosine_similarity,
            epsilon = 1e-12
        );
        assert_eq!(one.l0, many.l0);

        // Direct two-pass FVU with the global mean.
        let mut mean = vec![0.0f64; d];
        for r in 0..n {
            for j in 0..d {
                mean[j] += x[r * d + j] as f64 / n as f64;
            }
        }
        let (mut num, mut den) = (0.0, 0.0);
        for r in 0..n {
            for j in 0..d {
                let a = x[r * d + j] as f64;
                num += (a - xh[r * d + j] as f64).powi(2);
                den += (a - mean[j]).powi(2);
            }
        }
        assert_relative_eq!(one.fvu, num / den, epsilon = 1e-12);

        let dev = Device::Cpu;
        let mut t = ReconstructionAccumulator::new(d, k);
        for (lo, hi) in [(0, 20), (20, 37)] {
            let xt = Tensor::from_slice(&x[lo * d..hi * d], (hi - lo, d), &dev).unwrap();
            let xht = Tensor::from_slice(&xh[lo * d..hi * d], (hi - lo, d), &dev).unwrap();
            let at = Tensor::from_slice(&acts[lo * k..hi * k], (hi - lo, k), &dev).unwrap();
            t.update(&xt, &xht, &at).unwrap();
        }
        let t = t.finish(0.1).unwrap();
        assert_relative_eq!(one.fvu, t.fvu, epsilon = 1e-5);
        assert_relative_eq!(one.mse, t.mse, epsilon = 1e-6);
        assert_relative_eq!(one.cosine_similarity, t.cosine_similarity, epsilon = 1e-6);
        assert_eq!(one.l0, t.l0);
        assert_eq!(one.density_histogram, t.density_histogram);
    }

    #[test]
    fn perfect_reconstruction_has_zero_fvu_and_unit_cosine() {
        let x = [1.0, -2.0, 0.5, 4.0, 3.0, 3.0];
        let mut acc = ReconstructionAccumulator::new(3, 1);
        acc.update_slices(&x, &x, &[1.0, 1.0]).unwrap();
        let m = acc.finish(0.1).unwrap();
        assert_eq!(m.fvu, 0.0);
        assert_relative_eq!(m.cosine_similarity, 1.0, epsilon = 1e-12);
        assert_relative_eq!(m.l2_ratio, 1.0, epsilon = 1e-12);
    }

    #[test]
    fn wrong_shapes_name_the_tensor() {
        let mut acc = ReconstructionAccumulator::new(3, 2);
        let e = acc
            .update_slices(&[0.0; 6], &[0.0; 5], &[0.0; 4])
            .unwrap_err();
        assert!(e.to_string().contains("x_hat"), "{e}");
        let e = acc
            .update_slices(&[0.0; 6], &[0.0; 6], &[0.0; 5])
            .unwrap_err();
        assert!(e.to_string().contains("feature_acts"), "{e}");
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let a = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
        let e = acc.update(&x, &x, &a).unwrap_err();
        assert!(
            e.to_string().contains("x:") || e.to_string().contains("for x"),
            "{e}"
        );
        assert!(matches!(acc.finish(0.1), Err(MetricsError::Empty { .. })));
        let e = acc
            .update_slices(&[f32::NAN, 0.0, 0.0], &[0.0; 3], &[0.0; 2])
            .unwrap_err();
        assert!(matches!(e, MetricsError::NonFinite { .. }), "{e}");
    }

    #[test]
    fn density_histogram_bins_log10_rates() {
        let d = FeatureDensity {
            n_tokens: 1000,
            fire_counts: vec![0, 1, 10, 100, 1000, 999],
        };
        let h = d.log10_histogram(3).unwrap();
        assert_eq!(h.bin_edges.len(), 4);
        assert_relative_eq!(h.bin_edges[0], -3.0);
        assert_eq!(h.n_dead, 1);
        // log10 rates: -3, -2, -1, 0, -0.0004 -> bins [-3,-2): 1, [-2,-1): 1, [-1,0]: 3.
        assert_eq!(h.counts, vec![1, 1, 3]);
        assert_relative_eq!(d.dense_fraction(0.05), 3.0 / 6.0);
        assert_relative_eq!(d.dead_fraction(), 1.0 / 6.0);
    }
}
