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
