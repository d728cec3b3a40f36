//! Sparse probing: can k SAE latents alone tell a class of texts from the rest, and how does that
//! compare with k of the model's own neurons and with a probe on everything?
//!
//! This is SAEBench's `sparse_probing` evaluation, with its choices kept so that numbers compare:
//! each text is one vector, the mean of its tokens' activations (BOS left out) at the SAE's
//! hook, or the mean of its tokens' SAE codes; every class becomes a balanced one-vs-rest task
//! (all of the class against as many texts drawn evenly from the other classes); the k
//! dimensions with the largest |mean(class) - mean(rest)| on the training texts are kept; an
//! L2-regularised logistic regression with sklearn's defaults (C = 1, intercept unpenalised) is
//! fitted on them; the score is accuracy on held-out texts. A good SAE has single latents that
//! carry a concept the model represents, so its top-1 accuracy beats the top-1 neuron's.
//!
//! The regression is solved to convergence by L-BFGS (argmin), not by a fixed number of SGD
//! epochs, so the same inputs always give the same probe (SAEBench trains its full-width probes
//! with AdamW and early stopping on the test set; here every probe is the regularised optimum,
//! chosen without looking at the test texts).

use argmin::core::{CostFunction, Executor, Gradient, State, TerminationReason};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use candle_core::{D, Tensor};
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sae_core::SaeModel;
use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result, check_finite, shape_err};
use crate::hooked::HookedSplice;
use crate::spliced::SpliceTarget;

/// Texts as rows of features (`n x d`, row-major) with a class index each.
#[derive(Debug, Clone, Copy)]
pub struct LabelledFeatures<'a> {
    pub x: &'a [f32],
    pub d: usize,
    pub labels: &'a [usize],
}

impl LabelledFeatures<'_> {
    fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }

    pub(crate) fn check(&self, what: &str, n_classes: usize) -> Result<()> {
        if self.d == 0 || self.x.len() != self.labels.len() * self.d {
            return Err(shape_err(
                format!("{what} features"),
                format!("{} rows of {} values", self.labels.len(), self.d),
                format!("{} values", self.x.len()),
            ));
        }
        if let Some(&bad) = self.labels.iter().find(|&&l| l >= n_classes) {
            return Err(MetricsError::InvalidArgument {
                what: format!("{what} labels"),
                reason: format!("class {bad}, but there are {n_classes} classes"),
            });
        }
        check_finite(self.x, || format!("a {what} feature"))
    }
}

/// A fitted binary logistic regression: `p(class) = σ(w·x + b)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogisticProbe {
    pub weights: Vec<f64>,
    pub bias: f64,
    /// L-BFGS iterations taken.
    pub iterations: u64,
    /// Whether the gradient fell below tolerance (otherwise the iteration cap stopped it).
    pub converged: bool,
}

/// The regularised objective, scaled by `1/n` so that its size does not grow with the data:
/// `mean_i log(1 + exp(-s_i (w·x_i + b))) + |w|² / (2 C n)`, whose minimiser is sklearn's
/// `LogisticRegression(C)` (which minimises `n` times this). Columns that are zero in every row
/// are dropped before fitting: their optimal weight is exactly zero.
struct Objective<'a> {
    x: &'a [f64],
    n: usize,
    d: usize,
    y: &'a [f64],
    /// Each row's weight in the loss: 1 for every row, or sklearn's `class_weight="balanced"`
    /// (`n / (2 n_class)`), the pair (positive, negative).
    class_weight: (f64, f64),
    l2: f64,
}

impl Objective<'_> {
    fn row_weight(&self, y: f64) -> f64 {
        if y > 0.5 {
            self.class_weight.0
        } else {
            self.class_weight.1
        }
    }

    fn margins(&self, p: &[f64]) -> Vec<f64> {
        let (w, b) = p.split_at(self.d);
        self.x
            .par_chunks(self.d)
            .map(|row| b[0] + dot(row, w))
            .collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Four accumulators let the compiler vectorise the sum.
    let mut acc = [0.0f64; 4];
    let (ca, ra) = a.as_chunks::<4>();
    let (cb, rb) = b.as_chunks::<4>();
    for (x, y) in ca.iter().zip(cb) {
        for j in 0..4 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

/// `log(1 + exp(z))` without overflow.
fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

pub(crate) fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl CostFunction for Objective<'_> {
    type Param = Vec<f64>;
    type Output = f64;

    fn cost(&self, p: &Vec<f64>) -> std::result::Result<f64, argmin::core::Error> {
        let z = self.margins(p);
        let loss: f64 = z
            .iter()
            .zip(self.y)
            .map(|(&z, &y)| self.row_weight(y) * (softplus(z) - y * z))
            .sum::<f64>()
            / self.n as f64;
        let w = &p[..self.d];
        Ok(loss + 0.5 * self.l2 * dot(w, w))
    }
}

impl Gradient for Objective<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;

    fn gradient(&self, p: &Vec<f64>) -> std::result::Result<Vec<f64>, argmin::core::Error> {
        let z = self.margins(p);
        let r: Vec<f64> = z
            .iter()
            .zip(self.y)
            .map(|(&z, &y)| self.row_weight(y) * (sigmoid(z) - y) / self.n as f64)
            .collect();
        let d = self.d;
        let mut g = self
            .x
            .par_chunks(d)
            .zip(r.par_iter())
            .fold(
                || vec![0.0f64; d + 1],
                |mut g, (row, &ri)| {
                    for (gj, xj) in g[..d].iter_mut().zip(row) {
                        *gj += ri * xj;
                    }
                    g[d] += ri;
                    g
                },
            )
            .reduce(
                || vec![0.0f64; d + 1],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    a
                },
            );
        for (gj, wj) in g[..d].iter_mut().zip(&p[..d]) {
            *gj += self.l2 * wj;
        }
        Ok(g)
    }
}

/// The most L-BFGS iterations a probe may take (sklearn's SAEBench setting is 1,000).
pub const MAX_PROBE_ITERATIONS: u64 = 1000;

impl LogisticProbe {
    /// Fits `σ(w·x + b)` to `y` on the rows of `x` (`y.len()` rows of `d`), with inverse
    /// regularisation strength `c` (sklearn's `C`).
    ///
    /// # Errors
    /// `ShapeMismatch` for sizes that disagree, `InvalidArgument` for `c <= 0` or labels of one
    /// class only, `NonFinite` for a NaN or infinite feature.
    pub fn fit(x: &[f32], d: usize, y: &[bool], c: f64) -> Result<Self> {
        Self::fit_weighted(x, d, y, c, false)
    }

    /// [`LogisticProbe::fit`] with sklearn's `class_weight="balanced"`: each class's rows weigh
    /// `n / (2 n_class)`, so a rare class (one letter of 26) counts as much as the rest. SAEBench's
    /// absorption probes are fitted this way.
    ///
    /// # Errors
    /// As [`LogisticProbe::fit`].
    pub fn fit_balanced(x: &[f32], d: usize, y: &[bool], c: f64) -> Result<Self> {
        Self::fit_weighted(x, d, y, c, true)
    }

    fn fit_weighted(x: &[f32], d: usize, y: &[bool], c: f64, balanced: bool) -> Result<Self> {
        let n = y.len();
        if d == 0 || x.len() != n * d {
            return Err(shape_err(
                "probe inputs",
                format!("{n} rows of {d} values"),
                format!("{} values", x.len()),
            ));
        }
        if !(c.is_finite() && c > 0.0) {
            return Err(MetricsError::InvalidArgument {
                what: "probe C".into(),
                reason: format!("{c}: must be a positive number"),
            });
        }
        let positives = y.iter().filter(|&&v| v).count();
        if positives == 0 || positives == n {
            return Err(MetricsError::InvalidArgument {
                what: "probe labels".into(),
                reason: format!("{positives} of {n} rows are positive: a probe needs both classes"),
            });
        }
        check_finite(x, || "a probe input".into())?;
        let active: Vec<usize> = (0..d)
            .filter(|&j| (0..n).any(|i| x[i * d + j] != 0.0))
            .collect();
        let da = active.len();
        let xa: Vec<f64> = (0..n)
            .flat_map(|i| active.iter().map(move |&j| f64::from(x[i * d + j])))
            .collect();
        let ys: Vec<f64> = y.iter().map(|&v| f64::from(u8::from(v))).collect();
        let class_weight = if balanced {
            (
                n as f64 / (2.0 * positives as f64),
                n as f64 / (2.0 * (n - positives) as f64),
            )
        } else {
            (1.0, 1.0)
        };
        let objective = Objective {
            x: &xa,
            n,
            d: da,
            y: &ys,
            class_weight,
            l2: 1.0 / (c * n as f64),
        };
        // Start from the intercept that fits the (weighted) class balance, every weight zero.
        let p = if balanced {
            0.5
        } else {
            positives as f64 / n as f64
        };
        let mut init = vec![0.0f64; da + 1];
        init[da] = (p / (1.0 - p)).ln();
        let solver = LBFGS::new(MoreThuenteLineSearch::new(), 10)
            .with_tolerance_grad(1e-7)
            .and_then(|s| s.with_tolerance_cost(1e-14))
            .map_err(|e| MetricsError::InvalidArgument {
                what: "probe solver".into(),
                reason: e.to_string(),
            })?;
        let result = Executor::new(objective, solver)
            .configure(|s| s.param(init).max_iters(MAX_PROBE_ITERATIONS))
            .run()
            .map_err(|e| MetricsError::InvalidArgument {
                what: "probe fit".into(),
                reason: e.to_string(),
            })?;
        let state = result.state();
        let best = state
            .get_best_param()
            .ok_or_else(|| MetricsError::Empty {
                what: "probe solutions".into(),
            })?
            .clone();
        let converged = matches!(
            state.get_termination_reason(),
            Some(TerminationReason::SolverConverged)
        );
        let mut weights = vec![0.0f64; d];
        for (k, &j) in active.iter().enumerate() {
            weights[j] = best[k];
        }
        Ok(LogisticProbe {
            weights,
            bias: best[da],
            iterations: state.get_iter(),
            converged,
        })
    }

    /// `w·x + b`: positive means the class.
    pub fn decision(&self, row: &[f32]) -> f64 {
        self.bias
            + self
                .weights
                .iter()
                .zip(row)
                .map(|(w, &x)| w * f64::from(x))
                .sum::<f64>()
    }

    /// The share of rows of `x` whose predicted class is their label.
    pub fn accuracy(&self, x: &[f32], y: &[bool]) -> f64 {
        let d = self.weights.len();
        let right = x
            .chunks(d)
            .zip(y)
            .filter(|(row, y)| (self.decision(row) > 0.0) == **y)
            .count();
        right as f64 / y.len().max(1) as f64
    }
}

/// The `k` columns of `x` (`y.len()` rows of `d`) whose mean differs most, in absolute value,
/// between the positive and the negative rows, largest first (ties: the lower index).
pub fn top_k_by_mean_difference(x: &[f32], d: usize, y: &[bool], k: usize) -> Vec<usize> {
    let mut pos = vec![0.0f64; d];
    let mut neg = vec![0.0f64; d];
    let (mut np, mut nn) = (0usize, 0usize);
    for (row, &label) in x.chunks(d).zip(y) {
        let (sum, count) = if label {
            (&mut pos, &mut np)
        } else {
            (&mut neg, &mut nn)
        };
        *count += 1;
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += f64::from(v);
        }
    }
    let diff: Vec<f64> = pos
        .iter()
        .zip(&neg)
        .map(|(p, q)| (p / np.max(1) as f64 - q / nn.max(1) as f64).abs())
        .collect();
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| diff[b].total_cmp(&diff[a]).then(a.cmp(&b)));
    order.truncate(k.min(d));
    order
}

/// A balanced one-vs-rest task for `class`: every row of that class (positive) and as many rows
/// drawn from the others (negative), taking `ceil(positives / other classes)` at random from each
/// other class first so that no class dominates the negatives, then shuffled. Returns row indices
/// and labels. The draw depends only on `labels`, `class` and `seed`, so the model's and each
/// SAE's probes see the same rows.
pub fn balanced_one_vs_rest(
    labels: &[usize],
    n_classes: usize,
    class: usize,
    seed: u64,
) -> (Vec<usize>, Vec<bool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (class as u64).wrapping_mul(0x9E37_79B9));
    let positives: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
    let others: Vec<usize> = (0..n_classes)
        .filter(|&c| c != class && labels.contains(&c))
        .collect();
    let per_class = positives.len().div_ceil(others.len().max(1));
    let mut negatives = Vec::new();
    for &c in &others {
        let mut rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        rows.shuffle(&mut rng);
        rows.truncate(per_class);
        negatives.extend(rows);
    }
    negatives.shuffle(&mut rng);
    negatives.truncate(positives.len());
    let mut rows: Vec<(usize, bool)> = positives
        .into_iter()
        .map(|i| (i, true))
        .chain(negatives.into_iter().map(|i| (i, false)))
        .collect();
    rows.shuffle(&mut rng);
    rows.into_iter().unzip()
}

/// What to probe with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbingConfig {
    /// Numbers of dimensions to keep (SAEBench: 1, 2, 5).
    pub ks: Vec<usize>,
    /// Also fit a probe on every dimension (SAEBench's `llm_test_accuracy` / `sae_test_accuracy`).
    pub full: bool,
    /// sklearn's `C`, the inverse L2 strength (SAEBench: 1.0).
    pub c: f64,
    /// Seed of the one-vs-rest draws.
    pub seed: u64,
}

impl Default for ProbingConfig {
    fn default() -> Self {
        ProbingConfig {
            ks: vec![1, 2, 5],
            full: true,
            c: 1.0,
            seed: 42,
        }
    }
}

/// A probe on the `k` chosen dimensions of one class's task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopKProbe {
    pub k: usize,
    pub test_accuracy: f64,
    /// The dimensions chosen (neurons or latents), largest mean difference first.
    pub features: Vec<usize>,
    /// Their probe weights, in the order of `features`.
    pub weights: Vec<f64>,
}

/// One class's one-vs-rest probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassProbing {
    pub class: String,
    pub n_train: usize,
    pub n_test: usize,
    /// The probe on every dimension, when asked for.
    pub full_test_accuracy: Option<f64>,
    pub top_k: Vec<TopKProbe>,
    /// Probes the iteration cap stopped before convergence (their accuracy still counts).
    pub unconverged: usize,
}

impl ClassProbing {
    /// The test accuracy with `k` dimensions, if it was probed.
    pub fn top_k_accuracy(&self, k: usize) -> Option<f64> {
        self.top_k
            .iter()
            .find(|p| p.k == k)
            .map(|p| p.test_accuracy)
    }
}

pub(crate) fn gather(f: &LabelledFeatures<'_>, rows: &[usize], cols: Option<&[usize]>) -> Vec<f32> {
    match cols {
        None => rows
            .iter()
            .flat_map(|&i| f.row(i).iter().copied())
            .collect(),
        Some(cols) => rows
            .iter()
            .flat_map(|&i| {
                let r = f.row(i);
                cols.iter().map(move |&j| r[j])
            })
            .collect(),
    }
}

/// The checks every probing evaluation makes on its two splits: shapes, labels and values,
/// one width for both, at least two classes, and every class present in each split.
pub(crate) fn check_splits(
    train: LabelledFeatures<'_>,
    test: LabelledFeatures<'_>,
    classes: &[String],
) -> Result<()> {
    train.check("training", classes.len())?;
    test.check("test", classes.len())?;
    if train.d != test.d {
        return Err(shape_err(
            "test features",
            format!("{} values a row (as in training)", train.d),
            format!("{}", test.d),
        ));
    }
    for (c, name) in classes.iter().enumerate() {
        for (split, f) in [("training", &train), ("test", &test)] {
            if !f.labels.contains(&c) {
                return Err(MetricsError::InvalidArgument {
                    what: format!("class `{name}`"),
                    reason: format!("it has no {split} texts"),
                });
            }
        }
    }
    if classes.len() < 2 {
        return Err(MetricsError::InvalidArgument {
            what: "probe classes".into(),
            reason: format!("{}: one-vs-rest needs at least two", classes.len()),
        });
    }
    Ok(())
}

/// Probes every class of `classes` one against the rest: top-k probes for each `k` of `cfg`
/// (dimensions chosen on `train`), and the full-width probe if asked; accuracy on `test`.
/// Classes run in parallel.
///
/// ```
/// use metrics::{LabelledFeatures, ProbingConfig, sparse_probing};
///
/// // Thirty texts of three classes, three dimensions each: class c raises dimension c.
/// let row = |c: usize, noise: f32| -> Vec<f32> {
///     (0..3).map(|j| if j == c { 2.0 + noise } else { noise }).collect()
/// };
/// let (mut x, mut labels) = (Vec::new(), Vec::new());
/// for i in 0..30 {
///     x.extend(row(i % 3, 0.1 * (i % 5) as f32));
///     labels.push(i % 3);
/// }
/// let classes = ["a", "b", "c"].map(String::from);
/// let data = LabelledFeatures { x: &x, d: 3, labels: &labels };
/// let res = sparse_probing(data, data, &classes, &ProbingConfig::default()).unwrap();
/// for (c, class) in res.iter().enumerate() {
///     assert_eq!(class.top_k[0].features, vec![c]); // the dimension that marks the class
///     assert_eq!(class.top_k_accuracy(1), Some(1.0));
/// }
/// ```
///
/// # Errors
/// Shapes that disagree, labels past `classes`, non-finite features, a class without rows in
/// either split, `k = 0`.
pub fn sparse_probing(
    train: LabelledFeatures<'_>,
    test: LabelledFeatures<'_>,
    classes: &[String],
    cfg: &ProbingConfig,
) -> Result<Vec<ClassProbing>> {
    check_splits(train, test, classes)?;
    if cfg.ks.contains(&0) {
        return Err(MetricsError::InvalidArgument {
            what: "probe k".into(),
            reason: "0 dimensions: k must be at least 1".into(),
        });
    }
    (0..classes.len())
        .into_par_iter()
        .map(|c| {
            let (tr_rows, tr_y) = balanced_one_vs_rest(train.labels, classes.len(), c, cfg.seed);
            let (te_rows, te_y) =
                balanced_one_vs_rest(test.labels, classes.len(), c, cfg.seed.wrapping_add(1));
            let mut unconverged = 0;
            let tr_all = gather(&train, &tr_rows, None);
            let full_test_accuracy = if cfg.full {
                let probe = LogisticProbe::fit(&tr_all, train.d, &tr_y, cfg.c)?;
                unconverged += usize::from(!probe.converged);
                Some(probe.accuracy(&gather(&test, &te_rows, None), &te_y))
            } else {
                None
            };
            let mut top_k = Vec::with_capacity(cfg.ks.len());
            for &k in &cfg.ks {
                let features = top_k_by_mean_difference(&tr_all, train.d, &tr_y, k);
                let kk = features.len();
                let probe = LogisticProbe::fit(
                    &gather(&train, &tr_rows, Some(&features)),
                    kk,
                    &tr_y,
                    cfg.c,
                )?;
                unconverged += usize::from(!probe.converged);
                let test_accuracy =
                    probe.accuracy(&gather(&test, &te_rows, Some(&features)), &te_y);
                top_k.push(TopKProbe {
                    k,
                    test_accuracy,
                    weights: probe.weights,
                    features,
                });
            }
            Ok(ClassProbing {
                class: classes[c].clone(),
                n_train: tr_rows.len(),
                n_test: te_rows.len(),
                full_test_accuracy,
                top_k,
                unconverged,
            })
        })
        .collect()
}

/// Mean-pooled features of token windows: `n x d`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledFeatures {
    pub d: usize,
    pub rows: Vec<f32>,
}

/// Runs `model` over `windows` (token ids, all of one length, `batch` at a time) up to `hook`,
/// and returns each window's mean activation at the hook and, for each SAE of `saes`, its mean
/// code; positions before `skip` (1: the BOS) are left out of the means, as SAEBench masks BOS.
///
/// # Errors
/// An unknown hook, an SAE whose `d_in` is not the hook's width, windows of different lengths
/// or no longer than `skip`, `batch == 0`, and the model's and SAEs' own errors.
pub fn pooled_window_features(
    model: &transformer_hooks::Model,
    hook: &str,
    saes: &[&SaeModel],
    windows: &[Vec<u32>],
    batch: usize,
    skip: usize,
    progress: Option<&ProgressBar>,
) -> Result<(PooledFeatures, Vec<PooledFeatures>)> {
    let target = HookedSplice::new(model, hook)?;
    for sae in saes {
        target.check_sae(sae)?;
    }
    if batch == 0 {
        return Err(MetricsError::InvalidArgument {
            what: "batch".into(),
            reason: "0 windows per forward pass".into(),
        });
    }
    let len = windows.first().map_or(0, Vec::len);
    if let Some(w) = windows.iter().find(|w| w.len() != len) {
        return Err(shape_err(
            "windows",
            format!("all of {len} tokens"),
            format!("one of {}", w.len()),
        ));
    }
    if !windows.is_empty() && len <= skip {
        return Err(MetricsError::TextTooShort {
            what: "window".into(),
            tokens: len,
            needed: skip + 1,
        });
    }
    let hp = target.hook();
    let mut acts = PooledFeatures {
        d: 0,
        rows: Vec::new(),
    };
    let mut codes: Vec<PooledFeatures> = saes
        .iter()
        .map(|s| PooledFeatures {
            d: s.d_sae(),
            rows: Vec::with_capacity(windows.len() * s.d_sae()),
        })
        .collect();
    let kept = len.saturating_sub(skip);
    for chunk in windows.chunks(batch) {
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let tokens = Tensor::from_vec(flat, (chunk.len(), len), model.device())?;
        let cache = model.run_with_cache(&tokens, &[hp])?;
        let h = cache
            .require(hp)?
            .narrow(1, skip, kept)?
            .to_dtype(candle_core::DType::F32)?;
        let width = h.dim(D::Minus1)?;
        acts.d = width;
        acts.rows
            .extend(h.mean(1)?.flatten_all()?.to_vec1::<f32>()?);
        let rows = h.reshape((chunk.len() * kept, width))?;
        for (sae, out) in saes.iter().zip(codes.iter_mut()) {
            let c = sae.encode_sparse(&rows)?;
            for w in 0..chunk.len() {
                let mut mean = vec![0.0f32; sae.d_sae()];
                for t in w * kept..(w + 1) * kept {
                    let (fs, vs) = c.row(t);
                    for (&f, &v) in fs.iter().zip(vs) {
                        mean[f as usize] += v;
                    }
                }
                let inv = 1.0 / kept as f32;
                out.rows.extend(mean.into_iter().map(|v| v * inv));
            }
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok((acts, codes))
}

/// Runs `model` over `sequences` (token ids of any lengths, `batch` at a time, padded on the
/// right and masked) up to `hook`, and returns the hook's activation at `positions[i]` of
/// sequence `i`: `sequences.len()` rows of the hook's width. This is how a probe reads one token
/// (a word in a prompt) rather than a whole window; padding changes nothing at the real positions.
///
/// # Errors
/// An unknown hook, `positions` of another count or past their sequence's end, an empty
/// sequence, `batch == 0`, and the model's own errors.
pub fn token_activations(
    model: &transformer_hooks::Model,
    hook: &str,
    sequences: &[Vec<u32>],
    positions: &[usize],
    batch: usize,
    progress: Option<&ProgressBar>,
) -> Result<PooledFeatures> {
    let target = HookedSplice::new(model, hook)?;
    if batch == 0 {
        return Err(MetricsError::InvalidArgument {
            what: "batch".into(),
            reason: "0 sequences per forward pass".into(),
        });
    }
    if positions.len() != sequences.len() {
        return Err(shape_err(
            "token positions",
            format!("one per sequence ({})", sequences.len()),
            format!("{}", positions.len()),
        ));
    }
    if let Some((i, s)) = sequences
        .iter()
        .enumerate()
        .find(|(i, s)| positions[*i] >= s.len())
    {
        return Err(MetricsError::InvalidArgument {
            what: format!("token position of sequence {i}"),
            reason: format!("{} in a sequence of {} tokens", positions[i], s.len()),
        });
    }
    let hp = target.hook();
    let mut out = PooledFeatures {
        d: target.hook_width(),
        rows: Vec::with_capacity(sequences.len() * target.hook_width()),
    };
    for (chunk, pos) in sequences.chunks(batch).zip(positions.chunks(batch)) {
        let (tokens, mask) = model.pad_batch(chunk, 0, false)?;
        let mut hooks = transformer_hooks::Hooks::new()
            .capture(hp)
            .stop_at_deepest_capture();
        let cache = model.forward_masked(&tokens, &mask, &mut hooks)?.cache;
        let h = cache.require(hp)?.to_dtype(candle_core::DType::F32)?;
        for (row, &p) in pos.iter().enumerate() {
            out.rows.extend(h.get(row)?.get(p)?.to_vec1::<f32>()?);
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::perfect_sae;
    use candle_core::Device;
    use transformer_hooks::{HookPoint, Model, Site};

    fn objective_parts(n: usize, d: usize, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        use rand::Rng;
        let x: Vec<f64> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let y: Vec<f64> = (0..n).map(|i| f64::from(u8::from(i % 3 == 0))).collect();
        let p: Vec<f64> = (0..=d).map(|_| rng.random_range(-1.0..1.0)).collect();
        (x, y, p)
    }

    #[test]
    fn the_gradient_is_the_objectives_derivative() {
        let (n, d) = (17, 6);
        let (x, y, p) = objective_parts(n, d, 3);
        // Unequal class weights, as `fit_balanced` gives, so that both rows' kinds are checked.
        let f = Objective {
            x: &x,
            n,
            d,
            y: &y,
            class_weight: (2.5, 0.7),
            l2: 0.37,
        };
        let g = f.gradient(&p).unwrap();
        for j in 0..=d {
            let h = 1e-6;
            let (mut a, mut b) = (p.clone(), p.clone());
            a[j] += h;
            b[j] -= h;
            let fd = (f.cost(&a).unwrap() - f.cost(&b).unwrap()) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() < 1e-7,
                "parameter {j}: analytic {} vs finite difference {fd}",
                g[j]
            );
        }
        // The intercept is not penalised: with every weight zero, its gradient is the mean residual.
        let mut zero = vec![0.0; d + 1];
        zero[d] = 0.4;
        let g0 = f.gradient(&zero).unwrap();
        let mean_r = y
            .iter()
            .map(|&y| f.row_weight(y) * (sigmoid(0.4) - y))
            .sum::<f64>()
            / n as f64;
        assert!((g0[d] - mean_r).abs() < 1e-12);
    }

    #[test]
    fn balanced_weights_equal_replicating_the_rare_class() {
        // 10 positives and 30 negatives: balanced weights are 2 and 2/3, i.e. two thirds of an
        // unweighted fit with the positives tripled; for the same optimum that fit's penalty
        // 1/(2C') must be 3/2 of 1/(2C): C' = 2C/3.
        let (n, d) = (40, 5);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        use rand::Rng;
        let y: Vec<bool> = (0..n).map(|i| i % 4 == 0).collect();
        let x: Vec<f32> = (0..n * d)
            .map(|i| rng.random_range(-1.0..1.0) + if y[i / d] && i % d == 1 { 0.8 } else { 0.0 })
            .collect();
        let balanced = LogisticProbe::fit_balanced(&x, d, &y, 1.0).unwrap();
        let (mut xr, mut yr) = (Vec::new(), Vec::new());
        for (row, &label) in x.chunks(d).zip(&y) {
            for _ in 0..if label { 3 } else { 1 } {
                xr.extend_from_slice(row);
                yr.push(label);
            }
        }
        let replicated = LogisticProbe::fit(&xr, d, &yr, 2.0 / 3.0).unwrap();
        assert!(balanced.converged && replicated.converged);
        for (a, b) in balanced.weights.iter().zip(&replicated.weights) {
            assert!(
                (a - b).abs() < 1e-5,
                "{:?} vs {:?}",
                balanced.weights,
                replicated.weights
            );
        }
        assert!((balanced.bias - replicated.bias).abs() < 1e-5);
        // And they differ from the unweighted fit, whose intercept leans to the majority.
        let plain = LogisticProbe::fit(&x, d, &y, 1.0).unwrap();
        assert!(
            plain.bias < balanced.bias - 0.5,
            "{} vs {}",
            plain.bias,
            balanced.bias
        );
    }

    #[test]
    fn softplus_and_sigmoid_hold_at_extremes() {
        assert_eq!(softplus(800.0), 800.0);
        assert!(softplus(-800.0) >= 0.0 && softplus(-800.0) < 1e-300);
        assert!((softplus(0.0) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(sigmoid(-800.0), 0.0);
        assert_eq!(sigmoid(800.0), 1.0);
        assert!((sigmoid(1.3) + sigmoid(-1.3) - 1.0).abs() < 1e-15);
    }

    /// Features where class `c` raises column `2c` by 3 (and `2c + 1` by 0.2); the rest is noise.
    fn planted(n_per_class: usize, classes: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n_per_class * classes {
            let c = i % classes;
            for j in 0..d {
                let mut v: f32 = rng.random_range(0.0..1.0);
                if j == 2 * c {
                    v += 3.0;
                } else if j == 2 * c + 1 {
                    v += 0.2;
                }
                x.push(v);
            }
            labels.push(c);
        }
        (x, labels)
    }

    #[test]
    fn the_planted_column_is_chosen_and_separates_its_class() {
        let (classes, d) = (4, 20);
        let names: Vec<String> = (0..classes).map(|c| format!("c{c}")).collect();
        let (xtr, ltr) = planted(30, classes, d, 1);
        let (xte, lte) = planted(20, classes, d, 2);
        let train = LabelledFeatures {
            x: &xtr,
            d,
            labels: &ltr,
        };
        let test = LabelledFeatures {
            x: &xte,
            d,
            labels: &lte,
        };
        let res = sparse_probing(train, test, &names, &ProbingConfig::default()).unwrap();
        assert_eq!(res.len(), classes);
        for (c, r) in res.iter().enumerate() {
            assert_eq!(r.class, names[c]);
            assert_eq!(r.n_train, 60, "30 positives and 30 negatives");
            assert_eq!(r.n_test, 40);
            assert_eq!(r.top_k[0].features, vec![2 * c], "class {c}'s top-1 column");
            assert_eq!(r.top_k_accuracy(1), Some(1.0), "class {c}");
            // Next comes another class's column: 3 above the rest in a third of the negatives
            // differs by about 1, more than this class's weak +0.2.
            let second = r.top_k[1].features[1];
            assert!(
                second % 2 == 0 && second != 2 * c,
                "class {c}: {:?}",
                r.top_k[1]
            );
            assert_eq!(r.top_k[2].features.len(), 5);
            assert!(r.full_test_accuracy.unwrap() >= 0.95, "{r:?}");
            assert_eq!(r.unconverged, 0);
        }
    }

    #[test]
    fn one_vs_rest_is_balanced_spread_and_repeatable() {
        // 12 of class 0, 30 of class 1, 9 of class 2.
        let labels: Vec<usize> = (0..51)
            .map(|i| {
                if i < 12 {
                    0
                } else if i < 42 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let (rows, y) = balanced_one_vs_rest(&labels, 3, 0, 7);
        assert_eq!(rows.len(), 24);
        assert_eq!(y.iter().filter(|&&v| v).count(), 12);
        let neg: Vec<usize> = rows
            .iter()
            .zip(&y)
            .filter(|(_, y)| !**y)
            .map(|(&r, _)| labels[r])
            .collect();
        assert_eq!(
            neg.iter().filter(|&&c| c == 1).count(),
            6,
            "ceil(12 / 2) from each other class"
        );
        assert_eq!(neg.iter().filter(|&&c| c == 2).count(), 6);
        let mut sorted = rows.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), rows.len(), "no row drawn twice");
        assert_eq!(
            balanced_one_vs_rest(&labels, 3, 0, 7),
            (rows.clone(), y.clone())
        );
        assert_ne!(
            balanced_one_vs_rest(&labels, 3, 0, 8).0,
            rows,
            "another seed, another draw"
        );
        // A class larger than all others together: negatives fall short, positives are all kept.
        let (rows1, y1) = balanced_one_vs_rest(&labels, 3, 1, 7);
        assert_eq!(y1.iter().filter(|&&v| v).count(), 30);
        assert_eq!(rows1.len(), 30 + 21);
    }

    #[test]
    fn bad_inputs_are_named() {
        let names = vec!["a".to_string(), "b".to_string()];
        fn feats<'a>(x: &'a [f32], labels: &'a [usize]) -> LabelledFeatures<'a> {
            LabelledFeatures { x, d: 2, labels }
        }
        let x = vec![0.0f32, 1.0, 1.0, 0.0];
        let ok = feats(&x, &[0, 1]);
        let err = |r: Result<Vec<ClassProbing>>| r.unwrap_err().to_string();
        let one = feats(&x, &[0, 0]);
        assert!(
            err(sparse_probing(ok, one, &names, &ProbingConfig::default()))
                .contains("class `b`: it has no test texts")
        );
        let short = feats(&x[..3], &[0, 1]);
        assert!(
            err(sparse_probing(short, ok, &names, &ProbingConfig::default()))
                .contains("training features")
        );
        let nan = vec![0.0f32, f32::NAN, 1.0, 0.0];
        let bad = feats(&nan, &[0, 1]);
        assert!(
            err(sparse_probing(ok, bad, &names, &ProbingConfig::default())).contains("not finite")
        );
        let cfg = ProbingConfig {
            ks: vec![0],
            ..ProbingConfig::default()
        };
        assert!(err(sparse_probing(ok, ok, &names, &cfg)).contains("k must be at least 1"));
        let past = feats(&x, &[0, 2]);
        assert!(
            err(sparse_probing(past, ok, &names, &ProbingConfig::default()))
                .contains("class 2, but there are 2 classes")
        );
        let e = LogisticProbe::fit(&x, 2, &[true, true], 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 of 2 rows are positive"), "{e}");
        let e = LogisticProbe::fit(&x, 2, &[true, false], 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("positive number"), "{e}");
    }

    fn tiny_llama() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../transformer-hooks/tests/fixtures/tiny/llama");
        Model::load(&dir, &Device::Cpu).unwrap()
    }

    #[test]
    fn token_activations_are_each_sequences_own_at_its_position() {
        let model = tiny_llama();
        let hook = "blocks.0.hook_resid_post";
        let hp: HookPoint = hook.parse().unwrap();
        let seqs: Vec<Vec<u32>> = (0..5u32)
            .map(|s| (0..4 + 3 * s).map(|t| 1 + (s * 13 + t * 5) % 100).collect())
            .collect();
        let positions = [3, 0, 9, 12, 5];
        let got = token_activations(&model, hook, &seqs, &positions, 2, None).unwrap();
        let d = model.config().d_model;
        assert_eq!((got.d, got.rows.len()), (d, 5 * d));
        for (i, ids) in seqs.iter().enumerate() {
            // Each sequence alone, unpadded.
            let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
            let h = model.run_with_cache(&t, &[hp]).unwrap();
            let want: Vec<f32> = h
                .require(hp)
                .unwrap()
                .get(0)
                .unwrap()
                .get(positions[i])
                .unwrap()
                .to_vec1()
                .unwrap();
            for (j, (g, w)) in got.rows[i * d..(i + 1) * d].iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-4, "sequence {i} dim {j}: {g} vs {w}");
            }
        }
        let e = token_activations(&model, hook, &seqs, &[3, 0, 10, 12, 5], 2, None).unwrap_err();
        assert!(
            e.to_string().contains("10 in a sequence of 10 tokens"),
            "{e}"
        );
        let e = token_activations(&model, hook, &seqs, &[1, 2], 2, None).unwrap_err();
        assert!(e.to_string().contains("one per sequence (5)"), "{e}");
        let e = token_activations(
            &model,
            "blocks.9.hook_resid_post",
            &seqs,
            &positions,
            2,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("blocks.9"), "{e}");
    }

    #[test]
    fn pooled_features_are_per_window_means_without_bos() {
        let model = tiny_llama();
        let hook = "blocks.1.mlp.hook_post";
        let d = model.config().d_mlp;
        let sae = perfect_sae(d); // codes: ReLU(x) then ReLU(-x)
        let windows: Vec<Vec<u32>> = (0..5u32)
            .map(|w| {
                (0..9u32)
                    .map(|t| {
                        if t == 0 {
                            1
                        } else {
                            3 + (w * 11 + t * 7) % 120
                        }
                    })
                    .collect()
            })
            .collect();
        let (acts, codes) =
            pooled_window_features(&model, hook, &[&sae], &windows, 2, 1, None).unwrap();
        assert_eq!((acts.d, acts.rows.len()), (d, 5 * d));
        assert_eq!((codes[0].d, codes[0].rows.len()), (2 * d, 5 * 2 * d));
        let hp = HookPoint::Block(1, Site::MlpPost);
        for (w, ids) in windows.iter().enumerate() {
            // One window on its own, averaged by hand.
            let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
            let h = model.run_with_cache(&t, &[hp]).unwrap();
            let h: Vec<Vec<f32>> = h
                .require(hp)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2()
                .unwrap();
            for j in 0..d {
                let vals: Vec<f32> = h[1..].iter().map(|r| r[j]).collect();
                let mean = vals.iter().sum::<f32>() / 8.0;
                let pos = vals.iter().map(|v| v.max(0.0)).sum::<f32>() / 8.0;
                let neg = vals.iter().map(|v| (-v).max(0.0)).sum::<f32>() / 8.0;
                assert!(
                    (acts.rows[w * d + j] - mean).abs() < 1e-5,
                    "window {w} neuron {j}"
                );
                assert!((codes[0].rows[w * 2 * d + j] - pos).abs() < 1e-5);
                assert!((codes[0].rows[w * 2 * d + d + j] - neg).abs() < 1e-5);
            }
        }
        let wrong = perfect_sae(d + 1);
        let e = pooled_window_features(&model, hook, &[&wrong], &windows, 2, 1, None).unwrap_err();
        assert!(e.to_string().contains(&format!("{}", d + 1)), "{e}");
        let ragged = vec![windows[0].clone(), windows[1][..4].to_vec()];
        let e = pooled_window_features(&model, hook, &[], &ragged, 2, 1, None).unwrap_err();
        assert!(e.to_string().contains("windows"), "{e}");
    }
}
