//! Host-side parameter storage: named f32 buffers in row-major order.
//!
//! Training keeps every parameter as a plain `Vec<f32>` so that the hot loops (sparse decoder,
//! per-feature gradient rows, Adam) run over slices with rayon, and so that checkpoints are exact
//! byte copies.

use crate::error::{Result, SaeError};

/// One named parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// SAELens name (`W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold`, `b_gate`, `b_mag`, `r_mag`).
    pub name: String,
    /// Row-major shape as stored here (see `src/arch/mod.rs` for the one layout that differs from the
    /// file: `W_enc` is kept feature-major, `[d_sae, d_in]`).
    pub shape: Vec<usize>,
    /// Whether the first axis indexes features, so that resampling a dead feature resets row `f`
    /// of this parameter and of its optimizer state.
    pub per_feature: bool,
    /// The values.
    pub data: Vec<f32>,
}

impl Param {
    pub fn new(name: &str, shape: &[usize], per_feature: bool, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            per_feature,
            data,
        }
    }
    pub fn zeros(name: &str, shape: &[usize], per_feature: bool) -> Self {
        Self::new(name, shape, per_feature, vec![0.0; shape.iter().product()])
    }
    /// Elements per feature row (for per-feature params).
    pub fn row_len(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

/// An ordered set of named parameters (the same order is used for gradients and Adam moments).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params {
    pub list: Vec<Param>,
}

impl Params {
    pub fn new(list: Vec<Param>) -> Self {
        Params { list }
    }
    /// A zero-filled set with the same names and shapes.
    pub fn zeros_like(&self) -> Self {
        Params {
            list: self
                .list
                .iter()
                .map(|p| Param::zeros(&p.name, &p.shape, p.per_feature))
                .collect(),
        }
    }
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|p| p.name == name)
    }
    /// The parameter called `name`.
    ///
    /// # Errors
    /// [`SaeError::InvalidConfig`] if absent (a programming error in an architecture).
    pub fn get(&self, name: &str) -> Result<&Param> {
        self.list
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| SaeError::config(name, "no such parameter"))
    }
    pub fn get_mut(&mut self, name: &str) -> Result<&mut Param> {
        self.list
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| SaeError::config(name, "no such parameter"))
    }
    /// Slice of parameter `name`.
    pub fn data(&self, name: &str) -> Result<&[f32]> {
        Ok(&self.get(name)?.data)
    }
    pub fn data_mut(&mut self, name: &str) -> Result<&mut [f32]> {
        Ok(&mut self.get_mut(name)?.data)
    }
    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.list.iter().map(|p| p.data.len()).sum()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.list.iter()
    }
    /// Several disjoint mutable slices at once, in the order of `names`.
    ///
    /// # Errors
    /// If a name is missing or repeated.
    pub fn many_mut<const N: usize>(&mut self, names: [&str; N]) -> Result<[&mut [f32]; N]> {
        let mut idx = [0usize; N];
        for (i, n) in names.iter().enumerate() {
            idx[i] = self
                .index_of(n)
                .ok_or_else(|| SaeError::config(*n, "no such parameter"))?;
            if idx[..i].contains(&idx[i]) {
                return Err(SaeError::config(*n, "requested twice"));
            }
        }
        let mut refs: Vec<Option<&mut [f32]>> = self
            .list
            .iter_mut()
            .map(|p| Some(p.data.as_mut_slice()))
            .collect();
        Ok(idx.map(|i| refs[i].take().unwrap_or_default()))
    }
}
