//! Spurious correlation removal (SCR, SAEBench): a probe trained where a concept and a spurious
//! attribute always go together learns both; can ablating the few latents that carry the spurious
//! attribute make it read the concept alone?
//!
//! SAEBench's recipe (its `scr` evaluation, profession against gender), kept so that numbers
//! compare:
//!
//! 1. three probes on the model's pooled activations at the SAE's hook: the *biased* probe, fitted
//!    for the concept on the training texts where the two attributes agree; the *concept* probe,
//!    fitted for the concept on all four groups (the skyline); the *spurious* probe, fitted for the
//!    spurious attribute on all four groups;
//! 2. each latent's effect on the spurious probe, `|(mean code where spurious) - (mean code where
//!    not)| x |w_spurious · W_dec[f]|`;
//! 3. for `N` in 2, 5, ..., 500: zero-ablate the `N` largest in the held-out texts (the SAE's error
//!    kept) and measure the biased probe's concept accuracy on held-out texts of all four groups;
//! 4. the score, SAEBench's `scr_metric_threshold_N`, is `(after - before) / (concept probe's -
//!    before)`: the share of the gap to an unbiased probe that the ablation closes.
//!
//! As with TPP the probes read the hook that is edited and the texts are mean-pooled, so the
//! ablation is applied to pooled activations and codes without another forward pass. Neurons
//! ablated the same way (set to zero) are the baseline.

use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result, check_finite, shape_err};
use crate::probing::LogisticProbe;
use crate::tpp::{FeatureSource, ablate, check_ablation, source_effects, top_n};

/// Texts as rows of pooled features (`n x d`, row-major) with two yes/no attributes each. The
/// four groups should be of equal size, so that neither attribute predicts the other.
#[derive(Debug, Clone, Copy)]
pub struct TwoAttributes<'a> {
    pub x: &'a [f32],
    pub d: usize,
    /// What the probe should read (SAEBench: the profession).
    pub concept: &'a [bool],
    /// What it should not (SAEBench: the gender).
    pub spurious: &'a [bool],
}

impl TwoAttributes<'_> {
    fn check(&self, what: &str) -> Result<()> {
        let n = self.concept.len();
        if self.d == 0 || self.x.len() != n * self.d || self.spurious.len() != n {
            return Err(shape_err(
                format!("SCR {what} texts"),
                format!(
                    "{n} rows of {} values, {n} labels of each attribute",
                    self.d
                ),
                format!(
                    "{} values and {} spurious labels",
                    self.x.len(),
                    self.spurious.len()
                ),
            ));
        }
        for (c, s) in [(true, true), (true, false), (false, true), (false, false)] {
            if !(0..n).any(|i| self.concept[i] == c && self.spurious[i] == s) {
                return Err(MetricsError::InvalidArgument {
                    what: format!("SCR {what} texts"),
                    reason: format!(
                        "none has concept = {c} and spurious = {s}: all four groups are needed"
                    ),
                });
            }
        }
        check_finite(self.x, || format!("an SCR {what} feature"))
    }

    fn rows(&self, keep: impl Fn(usize) -> bool) -> (Vec<f32>, Vec<usize>) {
        let rows: Vec<usize> = (0..self.concept.len()).filter(|&i| keep(i)).collect();
        let x = rows
            .iter()
            .flat_map(|&i| self.x[i * self.d..(i + 1) * self.d].iter().copied())
            .collect();
        (x, rows)
    }
}

/// What SCR ablates and how its probes are fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScrConfig {
    /// Numbers of latents (or neurons) ablated (SAEBench: 2, 5, 10, 20, 50, 100, 500).
    pub n_values: Vec<usize>,
    /// sklearn's `C` of the probes.
    pub c: f64,
}

impl Default for ScrConfig {
    fn default() -> Self {
        ScrConfig {
            n_values: vec![2, 5, 10, 20, 50, 100, 500],
            c: 1.0,
        }
    }
}

/// The three probes of SCR and their held-out accuracies with nothing ablated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScrProbes {
    /// For the concept, fitted where the attributes agree: it may read either.
    pub biased: LogisticProbe,
    /// For the concept, fitted on all four groups: the accuracy an unbiased probe reaches.
    pub concept: LogisticProbe,
    /// For the spurious attribute, fitted on all four groups: it chooses what to ablate.
    pub spurious: LogisticProbe,
    /// The biased probe's concept accuracy on held-out texts of all four groups.
    pub biased_accuracy: f64,
    /// The biased probe against the spurious labels: how much of that attribute it learnt.
    pub biased_on_spurious_accuracy: f64,
    pub concept_accuracy: f64,
    pub spurious_accuracy: f64,
    d: usize,
    n_train: usize,
    n_test: usize,
}

impl ScrProbes {
    /// Fits the three probes on `train` and scores them on `test`.
    ///
    /// # Errors
    /// Shapes that disagree, a group of the four missing from a split, non-finite features, the
    /// probe's errors.
    pub fn fit(train: TwoAttributes<'_>, test: TwoAttributes<'_>, c: f64) -> Result<Self> {
        train.check("training")?;
        test.check("test")?;
        if train.d != test.d {
            return Err(shape_err(
                "SCR test texts",
                format!("{} values a row (as in training)", train.d),
                format!("{}", test.d),
            ));
        }
        let d = train.d;
        let (xb, rows) = train.rows(|i| train.concept[i] == train.spurious[i]);
        let yb: Vec<bool> = rows.iter().map(|&i| train.concept[i]).collect();
        let biased = LogisticProbe::fit(&xb, d, &yb, c)?;
        let concept = LogisticProbe::fit(train.x, d, train.concept, c)?;
        let spurious = LogisticProbe::fit(train.x, d, train.spurious, c)?;
        Ok(ScrProbes {
            biased_accuracy: biased.accuracy(test.x, test.concept),
            biased_on_spurious_accuracy: biased.accuracy(test.x, test.spurious),
            concept_accuracy: concept.accuracy(test.x, test.concept),
            spurious_accuracy: spurious.accuracy(test.x, test.spurious),
            biased,
            concept,
            spurious,
            d,
            n_train: train.concept.len(),
            n_test: test.concept.len(),
        })
    }
}

/// One ablation: the `n` dimensions that matter most to the spurious probe removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScrAblation {
    pub n: usize,
    /// The dimensions removed, largest effect first (fewer than `n` when fewer have an effect).
    pub features: Vec<usize>,
    /// The biased probe's held-out concept accuracy afterwards.
    pub biased_accuracy: f64,
    /// The biased probe against the spurious labels afterwards.
    pub biased_on_spurious_accuracy: f64,
    /// The concept probe's accuracy afterwards: whether the concept survived the ablation.
    pub concept_accuracy: f64,
    /// The spurious probe's accuracy afterwards: whether the attribute is gone.
    pub spurious_accuracy: f64,
    /// `(biased after - biased before) / (concept probe's - biased before)`, SAEBench's
    /// `scr_metric_threshold_{n}`; `None` when the biased probe was already as good as the concept
    /// probe (nothing to recover).
    pub score: Option<f64>,
}

/// SCR of `source`'s dimensions against `probes`, on the pooled activations they were fitted on.
///
/// ```
/// use metrics::{FeatureSource, ScrConfig, ScrProbes, TwoAttributes, spurious_correlation_removal};
///
/// // Dimension 0 carries the concept weakly, dimension 1 the spurious attribute strongly.
/// let (mut x, mut concept, mut spurious) = (Vec::new(), Vec::new(), Vec::new());
/// for i in 0..200 {
///     let (c, s) = (i % 2 == 0, i % 4 < 2);
///     let noise = ((i * 37) % 23) as f32 / 23.0 - 0.5;
///     x.extend([if c { 0.5 } else { -0.5 } + noise, if s { 2.0 } else { -2.0 }]);
///     concept.push(c);
///     spurious.push(s);
/// }
/// let data = TwoAttributes { x: &x, d: 2, concept: &concept, spurious: &spurious };
/// let probes = ScrProbes::fit(data, data, 1.0).unwrap();
/// assert!(probes.biased_accuracy < probes.concept_accuracy); // the biased probe reads dimension 1
/// let cfg = ScrConfig { n_values: vec![1], ..ScrConfig::default() };
/// let res = spurious_correlation_removal(&probes, data, data, FeatureSource::Neurons, &cfg).unwrap();
/// assert_eq!(res[0].features, vec![1]);
/// assert!(res[0].score.unwrap() > 0.9); // without dimension 1 it reads the concept
/// ```
///
/// # Errors
/// Features of other sizes than the probes were fitted on, codes of the wrong size or with a
/// non-finite value, an SAE whose `d_in` is not the activations' width, `n = 0`, and the SAE's own
/// errors.
pub fn spurious_correlation_removal(
    probes: &ScrProbes,
    train: TwoAttributes<'_>,
    test: TwoAttributes<'_>,
    source: FeatureSource<'_>,
    cfg: &ScrConfig,
) -> Result<Vec<ScrAblation>> {
    train.check("training")?;
    test.check("test")?;
    check_ablation(
        "SCR",
        probes.d,
        [probes.n_train, probes.n_test],
        [(train.d, train.concept.len()), (test.d, test.concept.len())],
        &cfg.n_values,
        &source,
    )?;
    let d = probes.d;
    let effects = scr_effects(probes, train, source);
    let gap = probes.concept_accuracy - probes.biased_accuracy;
    cfg.n_values
        .iter()
        .map(|&n| {
            let features = top_n(&effects, n);
            let x = ablate(test.x, d, probes.n_test, &features, source)?;
            let biased_accuracy = probes.biased.accuracy(&x, test.concept);
            Ok(ScrAblation {
                n,
                biased_on_spurious_accuracy: probes.biased.accuracy(&x, test.spurious),
                concept_accuracy: probes.concept.accuracy(&x, test.concept),
                spurious_accuracy: probes.spurious.accuracy(&x, test.spurious),
                score: (gap > 0.0).then(|| (biased_accuracy - probes.biased_accuracy) / gap),
                biased_accuracy,
                features,
            })
        })
        .collect()
}

/// Each dimension's effect on the spurious probe, in absolute value (SAEBench: an effect either
/// way is a dimension the probe reads): `|(mean where spurious - mean where not) x (probe weight
/// along its direction)|`, over every training row.
fn scr_effects(
    probes: &ScrProbes,
    train: TwoAttributes<'_>,
    source: FeatureSource<'_>,
) -> Vec<f64> {
    let all: Vec<usize> = (0..probes.n_train).collect();
    source_effects(
        source,
        train.x,
        probes.d,
        &all,
        train.spurious,
        &probes.spurious,
        false,
    )
    .into_iter()
    .map(f64::abs)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{perfect_sae, perfect_sae_codes};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Dimension 0: the concept, ±0.5 under noise of width 2; dimension 1: the spurious
    /// attribute, ±1.5 under noise of width 0.4; dimensions 2..d: noise in [-1, 1).
    /// Groups in turn, so all four are of one size.
    fn data(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<bool>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut x, mut concept, mut spurious) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let (c, s) = (i % 2 == 0, i % 4 < 2);
            x.push(if c { 0.5 } else { -0.5 } + rng.random_range(-1.0f32..1.0));
            x.push(if s { 1.5 } else { -1.5 } + rng.random_range(-0.2f32..0.2));
            for _ in 2..d {
                x.push(rng.random_range(-1.0f32..1.0));
            }
            concept.push(c);
            spurious.push(s);
        }
        (x, concept, spurious)
    }

    #[test]
    fn ablating_the_spurious_dimension_recovers_the_concept() {
        let d = 6;
        let (xtr, ctr, str_) = data(400, d, 1);
        let (xte, cte, ste) = data(400, d, 2);
        let train = TwoAttributes {
            x: &xtr,
            d,
            concept: &ctr,
            spurious: &str_,
        };
        let test = TwoAttributes {
            x: &xte,
            d,
            concept: &cte,
            spurious: &ste,
        };
        let probes = ScrProbes::fit(train, test, 1.0).unwrap();
        // Fitted where the attributes agree, the biased probe reads the spurious dimension.
        assert!(probes.biased_on_spurious_accuracy > 0.9, "{probes:?}");
        assert!(
            probes.concept_accuracy - probes.biased_accuracy > 0.15,
            "{probes:?}"
        );
        assert!(probes.spurious_accuracy > 0.99);
        let cfg = ScrConfig {
            n_values: vec![1, 2],
            ..ScrConfig::default()
        };
        let neurons =
            spurious_correlation_removal(&probes, train, test, FeatureSource::Neurons, &cfg)
                .unwrap();
        let one = &neurons[0];
        assert_eq!(one.features, vec![1]);
        let gap = probes.concept_accuracy - probes.biased_accuracy;
        let recovered = one.biased_accuracy - probes.biased_accuracy;
        assert!((one.score.unwrap() - recovered / gap).abs() < 1e-12);
        assert!(
            one.score.unwrap() > 0.8 && one.score.unwrap() < 1.1,
            "{one:?}"
        );
        assert!(
            (one.spurious_accuracy - 0.5).abs() < 0.1,
            "the attribute is gone: {one:?}"
        );
        assert!((one.concept_accuracy - probes.concept_accuracy).abs() < 0.03);

        // The SAE with features ±e_j: dimension 1 is carried by latents 1 (where it is
        // positive) and d + 1 (negative); ablating both is ablating the neuron.
        let sae = perfect_sae(d);
        let (ktr, kte) = (perfect_sae_codes(&xtr, d), perfect_sae_codes(&xte, d));
        let latents = spurious_correlation_removal(
            &probes,
            train,
            test,
            FeatureSource::Latents {
                sae: &sae,
                train_codes: &ktr,
                test_codes: &kte,
            },
            &cfg,
        )
        .unwrap();
        let mut two = latents[1].features.clone();
        two.sort_unstable();
        assert_eq!(two, vec![1, d + 1]);
        assert!(
            (latents[1].biased_accuracy - one.biased_accuracy).abs() < 1e-12,
            "{:?} vs {one:?}",
            latents[1]
        );
        assert_eq!(latents[1].score, one.score);
    }

    #[test]
    fn effects_count_either_sign() {
        // Dimension 0 is 1 higher where spurious, dimension 1 is 2 higher; the probe weighs them
        // +1 and -1: effects 1 and 2, the second first although its product is negative.
        let x = [1.0f32, 2.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0];
        let spurious = [true, false, true, false];
        let concept = [true, true, false, false];
        let f = TwoAttributes {
            x: &x,
            d: 2,
            concept: &concept,
            spurious: &spurious,
        };
        let mut probes = ScrProbes::fit(f, f, 1.0).unwrap();
        probes.spurious.weights = vec![1.0, -1.0];
        let e = scr_effects(&probes, f, FeatureSource::Neurons);
        assert_eq!(e, vec![1.0, 2.0]);
        assert_eq!(top_n(&e, 1), vec![1]);
    }

    #[test]
    fn bad_inputs_are_named() {
        let (x, c, s) = data(40, 3, 1);
        let ok = TwoAttributes {
            x: &x,
            d: 3,
            concept: &c,
            spurious: &s,
        };
        let agree: Vec<bool> = c.clone();
        let biased_only = TwoAttributes {
            spurious: &agree,
            ..ok
        };
        let e = ScrProbes::fit(biased_only, ok, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("concept = true and spurious = false"), "{e}");
        let short = TwoAttributes {
            spurious: &s[..39],
            ..ok
        };
        let e = ScrProbes::fit(ok, short, 1.0).unwrap_err().to_string();
        assert!(e.contains("SCR test texts"), "{e}");
        let probes = ScrProbes::fit(ok, ok, 1.0).unwrap();
        let zero = ScrConfig {
            n_values: vec![0],
            ..ScrConfig::default()
        };
        let e = spurious_correlation_removal(&probes, ok, ok, FeatureSource::Neurons, &zero)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one"), "{e}");
        let sae = perfect_sae(3);
        let codes = vec![f32::NAN; 40 * 6];
        let e = spurious_correlation_removal(
            &probes,
            ok,
            ok,
            FeatureSource::Latents {
                sae: &sae,
                train_codes: &codes,
                test_codes: &codes,
            },
            &ScrConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("SCR training code"), "{e}");
    }
}
