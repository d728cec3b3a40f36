//! Properties every SAE architecture must satisfy, as reusable proptest-driven checks
//! (feature `testkit`). An architecture passes the kit with:
//!
//! ```ignore
//! use sae_core::testkit::{check_architecture, KitOptions};
//! check_architecture("my_arch", |d_in, d_sae, seed| MySae::init(d_in, d_sae, seed), &KitOptions::default());
//! ```
//!
//! The checks (each also public on its own):
//! * [`check_shapes`]: codes and reconstructions have the right shapes; parameters are finite.
//! * [`check_gradients`]: the hand-written gradient of every parameter (except declared
//!   straight-through ones) matches central finite differences of the reported loss along random
//!   directions; directions that cross a discontinuity (a TopK swap, a JumpReLU jump) are detected
//!   by comparing two step sizes and skipped.
//! * [`check_decoder_norms`]: after a training step, decoder rows have unit norm when the
//!   architecture says it constrains them.
//! * [`check_l0_bound`]: no token activates more than [`crate::TrainableSae::max_l0`] features.
//! * [`check_save_load`]: export → SAELens folder → [`crate::SaeModel::load`] gives identical codes
//!   and reconstructions.
//! * [`check_planted_recovery`]: on data built from a planted sparse dictionary, the loss falls and
//!   at least 90% of planted atoms are matched by a decoder row at cosine ≥ 0.9.
//!
//! Two of these constrain only some architectures and pass without checking anything on the
//! others, so read a pass accordingly:
//!
//! | check | constrains | passes vacuously for |
//! |---|---|---|
//! | [`check_decoder_norms`] | any SAE whose `unit_norm_decoder()` is true (`DecoderNorm::Unit`: the defaults of ReLU-L1, TopK, BatchTopK, Matryoshka BatchTopK) | `DecoderNorm::Free` (the defaults of JumpReLU and Gated; any architecture configured free) |
//! | [`check_l0_bound`] | TopK (`max_l0() = Some(k)`: at most k per token) | ReLU-L1, JumpReLU, Gated (no per-token bound) BatchTopK and Matryoshka BatchTopK (their k bounds the batch mean, not each token) |
//!
//! Every other check constrains every architecture.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Device;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::arch::{Batch, StepContext, StepOutput, TrainableSae};
use crate::config::CommonConfig;
use crate::kernels;
use crate::model::SaeModel;
use crate::optim::Adam;
use crate::params::Params;

/// Sizes and budgets for the kit.
#[derive(Debug, Clone)]
pub struct KitOptions {
    pub d_in: usize,
    pub d_sae: usize,
    /// Proptest cases per property.
    pub cases: u32,
    /// Planted-dictionary run: atoms, active atoms per sample, SAE width, steps, batch, lr.
    pub planted: PlantedOptions,
}

/// The planted-dictionary experiment.
#[derive(Debug, Clone)]
pub struct PlantedOptions {
    pub d_in: usize,
    pub n_atoms: usize,
    pub active_per_sample: usize,
    pub d_sae: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Required fraction of atoms recovered at cosine ≥ `min_cosine`.
    pub min_recovered: f64,
    pub min_cosine: f32,
}

impl Default for KitOptions {
    fn default() -> Self {
        KitOptions {
            d_in: 8,
            d_sae: 16,
            cases: 6,
            planted: PlantedOptions {
                d_in: 24,
                n_atoms: 16,
                active_per_sample: 2,
                d_sae: 32,
                steps: 1500,
                batch: 128,
                lr: 1e-2,
                min_recovered: 0.9,
                min_cosine: 0.9,
            },
        }
    }
}

/// Runs every property on the architecture built by `make(d_in, d_sae, seed)`.
///
/// # Panics
/// With a message naming the architecture and the property that failed.
pub fn check_architecture<S, F>(name: &str, make: F, opts: &KitOptions)
where
    S: TrainableSae,
    F: Fn(usize, usize, u64) -> S,
{
    let run = |prop: &str, r: Result<(), String>| {
        if let Err(e) = r {
            panic!("{name}: property `{prop}` failed: {e}");
        }
    };
    run("shapes", check_shapes(&make, opts));
    run("gradients", check_gradients(&make, opts));
    run("decoder_norms", check_decoder_norms(&make, opts));
    run("l0_bound", check_l0_bound(&make, opts));
    run("save_load", check_save_load(&make, opts));
    run(
        "planted_recovery",
        check_planted_recovery(&make, &opts.planted).map(|_| ()),
    );
}

/// A runner with a fixed seed, so that a property's verdict is the same on every run (a random
/// seed made the share of finite-difference directions that cross a JumpReLU jump vary from run
/// to run, and CI failed on one draw); `PROPTEST_RNG_SEED` still chooses another seed, to explore.
fn runner(cases: u32) -> TestRunner {
    let base = Config::default();
    let rng_seed = match base.rng_seed {
        RngSeed::Random => RngSeed::Fixed(KIT_SEED),
        chosen => chosen,
    };
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed,
        ..base
    })
}

/// The kit's default proptest seed.
const KIT_SEED: u64 = 0x5AE_2026;

fn finish(r: Result<(), proptest::test_runner::TestError<(u64, usize)>>) -> Result<(), String> {
    r.map_err(|e| e.to_string())
}

/// A Gaussian batch `[n, d]` scaled so that rows have norm about `sqrt(d)` times `scale`.
pub fn gaussian_batch(n: usize, d: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * d)
        .map(|_| {
            let v: f32 = StandardNormal.sample(&mut rng);
            v * scale
        })
        .collect()
}

fn ctx<'a>(dead: &'a [bool]) -> StepContext<'a> {
    StepContext {
        sparsity_scale: 1.0,
        dead,
        device: &Device::Cpu,
    }
}

/// Shapes of codes, reconstructions and parameters.
///
/// # Errors
/// A description of the first failing case.
pub fn check_shapes<S: TrainableSae>(
    make: &impl Fn(usize, usize, u64) -> S,
    opts: &KitOptions,
) -> Result<(), String> {
    let (d_in, d_sae) = (opts.d_in, opts.d_sae);
    finish(
        runner(opts.cases).run(&(any::<u64>(), 1usize..20), |(seed, n)| {
            let sae = make(d_in, d_sae, seed);
            prop_assert_eq!(sae.d_in(), d_in);
            prop_assert_eq!(sae.d_sae(), d_sae);
            for p in sae.params().iter() {
                prop_assert_eq!(
                    p.shape.iter().product::<usize>(),
                    p.data.len(),
                    "param {}",
                    &p.name
                );
                prop_assert!(
                    p.data.iter().all(|v| v.is_finite()),
                    "param {} not finite",
                    &p.name
                );
            }
            let x = gaussian_batch(n, d_in, 1.0, seed ^ 1);
            let codes = sae
                .encode_host(&x, n)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(codes.n_tokens, n);
            prop_assert_eq!(codes.d_sae, d_sae);
            prop_assert_eq!(codes.offsets.len(), n + 1);
            prop_assert!(codes.features.iter().all(|&f| (f as usize) < d_sae));
            let xhat = sae
                .decode_host(&codes)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(xhat.len(), n * d_in);
            let mut grads = sae.params().zeros_like();
            let dead = vec![false; d_sae];
            let out = sae
                .forward_backward(&Batch { x: &x, n, d_in }, &ctx(&dead), &mut grads)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(out.loss.is_finite());
            prop_assert_eq!(out.per_token_sq_err.len(), n);
            for (g, p) in grads.iter().zip(sae.params().iter()) {
                prop_assert_eq!(&g.shape, &p.shape, "gradient of {}", &p.name);
                prop_assert!(
                    g.data.iter().all(|v| v.is_finite()),
                    "gradient of {} not finite",
                    &p.name
                );
            }
            Ok(())
        }),
    )
}

/// Hand-written gradients against central finite differences of the loss.
///
/// # Errors
/// A description of the first mismatch.
pub fn check_gradients<S: TrainableSae>(
    make: &impl Fn(usize, usize, u64) -> S,
    opts: &KitOptions,
) -> Result<(), String> {
    let (d_in, d_sae) = (opts.d_in, opts.d_sae);
    let checked = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let r = finish(runner(opts.cases).run(&(any::<u64>(), 4usize..24), |(seed, n)| {
        let mut sae = make(d_in, d_sae, seed);
        perturb_biases(&mut sae, seed);
        let x = gaussian_batch(n, d_in, 1.0, seed ^ 7);
        let dead = vec![false; d_sae];
        let batch = Batch { x: &x, n, d_in };
        let mut grads = sae.params().zeros_like();
        sae.forward_backward(&batch, &ctx(&dead), &mut grads)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let skip: Vec<String> = sae.pseudo_gradient_params().iter().map(|s| s.to_string()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 99);
        let names: Vec<String> = sae.params().iter().map(|p| p.name.clone()).collect();
        for (pi, name) in names.iter().enumerate() {
            if skip.contains(name) {
                continue;
            }
            let len = sae.params().list[pi].data.len();
            let mut dir: Vec<f32> = (0..len).map(|_| StandardNormal.sample(&mut rng)).collect();
            let norm = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
            dir.iter_mut().for_each(|v| *v /= norm);
            let analytic: f64 = grads.list[pi]
                .data
                .iter()
                .zip(&dir)
                .map(|(g, d)| (*g as f64) * (*d as f64))
                .sum();
            let mut loss_at = |eps: f32| -> Result<f64, TestCaseError> {
                let base = sae.params().list[pi].data.clone();
                for (p, d) in sae.params_mut().list[pi].data.iter_mut().zip(&dir) {
                    *p += eps * d;
                }
                let mut scratch = sae.params().zeros_like();
                let out = sae
                    .forward_backward(&batch, &ctx(&dead), &mut scratch)
                    .map_err(|e| TestCaseError::fail(e.to_string()));
                sae.params_mut().list[pi].data = base;
                Ok(out?.loss)
            };
            // One-sided differences at three step sizes h: for a smooth loss their gap (right
            // slope minus left slope) is curvature x h, so it halves with h; a kink or jump inside
            // [-h, h] breaks that scaling at one of the two halvings (no kink position satisfies
            // both), and such directions are skipped. The skip tolerance is half the assertion's:
            // an undetected kink then moves the central difference by less than the assertion allows.
            let eps = 2e-3f32;
            let l0 = loss_at(0.0)?;
            let e = eps as f64;
            let mut gaps = [0.0f64; 3];
            let mut central = 0.0;
            for (i, h) in [e, e / 2.0, e / 4.0].into_iter().enumerate() {
                let (lp, lm) = (loss_at(h as f32)?, loss_at(-h as f32)?);
                gaps[i] = (lp - l0) / h - (l0 - lm) / h;
                if i == 1 {
                    central = (lp - lm) / (2.0 * h);
                }
            }
            let scale = analytic.abs().max(central.abs()).max(1e-2);
            let smooth = |big: f64, small: f64, tol: f64| (small - big / 2.0).abs() <= tol;
            let tol = 0.005 * scale + 1.5e-3;
            if !smooth(gaps[0], gaps[1], tol) || !smooth(gaps[1], gaps[2], tol)
            {
                skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            checked.fetch_add(1, Ordering::Relaxed);
            prop_assert!(
                (central - analytic).abs() <= 0.01 * scale + 3e-3,
                "parameter {}: analytic directional derivative {} vs finite difference {} (n = {})",
                name,
                analytic,
                central,
                n
            );
        }
        Ok(())
    }));
    r?;
    let (c, s) = (
        checked.load(Ordering::Relaxed),
        skipped.load(Ordering::Relaxed),
    );
    if c < 2 * s.max(1) {
        return Err(format!(
            "too few usable finite-difference directions: {c} checked, {s} crossed a discontinuity"
        ));
    }
    Ok(())
}

/// Moves biases off zero so that the checks do not sit on symmetric special points.
fn perturb_biases<S: TrainableSae>(sae: &mut S, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 3);
    for p in sae.params_mut().list.iter_mut() {
        if p.shape.len() == 1 && p.name != "threshold" {
            for v in p.data.iter_mut() {
                *v += 0.1 * rng.random_range(-1.0f32..1.0);
            }
        }
    }
}

/// Runs `steps` optimizer steps the way [`crate::Trainer`] does (forward/backward, gradient
/// constraint, Adam, post-step hook) and returns the outputs.
///
/// # Errors
/// Any training error, as a string.
pub fn train_steps<S: TrainableSae>(
    sae: &mut S,
    batches: &mut dyn FnMut(usize) -> Vec<f32>,
    steps: usize,
    lr: f64,
) -> Result<Vec<StepOutput>, String> {
    let d_in = sae.d_in();
    let d_sae = sae.d_sae();
    let mut adam = Adam::new(sae.params(), 0.9, 0.999, 1e-8);
    let mut grads: Params = sae.params().zeros_like();
    let dead = vec![false; d_sae];
    let mut outs = Vec::new();
    for s in 0..steps {
        let x = batches(s);
        let n = x.len() / d_in;
        let out = sae
            .forward_backward(&Batch { x: &x, n, d_in }, &ctx(&dead), &mut grads)
            .map_err(|e| e.to_string())?;
        sae.constrain_gradients(&mut grads)
            .map_err(|e| e.to_string())?;
        adam.step(sae.params_mut(), &grads, lr, 1.0, s as u64)
            .map_err(|e| e.to_string())?;
        sae.after_optimizer_step(&out).map_err(|e| e.to_string())?;
        outs.push(out);
    }
    Ok(outs)
}

/// Unit-norm decoder rows after a step, where the architecture constrains them.
///
/// # Errors
/// The worst row norm.
pub fn check_decoder_norms<S: TrainableSae>(
    make: &impl Fn(usize, usize, u64) -> S,
    opts: &KitOptions,
) -> Result<(), String> {
    let (d_in, d_sae) = (opts.d_in, opts.d_sae);
    finish(
        runner(opts.cases).run(&(any::<u64>(), 4usize..20), |(seed, n)| {
            let mut sae = make(d_in, d_sae, seed);
            if !sae.unit_norm_decoder() {
                return Ok(());
            }
            train_steps(
                &mut sae,
                &mut |s| gaussian_batch(n, d_in, 1.0, seed ^ s as u64),
                2,
                1e-2,
            )
            .map_err(TestCaseError::fail)?;
            let w = sae
                .params()
                .data("W_dec")
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (f, nrm) in kernels::row_norms(w, d_in).iter().enumerate() {
                prop_assert!(
                    (nrm - 1.0).abs() < 1e-5,
                    "decoder row {} has norm {}",
                    f,
                    nrm
                );
            }
            Ok(())
        }),
    )
}

/// No token exceeds the architecture's L0 bound, at inference and in training.
///
/// # Errors
/// The offending token.
pub fn check_l0_bound<S: TrainableSae>(
    make: &impl Fn(usize, usize, u64) -> S,
    opts: &KitOptions,
) -> Result<(), String> {
    let (d_in, d_sae) = (opts.d_in, opts.d_sae);
    finish(
        runner(opts.cases).run(&(any::<u64>(), 1usize..30), |(seed, n)| {
            let sae = make(d_in, d_sae, seed);
            let Some(k) = sae.max_l0() else { return Ok(()) };
            let x = gaussian_batch(n, d_in, 3.0, seed ^ 5);
            let codes = sae
                .encode_host(&x, n)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut grads = sae.params().zeros_like();
            let dead = vec![false; d_sae];
            let out = sae
                .forward_backward(&Batch { x: &x, n, d_in }, &ctx(&dead), &mut grads)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            for c in [&codes, &out.codes] {
                for t in 0..n {
                    let (fs, vs) = c.row(t);
                    let active = vs.iter().filter(|v| **v != 0.0).count();
                    prop_assert!(
                        active <= k,
                        "token {} has {} active features (k = {})",
                        t,
                        active,
                        k
                    );
                    let mut sorted = fs.to_vec();
                    sorted.sort_unstable();
                    sorted.dedup();
                    prop_assert_eq!(sorted.len(), fs.len(), "duplicate feature in token {}", t);
                }
            }
            Ok(())
        }),
    )
}

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Export → SAELens folder → load gives the same codes and reconstructions.
///
/// # Errors
/// The largest difference found.
pub fn check_save_load<S: TrainableSae>(
    make: &impl Fn(usize, usize, u64) -> S,
    opts: &KitOptions,
) -> Result<(), String> {
    let (d_in, d_sae) = (opts.d_in, opts.d_sae);
    finish(
        runner(opts.cases).run(&(any::<u64>(), 1usize..20), |(seed, n)| {
            let mut sae = make(d_in, d_sae, seed);
            perturb_biases(&mut sae, seed);
            let (cfg, tensors) = sae
                .export(sae.params(), CommonConfig::new(d_in, d_sae))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let dir = std::env::temp_dir().join(format!(
                "sae-testkit-{}-{}",
                std::process::id(),
                DIR_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let saved =
                crate::io::save_sae(&dir, &cfg, &tensors, None).and_then(|_| SaeModel::load(&dir));
            let _ = std::fs::remove_dir_all(&dir);
            let model = saved.map_err(|e| TestCaseError::fail(e.to_string()))?;
            let x = gaussian_batch(n, d_in, 1.0, seed ^ 11);
            let a = sae
                .encode_host(&x, n)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let b = model
                .sae()
                .encode_host(&x, n)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (da, db) = (a.to_dense(), b.to_dense());
            for (i, (u, v)) in da.iter().zip(&db).enumerate() {
                prop_assert!(
                    (u - v).abs() <= 1e-5 * u.abs().max(1.0),
                    "code {} differs: {} vs {}",
                    i,
                    u,
                    v
                );
            }
            let ra = sae
                .decode_host(&a)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let rb = model
                .sae()
                .decode_host(&b)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (i, (u, v)) in ra.iter().zip(&rb).enumerate() {
                prop_assert!(
                    (u - v).abs() <= 1e-5 * u.abs().max(1.0),
                    "reconstruction {} differs: {} vs {}",
                    i,
                    u,
                    v
                );
            }
            Ok(())
        }),
    )
}

/// Result of the planted-dictionary experiment.
#[derive(Debug, Clone)]
pub struct PlantedReport {
    pub first_loss: f64,
    pub last_loss: f64,
    /// Fraction of atoms with a decoder row at cosine ≥ `min_cosine`.
    pub recovered: f64,
}

/// Samples `x = Σ c_i atom_i` over `active` random atoms with `c_i ~ U(0.5, 1.5)`.
pub fn planted_batch(
    atoms: &[f32],
    d_in: usize,
    n_atoms: usize,
    active: usize,
    n: usize,
    seed: u64,
) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = vec![0.0f32; n * d_in];
    for t in 0..n {
        let mut chosen = Vec::with_capacity(active);
        while chosen.len() < active {
            let a = rng.random_range(0..n_atoms);
            if !chosen.contains(&a) {
                chosen.push(a);
            }
        }
        for a in chosen {
            let c: f32 = rng.random_range(0.5..1.5);
            kernels::axpy(
                c,
                &atoms[a * d_in..(a + 1) * d_in],
                &mut x[t * d_in..(t + 1) * d_in],
            );
        }
    }
    x
}

/// Trains on planted-dictionary data and checks that the loss falls and the atoms are found.
///
/// # Errors
/// The measured loss drop and recovery when below the bar.
pub fn check_planted_recovery<S: TrainableSae>(
    make: &impl Fn(usize, usize, u64) -> S,
    o: &PlantedOptions,
) -> Result<PlantedReport, String> {
    let mut atoms = gaussian_batch(o.n_atoms, o.d_in, 1.0, 1234);
    kernels::normalize_rows(&mut atoms, o.d_in);
    let mut sae = make(o.d_in, o.d_sae, 42);
    let outs = train_steps(
        &mut sae,
        &mut |s| {
            planted_batch(
                &atoms,
                o.d_in,
                o.n_atoms,
                o.active_per_sample,
                o.batch,
                1000 + s as u64,
            )
        },
        o.steps,
        o.lr,
    )?;
    let avg = |r: &[StepOutput]| r.iter().map(|x| x.mse).sum::<f64>() / r.len() as f64;
    let w = 20.min(outs.len());
    let first_loss = avg(&outs[..w]);
    let last_loss = avg(&outs[outs.len() - w..]);
    let w_dec = sae.params().data("W_dec").map_err(|e| e.to_string())?;
    let norms = kernels::row_norms(w_dec, o.d_in);
    let mut found = 0usize;
    for a in 0..o.n_atoms {
        let atom = &atoms[a * o.d_in..(a + 1) * o.d_in];
        let best = (0..o.d_sae)
            .map(|f| kernels::dot(atom, &w_dec[f * o.d_in..(f + 1) * o.d_in]) / norms[f].max(1e-12))
            .fold(f32::NEG_INFINITY, f32::max);
        if best >= o.min_cosine {
            found += 1;
        }
    }
    let rep = PlantedReport {
        first_loss,
        last_loss,
        recovered: found as f64 / o.n_atoms as f64,
    };
    // Written so that a NaN loss fails too.
    if rep.last_loss.partial_cmp(&(0.5 * rep.first_loss)) != Some(std::cmp::Ordering::Less) {
        return Err(format!("reconstruction loss did not fall enough: {rep:?}"));
    }
    if rep.recovered < o.min_recovered {
        return Err(format!(
            "recovered {:.0}% of planted atoms at cosine >= {} (need {:.0}%): {rep:?}",
            100.0 * rep.recovered,
            o.min_cosine,
            100.0 * o.min_recovered
        ));
    }
    Ok(rep)
}
