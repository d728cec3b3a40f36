//! Spliced evaluation and the ablation study on the real SmolLM2-135M-Instruct, with SAEs whose
//! answers are known: a perfect reconstruction (loss recovered 1, KL 0), a zero decoder
//! (= zero-ablation, loss recovered 0), and cross-checks against transformer-hooks' own
//! log-probabilities and zero-ablation intervention. Skips when the model is not fetched.

use candle_core::{Device, Tensor};
use metrics::{
    HookedSplice, MeanActivation, MetricsError, SpliceTarget, SplicedConfig, ablate_feature,
    evaluate_spliced, token_batches,
};
use sae_core::StandardConfig;
use sae_core::{
    CommonConfig, DecoderNorm, Param, Params, SaeConfig, SaeModel, StandardSae, StandardTraining,
};
use transformer_hooks::{Hooks, Intervention, Model, assets};

const TEXT: &str = "Call me Ishmael. Some years ago, never mind how long precisely, having little or \
no money in my purse, and nothing particular to interest me on shore, I thought I would sail about a \
little and see the watery part of the world.";

fn load() -> Option<Model> {
    let path = assets::asset_or_skip(assets::SMOLLM2)?;
    Some(Model::load(&path, &Device::Cpu).expect("SmolLM2 loads"))
}

/// ±I dictionary (perfect reconstruction) or, with `zero_decoder`, the same encoder and a zero
/// decoder (reconstruction 0).
fn pm_identity_sae(d: usize, zero_decoder: bool, hook: &str) -> SaeModel {
    let mut w = vec![0.0; 2 * d * d];
    for j in 0..d {
        w[j * d + j] = 1.0;
        w[(d + j) * d + j] = -1.0;
    }
    let w_dec = if zero_decoder {
        vec![0.0; 2 * d * d]
    } else {
        w.clone()
    };
    let params = Params::new(vec![
        Param::new("W_enc", &[2 * d, d], true, w),
        Param::zeros("b_enc", &[2 * d], true),
        Param::new("W_dec", &[2 * d, d], true, w_dec),
        Param::zeros("b_dec", &[d], false),
    ]);
    let cfg = StandardTraining {
        decoder_norm: DecoderNorm::Free,
        ..StandardTraining::default()
    };
    let sae = StandardSae::from_params(d, 2 * d, cfg, params).unwrap();
    let mut common = CommonConfig::new(d, 2 * d);
    common.metadata.hook_name = Some(hook.to_string());
    SaeModel::from_parts(
        SaeConfig::Standard(StandardConfig { common }),
        Box::new(sae),
        None,
    )
}

fn batches(model: &Model) -> Vec<Tensor> {
    let tok = model.tokenizer().unwrap();
    let ids = tok.encode(TEXT, false).unwrap();
    let bos = tok.bos_id().or(model.config().bos_token_id);
    token_batches(&ids, bos, 24, 2, &Device::Cpu).unwrap()
}

#[test]
fn perfect_and_zero_saes_on_neurons_mlp_out_and_residual() {
    let Some(model) = load() else { return };
    let b = batches(&model);
    let d_mlp = model.config().d_mlp;
    let d_model = model.config().d_model;
    for (hook, d) in [
        ("blocks.15.mlp.hook_post", d_mlp),
        ("blocks.15.hook_mlp_out", d_model),
        ("blocks.15.hook_resid_post", d_model),
    ] {
        let mut target = HookedSplice::new(&model, hook).unwrap();
        assert_eq!(target.hook_width(), d);
        let cfg = SplicedConfig::default();
        let perfect = evaluate_spliced(
            &mut target,
            &pm_identity_sae(d, false, hook),
            &b,
            &cfg,
            None,
        )
        .unwrap();
        let s = &perfect.spliced;
        eprintln!("{hook}: {}", serde_json::to_string(s).unwrap());
        assert!((s.spliced - s.clean).abs() < 1e-4, "{hook}: {s:?}");
        assert!((s.loss_recovered_zero - 1.0).abs() < 1e-3, "{hook}: {s:?}");
        assert!(s.kl_clean_spliced < 1e-5, "{hook}: {s:?}");
        assert!(s.spliced_with_error_max_abs_diff < 1e-3, "{hook}: {s:?}");
        // One layer's zero-ablation may not raise the loss of a short text, but it must move the
        // distribution.
        assert!(
            s.kl_clean_zero_ablated > 0.01,
            "zero-ablating {hook} must change something: {s:?}"
        );
        assert!(perfect.reconstruction.fvu < 1e-10);

        let zero =
            evaluate_spliced(&mut target, &pm_identity_sae(d, true, hook), &b, &cfg, None).unwrap();
        let z = &zero.spliced;
        assert!((z.spliced - z.zero_ablated).abs() < 1e-5, "{hook}: {z:?}");
        assert!(z.loss_recovered_zero.abs() < 1e-3, "{hook}: {z:?}");
        assert!(
            (z.spliced_with_error - z.clean).abs() < 1e-4,
            "{hook}: {z:?}"
        );
        assert!((z.clean - s.clean).abs() < 1e-9);
        assert!((z.mean_ablated - s.mean_ablated).abs() < 1e-9);
    }
}

#[test]
fn clean_and_zero_ablated_match_transformer_hooks() {
    let Some(model) = load() else { return };
    let b = batches(&model);
    let hook = "blocks.15.mlp.hook_post";
    let mut target = HookedSplice::new(&model, hook).unwrap();
    let cfg = SplicedConfig {
        first_spliced_position: 0,
        ..SplicedConfig::default()
    };
    let sae = pm_identity_sae(model.config().d_mlp, true, hook);
    let s = evaluate_spliced(&mut target, &sae, &b, &cfg, None)
        .unwrap()
        .spliced;
    // The same quantities through transformer-hooks' own log-probabilities and Zero intervention.
    let (mut clean, mut zero, mut n) = (0.0f64, 0.0f64, 0usize);
    for t in &b {
        let lp = model.logprobs(t).unwrap();
        clean -= lp.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let mut hooks = Hooks::new().intervene(model.hook_point(hook).unwrap(), Intervention::Zero);
        let lz = model.logprobs_with_hooks(t, None, &mut hooks).unwrap();
        zero -= lz.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        n += lp.elem_count();
    }
    assert_eq!(s.n_tokens as usize, n);
    assert!(
        (s.clean - clean / n as f64).abs() < 1e-4,
        "{} vs {}",
        s.clean,
        clean / n as f64
    );
    assert!((s.zero_ablated - zero / n as f64).abs() < 1e-4);
    assert!((s.spliced - s.zero_ablated).abs() < 1e-5);
    // A plausible language model: well under ln(vocab) = 10.8 nats.
    assert!(s.clean > 1.0 && s.clean < 6.0, "{}", s.clean);
}

#[test]
fn bad_input_names_the_problem() {
    let Some(model) = load() else { return };
    let e = HookedSplice::new(&model, "blocks.40.mlp.hook_post")
        .err()
        .unwrap();
    assert!(e.to_string().contains("blocks.40.mlp.hook_post"), "{e}");
    let e = HookedSplice::new(&model, "blocks.3.mlp.hook_pots")
        .err()
        .unwrap();
    assert!(e.to_string().contains("hook_pots"), "{e}");
    let target = HookedSplice::new(&model, "blocks.15.mlp.hook_post").unwrap();
    let wrong = pm_identity_sae(model.config().d_model, false, "blocks.15.mlp.hook_post");
    let e = target.check_sae(&wrong).unwrap_err();
    assert!(
        matches!(
            e,
            MetricsError::SaeHookWidth {
                sae_d_in: 576,
                hook_width: 1536,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("blocks.15.mlp.hook_post"));
    let mut target = target;
    let e = evaluate_spliced(
        &mut target,
        &wrong,
        &batches(&model),
        &SplicedConfig::default(),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, MetricsError::SaeHookWidth { .. }), "{e}");
    let tok = model.tokenizer().unwrap();
    let e = token_batches(&tok.encode("", false).unwrap(), None, 24, 2, &Device::Cpu).unwrap_err();
    assert!(matches!(e, MetricsError::TextTooShort { .. }), "{e}");
    let cfg = SplicedConfig {
        mean: MeanActivation::Provided(vec![0.0; 3]),
        ..SplicedConfig::default()
    };
    let sae = pm_identity_sae(1536, false, "blocks.15.mlp.hook_post");
    assert!(evaluate_spliced(&mut target, &sae, &batches(&model), &cfg, None).is_err());
}

#[test]
fn ablating_a_neuron_feature_changes_later_tokens_only() {
    let Some(model) = load() else { return };
    let hook = "blocks.15.mlp.hook_post";
    let mut target = HookedSplice::new(&model, hook).unwrap();
    let d = model.config().d_mlp;
    let sae = pm_identity_sae(d, false, hook);
    let tok = model.tokenizer().unwrap();
    let bos = tok.bos_id().or(model.config().bos_token_id).unwrap();
    let mut ids = vec![bos];
    ids.extend(tok.encode(TEXT, false).unwrap());
    ids.truncate(20);
    // The neuron whose activation is largest at position 5: ablate its +e_j feature.
    let cache = model
        .run_with_cache(
            &model.tokens(&ids).unwrap(),
            &[model.hook_point(hook).unwrap()],
        )
        .unwrap();
    let acts = cache.get_by_name(hook).unwrap().squeeze(0).unwrap();
    let row = acts.get(5).unwrap().to_vec1::<f32>().unwrap();
    let (j, &a5) = row
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    let res = ablate_feature(&mut target, &sae, j, &[ids.clone()], 1, 1).unwrap();
    let r = &res[0];
    assert!((r.activations[5] - a5).abs() < 1e-4 * a5.abs().max(1.0));
    // Causality: ablating at positions >= 1 cannot change the prediction from position 0.
    assert!(r.logprob_delta[1].unwrap().abs() < 1e-5);
    let changed = r.logprob_delta[6..]
        .iter()
        .flatten()
        .any(|d| d.abs() > 1e-4);
    assert!(
        changed,
        "removing the largest neuron must move some later prediction"
    );
    // Logit effects through W_out and the unembedding exist and are sorted.
    let le = target.logit_effects(&sae, j, 5).unwrap();
    assert_eq!(le.raised.len(), 5);
    assert!(le.raised[0].1 >= le.raised[4].1);
    assert!(le.lowered[0].1 <= le.lowered[4].1);
    assert!(le.caveat.contains("W_out"));
}
