//! Shared by the steering tests: a random TopK SAE wrapped as an `SaeModel`.
#![allow(dead_code)]

use sae_core::TopKConfig;
use sae_core::{CommonConfig, SaeConfig, SaeModel, TopKSae, TopKTraining};

/// A freshly initialised TopK SAE of `d_sae` features reading width `d_in`.
pub fn random_topk(d_in: usize, d_sae: usize, k: usize, seed: u64) -> SaeModel {
    let sae = TopKSae::init(d_in, d_sae, TopKTraining::new(k), seed).unwrap();
    let cfg = TopKConfig {
        k,
        rescale_acts_by_decoder_norm: false,
        common: CommonConfig::new(d_in, d_sae),
    };
    SaeModel::from_parts(SaeConfig::TopK(cfg), Box::new(sae), None)
}

/// [`random_topk`] with a `b_dec` that is not zero (`scale` times a fixed pattern), for
/// measurements taken relative to it.
pub fn random_topk_offset(d_in: usize, d_sae: usize, k: usize, seed: u64, scale: f32) -> SaeModel {
    use sae_core::TrainableSae as _;
    let mut sae = TopKSae::init(d_in, d_sae, TopKTraining::new(k), seed).unwrap();
    for (i, b) in sae
        .params_mut()
        .data_mut("b_dec")
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        *b = scale * ((i % 7) as f32 - 3.0);
    }
    let cfg = TopKConfig {
        k,
        rescale_acts_by_decoder_norm: false,
        common: CommonConfig::new(d_in, d_sae),
    };
    SaeModel::from_parts(SaeConfig::TopK(cfg), Box::new(sae), None)
}
