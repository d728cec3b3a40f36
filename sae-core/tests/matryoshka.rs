//! Matryoshka BatchTopK against independent figures: with no inner prefix it is BatchTopK, step
//! for step; with prefixes, its extra loss is each prefix's reconstruction error computed here by
//! hand from the codes; bad widths are named.

use candle_core::Device;
use sae_core::testkit::gaussian_batch;
use sae_core::{
    Batch, BatchTopKSae, BatchTopKTraining, MatryoshkaSae, MatryoshkaTraining, Sae, StepContext,
    TrainableSae,
};

const D_IN: usize = 10;
const D_SAE: usize = 32;
const N: usize = 24;

fn ctx(dead: &[bool]) -> StepContext<'_> {
    StepContext {
        sparsity_scale: 1.0,
        dead,
        device: &Device::Cpu,
    }
}

#[test]
fn without_inner_prefixes_it_is_batchtopk() {
    let x = gaussian_batch(N, D_IN, 1.5, 4);
    let m = MatryoshkaSae::init(D_IN, D_SAE, MatryoshkaTraining::new(4.0, vec![]), 7).unwrap();
    let b = BatchTopKSae::init(D_IN, D_SAE, BatchTopKTraining::new(4.0), 7).unwrap();
    assert_eq!(m.widths(), [D_SAE]);
    let dead = vec![false; D_SAE];
    let (mut gm, mut gb) = (m.params().zeros_like(), b.params().zeros_like());
    let batch = Batch::new(&x, D_IN).unwrap();
    let om = m.forward_backward(&batch, &ctx(&dead), &mut gm).unwrap();
    let ob = b.forward_backward(&batch, &ctx(&dead), &mut gb).unwrap();
    assert_eq!(om.loss, ob.loss);
    for (p, q) in gm.iter().zip(gb.iter()) {
        assert_eq!(p.data, q.data, "gradient of {}", p.name);
    }
}

#[test]
fn inner_losses_are_the_prefix_reconstruction_errors() {
    let x = gaussian_batch(N, D_IN, 1.5, 5);
    let widths = vec![4, 12];
    let m =
        MatryoshkaSae::init(D_IN, D_SAE, MatryoshkaTraining::new(4.0, widths.clone()), 3).unwrap();
    let dead = vec![false; D_SAE];
    let mut g = m.params().zeros_like();
    let out = m
        .forward_backward(&Batch::new(&x, D_IN).unwrap(), &ctx(&dead), &mut g)
        .unwrap();
    let p = m.params();
    let (w_dec, b_dec) = (p.data("W_dec").unwrap(), p.data("b_dec").unwrap());
    // Each prefix decoded by hand from the step's codes.
    let err = |width: usize| -> f64 {
        let mut total = 0.0;
        for t in 0..N {
            let (fs, vs) = out.codes.row(t);
            let mut xhat: Vec<f64> = b_dec.iter().map(|&v| v as f64).collect();
            for (&f, &a) in fs.iter().zip(vs) {
                if (f as usize) < width {
                    for d in 0..D_IN {
                        xhat[d] += a as f64 * w_dec[f as usize * D_IN + d] as f64;
                    }
                }
            }
            total += (0..D_IN)
                .map(|d| (x[t * D_IN + d] as f64 - xhat[d]).powi(2))
                .sum::<f64>();
        }
        total / N as f64
    };
    approx::assert_relative_eq!(out.mse, err(D_SAE), max_relative = 1e-4);
    let inner = err(4) + err(12);
    approx::assert_relative_eq!(out.aux_loss, inner, max_relative = 1e-4);
    approx::assert_relative_eq!(out.loss, err(D_SAE) + inner, max_relative = 1e-4);
    // Three different reconstructions, not one counted three times.
    assert!((err(4) - err(12)).abs() > 1e-3 && (err(12) - err(D_SAE)).abs() > 1e-3);
}

#[test]
fn bad_widths_are_named() {
    for widths in [vec![8, 8], vec![12, 4], vec![0, 4], vec![4, 64]] {
        let err = MatryoshkaSae::init(D_IN, D_SAE, MatryoshkaTraining::new(4.0, widths.clone()), 0)
            .unwrap_err();
        assert!(
            err.to_string().contains("matryoshka_widths"),
            "{widths:?}: {err}"
        );
    }
}

/// Trained through the trainer, saved as SAELens saves it (JumpReLU with the learned threshold),
/// loaded back for inference and for further training with its threshold.
#[test]
fn trains_saves_as_jumprelu_and_comes_back() {
    use sae_core::{ArchitectureConfig, HostBatch, SaeModel, Trainer, TrainerConfig};
    let arch = ArchitectureConfig::Matryoshka(MatryoshkaTraining::new(3.0, vec![8, 16]));
    let mut cfg = TrainerConfig::new(D_IN, D_SAE, arch, 30);
    cfg.lr = 1e-2;
    // Raw activations, so that the trained SAE and the saved one read the same inputs.
    cfg.normalize_activations = sae_core::ActivationNormalization::None;
    let mut t = Trainer::new(cfg.clone()).unwrap();
    for s in 0..30u64 {
        let x = gaussian_batch(64, D_IN, 2.0, 300 + s);
        t.step_host(&HostBatch::from_vec(x, D_IN).unwrap()).unwrap();
    }
    let threshold = t.sae().state_json()["topk_threshold"].as_f64().unwrap();
    assert!(threshold > 0.0);
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path()).unwrap();
    let model = SaeModel::load(dir.path()).unwrap();
    assert_eq!(model.config().architecture(), "jumprelu");
    let x = gaussian_batch(9, D_IN, 2.0, 1);
    let ours = t.sae().encode_host(&x, 9).unwrap();
    let loaded = model.sae().encode_host(&x, 9).unwrap();
    assert_eq!(ours.features, loaded.features);
    for (a, b) in ours.values.iter().zip(&loaded.values) {
        approx::assert_relative_eq!(a, b, max_relative = 1e-5);
    }
    let again = Trainer::from_pretrained(cfg, model).unwrap();
    approx::assert_relative_eq!(
        again.sae().state_json()["topk_threshold"].as_f64().unwrap(),
        threshold,
        max_relative = 1e-6
    );
}
