//! Top-activating and interval-sampled examples of every feature, collected in one streaming
//! pass over an activation cache with per-row provenance.
//!
//! For each feature the collector keeps its `top_k` largest activations and a uniform reservoir
//! sample of its nonzero activations (Vitter's algorithm R). Deciles of the nonzero activations
//! are read off the reservoir at the end, and each decile's examples are drawn from the reservoir
//! entries inside it: a uniform sample of the interval, with no second pass over the cache. This
//! matters because polysemanticity hides in the low activations that top examples never show.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sae_core::SparseCodes;
use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result, shape_err};
use crate::reconstruction::FeatureDensity;

/// Where a cached activation row came from (`activation_store::Provenance`'s fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RowSource {
    /// Window index in the cache's plan.
    pub window: u32,
    /// Position in the window (0 is BOS).
    pub position: u32,
    /// Token id at that position.
    pub token: u32,
}

/// One example: an activation and where it happened.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub activation: f32,
    pub source: RowSource,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Keyed(f32, RowSource);
impl Eq for Keyed {}
impl PartialOrd for Keyed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Keyed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Streaming collector of per-feature examples and densities.
#[derive(Debug, Clone)]
pub struct ExampleCollector {
    top_k: usize,
    reservoir_size: usize,
    top: Vec<BinaryHeap<Reverse<Keyed>>>,
    reservoir: Vec<Vec<Example>>,
    nonzero_seen: Vec<u64>,
    max_activation: Vec<f32>,
    density: FeatureDensity,
    rng: ChaCha8Rng,
}

/// Examples drawn from one interval of a feature's nonzero activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalExamples {
    pub low: f32,
    pub high: f32,
    /// 0-based decile index.
    pub index: usize,
    pub examples: Vec<Example>,
}

impl ExampleCollector {
    /// A collector for `d_sae` features keeping `top_k` top examples and a reservoir of
    /// `reservoir_size` nonzero activations per feature, seeded for reproducible samples.
    pub fn new(d_sae: usize, top_k: usize, reservoir_size: usize, seed: u64) -> Self {
        Self {
            top_k,
            reservoir_size,
            top: vec![BinaryHeap::new(); d_sae],
            reservoir: vec![Vec::new(); d_sae],
            nonzero_seen: vec![0; d_sae],
            max_activation: vec![0.0; d_sae],
            density: FeatureDensity::new(d_sae),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Adds the codes of a batch of rows and their sources (one per row).
    ///
    /// # Errors
    /// `ShapeMismatch` if the counts differ or `codes.d_sae` is not the collector's.
    pub fn observe(&mut self, codes: &SparseCodes, sources: &[RowSource]) -> Result<()> {
        if codes.n_tokens != sources.len() {
            return Err(shape_err(
                "row sources",
                format!("{} (one per coded row)", codes.n_tokens),
                format!("{}", sources.len()),
            ));
        }
        if codes.d_sae != self.top.len() {
            return Err(shape_err(
                "codes",
                format!("d_sae = {}", self.top.len()),
                format!("d_sae = {}", codes.d_sae),
            ));
        }
        for (r, src) in sources.iter().enumerate() {
            let (fs, vs) = codes.row(r);
            for (&f, &v) in fs.iter().zip(vs) {
                if v <= 0.0 || !v.is_finite() {
                    continue;
                }
                let f = f as usize;
                self.density.fire_counts[f] += 1;
                if v > self.max_activation[f] {
                    self.max_activation[f] = v;
                }
                let heap = &mut self.top[f];
                let item = Keyed(v, *src);
                if heap.len() < self.top_k {
                    heap.push(Reverse(item));
                } else if heap.peek().is_some_and(|m| item > m.0) {
                    heap.pop();
                    heap.push(Reverse(item));
                }
                self.nonzero_seen[f] += 1;
                let seen = self.nonzero_seen[f];
                let ex = Example {
                    activation: v,
                    source: *src,
                };
                let res = &mut self.reservoir[f];
                if res.len() < self.reservoir_size {
                    res.push(ex);
                } else {
                    let j = self.rng.random_range(0..seen);
                    if (j as usize) < self.reservoir_size {
                        res[j as usize] = ex;
                    }
                }
            }
        }
        self.density.n_tokens += sources.len() as u64;
        Ok(())
    }

    /// Number of features.
    pub fn d_sae(&self) -> usize {
        self.top.len()
    }

    /// Firing counts over the observed rows.
    pub fn density(&self) -> &FeatureDensity {
        &self.density
    }

    /// The feature's largest activation seen (0 if it never fired).
    pub fn max_activation(&self, feature: usize) -> f32 {
        self.max_activation.get(feature).copied().unwrap_or(0.0)
    }

    fn check(&self, feature: usize) -> Result<()> {
        if feature >= self.d_sae() {
            return Err(MetricsError::InvalidArgument {
                what: format!("feature {feature}"),
                reason: format!("the SAE has {} features", self.d_sae()),
            });
        }
        Ok(())
    }

    /// The feature's top examples, largest first.
    ///
    /// # Errors
    /// `InvalidArgument` for a feature out of range.
    pub fn top_examples(&self, feature: usize) -> Result<Vec<Example>> {
        self.check(feature)?;
        let mut v: Vec<Keyed> = self.top[feature].iter().map(|r| r.0).collect();
        v.sort_by(|a, b| b.cmp(a));
        Ok(v.into_iter()
            .map(|k| Example {
                activation: k.0,
                source: k.1,
            })
            .collect())
    }

    /// The reservoir: a uniform sample of the feature's nonzero activations.
    ///
    /// # Errors
    /// `InvalidArgument` for a feature out of range.
    pub fn nonzero_sample(&self, feature: usize) -> Result<&[Example]> {
        self.check(feature)?;
        Ok(&self.reservoir[feature])
    }

    /// Up to `per_interval` examples from each decile interval of the feature's nonzero
    /// activations (deciles estimated from the reservoir), lowest interval first.
    ///
    /// # Errors
    /// `InvalidArgument` for a feature out of range.
    pub fn decile_examples(
        &self,
        feature: usize,
        per_interval: usize,
        seed: u64,
    ) -> Result<Vec<IntervalExamples>> {
        self.check(feature)?;
        let mut sample = self.reservoir[feature].clone();
        if sample.is_empty() {
            return Ok(Vec::new());
        }
        sample.sort_by(|a, b| a.activation.total_cmp(&b.activation));
        let n = sample.len();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ feature as u64);
        let mut out = Vec::new();
        for dec in 0..10 {
            let lo = dec * n / 10;
            let hi = ((dec + 1) * n / 10).min(n);
            if lo >= hi {
                continue;
            }
            let mut part: Vec<Example> = sample[lo..hi].to_vec();
            // Partial Fisher-Yates: a uniform subset of the interval.
            let take = per_interval.min(part.len());
            for i in 0..take {
                let j = rng.random_range(i..part.len());
                part.swap(i, j);
            }
            part.truncate(take);
            part.sort_by(|a, b| b.activation.total_cmp(&a.activation));
            out.push(IntervalExamples {
                low: sample[lo].activation,
                high: sample[hi - 1].activation,
                index: dec,
                examples: part,
            });
        }
        Ok(out)
    }

    /// Histogram of the reservoir's activations in `n_bins` equal bins from 0 to the maximum:
    /// (edges, counts).
    ///
    /// # Errors
    /// `InvalidArgument` for a feature out of range or `n_bins == 0`.
    pub fn activation_histogram(
        &self,
        feature: usize,
        n_bins: usize,
    ) -> Result<(Vec<f32>, Vec<u64>)> {
        self.check(feature)?;
        if n_bins == 0 {
            return Err(MetricsError::InvalidArgument {
                what: "n_bins".into(),
                reason: "at least one bin".into(),
            });
        }
        let max = self.reservoir[feature]
            .iter()
            .map(|e| e.activation)
            .fold(0.0f32, f32::max);
        if max <= 0.0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let edges: Vec<f32> = (0..=n_bins)
            .map(|i| max * i as f32 / n_bins as f32)
            .collect();
        let mut counts = vec![0u64; n_bins];
        for e in &self.reservoir[feature] {
            let i = ((e.activation / max * n_bins as f32) as usize).min(n_bins - 1);
            counts[i] += 1;
        }
        Ok((edges, counts))
    }

    /// The most frequent tokens among the feature's top examples, most frequent first (ties by
    /// total activation): the raw material of a short automatic label.
    ///
    /// # Errors
    /// `InvalidArgument` for a feature out of range.
    pub fn top_tokens(&self, feature: usize, k: usize) -> Result<Vec<(u32, usize)>> {
        let top = self.top_examples(feature)?;
        let mut counts: Vec<(u32, usize, f32)> = Vec::new();
        for e in &top {
            match counts.iter_mut().find(|c| c.0 == e.source.token) {
                Some(c) => {
                    c.1 += 1;
                    c.2 += e.activation;
                }
                None => counts.push((e.source.token, 1, e.activation)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)));
        Ok(counts.into_iter().take(k).map(|c| (c.0, c.1)).collect())
    }
}

/// Scans up to `max_rows` rows of a cached hook in storage order, `batch_rows` at a time, through
/// `sae`, into a new collector (`top_k` top examples and a `reservoir_size` sample per feature).
///
/// # Errors
/// `SaeHookWidth` if the SAE does not read the cache's width; cache and SAE errors.
#[allow(clippy::too_many_arguments)]
pub fn collect_examples(
    acts: &activation_store::HookActivations,
    sae: &sae_core::SaeModel,
    max_rows: u64,
    batch_rows: usize,
    top_k: usize,
    reservoir_size: usize,
    seed: u64,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<ExampleCollector> {
    if sae.d_in() != acts.width() {
        return Err(MetricsError::SaeHookWidth {
            hook: acts.name().to_string(),
            sae_d_in: sae.d_in(),
            hook_width: acts.width(),
        });
    }
    let total = acts.rows().min(max_rows);
    if let Some(pb) = progress {
        pb.set_length(total);
    }
    let mut collector = ExampleCollector::new(sae.d_sae(), top_k, reservoir_size, seed);
    let cache = acts.cache();
    let mut start = 0u64;
    while start < total {
        let n = (batch_rows.max(1) as u64).min(total - start) as usize;
        let x = acts.read_rows(start, n)?;
        let t = candle_core::Tensor::from_vec(x, (n, acts.width()), &candle_core::Device::Cpu)?;
        let codes = sae.encode_sparse(&t)?;
        let mut sources = Vec::with_capacity(n);
        for r in start..start + n as u64 {
            let p = cache.provenance(r)?;
            sources.push(RowSource {
                window: p.window,
                position: p.position,
                token: p.token,
            });
        }
        collector.observe(&codes, &sources)?;
        start += n as u64;
        if let Some(pb) = progress {
            pb.set_position(start);
        }
    }
    Ok(collector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(i: u32) -> RowSource {
        RowSource {
            window: i / 10,
            position: i % 10,
            token: i % 7,
        }
    }

    #[test]
    fn keeps_true_top_k_and_density() {
        // Feature 0 fires on every row with activation = row index; feature 1 on even rows.
        let n = 1000u32;
        let rows: Vec<Vec<(u32, f32)>> = (0..n)
            .map(|i| {
                let mut r = vec![(0, i as f32 + 1.0)];
                if i % 2 == 0 {
                    r.push((1, 1.0));
                }
                r
            })
            .collect();
        let codes = SparseCodes::from_rows(3, rows);
        let sources: Vec<RowSource> = (0..n).map(src).collect();
        let mut c = ExampleCollector::new(3, 5, 100, 0);
        // Two batches.
        let (a, b) = (
            SparseCodes::from_rows(
                3,
                (0..400)
                    .map(|i| {
                        codes
                            .row(i)
                            .0
                            .iter()
                            .copied()
                            .zip(codes.row(i).1.iter().copied())
                            .collect()
                    })
                    .collect(),
            ),
            SparseCodes::from_rows(
                3,
                (400..1000)
                    .map(|i| {
                        codes
                            .row(i)
                            .0
                            .iter()
                            .copied()
                            .zip(codes.row(i).1.iter().copied())
                            .collect()
                    })
                    .collect(),
            ),
        );
        c.observe(&a, &sources[..400]).unwrap();
        c.observe(&b, &sources[400..]).unwrap();
        let top = c.top_examples(0).unwrap();
        let acts: Vec<f32> = top.iter().map(|e| e.activation).collect();
        assert_eq!(acts, vec![1000.0, 999.0, 998.0, 997.0, 996.0]);
        assert_eq!(top[0].source, src(999));
        assert_eq!(c.density().fire_counts, vec![1000, 500, 0]);
        assert_eq!(c.density().n_tokens, 1000);
        assert_eq!(c.nonzero_sample(0).unwrap().len(), 100);
        // Deciles of a uniform 1..1000: each interval's examples lie inside it, intervals rise.
        let dec = c.decile_examples(0, 3, 1).unwrap();
        assert_eq!(dec.len(), 10);
        for w in dec.windows(2) {
            assert!(w[0].high <= w[1].low);
        }
        for d in &dec {
            assert_eq!(d.examples.len(), 3);
            for e in &d.examples {
                assert!(e.activation >= d.low && e.activation <= d.high);
            }
        }
        // The reservoir is roughly uniform: its median is near 500.
        let mut s: Vec<f32> = c
            .nonzero_sample(0)
            .unwrap()
            .iter()
            .map(|e| e.activation)
            .collect();
        s.sort_by(f32::total_cmp);
        assert!((s[50] - 500.0).abs() < 150.0, "median {}", s[50]);
        assert!(c.decile_examples(2, 3, 1).unwrap().is_empty());
        assert!(c.top_examples(3).is_err());
        let (edges, counts) = c.activation_histogram(0, 4).unwrap();
        assert_eq!(edges.len(), 5);
        assert_eq!(counts.iter().sum::<u64>(), 100);
    }
}
