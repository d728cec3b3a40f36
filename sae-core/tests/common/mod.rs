//! Shared by the interop tests: the expected outputs a Python tool wrote beside its SAE.
#![allow(dead_code)]

use std::path::Path;

use candle_core::{Device, Tensor};
use sae_core::io::read_safetensors;

/// `expected.safetensors`: inputs `x` and the tool's own codes and reconstruction of them.
pub struct Expected {
    pub x: Tensor,
    pub acts: Vec<f32>,
    pub recon: Vec<f32>,
}

pub fn expected(dir: &Path) -> Expected {
    let t = read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let x = &t["x"];
    Expected {
        x: Tensor::from_slice(&x.data, (x.shape[0], x.shape[1]), &Device::Cpu).unwrap(),
        acts: t["feature_acts"].data.clone(),
        recon: t["recon"].data.clone(),
    }
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(u, v)| (u - v).abs())
        .fold(0.0, f32::max)
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}
