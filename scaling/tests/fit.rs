//! Fits against data drawn from known laws (the exponents come back, inside their intervals),
//! against data that follow no power law (the verdict says so), and the frontier and
//! extrapolation on hand-made runs.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use scaling::{
    Law, OffsetPowerLaw, ScalingError, Verdict, assess, best_per_bin, bootstrap, extrapolate,
    fit_offset_power_law, fit_power_law, frontier,
};

/// `n` points log-spaced over `[lo, hi]`.
fn logspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (lo.ln() + (hi.ln() - lo.ln()) * i as f64 / (n - 1) as f64).exp())
        .collect()
}

/// `f(x)` times log-normal noise of relative size `sigma`.
fn noisy(x: &[f64], f: impl Fn(f64) -> f64, sigma: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = Normal::new(0.0, sigma).unwrap();
    x.iter()
        .map(|&x| f(x) * noise.sample(&mut rng).exp())
        .collect()
}

#[test]
fn exact_offset_laws_are_recovered() {
    // Gao et al.'s frontier for GPT-4 TopK SAEs, and a steeper one.
    for (truth, lo, hi) in [
        (
            OffsetPowerLaw {
                a: 0.09,
                b: 0.056,
                alpha: 0.084,
            },
            1e3,
            1e15,
        ),
        (
            OffsetPowerLaw {
                a: 0.1,
                b: 2.0,
                alpha: 0.3,
            },
            1e3,
            1e9,
        ),
    ] {
        let x = logspace(lo, hi, 30);
        let y: Vec<f64> = x.iter().map(|&x| truth.at(x)).collect();
        let f = fit_offset_power_law(&x, &y).unwrap();
        for ((name, got), (_, want)) in f.law.params().into_iter().zip(truth.params()) {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{name}: {got} vs {want} ({:?})",
                f.law
            );
        }
        assert!(f.quality.r2_log > 0.999_999, "{:?}", f.quality);
    }
}

#[test]
fn noisy_offset_law_exponent_lies_in_its_interval() {
    let truth = OffsetPowerLaw {
        a: 0.1,
        b: 2.0,
        alpha: 0.3,
    };
    let x = logspace(1e3, 1e9, 40);
    for seed in 0..3 {
        let y = noisy(&x, |x| truth.at(x), 0.01, seed);
        let f = fit_offset_power_law(&x, &y).unwrap();
        let b = bootstrap(&x, &y, fit_offset_power_law, 200, seed).unwrap();
        let alpha = b.get("alpha").unwrap();
        assert!(alpha.contains(0.3), "seed {seed}: {alpha:?}");
        assert!(
            alpha.hi - alpha.lo < 0.15,
            "seed {seed}: too wide {alpha:?}"
        );
        assert!(b.get("a").unwrap().contains(0.1), "seed {seed}: {b:?}");
        assert_eq!(assess(&f, &b, &x, &y), Verdict::Holds, "seed {seed}");
    }
}

#[test]
fn noisy_power_law_exponent_lies_in_its_interval() {
    // Tokens to convergence grow about as n^0.6 (Gao et al.).
    let x = logspace(1e3, 1e6, 25);
    let y = noisy(&x, |x| 40.0 * x.powf(0.6), 0.05, 7);
    let f = fit_power_law(&x, &y).unwrap();
    let b = bootstrap(&x, &y, fit_power_law, 300, 1).unwrap();
    let beta = b.get("beta").unwrap();
    assert!(beta.contains(0.6), "{beta:?}");
    assert!((f.law.beta - 0.6).abs() < 0.03, "{:?}", f.law);
    assert_eq!(assess(&f, &b, &x, &y), Verdict::Holds);
}

#[test]
fn no_trend_is_no_law() {
    let x = logspace(1e3, 1e9, 30);
    let y = noisy(&x, |_| 0.2, 0.05, 3);
    for verdict in [
        {
            let f = fit_power_law(&x, &y).unwrap();
            let b = bootstrap(&x, &y, fit_power_law, 200, 0).unwrap();
            assess(&f, &b, &x, &y)
        },
        {
            let f = fit_offset_power_law(&x, &y).unwrap();
            let b = bootstrap(&x, &y, fit_offset_power_law, 200, 0).unwrap();
            assess(&f, &b, &x, &y)
        },
    ] {
        assert!(matches!(verdict, Verdict::NoLaw(_)), "{verdict:?}");
    }
}

#[test]
fn a_curve_of_another_shape_is_no_law() {
    // Loss that falls, bottoms out and rises again (over-training, a bad learning rate): a power
    // law with an offset fits its first half, and the verdict must not call it one.
    let x = logspace(1e3, 1e9, 40);
    let y = noisy(
        &x,
        |x| {
            let u = x.log10() - 6.0;
            0.2 + 0.02 * u * u
        },
        0.005,
        5,
    );
    let f = fit_offset_power_law(&x, &y).unwrap();
    let b = bootstrap(&x, &y, fit_offset_power_law, 200, 0).unwrap();
    let v = assess(&f, &b, &x, &y);
    assert!(matches!(v, Verdict::NoLaw(_)), "{v:?} for {:?}", f);
}

#[test]
fn bad_points_are_named() {
    let err = fit_power_law(&[1.0, 2.0, 3.0], &[1.0, -2.0, 3.0]).unwrap_err();
    assert!(err.to_string().contains("point 1"), "{err}");
    let err = fit_offset_power_law(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).unwrap_err();
    assert!(err.to_string().contains("at least 4"), "{err}");
    let err = fit_power_law(&[1.0, 2.0], &[1.0, 2.0, 3.0]).unwrap_err();
    assert!(matches!(err, ScalingError::Invalid { .. }), "{err}");
    let err = fit_power_law(&[2.0, 2.0, 2.0, 5.0], &[1.0, 2.0, 3.0, 4.0]).unwrap_err();
    assert!(err.to_string().contains("2 distinct"), "{err}");
    let err = fit_power_law(&[1.0, 2.0, f64::NAN], &[1.0, 2.0, 3.0]).unwrap_err();
    assert!(err.to_string().contains("point 2"), "{err}");
}

#[test]
fn frontier_and_bins() {
    let compute = [1.0, 2.0, 2.0, 4.0, 8.0, 8.0, 16.0];
    let loss = [1.0, 0.9, 1.1, 0.95, 0.7, 0.6, 0.65];
    assert_eq!(frontier(&compute, &loss).unwrap(), vec![0, 1, 5]);
    // One bin per decade: [1, 10) holds runs 0-5, [10, 100) run 6.
    assert_eq!(best_per_bin(&compute, &loss, 1.0).unwrap(), vec![5, 6]);
    assert!(frontier(&compute, &loss[..3]).is_err());
    assert!(frontier(&[1.0, 0.0], &[1.0, 1.0]).is_err());
}

#[test]
fn extrapolation_predicts_a_law_and_reports_a_miss() {
    let law = OffsetPowerLaw {
        a: 0.1,
        b: 2.0,
        alpha: 0.3,
    };
    // A grid of runs: at each compute, the law's loss for the best run and two worse ones.
    let mut compute = Vec::new();
    let mut loss = Vec::new();
    for c in logspace(1e6, 1e12, 13) {
        for worse in [1.0, 1.2, 1.5] {
            compute.push(c);
            loss.push(law.at(c) * worse);
        }
    }
    let e = extrapolate(&compute, &loss, 4.0).unwrap();
    assert!((e.c_max / 1e12 - 1.0).abs() < 1e-9, "{e:?}");
    assert_eq!(e.frontier_points, 11); // the 11 compute values up to 1e12 / 4
    assert!(e.relative_error.abs() < 1e-6, "{e:?}");

    // The largest runs do much better than the law of the smaller ones: the miss is reported.
    let last = loss.len() - 3;
    loss[last] *= 0.5;
    let e = extrapolate(&compute, &loss, 4.0).unwrap();
    assert!(e.relative_error > 0.5, "{e:?}");
    assert!(extrapolate(&compute[..6], &loss[..6], 4.0).is_err());
    assert!(extrapolate(&compute, &loss, 1.0).is_err());
}

#[test]
fn a_bend_is_no_law_even_when_it_explains_most_variance() {
    // Flat, then falling fast: monotone, and a power law with an offset explains most of its
    // variance in logs, but its residuals run in long same-sign stretches.
    let x = logspace(1e3, 1e9, 40);
    let y = noisy(&x, |x| 0.2 + 0.8 / (1.0 + (x / 1e6).powi(2)), 0.005, 5);
    let f = fit_offset_power_law(&x, &y).unwrap();
    let b = bootstrap(&x, &y, fit_offset_power_law, 200, 0).unwrap();
    let v = assess(&f, &b, &x, &y);
    assert!(f.quality.r2_log > 0.8, "{:?}", f.quality);
    assert!(
        matches!(&v, Verdict::NoLaw(r) if r.contains("change sign")),
        "{v:?} for {f:?}"
    );
}
