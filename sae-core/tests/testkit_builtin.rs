//! Every built-in architecture runs the property kit.

use sae_core::testkit::{KitOptions, check_architecture};
use sae_core::{
    BatchTopKSae, BatchTopKTraining, DecoderNorm, GatedSae, GatedTraining, JumpReluSae,
    JumpReluTraining, StandardSae, StandardTraining, TopKSae, TopKTraining,
};

fn opts() -> KitOptions {
    KitOptions::default()
}

#[test]
fn standard_passes_the_kit() {
    check_architecture(
        "standard",
        |d_in, d_sae, seed| {
            StandardSae::init(
                d_in,
                d_sae,
                StandardTraining {
                    l1_coefficient: 0.05,
                    ..StandardTraining::default()
                },
                seed,
            )
        },
        &opts(),
    );
}

#[test]
fn standard_with_free_decoder_passes_the_kit() {
    check_architecture(
        "standard (free decoder)",
        |d_in, d_sae, seed| {
            StandardSae::init(
                d_in,
                d_sae,
                StandardTraining {
                    l1_coefficient: 0.05,
                    decoder_norm: DecoderNorm::Free,
                    decoder_init_norm: 0.5,
                    ..StandardTraining::default()
                },
                seed,
            )
        },
        &opts(),
    );
}

#[test]
fn topk_passes_the_kit() {
    check_architecture(
        "topk",
        |d_in, d_sae, seed| TopKSae::init(d_in, d_sae, TopKTraining::new(3), seed).unwrap(),
        &opts(),
    );
}

#[test]
fn batchtopk_passes_the_kit() {
    check_architecture(
        "batchtopk",
        |d_in, d_sae, seed| {
            BatchTopKSae::init(d_in, d_sae, BatchTopKTraining::new(3.0), seed).unwrap()
        },
        &opts(),
    );
}

#[test]
fn jumprelu_passes_the_kit() {
    check_architecture(
        "jumprelu",
        |d_in, d_sae, seed| {
            JumpReluSae::init(
                d_in,
                d_sae,
                JumpReluTraining {
                    l0_coefficient: 0.1,
                    decoder_init_norm: 0.5,
                    ..JumpReluTraining::default()
                },
                seed,
            )
        },
        &opts(),
    );
}

#[test]
fn gated_passes_the_kit() {
    check_architecture(
        "gated",
        |d_in, d_sae, seed| {
            GatedSae::init(
                d_in,
                d_sae,
                GatedTraining {
                    l1_coefficient: 0.05,
                    decoder_init_norm: 0.5,
                    ..GatedTraining::default()
                },
                seed,
            )
        },
        &opts(),
    );
}
