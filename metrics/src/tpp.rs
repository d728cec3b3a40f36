//! Targeted probe perturbation (TPP, SAEBench): when the latents that matter most to one class's
//! probe are ablated, does that probe fail while the other classes' probes keep working?
//!
//! Sparse probing asks whether a concept can be *read* from a few latents; TPP asks whether it
//! can be *removed* through them without touching its neighbours, the property that steering and
//! unlearning rely on. SAEBench's recipe, kept so that numbers compare:
//!
//! 1. one probe per class (one against the rest, balanced) on the model's own pooled activations
//!    at the SAE's hook, every dimension (SAEBench fits it with AdamW and early stopping; here,
//!    as in [`crate::sparse_probing`], it is the L2-regularised optimum with C = 1);
//! 2. each latent's effect on class `i`'s probe: its mean pooled code on the class's texts minus
//!    that on the other texts, floored at zero, times the probe weight read along its decoder
//!    direction, `w_i · W_dec[f]`;
//! 3. for `N` in 2, 5, 10, ..., 500: zero-ablate class `i`'s `N` largest-effect latents in the
//!    held-out texts' activations, keeping the SAE's error (`x - Σ_{f∈S} c_f W_dec[f]`), and
//!    measure every class's probe again;
//! 4. `intended_diff` is the drop of class `i`'s own probe, `unintended_diff` the mean drop of
//!    the others', and `total = intended - unintended`, averaged over classes.
//!
//! Because the probe reads the hook that is edited and the texts are mean-pooled, ablating on
//! every token and pooling afterwards equals removing the latents' pooled share from the pooled
//! activations: no forward pass is needed once the pooled activations and codes are at hand.
//!
//! The same recipe runs on neurons (their effect is the floored mean difference times the probe
//! weight; ablation sets them to zero), the baseline against which an SAE's handles are judged:
//! a latent that is one concept is a more targeted handle than a neuron that mixes several.

use rayon::prelude::*;
use sae_core::{SaeModel, SparseCodes};
use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result, check_finite, shape_err};
use crate::probing::{LabelledFeatures, LogisticProbe, balanced_one_vs_rest, check_splits, gather};

/// What TPP ablates and how its probes are fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TppConfig {
    /// Numbers of latents (or neurons) ablated per class (SAEBench: 2, 5, 10, 20, 50, 100, 500).
    pub n_values: Vec<usize>,
    /// sklearn's `C` of the class probes.
    pub c: f64,
    /// Seed of the one-vs-rest draws (the same draws as [`crate::sparse_probing`]'s with this
    /// seed).
    pub seed: u64,
}

impl Default for TppConfig {
    fn default() -> Self {
        TppConfig {
            n_values: vec![2, 5, 10, 20, 50, 100, 500],
            c: 1.0,
            seed: 42,
        }
    }
}

/// The model's own probes, one per class, fitted once and perturbed by every feature source.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassProbes {
    pub classes: Vec<String>,
    pub probes: Vec<LogisticProbe>,
    /// Each probe's accuracy on its held-out rows, nothing ablated.
    pub clean_accuracy: Vec<f64>,
    /// Each class's balanced training rows and labels (the rows its effects are measured on).
    train: Vec<(Vec<usize>, Vec<bool>)>,
    /// Each class's balanced held-out rows and labels.
    test: Vec<(Vec<usize>, Vec<bool>)>,
    d: usize,
    n_train: usize,
    n_test: usize,
}

impl ClassProbes {
    /// Fits one full-width probe per class on `train` (pooled hook activations) and scores it on
    /// `test`. Classes fit in parallel.
    ///
    /// # Errors
    /// As [`crate::sparse_probing`]: shapes, labels, non-finite values, a class missing from a
    /// split, fewer than two classes.
    pub fn fit(
        train: LabelledFeatures<'_>,
        test: LabelledFeatures<'_>,
        classes: &[String],
        cfg: &TppConfig,
    ) -> Result<Self> {
        check_splits(train, test, classes)?;
        let fitted: Vec<_> = (0..classes.len())
            .into_par_iter()
            .map(|c| {
                let tr = balanced_one_vs_rest(train.labels, classes.len(), c, cfg.seed);
                let te =
                    balanced_one_vs_rest(test.labels, classes.len(), c, cfg.seed.wrapping_add(1));
                let probe =
                    LogisticProbe::fit(&gather(&train, &tr.0, None), train.d, &tr.1, cfg.c)?;
                let acc = probe.accuracy(&gather(&test, &te.0, None), &te.1);
                Ok((probe, acc, tr, te))
            })
            .collect::<Result<_>>()?;
        let mut out = ClassProbes {
            classes: classes.to_vec(),
            probes: Vec::new(),
            clean_accuracy: Vec::new(),
            train: Vec::new(),
            test: Vec::new(),
            d: train.d,
            n_train: train.labels.len(),
            n_test: test.labels.len(),
        };
        for (probe, acc, tr, te) in fitted {
            out.probes.push(probe);
            out.clean_accuracy.push(acc);
            out.train.push(tr);
            out.test.push(te);
        }
        Ok(out)
    }

    /// Every class's probe accuracy on held-out rows `x` (`n_test x d`, row-major).
    fn accuracies(&self, x: &[f32]) -> Vec<f64> {
        let f = LabelledFeatures {
            x,
            d: self.d,
            labels: &[],
        };
        self.probes
            .iter()
            .zip(&self.test)
            .map(|(p, (rows, y))| p.accuracy(&gather(&f, rows, None), y))
            .collect()
    }
}

/// The dimensions an ablation removes (TPP's and SCR's).
#[derive(Clone, Copy)]
pub enum FeatureSource<'a> {
    /// The hook's own dimensions; an ablated neuron is set to zero.
    Neurons,
    /// An SAE's latents, given as the pooled codes of the same rows as the activations
    /// (`n x d_sae`, row-major); an ablated latent's share `c_f W_dec[f]` is taken away and the
    /// SAE's error is kept.
    Latents {
        sae: &'a SaeModel,
        train_codes: &'a [f32],
        test_codes: &'a [f32],
    },
}

/// The checks TPP and SCR make before ablating: the training and test features (`given`,
/// width and rows) are those the probes were fitted on (`d` wide, `fitted` rows), every N is at
/// least 1, and the source fits. `eval` names the evaluation in the errors.
pub(crate) fn check_ablation(
    eval: &str,
    d: usize,
    fitted: [usize; 2],
    given: [(usize, usize); 2],
    n_values: &[usize],
    source: &FeatureSource<'_>,
) -> Result<()> {
    for ((split, n), (width, rows)) in ["training", "test"].into_iter().zip(fitted).zip(given) {
        if width != d || rows != n {
            return Err(shape_err(
                format!("{eval} {split} features"),
                format!("the {n} rows of {d} values the probes were fitted on"),
                format!("{rows} rows of {width}"),
            ));
        }
    }
    if n_values.is_empty() || n_values.contains(&0) {
        return Err(MetricsError::InvalidArgument {
            what: format!("{eval} n"),
            reason: format!("{n_values:?}: ablate at least one dimension per step"),
        });
    }
    source.check(eval, d, fitted[0], fitted[1])
}

impl FeatureSource<'_> {
    /// For latents: the SAE reads `d` values, and the codes are `n_train` and `n_test` finite
    /// rows of `d_sae`. `eval` names the evaluation in the errors.
    pub(crate) fn check(&self, eval: &str, d: usize, n_train: usize, n_test: usize) -> Result<()> {
        let FeatureSource::Latents {
            sae,
            train_codes,
            test_codes,
        } = self
        else {
            return Ok(());
        };
        if sae.d_in() != d {
            return Err(shape_err(
                "the SAE's d_in",
                format!("{d}, the width of the activations {eval} ablates"),
                format!("{}", sae.d_in()),
            ));
        }
        for (what, codes, n) in [
            ("training", train_codes, n_train),
            ("test", test_codes, n_test),
        ] {
            if codes.len() != n * sae.d_sae() {
                return Err(shape_err(
                    format!("{eval} {what} codes"),
                    format!("{n} rows of {} latents", sae.d_sae()),
                    format!("{} values", codes.len()),
                ));
            }
            check_finite(codes, || format!("a {eval} {what} code"))?;
        }
        Ok(())
    }
}

/// One ablation: class `class`'s `n` largest-effect dimensions removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TppAblation {
    pub n: usize,
    /// The dimensions removed, largest effect first (fewer than `n` when fewer have an effect).
    pub features: Vec<usize>,
    /// Every class's probe accuracy afterwards, in class order.
    pub accuracy: Vec<f64>,
    /// The drop of the ablated class's own probe.
    pub intended_diff: f64,
    /// The mean drop of the other classes' probes.
    pub unintended_diff: f64,
    /// `intended_diff - unintended_diff`: SAEBench's `tpp_threshold_{n}_total_metric`.
    pub total: f64,
}

/// TPP for the ablations aimed at one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TppClass {
    pub class: String,
    /// Its probe's accuracy with nothing ablated.
    pub clean_accuracy: f64,
    pub ablations: Vec<TppAblation>,
}

impl TppClass {
    /// The ablation of `n` dimensions, if it was made.
    pub fn at(&self, n: usize) -> Option<&TppAblation> {
        self.ablations.iter().find(|a| a.n == n)
    }
}

/// The mean over classes of `metric` (e.g. `|a| a.total`) at `n`, or `None` if no class has it.
pub fn tpp_mean(
    classes: &[TppClass],
    n: usize,
    metric: impl Fn(&TppAblation) -> f64,
) -> Option<f64> {
    let v: Vec<f64> = classes.iter().filter_map(|c| c.at(n)).map(metric).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Each dimension's effect on a probe: the mean of its pooled value over the positive rows of
/// `rows` less that over the negatives (floored at zero when `floor`, as TPP does), times the
/// probe's weight along the dimension's direction (its decoder row for a latent, the unit vector
/// for a neuron).
pub(crate) fn effects(
    rows: &[usize],
    y: &[bool],
    values: &[f32],
    width: usize,
    floor: bool,
    direction_weight: &dyn Fn(usize) -> f64,
) -> Vec<f64> {
    let mut pos = vec![0.0f64; width];
    let mut neg = vec![0.0f64; width];
    let (mut np, mut nn) = (0usize, 0usize);
    for (&r, &label) in rows.iter().zip(y) {
        let (sum, count) = if label {
            (&mut pos, &mut np)
        } else {
            (&mut neg, &mut nn)
        };
        *count += 1;
        for (s, &v) in sum.iter_mut().zip(&values[r * width..(r + 1) * width]) {
            *s += f64::from(v);
        }
    }
    (0..width)
        .map(|f| {
            let diff = pos[f] / np.max(1) as f64 - neg[f] / nn.max(1) as f64;
            let diff = if floor { diff.max(0.0) } else { diff };
            diff * direction_weight(f)
        })
        .collect()
}

/// The `n` largest non-zero effects, largest first (ties: the lower index), as SAEBench's
/// `select_top_n_features`.
pub(crate) fn top_n(effects: &[f64], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..effects.len()).filter(|&f| effects[f] != 0.0).collect();
    idx.sort_by(|&a, &b| effects[b].total_cmp(&effects[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx
}

/// TPP of `source`'s dimensions against `probes`, on the pooled activations `train` and `test`
/// that the probes were fitted on (the same rows, the same labels). Ablated classes run in
/// parallel.
///
/// ```
/// use metrics::{ClassProbes, LabelledFeatures, TppConfig, FeatureSource, tpp_mean,
///     targeted_probe_perturbation};
///
/// // Three classes of texts, each marked by its own neuron: ablating that neuron blinds the
/// // class's probe and leaves the others' alone.
/// let (mut x, mut labels) = (Vec::new(), Vec::new());
/// for i in 0..60 {
///     let c = i % 3;
///     x.extend((0..3).map(|j| if j == c { 2.0 } else { 0.0 } + 0.1 * (i % 7) as f32));
///     labels.push(c);
/// }
/// let classes = ["a", "b", "c"].map(String::from);
/// let data = LabelledFeatures { x: &x, d: 3, labels: &labels };
/// let cfg = TppConfig { n_values: vec![1], ..TppConfig::default() };
/// let probes = ClassProbes::fit(data, data, &classes, &cfg).unwrap();
/// let res = targeted_probe_perturbation(&probes, data, data, FeatureSource::Neurons, &cfg).unwrap();
/// for (c, class) in res.iter().enumerate() {
///     assert_eq!(class.ablations[0].features, vec![c]);
/// }
/// assert!(tpp_mean(&res, 1, |a| a.total).unwrap() > 0.3);
/// ```
///
/// # Errors
/// Features of other sizes or labels than the probes were fitted on, codes of the wrong size or
/// with a non-finite value, an SAE whose `d_in` is not the activations' width, `n = 0`, and the
/// SAE's own errors.
pub fn targeted_probe_perturbation(
    probes: &ClassProbes,
    train: LabelledFeatures<'_>,
    test: LabelledFeatures<'_>,
    source: FeatureSource<'_>,
    cfg: &TppConfig,
) -> Result<Vec<TppClass>> {
    check_splits(train, test, &probes.classes)?;
    check_ablation(
        "TPP",
        probes.d,
        [probes.n_train, probes.n_test],
        [(train.d, train.labels.len()), (test.d, test.labels.len())],
        &cfg.n_values,
        &source,
    )?;
    let d = probes.d;
    let n_test = test.labels.len();
    let classes = probes.classes.len();
    (0..classes)
        .into_par_iter()
        .map(|class| {
            let (rows, y) = &probes.train[class];
            let eff = source_effects(source, train.x, d, rows, y, &probes.probes[class], true);
            let mut ablations = Vec::with_capacity(cfg.n_values.len());
            for &n in &cfg.n_values {
                let features = top_n(&eff, n);
                let ablated = ablate(test.x, d, n_test, &features, source)?;
                let accuracy = probes.accuracies(&ablated);
                let drop = |k: usize| probes.clean_accuracy[k] - accuracy[k];
                let intended_diff = drop(class);
                let unintended_diff = (0..classes).filter(|&k| k != class).map(drop).sum::<f64>()
                    / (classes - 1) as f64;
                ablations.push(TppAblation {
                    n,
                    features,
                    accuracy,
                    intended_diff,
                    unintended_diff,
                    total: intended_diff - unintended_diff,
                });
            }
            Ok(TppClass {
                class: probes.classes[class].clone(),
                clean_accuracy: probes.clean_accuracy[class],
                ablations,
            })
        })
        .collect()
}

/// The effects (see [`effects`]) of `source`'s dimensions on `probe`, over training `rows`
/// labelled `y`; `acts` are the pooled activations (`d` wide) the neurons' values come from.
pub(crate) fn source_effects(
    source: FeatureSource<'_>,
    acts: &[f32],
    d: usize,
    rows: &[usize],
    y: &[bool],
    probe: &LogisticProbe,
    floor: bool,
) -> Vec<f64> {
    let w = &probe.weights;
    match source {
        FeatureSource::Neurons => effects(rows, y, acts, d, floor, &|f| w[f]),
        FeatureSource::Latents {
            sae, train_codes, ..
        } => {
            let along = |f: usize| {
                sae.w_dec_row(f).map_or(0.0, |row| {
                    row.iter().zip(w).map(|(&r, &w)| f64::from(r) * w).sum()
                })
            };
            effects(rows, y, train_codes, sae.d_sae(), floor, &along)
        }
    }
}

/// The held-out activations `x` with `features` ablated.
pub(crate) fn ablate(
    x: &[f32],
    d: usize,
    n: usize,
    features: &[usize],
    source: FeatureSource<'_>,
) -> Result<Vec<f32>> {
    let mut out = x.to_vec();
    match source {
        FeatureSource::Neurons => {
            for row in out.chunks_mut(d) {
                for &f in features {
                    row[f] = 0.0;
                }
            }
        }
        FeatureSource::Latents {
            sae, test_codes, ..
        } => {
            // decode(c restricted to S) - decode(0): the latents' share, whatever the decoder's
            // bias, through the SAE's own decoder.
            let w = sae.d_sae();
            let rows: Vec<Vec<(u32, f32)>> = (0..n)
                .map(|i| {
                    features
                        .iter()
                        .map(|&f| (f as u32, test_codes[i * w + f]))
                        .filter(|&(_, v)| v != 0.0)
                        .collect()
                })
                .collect();
            let cpu = candle_core::Device::Cpu;
            let share = sae
                .decode_sparse(&SparseCodes::from_rows(w, rows), &cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let base = sae
                .decode_sparse(&SparseCodes::from_rows(w, vec![Vec::new()]), &cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (i, row) in out.chunks_mut(d).enumerate() {
                for ((o, &s), &b) in row.iter_mut().zip(&share[i * d..(i + 1) * d]).zip(&base) {
                    *o -= s - b;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probing::pooled_window_features;
    use crate::testutil::{perfect_sae, perfect_sae_codes, random_sae};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use transformer_hooks::{HookPoint, Model, Site};

    /// Class `c` raises dimension `2c` by 3; the rest is noise in [0, 1).
    fn planted(n_per_class: usize, classes: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n_per_class * classes {
            let c = i % classes;
            for j in 0..d {
                x.push(rng.random_range(0.0f32..1.0) + if j == 2 * c { 3.0 } else { 0.0 });
            }
            labels.push(c);
        }
        (x, labels)
    }

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|c| format!("c{c}")).collect()
    }

    #[test]
    fn ablating_a_class_marker_blinds_its_probe_only() {
        let (k, d) = (4, 12);
        let (xtr, ltr) = planted(40, k, d, 1);
        let (xte, lte) = planted(30, k, d, 2);
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
        let cfg = TppConfig {
            n_values: vec![1, 3],
            ..TppConfig::default()
        };
        let probes = ClassProbes::fit(train, test, &names(k), &cfg).unwrap();
        assert!(
            probes.clean_accuracy.iter().all(|&a| a == 1.0),
            "{:?}",
            probes.clean_accuracy
        );
        let neurons =
            targeted_probe_perturbation(&probes, train, test, FeatureSource::Neurons, &cfg)
                .unwrap();
        for (c, r) in neurons.iter().enumerate() {
            let one = r.at(1).unwrap();
            assert_eq!(
                one.features,
                vec![2 * c],
                "class {c}'s marker has the largest effect"
            );
            assert!(one.intended_diff >= 0.4, "class {c}: {one:?}");
            assert!(one.unintended_diff.abs() <= 0.1, "class {c}: {one:?}");
            // Only dimensions that rise with the class and push its probe up can be chosen.
            let three = r.at(3).unwrap();
            assert_eq!(three.features[0], 2 * c);
            for &f in &three.features {
                assert!(
                    probes.probes[c].weights[f] > 0.0,
                    "class {c}, dimension {f}"
                );
            }
        }
        assert!(tpp_mean(&neurons, 1, |a| a.total).unwrap() >= 0.4);

        // The SAE with features ±e_j and codes ReLU(±x): ablating latent j removes exactly
        // x_j (x > 0 here), so the latents' TPP is the neurons' to the bit.
        let sae = perfect_sae(d);
        let (ctr, cte) = (perfect_sae_codes(&xtr, d), perfect_sae_codes(&xte, d));
        let latents = targeted_probe_perturbation(
            &probes,
            train,
            test,
            FeatureSource::Latents {
                sae: &sae,
                train_codes: &ctr,
                test_codes: &cte,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(latents, neurons);
    }

    #[test]
    fn effects_are_floored_mean_differences_along_the_probe() {
        // Two training rows per class, two latents with decoder rows (1, 0) and (1, -2).
        let classes = names(2);
        let x = [1.0f32, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0];
        let labels = [0usize, 1, 0, 1];
        let f = LabelledFeatures {
            x: &x,
            d: 2,
            labels: &labels,
        };
        let probes = ClassProbes::fit(f, f, &classes, &TppConfig::default()).unwrap();
        let codes = [0.5f32, 0.0, 1.0, 4.0, 1.5, 1.0, 0.0, 2.0];
        let (rows, y) = &probes.train[0];
        let mean = |j: usize, label: bool| {
            let v: Vec<f64> = rows
                .iter()
                .zip(y)
                .filter(|(_, l)| **l == label)
                .map(|(&r, _)| f64::from(codes[r * 2 + j]))
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let w = &probes.probes[0].weights;
        let dec = [[1.0, 0.0], [1.0, -2.0]];
        let e = effects(rows, y, &codes, 2, true, &|f| {
            dec[f][0] * w[0] + dec[f][1] * w[1]
        });
        for j in 0..2 {
            let want =
                (mean(j, true) - mean(j, false)).max(0.0) * (dec[j][0] * w[0] + dec[j][1] * w[1]);
            assert!(
                (e[j] - want).abs() < 1e-12,
                "latent {j}: {} vs {want}",
                e[j]
            );
        }
        // Latent 1 is higher on the negatives: floored to no effect.
        assert_eq!(e[1], 0.0);
        assert_eq!(top_n(&[0.0, 2.0, -1.0, 2.0, 5.0], 3), vec![4, 1, 3]);
        assert_eq!(top_n(&[0.0, -1.0], 5), vec![1], "only non-zero effects");
    }

    #[test]
    fn bad_inputs_are_named() {
        let (xtr, ltr) = planted(10, 3, 8, 1);
        let f = LabelledFeatures {
            x: &xtr,
            d: 8,
            labels: &ltr,
        };
        let classes = names(3);
        let probes = ClassProbes::fit(f, f, &classes, &TppConfig::default()).unwrap();
        let err = |src: FeatureSource<'_>, cfg: &TppConfig| {
            targeted_probe_perturbation(&probes, f, f, src, cfg)
                .unwrap_err()
                .to_string()
        };
        let zero = TppConfig {
            n_values: vec![0],
            ..TppConfig::default()
        };
        assert!(err(FeatureSource::Neurons, &zero).contains("at least one"));
        let sae = perfect_sae(8);
        let short = vec![0.0f32; 5];
        let e = err(
            FeatureSource::Latents {
                sae: &sae,
                train_codes: &short,
                test_codes: &short,
            },
            &TppConfig::default(),
        );
        assert!(
            e.contains("TPP training codes") && e.contains("30 rows of 16 latents"),
            "{e}"
        );
        let wide = perfect_sae(9);
        let codes = vec![0.0f32; 30 * 18];
        let e = err(
            FeatureSource::Latents {
                sae: &wide,
                train_codes: &codes,
                test_codes: &codes,
            },
            &TppConfig::default(),
        );
        assert!(e.contains("d_in: expected 8") && e.contains("got 9"), "{e}");
        let fewer = LabelledFeatures {
            x: &xtr[..8 * 27],
            d: 8,
            labels: &ltr[..27],
        };
        let e = targeted_probe_perturbation(
            &probes,
            fewer,
            f,
            FeatureSource::Neurons,
            &TppConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("the 30 rows of 8 values the probes were fitted on"),
            "{e}"
        );
    }

    /// Ablating on every token and pooling afterwards (the definition) equals taking the latents'
    /// pooled share from the pooled activations (what `ablate` does), on a real forward pass with
    /// an SAE that has a decoder bias and an error.
    #[test]
    fn pooled_ablation_is_per_token_ablation_pooled() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../transformer-hooks/tests/fixtures/tiny/llama");
        let model = Model::load(&dir, &Device::Cpu).unwrap();
        let hook = "blocks.1.mlp.hook_post";
        let d = model.config().d_mlp;
        let sae = random_sae(d, 3 * d, 5);
        let windows: Vec<Vec<u32>> = (0..4u32)
            .map(|w| {
                std::iter::once(1)
                    .chain((1..10u32).map(|t| 3 + (w * 13 + t * 5) % 120))
                    .collect()
            })
            .collect();
        let (acts, codes) =
            pooled_window_features(&model, hook, &[&sae], &windows, 3, 1, None).unwrap();
        let codes = &codes[0].rows;
        // The latents that fire most over all windows.
        let mut mass: Vec<(f32, usize)> = (0..sae.d_sae())
            .map(|f| ((0..4).map(|w| codes[w * sae.d_sae() + f]).sum(), f))
            .collect();
        mass.sort_by(|a, b| b.0.total_cmp(&a.0));
        let chosen: Vec<usize> = mass[..5].iter().map(|m| m.1).collect();
        assert!(mass[4].0 > 0.0, "the chosen latents fire");
        let src = FeatureSource::Latents {
            sae: &sae,
            train_codes: codes,
            test_codes: codes,
        };
        let fast = ablate(&acts.rows, d, 4, &chosen, src).unwrap();
        let hp = HookPoint::Block(1, Site::MlpPost);
        for (w, ids) in windows.iter().enumerate() {
            let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
            let h = model.run_with_cache(&t, &[hp]).unwrap();
            let h = h
                .require(hp)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .narrow(0, 1, 9)
                .unwrap();
            // Per token: x - x_hat + decode(codes with the chosen latents zeroed).
            let mut c = sae.encode(&h).unwrap().to_vec2::<f32>().unwrap();
            let x_hat = sae.forward(&h).unwrap();
            for row in &mut c {
                for &f in &chosen {
                    row[f] = 0.0;
                }
            }
            let c = Tensor::new(c, &Device::Cpu).unwrap();
            let edited = (h.clone() - x_hat + sae.decode(&c).unwrap()).unwrap();
            let pooled: Vec<f32> = edited.mean(0).unwrap().to_vec1().unwrap();
            for j in 0..d {
                assert!(
                    (pooled[j] - fast[w * d + j]).abs() < 1e-4,
                    "window {w}, dimension {j}: {} vs {}",
                    pooled[j],
                    fast[w * d + j]
                );
            }
        }
    }
}
