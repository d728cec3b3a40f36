//! `Steering::apply` against hand-computed edits on SAEs whose features are coordinate axes, so
//! every expected activation is a figure written down independently of the SAE code.

use approx::assert_abs_diff_eq;
use candle_core::{Device, Tensor};
use sae_core::{
    CommonConfig, DecoderNorm, Param, Params, SaeConfig, SaeModel, StandardConfig, StandardSae,
    StandardTraining, TopKConfig, TopKSae, TopKTraining,
};
use steering::{FeatureEdit, Scope, Steering, SteeringError};
use transformer_hooks::HookPoint;

const D_IN: usize = 6;
const D_SAE: usize = 4;
/// `b_dec`: the SAE subtracts it before encoding and adds it back when decoding.
const B_DEC: [f32; D_IN] = [0.5, -0.25, 0.0, 1.0, 0.0, 0.0];

/// Feature j reads and writes coordinate j (j < 4): `a_j(x) = ReLU(x_j - b_dec_j)` for the
/// ReLU SAE, the same restricted to the k largest for TopK.
fn axis_params() -> Params {
    let mut w = vec![0.0; D_SAE * D_IN];
    for j in 0..D_SAE {
        w[j * D_IN + j] = 1.0;
    }
    Params::new(vec![
        Param::new("W_enc", &[D_SAE, D_IN], true, w.clone()),
        Param::zeros("b_enc", &[D_SAE], true),
        Param::new("W_dec", &[D_SAE, D_IN], true, w),
        Param::new("b_dec", &[D_IN], false, B_DEC.to_vec()),
    ])
}

fn relu_sae() -> SaeModel {
    let cfg = StandardTraining {
        decoder_norm: DecoderNorm::Free,
        ..StandardTraining::default()
    };
    let sae = StandardSae::from_params(D_IN, D_SAE, cfg, axis_params()).unwrap();
    let common = CommonConfig::new(D_IN, D_SAE);
    SaeModel::from_parts(
        SaeConfig::Standard(StandardConfig { common }),
        Box::new(sae),
        None,
    )
}

fn topk_sae(k: usize) -> SaeModel {
    let sae = TopKSae::from_params(D_IN, D_SAE, TopKTraining::new(k), axis_params()).unwrap();
    let cfg = TopKConfig {
        k,
        rescale_acts_by_decoder_norm: false,
        common: CommonConfig::new(D_IN, D_SAE),
    };
    SaeModel::from_parts(SaeConfig::TopK(cfg), Box::new(sae), None)
}

/// `[2, 3, 6]`: two sequences of three positions, distinct values everywhere.
fn activations() -> (Vec<f32>, Tensor) {
    let v: Vec<f32> = (0..2 * 3 * D_IN)
        .map(|i| ((i * 7 % 11) as f32 - 4.0) * 0.5)
        .collect();
    let t = Tensor::from_vec(v.clone(), (2, 3, D_IN), &Device::Cpu).unwrap();
    (v, t)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn hook() -> HookPoint {
    HookPoint::resid_post(0)
}

#[test]
fn clamp_sets_the_feature_and_leaves_everything_else() {
    let sae = relu_sae();
    let (x, xt) = activations();
    let s = Steering::new(&sae, hook(), vec![FeatureEdit::clamp(1, 3.0)]).unwrap();
    let y = flat(&s.apply(&xt, 0).unwrap());
    for (xr, yr) in x.chunks(D_IN).zip(y.chunks(D_IN)) {
        let a1 = (xr[1] - B_DEC[1]).max(0.0);
        for j in 0..D_IN {
            let want = if j == 1 { xr[1] + 3.0 - a1 } else { xr[j] };
            assert_abs_diff_eq!(yr[j], want, epsilon = 1e-5);
        }
        // Re-encoded, a feature that was active reads exactly the clamp value (an inactive one
        // had a negative pre-activation, which the kept error term carries along).
        if a1 > 0.0 {
            assert_abs_diff_eq!(yr[1] - B_DEC[1], 3.0, epsilon = 1e-5);
        }
    }
}

#[test]
fn ablation_several_features_and_addition() {
    let sae = relu_sae();
    let (x, xt) = activations();
    let edits = vec![
        FeatureEdit::ablate(0),
        FeatureEdit::add(2, -1.5),
        FeatureEdit::clamp(3, 2.0),
    ];
    let s = Steering::new(&sae, hook(), edits).unwrap();
    let y = flat(&s.apply(&xt, 0).unwrap());
    for (xr, yr) in x.chunks(D_IN).zip(y.chunks(D_IN)) {
        let a0 = (xr[0] - B_DEC[0]).max(0.0);
        let a3 = (xr[3] - B_DEC[3]).max(0.0);
        let want = [
            xr[0] - a0,
            xr[1],
            xr[2] - 1.5,
            xr[3] + 2.0 - a3,
            xr[4],
            xr[5],
        ];
        for j in 0..D_IN {
            assert_abs_diff_eq!(yr[j], want[j], epsilon = 1e-5);
        }
    }
}

#[test]
fn topk_clamp_does_not_reselect_the_other_features() {
    // With k = 1 only the largest (x_j - b_dec_j) is active. Clamping another feature high must
    // move only its own coordinate: the winner keeps its activation although, re-encoded, the
    // clamped feature would now push it out of the top 1.
    let sae = topk_sae(1);
    let (x, xt) = activations();
    let s = Steering::new(&sae, hook(), vec![FeatureEdit::clamp(2, 50.0)]).unwrap();
    let y = flat(&s.apply(&xt, 0).unwrap());
    for (xr, yr) in x.chunks(D_IN).zip(y.chunks(D_IN)) {
        let pre: Vec<f32> = (0..D_SAE).map(|j| xr[j] - B_DEC[j]).collect();
        let top = (0..D_SAE)
            .max_by(|&a, &b| pre[a].total_cmp(&pre[b]))
            .unwrap();
        let a2 = if top == 2 { pre[2].max(0.0) } else { 0.0 };
        for j in 0..D_IN {
            let want = if j == 2 { xr[2] + 50.0 - a2 } else { xr[j] };
            assert_abs_diff_eq!(yr[j], want, epsilon = 1e-4);
        }
    }
}

#[test]
fn scope_from_leaves_earlier_positions_untouched_at_any_offset() {
    let sae = relu_sae();
    let (x, xt) = activations();
    let edit = vec![FeatureEdit::add(0, 10.0)];
    // Whole sequence (offset 0), edits from position 2 on: positions 0 and 1 untouched.
    let s = Steering::new(&sae, hook(), edit.clone())
        .unwrap()
        .with_scope(Scope::From(2));
    let y = flat(&s.apply(&xt, 0).unwrap());
    for b in 0..2 {
        for p in 0..3 {
            let i = (b * 3 + p) * D_IN;
            let shift = if p >= 2 { 10.0 } else { 0.0 };
            assert_abs_diff_eq!(y[i], x[i] + shift, epsilon = 1e-5);
            assert_abs_diff_eq!(y[i + 1], x[i + 1], epsilon = 1e-6);
        }
    }
    // A cached step whose first position is sequence index 1: its positions are 1, 2, 3.
    let y = flat(&s.apply(&xt, 1).unwrap());
    for b in 0..2 {
        for p in 0..3 {
            let i = (b * 3 + p) * D_IN;
            let shift = if p + 1 >= 2 { 10.0 } else { 0.0 };
            assert_abs_diff_eq!(y[i], x[i] + shift, epsilon = 1e-5);
        }
    }
    // A step entirely before the scope is returned as it came.
    let s = Steering::new(&sae, hook(), edit)
        .unwrap()
        .with_scope(Scope::From(9));
    assert_eq!(flat(&s.apply(&xt, 0).unwrap()), x);
}

#[test]
fn bad_edits_are_refused_with_the_reason() {
    let sae = relu_sae();
    match Steering::new(&sae, hook(), vec![FeatureEdit::clamp(D_SAE, 1.0)]) {
        Err(SteeringError::NoSuchFeature { feature, d_sae }) => {
            assert_eq!((feature, d_sae), (D_SAE, D_SAE));
        }
        other => panic!("expected NoSuchFeature, got {other:?}"),
    }
    let err = Steering::new(&sae, hook(), vec![FeatureEdit::clamp(0, f32::NAN)]).unwrap_err();
    assert!(err.to_string().contains("not finite"), "{err}");
    assert!(Steering::new(&sae, hook(), vec![]).is_err());
    let s = Steering::new(&sae, hook(), vec![FeatureEdit::ablate(0)]).unwrap();
    let wrong = Tensor::zeros((1, 2, D_IN + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = s.apply(&wrong, 0).unwrap_err();
    assert!(err.to_string().contains("width 7"), "{err}");
}

/// An SAE is checked against the model it is about to steer: its hook must be there and give
/// its `d_in`; each refusal names the hook and, for a width, both widths.
#[test]
fn an_sae_from_another_model_is_refused_naming_both_widths() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../transformer-hooks/tests/fixtures/tiny/llama");
    let model = transformer_hooks::Model::load(&dir, &Device::Cpu).unwrap();
    let with_hook = |d_in: usize, hook: &str| {
        let mut common = CommonConfig::new(d_in, D_SAE);
        common.metadata.hook_name = Some(hook.to_string());
        let sae = TopKSae::init(d_in, D_SAE, TopKTraining::new(2), 1).unwrap();
        let cfg = TopKConfig {
            k: 2,
            rescale_acts_by_decoder_norm: false,
            common,
        };
        SaeModel::from_parts(SaeConfig::TopK(cfg), Box::new(sae), None)
    };
    // The tiny Llama: d_model 32, MLP 48 wide, 3 layers.
    let ok = steering::sae_hook_in(&with_hook(48, "blocks.1.mlp.hook_post"), &model).unwrap();
    assert_eq!(ok, HookPoint::mlp_post(1));
    assert!(steering::sae_hook_in(&with_hook(32, "blocks.2.hook_resid_post"), &model).is_ok());
    let e = steering::sae_hook_in(&with_hook(32, "blocks.1.mlp.hook_post"), &model).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, SteeringError::SaeHook { .. }), "{msg}");
    assert!(
        msg.contains("blocks.1.mlp.hook_post") && msg.contains("32") && msg.contains("48"),
        "{msg}"
    );
    let e = steering::sae_hook_in(&with_hook(48, "blocks.7.mlp.hook_post"), &model).unwrap_err();
    assert!(e.to_string().contains("blocks.7.mlp.hook_post"), "{e}");
    let e = steering::sae_hook_in(&with_hook(8, "blocks.1.attn.hook_pattern"), &model);
    assert!(e.is_err());
}
