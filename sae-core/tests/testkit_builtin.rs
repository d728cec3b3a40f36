//! Every built-in architecture runs the property kit.

use sae_core::testkit::{KitOptions, PlantedOptions, check_architecture};
use sae_core::{
    BatchTopKSae, BatchTopKTraining, DecoderNorm, GatedSae, GatedTraining, JumpReluSae,
    JumpReluTraining, MatryoshkaSae, MatryoshkaTraining, StandardSae, StandardTraining, TopKSae,
    TopKTraining,
};

/// `PROPTEST_CASES` raises the number of cases per property (proptest's own variable).
fn opts() -> KitOptions {
    let mut o = KitOptions::default();
    if let Some(n) = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        o.cases = n;
    }
    o
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

/// A standard SAE whose `W_enc` gradient is off by 10%: the gradient property must reject it,
/// or the kit's passes above mean nothing.
struct SkewedGradient(StandardSae);

impl sae_core::Sae for SkewedGradient {
    fn architecture(&self) -> &str {
        self.0.architecture()
    }
    fn d_in(&self) -> usize {
        self.0.d_in()
    }
    fn d_sae(&self) -> usize {
        self.0.d_sae()
    }
    fn params(&self) -> &sae_core::Params {
        self.0.params()
    }
    fn encode_host(&self, x: &[f32], n: usize) -> sae_core::Result<sae_core::SparseCodes> {
        self.0.encode_host(x, n)
    }
}

impl sae_core::TrainableSae for SkewedGradient {
    fn params_mut(&mut self) -> &mut sae_core::Params {
        self.0.params_mut()
    }
    fn forward_backward(
        &self,
        batch: &sae_core::Batch<'_>,
        ctx: &sae_core::StepContext<'_>,
        grads: &mut sae_core::Params,
    ) -> sae_core::Result<sae_core::StepOutput> {
        let out = self.0.forward_backward(batch, ctx, grads)?;
        grads.data_mut("W_enc")?.iter_mut().for_each(|g| *g *= 1.1);
        Ok(out)
    }
    fn export(
        &self,
        params: &sae_core::Params,
        common: sae_core::CommonConfig,
    ) -> sae_core::Result<(sae_core::SaeConfig, Vec<sae_core::FileTensor>)> {
        self.0.export(params, common)
    }
}

#[test]
fn the_gradient_property_rejects_a_wrong_gradient() {
    let make = |d_in, d_sae, seed| {
        SkewedGradient(StandardSae::init(
            d_in,
            d_sae,
            StandardTraining {
                l1_coefficient: 0.05,
                ..StandardTraining::default()
            },
            seed,
        ))
    };
    let err = sae_core::testkit::check_gradients(&make, &opts()).unwrap_err();
    assert!(err.contains("W_enc"), "{err}");
}

#[test]
fn matryoshka_passes_the_kit() {
    // Two prefixes, half and all. On the planted run (16 atoms, 32 features, two atoms per
    // sample) the nested objective recovers 13 of 16 atoms at cosine >= 0.9 where BatchTopK
    // recovers all 16, at 1,500 steps as at 6,000; with a first prefix of a quarter or less
    // (its features must rebuild every sample alone, so they learn blends of atoms) 6-8 of 16.
    // That is the architecture's trade on unstructured atoms, not a training failure: the
    // gradient, shape, norm and save/load properties hold as for the others, and the bar for
    // recovery is set below the measured 81%.
    check_architecture(
        "matryoshka_batchtopk",
        |d_in, d_sae, seed| {
            let widths = vec![(d_sae / 2).max(1)];
            MatryoshkaSae::init(d_in, d_sae, MatryoshkaTraining::new(3.0, widths), seed).unwrap()
        },
        &KitOptions {
            planted: PlantedOptions {
                min_recovered: 0.75,
                ..opts().planted
            },
            ..opts()
        },
    );
}
