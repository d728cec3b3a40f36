//! The sparse codes every SAE's encoder returns.

use rayon::prelude::*;

use crate::error::{Result, SaeError};

/// Sparse feature activations in compressed-row form: token `t`'s pairs are
/// `offsets[t]..offsets[t + 1]` of `features` / `values`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseCodes {
    pub n_tokens: usize,
    pub d_sae: usize,
    pub offsets: Vec<usize>,
    pub features: Vec<u32>,
    pub values: Vec<f32>,
}

impl SparseCodes {
    /// Checks that the public fields agree: `n_tokens + 1` offsets, starting at 0, never
    /// decreasing, ending at the length of `features` and `values` (equal), and every feature
    /// below `d_sae`. Codes built by hand are checked before any kernel indexes with them.
    ///
    /// # Errors
    /// [`SaeError::InvalidConfig`] naming the first inconsistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(SaeError::config("sparse codes", reason));
        if self.offsets.len() != self.n_tokens + 1 {
            return bad(format!(
                "{} offsets for {} tokens (expected n_tokens + 1)",
                self.offsets.len(),
                self.n_tokens
            ));
        }
        if self.offsets[0] != 0 || self.offsets.windows(2).any(|w| w[1] < w[0]) {
            return bad("offsets must start at 0 and never decrease".into());
        }
        let end = self.offsets[self.n_tokens];
        if end != self.features.len() || end != self.values.len() {
            return bad(format!(
                "offsets end at {end}, with {} features and {} values",
                self.features.len(),
                self.values.len()
            ));
        }
        if let Some(f) = self.features.iter().find(|&&f| f as usize >= self.d_sae) {
            return bad(format!("feature {f} out of range 0..{}", self.d_sae));
        }
        Ok(())
    }

    /// Builds codes from per-token lists of `(feature, value)`.
    pub fn from_rows(d_sae: usize, rows: Vec<Vec<(u32, f32)>>) -> Self {
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0);
        let total: usize = rows.iter().map(Vec::len).sum();
        let mut features = Vec::with_capacity(total);
        let mut values = Vec::with_capacity(total);
        for r in &rows {
            for &(f, v) in r {
                features.push(f);
                values.push(v);
            }
            offsets.push(features.len());
        }
        SparseCodes {
            n_tokens: rows.len(),
            d_sae,
            offsets,
            features,
            values,
        }
    }
    /// Codes from a dense `[n, d_sae]` row-major matrix, keeping the non-zero entries.
    pub fn from_dense(dense: &[f32], n: usize, d_sae: usize) -> Self {
        let rows = dense
            .par_chunks(d_sae)
            .map(|row| {
                row.iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0.0)
                    .map(|(f, v)| (f as u32, *v))
                    .collect()
            })
            .collect();
        let mut c = Self::from_rows(d_sae, rows);
        c.n_tokens = n;
        c
    }
    /// Token `t`'s features and values.
    pub fn row(&self, t: usize) -> (&[u32], &[f32]) {
        let r = self.offsets[t]..self.offsets[t + 1];
        (&self.features[r.clone()], &self.values[r])
    }
    /// Number of stored pairs.
    pub fn nnz(&self) -> usize {
        self.features.len()
    }
    /// Mean number of non-zero activations per token.
    pub fn l0(&self) -> f64 {
        if self.n_tokens == 0 {
            return 0.0;
        }
        self.values.iter().filter(|v| **v != 0.0).count() as f64 / self.n_tokens as f64
    }
    /// Dense `[n, d_sae]` row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n_tokens * self.d_sae];
        for t in 0..self.n_tokens {
            let (fs, vs) = self.row(t);
            for (&f, &v) in fs.iter().zip(vs) {
                out[t * self.d_sae + f as usize] = v;
            }
        }
        out
    }
    /// How many tokens each feature fired on (value > 0).
    pub fn fire_counts(&self) -> Vec<u32> {
        let mut c = vec![0u32; self.d_sae];
        for (&f, &v) in self.features.iter().zip(&self.values) {
            if v != 0.0 {
                c[f as usize] += 1;
            }
        }
        c
    }
}
