//! The device path (every architecture) against the host path on `Device::Cpu`: the same
//! start, the same batches, 20 steps, and every step's losses and the final weights within 1e-4
//! relative. The two compute
//! the same step with different kernels (dense tensor products against sparse host loops), so
//! they agree to rounding, not bit for bit.

use candle_core::{Device, Tensor};
use sae_core::testkit::gaussian_batch;
use sae_core::{
    ArchitectureConfig, DecoderNorm, DeviceTrainer, IterSource, Params, Progress, StandardTraining,
    TopKTraining, Trainer, TrainerConfig,
};

const D_IN: usize = 16;
const D_SAE: usize = 64;
const N: usize = 40;
const STEPS: u64 = 20;

fn batch(step: u64) -> Tensor {
    let mut x = gaussian_batch(N, D_IN, 2.0, 900 + step);
    // An offset, so that b_dec's initialisation and the centring matter.
    for (i, v) in x.iter_mut().enumerate() {
        *v += 0.5 * (i % D_IN) as f32;
    }
    Tensor::from_vec(x, (N, D_IN), &Device::Cpu).unwrap()
}

fn close(what: &str, host: f64, device: f64) {
    let tol = 1e-4 * host.abs().max(1e-3);
    assert!(
        (host - device).abs() <= tol,
        "{what}: host {host}, device {device}"
    );
}

fn assert_same_weights(host: &Params, device: &Params) {
    for name in [
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
        "threshold",
        "b_gate",
        "r_mag",
        "b_mag",
    ] {
        let Ok(h) = host.data(name) else {
            assert!(device.data(name).is_err(), "{name} only on the device");
            continue;
        };
        let d = device.data(name).unwrap();
        let scale = h.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = h.iter().zip(d).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "{name}: largest difference {worst} against values up to {scale}"
        );
    }
}

/// Steps both paths through the same batches and compares them.
fn agree(cfg: TrainerConfig) -> (f64, f64, Vec<usize>) {
    agree_on(cfg, &Device::Cpu)
}

/// [`agree`] with the device path on `on` (the host path runs on the CPU).
fn agree_on(cfg: TrainerConfig, on: &Device) -> (f64, f64, Vec<usize>) {
    agree_for(cfg, on, STEPS)
}

/// [`agree_on`] for `steps` steps.
fn agree_for(cfg: TrainerConfig, on: &Device, steps: u64) -> (f64, f64, Vec<usize>) {
    agree_with(cfg, on, steps, |d| d)
}

/// [`agree_for`] with the device trainer set up by `tweak`.
fn agree_with(
    cfg: TrainerConfig,
    on: &Device,
    steps: u64,
    tweak: impl Fn(DeviceTrainer) -> DeviceTrainer,
) -> (f64, f64, Vec<usize>) {
    let host = Trainer::new(cfg.clone()).unwrap();
    let device = tweak(DeviceTrainer::from_trainer(&Trainer::new(cfg).unwrap(), on).unwrap());
    agree_from(host, device, 0..steps)
}

/// Steps `host` and `device` (from the same state) through batches `steps` and compares every
/// step and the final weights. Returns the largest AuxK loss and gradient norm seen, and the
/// dead features after each step.
fn agree_from(
    host: Trainer,
    device: DeviceTrainer,
    steps: std::ops::Range<u64>,
) -> (f64, f64, Vec<usize>) {
    agree_on_batches(host, &mut { device }, steps, batch)
}

/// [`agree_from`] on the batches `batch_of` gives for each step.
fn agree_on_batches(
    mut host: Trainer,
    device: &mut DeviceTrainer,
    steps: std::ops::Range<u64>,
    batch_of: impl Fn(u64) -> Tensor,
) -> (f64, f64, Vec<usize>) {
    let mut aux_seen = (0.0f64, 0.0f64);
    let mut dead_counts = Vec::new();
    for s in steps.clone() {
        let x = batch_of(s);
        let h = host.step(&x).unwrap();
        let d = device.step(&x).unwrap().host().unwrap();
        close(&format!("step {s} loss"), h.loss, d.loss);
        close(&format!("step {s} mse"), h.mse, d.mse);
        close(
            &format!("step {s} sparsity loss"),
            h.sparsity_loss,
            d.sparsity_loss,
        );
        close(&format!("step {s} aux loss"), h.aux_loss, d.aux_loss);
        close(&format!("step {s} fvu"), h.fvu, d.fvu);
        close(&format!("step {s} grad norm"), h.grad_norm, d.grad_norm);
        // Active pairs counted exactly (the device's mean is an f32 sum).
        assert_eq!(
            (h.l0 * N as f64).round(),
            (d.l0 * N as f64).round(),
            "step {s} L0"
        );
        aux_seen.0 += h.aux_loss;
        dead_counts.push((h.dead_fraction * D_SAE as f64).round() as usize);
        aux_seen.1 = aux_seen.1.max(h.grad_norm);
    }
    assert_eq!(device.step_count(), steps.end);
    assert_same_weights(host.sae().params(), &device.params_host().unwrap());
    let theta = host.sae().state_json()["topk_threshold"]
        .as_f64()
        .unwrap_or(0.0);
    close(
        "BatchTopK threshold",
        theta,
        device.topk_threshold().unwrap(),
    );
    eprintln!("dead features after each step: {dead_counts:?}");
    (aux_seen.0, aux_seen.1, dead_counts)
}

/// Every feature dead from the start: AuxK runs at every step with more dead features than
/// `aux_k`; unit-norm decoder, b_dec from the geometric median, inputs normalised.
#[test]
fn every_feature_dead_matches_the_host_path() {
    let mut cfg = TrainerConfig::new(
        D_IN,
        D_SAE,
        ArchitectureConfig::TopK(TopKTraining::new(4)),
        STEPS,
    );
    cfg.lr = 5e-3;
    cfg.lr_warm_up_steps = 3;
    cfg.lr_decay_steps = 5;
    cfg.dead_window_tokens = 0;
    cfg.seed = 11;
    let (aux, _, _) = agree(cfg);
    assert!(aux > 0.0, "AuxK never ran");
}

/// Features die after two batches without firing, so the dead set changes from step to step
/// and is smaller than `aux_k` (the masked part of the ranking); gradients clipped at most
/// steps; a free decoder norm; no b_dec subtracted before encoding.
#[test]
fn a_changing_dead_set_and_clipping_match_the_host_path() {
    let (aux, max_grad_norm, dead) = agree(changing_dead_set_config());
    assert!(aux > 0.0, "AuxK never ran");
    assert!(
        dead.iter().any(|&d| d > 0 && d < 60) && dead.windows(2).any(|w| w[0] != w[1]),
        "the dead set should change and stay under aux_k: {dead:?}"
    );
    assert!(max_grad_norm > 0.05, "clipping never applied");
}

fn changing_dead_set_config() -> TrainerConfig {
    let mut topk = TopKTraining::new(3);
    topk.aux_k = Some(60);
    topk.decoder_norm = DecoderNorm::Free;
    topk.apply_b_dec_to_input = false;
    let mut cfg = TrainerConfig::new(D_IN, D_SAE, ArchitectureConfig::TopK(topk), STEPS);
    cfg.lr = 1e-2;
    cfg.dead_window_tokens = 2 * N as u64;
    cfg.grad_clip_norm = Some(0.05);
    cfg.seed = 5;
    cfg
}

/// AuxK three ways: skipped while no feature is dead, on the dead features' own columns and
/// rows (forced with a limit of every feature), and over every feature with the live ones
/// masked (a limit of none); TopK's main pairs two ways: their rows scattered, and scattered
/// code matrices through dense products (CUDA's default); BatchTopK's and Matryoshka's codes
/// dense, and as pairs (their threshold candidates) both of those ways. Each takes the host path's steps,
/// in one pass and in token chunks with small row blocks (the dead features' own gradients add
/// up across chunks and go back block by block), and so do two replicas, each on half the batch.
#[test]
fn every_way_of_taking_auxk_and_the_pairs_matches_the_host_path() {
    for cfg in [
        changing_dead_set_config(),
        resident_config(),
        batchtopk_config(),
        matryoshka_config(),
    ] {
        let topk = matches!(cfg.sae, ArchitectureConfig::TopK(_));
        // (BatchTopK's pairs limit, dense pair gradients)
        let pairs = if topk {
            vec![(0, false), (0, true)]
        } else {
            vec![(0, false), (D_SAE, false), (D_SAE, true)]
        };
        for limit in [0, D_SAE] {
            for &(pairs_limit, dense) in &pairs {
                // With the dead features on their own rows, their gradients go back through our
                // row adds, or through candle's gathers.
                let owns = if limit == D_SAE {
                    vec![true, false]
                } else {
                    vec![true]
                };
                for (chunk, own) in [None, Some(7)]
                    .into_iter()
                    .flat_map(|c| owns.iter().map(move |&o| (c, o)))
                {
                    let way = |d: DeviceTrainer| {
                        let d = d
                            .with_compact_aux_limit(limit)
                            .with_batch_pairs_limit(pairs_limit)
                            .with_dense_pairs(dense)
                            .with_own_kernels(own);
                        match chunk {
                            // Row blocks of 3 features too: most hold no dead feature.
                            Some(rows) => d
                                .with_token_chunk(rows)
                                .unwrap()
                                .with_update_block(3 * D_IN),
                            None => d,
                        }
                    };
                    eprintln!(
                        "{:?}: limit {limit}, pairs {pairs_limit}, dense {dense}, chunk {chunk:?}, own {own}",
                        cfg.sae
                    );
                    let (aux, _, dead) = agree_with(cfg.clone(), &Device::Cpu, STEPS, way);
                    assert!(aux > 0.0, "AuxK never ran");
                    // Step 0 has none dead; the others some.
                    assert!(dead.iter().any(|&c| c > 0), "{dead:?}");
                }
                replicas_agree_with(cfg.clone(), |d| {
                    d.with_compact_aux_limit(limit)
                        .with_batch_pairs_limit(pairs_limit)
                        .with_dense_pairs(dense)
                });
            }
        }
    }
}

/// k close to d_sae: many of the k selected pre-activations are negative, and after the ReLU
/// they are not codes (no decode, no gradient, not counted in L0).
#[test]
fn selected_features_below_zero_are_not_codes() {
    let mut cfg = TrainerConfig::new(
        D_IN,
        D_SAE,
        ArchitectureConfig::TopK(TopKTraining::new(48)),
        STEPS,
    );
    cfg.lr = 5e-3;
    cfg.seed = 2;
    let mut host = Trainer::new(cfg.clone()).unwrap();
    let first = host.step(&batch(0)).unwrap();
    assert!(
        first.l0 < 48.0,
        "L0 {}: no selected pre-activation was negative",
        first.l0
    );
    agree(cfg);
}

/// The standard ReLU-L1 SAE: a fresh SAE fires on about half its features, the L1 coefficient
/// warms up over the first 8 steps (each step's warm-up factor must reach the penalty), unit-norm
/// decoder, b_dec subtracted, b_dec from the geometric median, inputs normalised.
#[test]
fn standard_relu_l1_matches_the_host_path() {
    let cfg = standard_l1_config();
    let mut host = Trainer::new(cfg.clone()).unwrap();
    let first = host.step(&batch(0)).unwrap();
    assert!(
        first.l0 > 10.0,
        "L0 {}: the codes should be dense",
        first.l0
    );
    assert_eq!(first.sparsity_loss, 0.0, "warm-up starts at zero");
    agree(cfg);
}

fn standard_l1_config() -> TrainerConfig {
    let mut cfg = TrainerConfig::new(
        D_IN,
        D_SAE,
        ArchitectureConfig::Standard(StandardTraining {
            l1_coefficient: 2.0,
            ..StandardTraining::default()
        }),
        STEPS,
    );
    cfg.lr = 5e-3;
    cfg.sparsity_warm_up_steps = 8;
    cfg.seed = 4;
    cfg
}

/// Standard with a free decoder norm (the penalty's decoder-norm gradient matters), no b_dec
/// subtracted, clipping at most steps, and an L1 strong enough that features die.
#[test]
fn standard_with_a_free_decoder_and_clipping_matches_the_host_path() {
    let mut cfg = TrainerConfig::new(
        D_IN,
        D_SAE,
        ArchitectureConfig::Standard(StandardTraining {
            l1_coefficient: 5.0,
            decoder_norm: DecoderNorm::Free,
            apply_b_dec_to_input: false,
            ..StandardTraining::default()
        }),
        STEPS,
    );
    cfg.lr = 5e-3;
    cfg.grad_clip_norm = Some(0.5);
    cfg.dead_window_tokens = 2 * N as u64;
    cfg.seed = 9;
    let (_, max_grad_norm, dead) = agree(cfg);
    assert!(max_grad_norm > 0.5, "clipping never applied");
    assert!(dead.iter().any(|&d| d > 0), "no feature died: {dead:?}");
}

fn batchtopk_config() -> TrainerConfig {
    let mut cfg = TrainerConfig::new(
        D_IN,
        D_SAE,
        ArchitectureConfig::BatchTopK(sae_core::BatchTopKTraining::new(4.0)),
        STEPS,
    );
    cfg.lr = 5e-3;
    cfg.dead_window_tokens = 2 * N as u64;
    cfg.log_every = 3;
    cfg.seed = 13;
    // Centred inputs make some features' encoder gradients sums that cancel to rounding noise,
    // which Adam's first steps blow up to a sizeable fraction of the learning rate: b_dec starts
    // at zero here, so that the comparison measures the step, not the noise (the TopK tests
    // cover the b_dec inits, which the architectures share).
    cfg.b_dec_init = sae_core::BDecInit::Zeros;
    cfg
}

fn matryoshka_config() -> TrainerConfig {
    let mut cfg = batchtopk_config();
    cfg.sae = ArchitectureConfig::Matryoshka(sae_core::MatryoshkaTraining::new(4.0, vec![8, 24]));
    cfg.seed = 14;
    cfg
}

/// BatchTopK: the batch's k·n largest codes (tokens get different numbers), AuxK on a dead set
/// that changes, and the threshold's moving average.
#[test]
fn batchtopk_matches_the_host_path() {
    let mut host = Trainer::new(batchtopk_config()).unwrap();
    let first = host.step(&batch(0)).unwrap();
    assert_eq!((first.l0 * N as f64).round(), 4.0 * N as f64);
    let (aux, _, dead) = agree(batchtopk_config());
    assert!(aux > 0.0, "AuxK never ran");
    assert!(dead.windows(2).any(|w| w[0] != w[1]), "{dead:?}");
}

/// Matryoshka BatchTopK: the prefixes' reconstructions of 8 and 24 of 64 features join the loss.
#[test]
fn matryoshka_matches_the_host_path() {
    agree(matryoshka_config());
}

/// Through the trainer, with a checkpoint: the threshold reaches the host trainer's SAE.
#[test]
fn matryoshka_through_the_trainer_logs_what_the_host_path_logs() {
    logs_match(matryoshka_config());
}

fn gated_config() -> TrainerConfig {
    let mut cfg = config_for(ArchitectureConfig::Gated(sae_core::GatedTraining {
        l1_coefficient: 2.0,
        ..sae_core::GatedTraining::default()
    }));
    cfg.lr = 5e-3;
    cfg.sparsity_warm_up_steps = 5;
    cfg.b_dec_init = sae_core::BDecInit::Zeros;
    cfg.seed = 19;
    cfg
}

/// Gated: the gate decides, the magnitude path (r_mag, b_mag) scales, the gate path's own
/// reconstruction and L1 join the loss, b_dec's gradient reaches the encoder through the
/// centring by the gate and magnitude paths together.
#[test]
fn gated_matches_the_host_path() {
    let mut host = Trainer::new(gated_config()).unwrap();
    let first = host.step(&batch(0)).unwrap();
    assert!(first.aux_loss > 0.0 && first.l0 > 1.0, "{first:?}");
    agree(gated_config());
    logs_match(gated_config());
    replicas_agree(gated_config());
    // The magnitude path's own parameters moved.
    let mut dev =
        DeviceTrainer::from_trainer(&Trainer::new(gated_config()).unwrap(), &Device::Cpu).unwrap();
    for s in 0..3 {
        dev.step(&batch(s)).unwrap();
    }
    let p = dev.params_host().unwrap();
    for name in ["r_mag", "b_mag", "b_gate"] {
        assert!(
            p.data(name).unwrap().iter().any(|&v| v != 0.0),
            "{name} never moved"
        );
    }
}

/// Replicas agree on one batch threshold (counts summed, the largest value and the smallest
/// kept shared), so two halves take the whole batch's BatchTopK step.
#[test]
fn two_batchtopk_replicas_take_the_whole_batch_step() {
    replicas_agree(batchtopk_config());
}

fn jumprelu_config() -> TrainerConfig {
    let mut cfg = config_for(ArchitectureConfig::JumpRelu(sae_core::JumpReluTraining {
        l0_coefficient: 0.5,
        bandwidth: 0.5,
        init_threshold: 0.3,
        ..sae_core::JumpReluTraining::default()
    }));
    cfg.lr = 5e-3;
    cfg.sparsity_warm_up_steps = 5;
    cfg.b_dec_init = sae_core::BDecInit::Zeros;
    cfg.seed = 17;
    cfg
}

/// JumpReLU: a wide estimator window, so that many pairs move the thresholds every step, the
/// L0 penalty warming up, thresholds clamped at zero.
#[test]
fn jumprelu_matches_the_host_path() {
    let mut host = Trainer::new(jumprelu_config()).unwrap();
    host.step(&batch(0)).unwrap();
    let theta = host.sae().params().data("threshold").unwrap();
    assert!(
        theta.iter().filter(|&&t| (t - 0.3).abs() > 1e-4).count() > D_SAE / 2,
        "the thresholds should move in the first step"
    );
    agree(jumprelu_config());
    logs_match(jumprelu_config());

    // No L0 penalty and a large step: the reconstruction pulls thresholds below zero, where the
    // clamp holds them.
    let mut cfg = jumprelu_config();
    cfg.sae = ArchitectureConfig::JumpRelu(sae_core::JumpReluTraining {
        l0_coefficient: 0.0,
        bandwidth: 0.5,
        init_threshold: 0.01,
        ..sae_core::JumpReluTraining::default()
    });
    cfg.lr = 0.05;
    let mut host = Trainer::new(cfg.clone()).unwrap();
    for s in 0..3 {
        host.step(&batch(s)).unwrap();
    }
    let theta = host.sae().params().data("threshold").unwrap();
    assert!(theta.contains(&0.0), "no threshold reached the clamp");
    // θ's gradient is proportional to θ, so near zero Adam's normalisation turns rounding into
    // visible differences: the losses agree as everywhere, the clamped set exactly, θ to 1e-3.
    let mut host = Trainer::new(cfg.clone()).unwrap();
    let mut dev = DeviceTrainer::from_trainer(&Trainer::new(cfg).unwrap(), &Device::Cpu).unwrap();
    for s in 0..6 {
        let h = host.step(&batch(s)).unwrap();
        let d = dev.step(&batch(s)).unwrap().host().unwrap();
        close(&format!("step {s} loss"), h.loss, d.loss);
    }
    let h = host.sae().params().data("threshold").unwrap().to_vec();
    let d = dev
        .params_host()
        .unwrap()
        .data("threshold")
        .unwrap()
        .to_vec();
    let zeros = |t: &[f32]| t.iter().map(|&v| v == 0.0).collect::<Vec<_>>();
    assert!(zeros(&h).iter().any(|&z| z));
    assert_eq!(zeros(&h), zeros(&d), "the clamped thresholds differ");
    for (a, b) in h.iter().zip(&d) {
        assert!((a - b).abs() < 1e-3, "threshold {a} against {b}");
    }
}

/// JumpReLU replicas: the threshold gradient and the L0 penalty sum over the group.
#[test]
fn two_jumprelu_replicas_take_the_whole_batch_step() {
    replicas_agree(jumprelu_config());
}

#[test]
fn batches_of_another_width_are_refused() {
    let cfg = TrainerConfig::new(
        D_IN,
        D_SAE,
        ArchitectureConfig::TopK(TopKTraining::new(4)),
        1,
    );
    let mut d = DeviceTrainer::from_trainer(&Trainer::new(cfg).unwrap(), &Device::Cpu).unwrap();
    let wrong = Tensor::zeros((4, D_IN + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = d.step(&wrong).unwrap_err();
    assert!(e.to_string().contains(&format!("{}", D_IN + 1)), "{e}");
}

/// Runs `each(rank, replica)` for the members of a group of `size` started from `start` (each
/// replica set up by `tweak`), one thread a replica, and returns the results in rank order.
fn on_replicas<T: Send>(
    start: &Trainer,
    size: usize,
    tweak: impl Fn(DeviceTrainer) -> DeviceTrainer,
    each: impl Fn(usize, DeviceTrainer) -> T + Sync,
) -> Vec<T> {
    let replicas: Vec<DeviceTrainer> = sae_core::InProcess::group(size)
        .into_iter()
        .map(|member| {
            tweak(
                DeviceTrainer::from_trainer(start, &Device::Cpu)
                    .unwrap()
                    .with_collective(member),
            )
        })
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = replicas
            .into_iter()
            .enumerate()
            .map(|(rank, d)| {
                let each = &each;
                scope.spawn(move || each(rank, d))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn bits(p: &Params) -> Vec<u32> {
    p.iter()
        .flat_map(|q| q.data.iter().map(|v| v.to_bits()))
        .collect()
}

/// A device run handed to its host trainer, checkpointed, resumed from the checkpoint and put
/// back on the device ends bit for bit where an uninterrupted device run ends; the saved SAE
/// loads and encodes.
#[test]
fn resume_through_a_checkpoint_is_bit_identical() {
    let mut cfg = TrainerConfig::new(
        D_IN,
        D_SAE,
        ArchitectureConfig::TopK(TopKTraining::new(3)),
        STEPS,
    );
    // Most features go dead and some come back, so the counters a resume carries matter.
    cfg.dead_window_tokens = 2 * N as u64;
    cfg.seed = 8;
    let mut whole =
        DeviceTrainer::from_trainer(&Trainer::new(cfg.clone()).unwrap(), &Device::Cpu).unwrap();
    for s in 0..STEPS {
        whole.step(&batch(s)).unwrap();
    }

    let mut host = Trainer::new(cfg).unwrap();
    let mut first = DeviceTrainer::from_trainer(&host, &Device::Cpu).unwrap();
    for s in 0..7 {
        first.step(&batch(s)).unwrap();
    }
    first.write_to(&mut host).unwrap();
    assert_eq!(host.step_count(), 7);
    assert_eq!(host.batches_consumed(), 7);
    let dir = tempfile::tempdir().unwrap();
    let ck = host.checkpoint(dir.path()).unwrap();
    drop((first, host));
    let resumed = Trainer::resume(&ck).unwrap();
    let mut second = DeviceTrainer::from_trainer(&resumed, &Device::Cpu).unwrap();
    for s in resumed.batches_consumed()..STEPS {
        second.step(&batch(s)).unwrap();
    }
    let (a, b) = (whole.params_host().unwrap(), second.params_host().unwrap());
    assert!(bits(&a) == bits(&b), "the resumed device run differs");

    let mut done = resumed;
    second.write_to(&mut done).unwrap();
    let out = dir.path().join("sae");
    done.save(&out).unwrap();
    let model = sae_core::SaeModel::load(&out).unwrap();
    let codes = model.encode_sparse(&batch(0)).unwrap();
    assert!(codes.l0() > 0.0 && codes.l0() <= 3.0, "L0 {}", codes.l0());
}

fn resident_config() -> TrainerConfig {
    config_for(ArchitectureConfig::TopK(TopKTraining::new(3)))
}

fn standard_config() -> TrainerConfig {
    let mut cfg = config_for(ArchitectureConfig::Standard(StandardTraining {
        l1_coefficient: 10.0,
        ..StandardTraining::default()
    }));
    cfg.sparsity_warm_up_steps = 6;
    cfg
}

/// One configuration of each architecture (TopK, standard, gated, JumpReLU, BatchTopK,
/// Matryoshka).
fn every_architecture() -> [TrainerConfig; 6] {
    [
        resident_config(),
        standard_config(),
        gated_config(),
        jumprelu_config(),
        batchtopk_config(),
        matryoshka_config(),
    ]
}

fn config_for(sae: ArchitectureConfig) -> TrainerConfig {
    let mut cfg = TrainerConfig::new(D_IN, D_SAE, sae, STEPS);
    cfg.dead_window_tokens = 2 * N as u64;
    cfg.log_every = 3;
    cfg.seed = 21;
    cfg
}

fn source(
    range: std::ops::Range<u64>,
) -> IterSource<impl Iterator<Item = sae_core::Result<Tensor>>> {
    IterSource(range.map(|s| Ok(batch(s))))
}

/// `Trainer::train` with the device path chosen logs what the host path logs (the firing
/// statistics exactly, the losses to rounding) and leaves the trained weights in the trainer.
#[test]
fn training_through_the_trainer_logs_what_the_host_path_logs() {
    logs_match(resident_config());
}

fn resampling_config() -> TrainerConfig {
    let mut cfg = standard_config();
    cfg.encoder_bias_init_l0 = Some(8);
    cfg.resample_at_steps = vec![7, 14];
    cfg.dead_window_tokens = N as u64;
    cfg
}

/// A host trainer after its first step (which sets the encoder bias for a target L0, so that
/// features die), for the device path to continue from.
fn after_first_host_step(cfg: TrainerConfig) -> Trainer {
    let mut t = Trainer::new(cfg).unwrap();
    t.step(&batch(0)).unwrap();
    t
}

/// Dead features resampled on the device (twice, after steps 7 and 14: the same tokens drawn
/// from the same stream, rows written in place, their Adam moments zeroed), against the host
/// path, in one pass and in token chunks of 9; features are dead before each resampling.
#[test]
fn resampling_on_the_device_matches_the_host_path() {
    resampling_matches_on(&Device::Cpu);
}

/// The encoder bias set for a target L0 at the first step on the device (standard: `b_enc`;
/// gated: `b_gate`; targets of 8 and 40 of 64 features), then 19 steps (with two resamplings
/// for the first), against the host path: every step and the final weights agree. Two replicas, each on
/// half the batch, gather the whole batch for the data inits (the geometric median of `b_dec`
/// too) and for the resampling draw, and take one device's steps.
#[test]
fn the_bias_init_on_the_device_matches_the_host_path() {
    let mut gated = gated_config();
    gated.encoder_bias_init_l0 = Some(8);
    // A target past half the features: the rank is found from the smallest end.
    let mut dense = standard_config();
    dense.encoder_bias_init_l0 = Some(40);
    for cfg in [resampling_config(), gated, dense] {
        let target = cfg.encoder_bias_init_l0.unwrap() as f64;
        let mut host = Trainer::new(cfg.clone()).unwrap();
        let first = host.step(&batch(0)).unwrap();
        eprintln!("L0 {} at the first step for a target of {target}", first.l0);
        // From the fresh initialisation about half the 64 features fire on every token.
        assert!(first.l0 < 1.5 * target, "L0 {} at the first step", first.l0);
        agree(cfg.clone());
        replicas_agree(cfg.clone());
        // The replicas' b_dec is the whole batch's geometric median, not a blend of their
        // halves' (one step of Adam moves it by at most about lr).
        let start = Trainer::new(cfg).unwrap();
        let mut whole = DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap();
        whole.step(&batch(0)).unwrap();
        let b_dec = |d: &DeviceTrainer| d.params_host().unwrap().data("b_dec").unwrap().to_vec();
        let want = b_dec(&whole);
        let halves = on_replicas(
            &start,
            2,
            |d| d,
            |rank, mut d| {
                d.step(&batch(0).narrow(0, rank * N / 2, N / 2).unwrap())
                    .unwrap();
                b_dec(&d)
            },
        );
        for got in halves {
            for (a, b) in want.iter().zip(&got) {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "b_dec {a} against {b}"
                );
            }
        }
    }
}

/// [`resampling_on_the_device_matches_the_host_path`]'s comparison, with the device path on `dev`.
fn resampling_matches_on(dev: &Device) {
    for chunk in [None, Some(9)] {
        let host = after_first_host_step(resampling_config());
        let mut device =
            DeviceTrainer::from_trainer(&after_first_host_step(resampling_config()), dev).unwrap();
        if let Some(rows) = chunk {
            device = device.with_token_chunk(rows).unwrap();
        }
        let (_, _, dead) = agree_from(host, device, 1..STEPS);
        // Dead features before each resampling (after steps 6 and 13), fewer right after it
        // (`dead[i]` follows step i + 2).
        for at in [7, 14] {
            let (before, after) = (dead[at - 3], dead[at - 2]);
            assert!(before > 0 && after < before, "{dead:?}");
        }
    }
}

/// The main job's standard SAE: the encoder bias set for a target L0 on the first batch and dead
/// features resampled twice, every step on the device path inside `Trainer::train`; the run
/// ends where the host path ends.
#[test]
fn the_bias_init_and_resampling_through_the_trainer_match_the_host_path() {
    let mut cfg = standard_config();
    cfg.encoder_bias_init_l0 = Some(8);
    cfg.resample_at_steps = vec![7, 14];
    cfg.dead_window_tokens = N as u64;
    let mut host = Trainer::new(cfg.clone()).unwrap();
    let log = host.train(&mut source(0..6), Progress::Hidden).unwrap();
    let dead = log.last().unwrap().dead_fraction;
    assert!(dead > 0.0, "no feature is dead before the first resampling");
    logs_match(cfg);
}

/// The same for the standard SAE, with the L1 warm-up logged.
#[test]
fn standard_training_through_the_trainer_logs_what_the_host_path_logs() {
    logs_match(standard_config());
}

fn logs_match(cfg: TrainerConfig) {
    let mut host = Trainer::new(cfg.clone()).unwrap();
    let host_log = host.train(&mut source(0..STEPS), Progress::Hidden).unwrap();
    let mut dev = Trainer::new(cfg)
        .unwrap()
        .with_device_resident(true)
        .unwrap();
    let dev_log = dev.train(&mut source(0..STEPS), Progress::Hidden).unwrap();
    assert_eq!(host_log.len(), dev_log.len());
    assert!(host_log.len() >= 6, "{} logged steps", host_log.len());
    for (h, d) in host_log.iter().zip(&dev_log) {
        assert_eq!(
            (h.step, h.tokens_seen, h.density_window_tokens),
            (d.step, d.tokens_seen, d.density_window_tokens)
        );
        assert_eq!(h.dead_fraction, d.dead_fraction, "step {}", h.step);
        assert_eq!(h.dense_fraction, d.dense_fraction, "step {}", h.step);
        assert_eq!(
            h.log10_density_histogram, d.log10_density_histogram,
            "step {}",
            h.step
        );
        assert_eq!(h.sparsity_scale, d.sparsity_scale, "step {}", h.step);
        close(&format!("step {} loss", h.step), h.loss, d.loss);
        close(
            &format!("step {} sparsity loss", h.step),
            h.sparsity_loss,
            d.sparsity_loss,
        );
        close(&format!("step {} fvu", h.step), h.fvu, d.fvu);
    }
    assert_eq!(dev.step_count(), STEPS);
    assert_eq!(dev.batches_consumed(), STEPS);
    assert_same_weights(host.sae().params(), dev.sae().params());
    assert_eq!(
        host.sae().state_json()["topk_threshold"].as_f64().is_some(),
        dev.sae().state_json()["topk_threshold"].as_f64().is_some()
    );
    if let Some(h) = host.sae().state_json()["topk_threshold"].as_f64() {
        let d = dev.sae().state_json()["topk_threshold"].as_f64().unwrap();
        close("threshold after training", h, d);
        assert!(h > 0.0);
    }
    assert_eq!(host.log10_feature_density(), dev.log10_feature_density());
}

/// A device-path run whose stream stops early (a killed job), resumed from its last checkpoint
/// with the device path chosen again, ends bit for bit where an uninterrupted run ends.
#[test]
fn a_device_run_resumed_from_its_checkpoint_is_bit_identical() {
    let resident = |cfg: TrainerConfig| {
        Trainer::new(cfg)
            .unwrap()
            .with_device_resident(true)
            .unwrap()
    };
    let mut whole = resident(resident_config());
    whole
        .train(&mut source(0..STEPS), Progress::Hidden)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = resident_config();
    cfg.checkpoint_dir = Some(dir.path().to_path_buf());
    cfg.checkpoint_every = Some(4);
    let mut cut = resident(cfg);
    cut.train(&mut source(0..10), Progress::Hidden).unwrap();
    drop(cut);
    let latest = Trainer::latest_checkpoint(dir.path()).unwrap();
    let resumed = Trainer::resume(&latest).unwrap();
    assert_eq!(resumed.step_count(), 8);
    let mut resumed = resumed.with_device_resident(true).unwrap();
    let from = resumed.batches_consumed();
    resumed
        .train(&mut source(from..STEPS), Progress::Hidden)
        .unwrap();
    assert_eq!(resumed.step_count(), STEPS);
    assert!(
        bits(whole.sae().params()) == bits(resumed.sae().params()),
        "the resumed run differs"
    );
}

/// Data parallel on the CPU: two replicas (threads joined by `InProcess`), each stepping on half
/// of every batch, end where one device ends on the whole batches (to rounding: sums are taken
/// in another order), with the same losses, and bit-identical to each other. A group of one is
/// the plain step, bit for bit.
#[test]
fn two_replicas_on_half_batches_take_the_whole_batch_step() {
    let aux = replicas_agree(resident_config());
    assert!(aux.iter().any(|&l| l > 0.0), "AuxK never ran");
}

/// The same for the standard SAE, whose penalty sums over the group's tokens.
#[test]
fn two_standard_replicas_take_the_whole_batch_step() {
    replicas_agree(standard_config());
}

/// Runs one device and two replicas from the same start; returns the AuxK losses.
fn replicas_agree(cfg: TrainerConfig) -> Vec<f64> {
    replicas_agree_with(cfg, |d| d)
}

/// [`replicas_agree`] with every trainer set up by `tweak`.
fn replicas_agree_with(
    mut cfg: TrainerConfig,
    tweak: impl Fn(DeviceTrainer) -> DeviceTrainer + Copy,
) -> Vec<f64> {
    if cfg.b_dec_init != sae_core::BDecInit::Zeros {
        // The mean centres the inputs so that no encoder-gradient sum cancels to rounding noise,
        // which Adam's first steps would blow up differently for two halves' sums and one
        // whole's (`batchtopk_config` has the story); the replicas' geometric median, the whole
        // batch's, is checked by `the_bias_init_on_the_device_matches_the_host_path`.
        cfg.b_dec_init = sae_core::BDecInit::Mean;
    }
    cfg.lr = 5e-3;
    let start = Trainer::new(cfg.clone()).unwrap();
    let mut whole = tweak(DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap());
    let whole_losses: Vec<(f64, f64, f64)> = (0..STEPS)
        .map(|s| {
            let h = whole.step(&batch(s)).unwrap().host().unwrap();
            (h.loss, h.aux_loss, h.sparsity_loss)
        })
        .collect();

    let done = on_replicas(&start, 2, tweak, |rank, mut d| {
        let losses: Vec<(f64, f64, f64)> = (0..STEPS)
            .map(|s| {
                let half = batch(s).narrow(0, rank * N / 2, N / 2).unwrap();
                let h = d.step(&half).unwrap().host().unwrap();
                (h.loss, h.aux_loss, h.sparsity_loss)
            })
            .collect();
        let theta = d.topk_threshold().unwrap();
        (d.params_host().unwrap(), d.tokens_seen(), losses, theta)
    });
    assert_eq!(
        done[0].1,
        STEPS * N as u64,
        "tokens seen count the whole batches"
    );
    assert!(
        bits(&done[0].0) == bits(&done[1].0),
        "the replicas drifted apart"
    );
    assert_eq!(done[0].2, done[1].2);
    for (s, (w, r)) in whole_losses.iter().zip(&done[0].2).enumerate() {
        close(&format!("step {s} loss"), w.0, r.0);
        close(&format!("step {s} aux loss"), w.1, r.1);
        close(&format!("step {s} sparsity loss"), w.2, r.2);
    }
    assert_same_weights(&whole.params_host().unwrap(), &done[0].0);
    close(
        "BatchTopK threshold",
        whole.topk_threshold().unwrap(),
        done[0].3,
    );
    assert_eq!(done[0].3, done[1].3);

    let mut alone = tweak(
        DeviceTrainer::from_trainer(&start, &Device::Cpu)
            .unwrap()
            .with_collective(sae_core::InProcess::group(1).remove(0)),
    );
    for s in 0..STEPS {
        alone.step(&batch(s)).unwrap();
    }
    let mut plain = tweak(DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap());
    for s in 0..STEPS {
        plain.step(&batch(s)).unwrap();
    }
    assert!(bits(&alone.params_host().unwrap()) == bits(&plain.params_host().unwrap()));
    whole_losses.iter().map(|l| l.1).collect()
}

/// The checks [`on_the_gpu_the_device_path_matches_the_host_path`] runs on CUDA, here on the CPU,
/// so that the sequence itself is known to pass.
#[test]
fn the_gpu_checks_pass_on_the_cpu() {
    device_path_matches_on(&Device::Cpu);
}

/// On a GPU (a build with `--features cuda`, run by `scripts/gpu_check.sh` on the GPU machine):
/// every architecture, the device path on CUDA against the host path on the CPU.
#[cfg(feature = "cuda")]
#[test]
fn on_the_gpu_the_device_path_matches_the_host_path() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    // Our kernels compiled (NVRTC) and loaded, so that what follows runs them, not the fallback.
    let d = DeviceTrainer::from_trainer(&Trainer::new(resident_config()).unwrap(), &gpu).unwrap();
    assert!(
        d.own_kernels(),
        "NVRTC could not compile our kernels (see the warning above)"
    );
    device_path_matches_on(&gpu);
}

fn device_path_matches_on(dev: &Device) {
    let mut topk = TrainerConfig::new(
        D_IN,
        D_SAE,
        ArchitectureConfig::TopK(TopKTraining::new(4)),
        STEPS,
    );
    topk.lr = 5e-3;
    topk.dead_window_tokens = 0;
    topk.seed = 11;
    let (aux, _, _) = agree_on(topk, dev);
    assert!(aux > 0.0, "AuxK never ran");
    // The changing dead set: AuxK skipped, on the dead rows alone and over every feature;
    // TopK's pairs scattered row by row (the CPU's default) and through code matrices (CUDA's).
    for limit in [0, D_SAE] {
        for dense in [false, true] {
            agree_with(changing_dead_set_config(), dev, STEPS, |d| {
                d.with_compact_aux_limit(limit).with_dense_pairs(dense)
            });
        }
    }
    agree_on(standard_l1_config(), dev);
    resampling_matches_on(dev);
    for cfg in [
        batchtopk_config(),
        matryoshka_config(),
        jumprelu_config(),
        gated_config(),
    ] {
        agree_on(cfg, dev);
    }
    // BatchTopK's and Matryoshka's codes as pairs (dense here at 64 features), their weight
    // gradients both ways.
    for cfg in [batchtopk_config(), matryoshka_config()] {
        for dense in [false, true] {
            agree_with(cfg.clone(), dev, STEPS, |d| {
                d.with_batch_pairs_limit(D_SAE).with_dense_pairs(dense)
            });
        }
    }
    // Through the trainer, batches coming from the host.
    let mut host = Trainer::new(resident_config()).unwrap();
    host.train(&mut source(0..STEPS), Progress::Hidden).unwrap();
    let mut on_dev = Trainer::new(resident_config())
        .unwrap()
        .with_device(dev.clone())
        .with_device_resident(true)
        .unwrap();
    on_dev
        .train(&mut source(0..STEPS), Progress::Hidden)
        .unwrap();
    assert_same_weights(host.sae().params(), on_dev.sae().params());
}

/// On a GPU with NCCL (a build with `--features nccl`, run by `scripts/gpu_check.sh`): a group
/// of one joined through NCCL takes the plain step bit for bit, and its all-reduce returns its
/// input.
#[cfg(feature = "nccl")]
#[test]
fn an_nccl_group_of_one_is_the_plain_step() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let dir = tempfile::tempdir().unwrap();
    let member = sae_core::Nccl::join(
        &gpu,
        0,
        1,
        &dir.path().join("nccl_id"),
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let t = Tensor::new(&[1.5f32, -2.0, 3.25], &gpu).unwrap();
    let sum = sae_core::Collective::all_reduce_sum(&member, &t).unwrap();
    assert_eq!(sum.to_vec1::<f32>().unwrap(), vec![1.5, -2.0, 3.25]);
    let counts = Tensor::new(&[7f64, 0.0, 1e12], &gpu).unwrap();
    let sum = sae_core::Collective::all_reduce_sum(&member, &counts).unwrap();
    assert_eq!(sum.to_vec1::<f64>().unwrap(), vec![7.0, 0.0, 1e12]);
    let start = Trainer::new(resident_config()).unwrap();
    let mut alone = DeviceTrainer::from_trainer(&start, &gpu)
        .unwrap()
        .with_collective(std::sync::Arc::new(member));
    let mut plain = DeviceTrainer::from_trainer(&start, &gpu).unwrap();
    for s in 0..STEPS {
        alone.step(&batch(s)).unwrap();
        plain.step(&batch(s)).unwrap();
    }
    assert!(bits(&alone.params_host().unwrap()) == bits(&plain.params_host().unwrap()));
}

/// NaN or infinity in a batch is reported as broken input, not as a diverged loss: when the step
/// is read back, at the trainer's next logged step, and before a device run is handed over.
#[test]
fn non_finite_batches_are_reported_as_broken_input() {
    let mut d =
        DeviceTrainer::from_trainer(&Trainer::new(resident_config()).unwrap(), &Device::Cpu)
            .unwrap();
    d.step(&batch(0)).unwrap().host().unwrap();
    let mut x: Vec<f32> = batch(1).flatten_all().unwrap().to_vec1().unwrap();
    x[5] = f32::INFINITY;
    x[17] = f32::NAN;
    let broken = Tensor::from_vec(x, (N, D_IN), &Device::Cpu).unwrap();
    let e = d.step(&broken).unwrap().host().unwrap_err();
    assert!(
        matches!(e, sae_core::SaeError::NonFiniteBatches { count: 2, .. }),
        "{e}"
    );
    // Later steps still say so, and nothing is handed to the host trainer.
    let later = d.step(&batch(2)).unwrap().host().unwrap_err();
    assert!(
        matches!(later, sae_core::SaeError::NonFiniteBatches { .. }),
        "{later}"
    );
    let mut host = Trainer::new(resident_config()).unwrap();
    assert!(d.write_to(&mut host).is_err());
    assert_eq!(host.step_count(), 0);

    // Through the trainer: batch 4 is broken, step 4 is not logged (every 3rd is), step 6 is.
    let mut t = Trainer::new(resident_config())
        .unwrap()
        .with_device_resident(true)
        .unwrap();
    let mut src = IterSource((0..STEPS).map(|s| -> sae_core::Result<Tensor> {
        let mut x: Vec<f32> = batch(s).flatten_all().unwrap().to_vec1().unwrap();
        if s == 4 {
            x[0] = f32::NAN;
        }
        Ok(Tensor::from_vec(x, (N, D_IN), &Device::Cpu).unwrap())
    }));
    let e = t.train(&mut src, Progress::Hidden).unwrap_err();
    assert!(e.to_string().contains("NaN or infinite"), "{e}");
    assert!(t.step_count() <= 6, "stopped at step {}", t.step_count());
}

/// bf16 (and f16) matrix products with f32 accumulation and f32 master weights: every step's
/// loss follows the f32 run's within 3% for 20 steps, and the products do run in the narrower
/// type (the losses are not bit-identical to f32).
#[test]
fn bf16_products_follow_the_f32_run() {
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        follows_the_f32_run(&format!("{dtype:?} products"), |d| {
            d.with_compute_dtype(dtype).unwrap()
        });
    }
    let d = DeviceTrainer::from_trainer(&Trainer::new(resident_config()).unwrap(), &Device::Cpu)
        .unwrap();
    let e = d.with_compute_dtype(candle_core::DType::U32).unwrap_err();
    assert!(e.to_string().contains("bf16"), "{e}");
}

/// Token chunks: the batch through the passes 7 rows at a time (40 = 5 x 7 + 5, so the last
/// chunk is short) takes the whole batch's step, for every architecture (BatchTopK's threshold
/// and θ included), and so do two replicas that each chunk their half.
#[test]
fn token_chunks_take_the_whole_batch_step() {
    for cfg in every_architecture() {
        let mut cfg = cfg;
        if cfg.b_dec_init != sae_core::BDecInit::Zeros {
            // Replicas average their halves' b_dec: the whole batch's only for the mean.
            cfg.b_dec_init = sae_core::BDecInit::Mean;
        }
        let start = Trainer::new(cfg.clone()).unwrap();
        let mut whole = DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap();
        let mut chunked = DeviceTrainer::from_trainer(&start, &Device::Cpu)
            .unwrap()
            .with_token_chunk(7)
            .unwrap();
        let group = sae_core::InProcess::group(2);
        let mut replicas: Vec<DeviceTrainer> = group
            .into_iter()
            .map(|member| {
                DeviceTrainer::from_trainer(&start, &Device::Cpu)
                    .unwrap()
                    .with_collective(member)
                    .with_token_chunk(6)
                    .unwrap()
            })
            .collect();
        let mut aux_seen = 0.0;
        for s in 0..STEPS {
            let x = batch(s);
            let w = whole.step(&x).unwrap().host().unwrap();
            let c = chunked.step(&x).unwrap().host().unwrap();
            for (what, a, b) in [
                ("loss", w.loss, c.loss),
                ("mse", w.mse, c.mse),
                ("sparsity loss", w.sparsity_loss, c.sparsity_loss),
                ("aux loss", w.aux_loss, c.aux_loss),
                ("grad norm", w.grad_norm, c.grad_norm),
            ] {
                close(&format!("step {s} {what}"), a, b);
            }
            assert_eq!(
                (w.l0 * N as f64).round(),
                (c.l0 * N as f64).round(),
                "step {s} L0"
            );
            aux_seen += w.aux_loss + w.sparsity_loss;
            // Two replicas, each on half the batch in chunks of 6 (20 = 3 x 6 + 2).
            let halves: Vec<_> = std::mem::take(&mut replicas)
                .into_iter()
                .enumerate()
                .map(|(rank, mut d)| {
                    let half = x.narrow(0, rank * N / 2, N / 2).unwrap();
                    std::thread::spawn(move || {
                        let h = d.step(&half).unwrap().host().unwrap();
                        (d, h.loss)
                    })
                })
                .collect();
            for h in halves {
                let (d, loss) = h.join().unwrap();
                close(&format!("step {s} replica loss"), w.loss, loss);
                replicas.push(d);
            }
        }
        assert!(aux_seen > 0.0, "no penalty or AuxK term was exercised");
        let w = whole.params_host().unwrap();
        assert_same_weights(&w, &chunked.params_host().unwrap());
        assert_same_weights(&w, &replicas[0].params_host().unwrap());
        let theta = whole.topk_threshold().unwrap();
        close("θ", theta, chunked.topk_threshold().unwrap());
        close("replica θ", theta, replicas[0].topk_threshold().unwrap());
        assert!(
            bits(&replicas[0].params_host().unwrap()) == bits(&replicas[1].params_host().unwrap())
        );
    }
}

#[test]
fn a_chunk_of_no_tokens_is_refused() {
    let d = DeviceTrainer::from_trainer(&Trainer::new(resident_config()).unwrap(), &Device::Cpu)
        .unwrap();
    let e = d.with_token_chunk(0).unwrap_err().to_string();
    assert!(e.contains("at least one token"), "{e}");
}

/// BatchTopK's threshold starts from one candidate per token here, far too few: each halving
/// below the largest smallest candidate that finds too few doubles them, until the threshold is
/// the whole batch's at every step; in one pass (the candidates from the pass's own
/// pre-activations) and in chunks of 7. Matryoshka from two, in chunks of 3.
#[test]
fn too_few_threshold_candidates_double_until_the_threshold_is_exact() {
    for (cfg, start, rows, pairs_limit) in [
        (batchtopk_config(), 1, None, 0),
        (batchtopk_config(), 1, Some(7), 0),
        (matryoshka_config(), 2, Some(3), 0),
        (batchtopk_config(), 1, None, D_SAE),
        (matryoshka_config(), 2, Some(3), D_SAE),
    ] {
        let set_up = |d: DeviceTrainer| {
            let d = d
                .with_threshold_candidates(start)
                .with_batch_pairs_limit(pairs_limit);
            match rows {
                Some(rows) => d.with_token_chunk(rows).unwrap(),
                None => d,
            }
        };
        let mut seen = 0;
        agree_with(cfg.clone(), &Device::Cpu, STEPS, set_up);
        // The doubling itself: after a few steps the candidates have grown.
        let mut d =
            set_up(DeviceTrainer::from_trainer(&Trainer::new(cfg).unwrap(), &Device::Cpu).unwrap());
        for s in 0..3 {
            d.step(&batch(s)).unwrap();
            seen = seen.max(d.threshold_candidates());
        }
        assert!(seen > start, "the candidates never doubled from {start}");
    }
}

/// One token of each batch is far larger than the others, and about half the features are codes
/// of it, more than the threshold's candidates per token at first (16 at k = 4): with the codes
/// as pairs (each token's candidates), the candidates double until they hold every token's
/// codes, and the pairs are taken from the last try's candidates (in one pass) or again at
/// the final count (in chunks): the steps are the host path's, the L0 counted exactly.
#[test]
fn a_token_with_more_codes_than_candidates_doubles_them_for_the_pairs() {
    let loud = |s: u64| {
        let x = batch(s);
        let first = (x.narrow(0, 0, 1).unwrap() * 30.0).unwrap();
        Tensor::cat(&[&first, &x.narrow(0, 1, N - 1).unwrap()], 0).unwrap()
    };
    for rows in [None, Some(7)] {
        let host = Trainer::new(batchtopk_config()).unwrap();
        let mut device = DeviceTrainer::from_trainer(&host, &Device::Cpu)
            .unwrap()
            .with_batch_pairs_limit(D_SAE);
        if let Some(rows) = rows {
            device = device.with_token_chunk(rows).unwrap();
        }
        agree_on_batches(host, &mut device, 0..STEPS, loud);
        let most = device.threshold_candidates();
        assert!(most > 16, "the candidates never grew: {most}");
    }
}

/// The gradient sums, the decoder projection and Adam's update go through the matrices in place
/// by row blocks; with blocks of 40 elements (2 rows of 16, so 32 blocks of `W_dec`, and blocks
/// of 40 features in the bias vectors) every architecture still takes the host path's steps,
/// in token chunks of 9 rows.
#[test]
fn in_place_updates_by_small_row_blocks_match_the_host_path() {
    for cfg in every_architecture() {
        agree_with(cfg, &Device::Cpu, STEPS, |d| {
            d.with_update_block(40).with_token_chunk(9).unwrap()
        });
    }
}

/// `W_enc` and `W_dec` kept in bf16 (with bf16 products; their updates rounded stochastically)
/// follow the f32 run's losses within 5% at every step for every architecture; two replicas
/// stay bit-identical (their rounding draws the same bits); bf16 weights without bf16 products,
/// or without our Adam kernels, are refused.
#[test]
fn bf16_weights_follow_the_f32_run() {
    use candle_core::DType;
    let narrow = |d: DeviceTrainer| {
        d.with_compute_dtype(DType::BF16)
            .unwrap()
            .with_weight_dtype(DType::BF16)
            .unwrap()
    };
    // Within 5% (3.3% at most seen): bf16 weights round every update on top of bf16 products.
    follows_the_f32_run_for(every_architecture().to_vec(), "bf16 weights", 0.05, narrow);
    let start = Trainer::new(resident_config()).unwrap();
    let halves = on_replicas(&start, 2, narrow, |rank, mut d| {
        for s in 0..6 {
            d.step(&batch(s).narrow(0, rank * N / 2, N / 2).unwrap())
                .unwrap();
        }
        d.params_host().unwrap()
    });
    assert!(bits(&halves[0]) == bits(&halves[1]), "the replicas drifted");
    // Both matrices are stored in bf16 (every value a bf16 one); the biases in f32 (not all).
    let in_bf16 = |name: &str| {
        halves[0]
            .data(name)
            .unwrap()
            .iter()
            .all(|&x| half::bf16::from_f32(x).to_f32() == x)
    };
    assert!(in_bf16("W_enc") && in_bf16("W_dec"));
    assert!(!in_bf16("b_enc") && !in_bf16("b_dec"));
    // Resampling writes its rows into the bf16 matrices (after steps 7 and 14) and follows the
    // f32 run too.
    follows_the_f32_run_for(
        vec![resampling_config()],
        "bf16 weights, resampled",
        0.05,
        narrow,
    );
    let fresh = || DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap();
    let e = fresh().with_weight_dtype(DType::BF16).unwrap_err();
    assert!(e.to_string().contains("bf16 products"), "{e}");
    let e = fresh()
        .with_own_kernels(false)
        .with_compute_dtype(DType::BF16)
        .unwrap()
        .with_weight_dtype(DType::BF16)
        .unwrap_err();
    assert!(e.to_string().contains("Adam kernels"), "{e}");
    let e = fresh().with_weight_dtype(DType::F16).unwrap_err();
    assert!(e.to_string().contains("expected f32 or bf16"), "{e}");
    // Nor can the products leave bf16 while the weights are.
    let e = narrow(fresh()).with_compute_dtype(DType::F32).unwrap_err();
    assert!(e.to_string().contains("bf16 products"), "{e}");
}

/// Adam's moments kept in bf16 follow the f32 run's losses within 3% at every step for TopK,
/// the standard SAE and gated (not bit for bit: the moments are rounded).
#[test]
fn bf16_moments_follow_the_f32_run() {
    follows_the_f32_run("bf16 moments", |d| {
        d.with_moment_dtype(candle_core::DType::BF16).unwrap()
    });
}

/// For TopK, the standard SAE and gated: a device trainer set up by `narrow` follows the f32
/// run's mse within 3% at each of 20 steps, and differs from it somewhere (the precision did
/// change).
fn follows_the_f32_run(what: &str, narrow: impl Fn(DeviceTrainer) -> DeviceTrainer) {
    follows_the_f32_run_for(
        vec![resident_config(), standard_config(), gated_config()],
        what,
        0.03,
        narrow,
    );
}

/// [`follows_the_f32_run`] for `configs`, the MSE within `tolerance` (relative) at every step.
fn follows_the_f32_run_for(
    configs: Vec<TrainerConfig>,
    what: &str,
    tolerance: f64,
    narrow: impl Fn(DeviceTrainer) -> DeviceTrainer,
) {
    for cfg in configs {
        let start = Trainer::new(cfg).unwrap();
        let mut f32_run = DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap();
        let mut other = narrow(DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap());
        let mut differs = false;
        for s in 0..STEPS {
            let a = f32_run.step(&batch(s)).unwrap().host().unwrap();
            let b = other.step(&batch(s)).unwrap().host().unwrap();
            let rel = (a.mse - b.mse).abs() / a.mse;
            assert!(
                rel < tolerance,
                "{what}, step {s}: mse {} against {}",
                b.mse,
                a.mse
            );
            differs |= rel > 1e-7;
        }
        assert!(differs, "{what}: the precision did not change");
    }
}

/// Device options reach the steps that `train_many` runs on the device (bf16 moments and token
/// chunks change the weights' bits), and a run with them resumed from a checkpoint ends bit for
/// bit where the uninterrupted run ends: the checkpoint holds the bf16 moments exactly.
#[test]
fn device_options_train_through_the_trainer_and_resume_exactly() {
    let opts = sae_core::DeviceOptions {
        moments: candle_core::DType::BF16,
        token_chunk: Some(7),
        ..Default::default()
    };
    resume_exactly_with(opts);
    // bf16 weights too: a checkpoint holds them as f32 (their bf16 values exactly), and the
    // stochastic rounding's bits come from the step, not from the run.
    resume_exactly_with(sae_core::DeviceOptions {
        compute: candle_core::DType::BF16,
        weights: candle_core::DType::BF16,
        ..opts
    });
}

fn resume_exactly_with(opts: sae_core::DeviceOptions) {
    let resident = |cfg: TrainerConfig, opts: sae_core::DeviceOptions| {
        Trainer::new(cfg)
            .unwrap()
            .with_device_resident(true)
            .unwrap()
            .with_device_options(opts)
            .unwrap()
    };
    let mut plain = resident(resident_config(), Default::default());
    plain
        .train(&mut source(0..STEPS), Progress::Hidden)
        .unwrap();
    let mut whole = resident(resident_config(), opts);
    whole
        .train(&mut source(0..STEPS), Progress::Hidden)
        .unwrap();
    assert!(
        bits(whole.sae().params()) != bits(plain.sae().params()),
        "the options did not reach the device steps"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = resident_config();
    cfg.checkpoint_dir = Some(dir.path().to_path_buf());
    cfg.checkpoint_every = Some(4);
    let mut cut = resident(cfg, opts);
    cut.train(&mut source(0..10), Progress::Hidden).unwrap();
    drop(cut);
    let latest = Trainer::latest_checkpoint(dir.path()).unwrap();
    let mut resumed = Trainer::resume(&latest)
        .unwrap()
        .with_device_resident(true)
        .unwrap()
        .with_device_options(opts)
        .unwrap();
    let from = resumed.batches_consumed();
    resumed
        .train(&mut source(from..STEPS), Progress::Hidden)
        .unwrap();
    assert!(
        bits(whole.sae().params()) == bits(resumed.sae().params()),
        "the resumed run differs"
    );
}

#[test]
fn device_options_the_path_cannot_take_are_refused_up_front() {
    use candle_core::DType;
    let refused = |cfg: TrainerConfig, opts: sae_core::DeviceOptions, says: &str| {
        let e = Trainer::new(cfg)
            .unwrap()
            .with_device_options(opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{e}");
    };
    let chunked = sae_core::DeviceOptions {
        token_chunk: Some(64),
        ..Default::default()
    };
    let zero = sae_core::DeviceOptions {
        token_chunk: Some(0),
        ..Default::default()
    };
    refused(resident_config(), zero, "at least one token");
    let f16_moments = sae_core::DeviceOptions {
        moments: DType::F16,
        ..Default::default()
    };
    refused(resident_config(), f16_moments, "moment dtype");
    let u32_products = sae_core::DeviceOptions {
        compute: DType::U32,
        ..Default::default()
    };
    refused(resident_config(), u32_products, "compute dtype");
    let f32_products_of_bf16_weights = sae_core::DeviceOptions {
        weights: DType::BF16,
        ..Default::default()
    };
    refused(
        resident_config(),
        f32_products_of_bf16_weights,
        "bf16 weights need bf16 products",
    );
    // What the path takes is taken.
    for cfg in [resident_config(), batchtopk_config(), matryoshka_config()] {
        Trainer::new(cfg)
            .unwrap()
            .with_device_options(chunked)
            .unwrap();
    }
}

/// A replica may get no rows of a batch (a data-parallel split of a short last batch): it still
/// takes each step with the group, and both end where one device on the whole batch ends, for
/// every architecture, with and without token chunks.
#[test]
fn a_replica_with_no_rows_keeps_the_group_in_step() {
    // BatchTopK's and Matryoshka's codes as pairs too (dense at this size by default).
    let as_pairs = [batchtopk_config(), matryoshka_config()].map(|c| (c, D_SAE));
    for (cfg, pairs_limit) in every_architecture()
        .map(|c| (c, 0))
        .into_iter()
        .chain(as_pairs)
    {
        for chunk in [None, Some(7)] {
            let start = Trainer::new(cfg.clone()).unwrap();
            let chunked = |d: DeviceTrainer| {
                let d = d.with_batch_pairs_limit(pairs_limit);
                match chunk {
                    Some(rows) => d.with_token_chunk(rows).unwrap(),
                    None => d,
                }
            };
            let mut whole = chunked(DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap());
            let done = on_replicas(&start, 2, chunked, |rank, mut d| {
                let mut losses = Vec::new();
                for s in 0..4 {
                    let rows = if rank == 0 { N } else { 0 };
                    let part = batch(s).narrow(0, 0, rows).unwrap();
                    losses.push(d.step(&part).unwrap().host().unwrap().loss);
                }
                let theta = d.topk_threshold().unwrap();
                (d.params_host().unwrap(), losses, theta)
            });
            for s in 0..4 {
                let w = whole.step(&batch(s)).unwrap().host().unwrap().loss;
                close(
                    &format!("{:?} step {s} loss", cfg.sae),
                    w,
                    done[0].1[s as usize],
                );
                assert_eq!(done[0].1[s as usize], done[1].1[s as usize]);
            }
            assert_same_weights(&whole.params_host().unwrap(), &done[0].0);
            assert!(
                bits(&done[0].0) == bits(&done[1].0),
                "the replicas drifted apart"
            );
            close("θ", whole.topk_threshold().unwrap(), done[0].2);
            assert_eq!(done[0].2, done[1].2);
        }
    }
}

/// A replica whose step fails (here on a batch of the wrong width) and whose trainer is dropped
/// leaves its group: the other replica's step fails naming it, where it used to wait for it
/// forever. (A wait here past a minute is that hang, reported as a failure.)
#[test]
fn a_replica_that_fails_makes_the_others_fail_instead_of_waiting() {
    let start = Trainer::new(resident_config()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for (rank, member) in sae_core::InProcess::group(2).into_iter().enumerate() {
        let mut d = DeviceTrainer::from_trainer(&start, &Device::Cpu)
            .unwrap()
            .with_collective(member);
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            for s in 0..3 {
                let x = if rank == 1 && s == 1 {
                    Tensor::zeros((N / 2, D_IN + 1), candle_core::DType::F32, &Device::Cpu).unwrap()
                } else {
                    batch(s).narrow(0, rank * N / 2, N / 2).unwrap()
                };
                match d.step(&x) {
                    Ok(_) => out.push(Ok(s)),
                    Err(e) => {
                        out.push(Err(e.to_string()));
                        break;
                    }
                }
            }
            drop(d);
            tx.send((rank, out)).unwrap();
        });
    }
    let mut results = [None, None];
    for _ in 0..2 {
        let (rank, out) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a replica is still waiting for the one that failed");
        results[rank] = Some(out);
    }
    let [Some(first), Some(second)] = results else {
        unreachable!()
    };
    // Step 0 went through for both; at step 1 the second replica's batch is refused, and the
    // first one's all-reduce fails naming the replica that left.
    assert_eq!(second[0], Ok(0));
    assert!(
        matches!(&second[1], Err(e) if e.contains("training batch")),
        "{second:?}"
    );
    assert_eq!(first[0], Ok(0));
    assert!(
        matches!(&first[1], Err(e) if e.contains("replica 1 of 2 left the group")),
        "{first:?}"
    );
    assert_eq!(first.len(), 2);
}

/// Phase timing: the timed run takes the untimed run's steps bit for bit, and reports every
/// phase a TopK step goes through (the standard SAE's own too), each with time spent; an
/// untimed trainer reports none.
#[test]
fn phase_timing_reports_every_phase_and_changes_nothing() {
    for (cfg, phases) in [
        (
            resident_config(),
            &[
                "inputs",
                "dead set",
                "encoder",
                "top-k",
                "decode",
                "pair gradients",
                "auxk",
            ][..],
        ),
        (standard_config(), &["encoder", "codes and gradients"][..]),
    ] {
        let start = Trainer::new(cfg).unwrap();
        let mut timed = DeviceTrainer::from_trainer(&start, &Device::Cpu)
            .unwrap()
            .with_phase_timing(true);
        let mut plain = DeviceTrainer::from_trainer(&start, &Device::Cpu).unwrap();
        for s in 0..4 {
            timed.step(&batch(s)).unwrap();
            plain.step(&batch(s)).unwrap();
        }
        assert!(bits(&timed.params_host().unwrap()) == bits(&plain.params_host().unwrap()));
        assert!(plain.phase_times().is_empty());
        let times = timed.phase_times();
        for want in phases.iter().chain(&[
            "gradient sums",
            "norm and clip",
            "adam",
            "counters and metrics",
        ]) {
            let t = times.iter().find(|(n, _)| n == want);
            assert!(matches!(t, Some((_, s)) if *s > 0.0), "{want}: {times:?}");
        }
    }
}

/// Our own ops (Adam's fused passes, TopK's pair decode and dot products: the default) and
/// candle's tensor ops (the fallback where NVRTC cannot compile our kernels) take the same
/// steps on the CPU, with f32 and bf16 moments, a unit-norm decoder (TopK, standard) and
/// JumpReLU's threshold: bit for bit where only Adam differs, within rounding for TopK, whose
/// decode and dot products add in another order.
#[test]
fn our_ops_and_their_tensor_op_fallback_take_the_same_steps() {
    for moments in [candle_core::DType::F32, candle_core::DType::BF16] {
        for cfg in [resident_config(), standard_config(), jumprelu_config()] {
            let start = Trainer::new(cfg).unwrap();
            let run = |fused: bool| {
                let mut d = DeviceTrainer::from_trainer(&start, &Device::Cpu)
                    .unwrap()
                    .with_moment_dtype(moments)
                    .unwrap()
                    .with_own_kernels(fused)
                    .with_update_block(40);
                assert_eq!(d.own_kernels(), fused);
                for s in 0..6 {
                    d.step(&batch(s)).unwrap();
                }
                d.params_host().unwrap()
            };
            let (ours, theirs) = (run(true), run(false));
            if matches!(start.config().sae, ArchitectureConfig::TopK(_)) {
                assert_same_weights(&theirs, &ours);
            } else {
                assert!(bits(&ours) == bits(&theirs), "{moments:?}");
            }
        }
    }
}
