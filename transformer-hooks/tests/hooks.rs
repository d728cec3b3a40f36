//! Hook semantics on tiny checkpoints: every point has its documented shape, the residual-stream
//! identities hold, stopping early gives the same activations, interventions change exactly what
//! they should, padding is invisible, and names round-trip.

mod common;

use candle_core::{D, Device, IndexOp, Tensor};
use common::*;
use proptest::prelude::*;
use transformer_hooks::{Error, HookPoint, Hooks, Intervention, Site};

fn expected_shape(
    model: &transformer_hooks::Model,
    h: HookPoint,
    b: usize,
    s: usize,
) -> Vec<usize> {
    let c = model.config();
    match h {
        HookPoint::Block(_, site) => match site {
            Site::Q | Site::RotQ | Site::Z => vec![b, s, c.n_heads, c.d_head],
            Site::K | Site::V | Site::RotK => vec![b, s, c.n_kv_heads, c.d_head],
            Site::AttnScores | Site::Pattern => vec![b, c.n_heads, s, s],
            Site::MlpPre | Site::MlpPreLinear | Site::MlpPost => vec![b, s, c.d_mlp],
            _ => vec![b, s, c.d_model],
        },
        _ => vec![b, s, c.d_model],
    }
}

#[test]
fn every_hook_point_has_its_documented_shape() {
    for key in ["gpt2", "llama", "qwen2", "gemma3"] {
        let model = tiny(key);
        let toks = some_tokens(2, 7, model.config().vocab_size);
        let all = model.hook_points();
        let mut hooks = Hooks::new().capture_all(all.clone());
        let out = model.forward(&toks, &mut hooks).unwrap();
        assert_eq!(out.cache.len(), all.len(), "{key}");
        for h in all {
            let t = out.cache.require(h).unwrap();
            assert_eq!(
                t.dims(),
                expected_shape(&model, h, 2, 7).as_slice(),
                "{key} {h}"
            );
            // `width` is the values per position: all dims after [batch, pos].
            let per_position = matches!(h, HookPoint::Block(_, Site::AttnScores | Site::Pattern));
            let want = (!per_position).then(|| t.dims()[2..].iter().product::<usize>());
            assert_eq!(h.width(model.config()), want, "{key} {h} width");
        }
        // Rotary and learned positions are exclusive; only gated MLPs have a linear branch.
        let gpt2 = key == "gpt2";
        assert_eq!(model.hook_point("hook_pos_embed").is_ok(), gpt2);
        assert_eq!(model.hook_point("blocks.0.attn.hook_rot_q").is_ok(), !gpt2);
        assert_eq!(
            model.hook_point("blocks.0.mlp.hook_pre_linear").is_ok(),
            !gpt2
        );
    }
}

#[test]
fn residual_stream_identities_hold() {
    for key in ["gpt2", "llama", "gemma3"] {
        let model = tiny(key);
        let n = model.config().n_layers;
        let toks = some_tokens(1, 6, model.config().vocab_size);
        let out = model
            .forward(&toks, &mut Hooks::new().capture_all(model.hook_points()))
            .unwrap();
        let c = |name: &str| out.cache.get_by_name(name).unwrap().clone();
        for l in 0..n {
            let mid = (c(&format!("blocks.{l}.hook_resid_pre"))
                + c(&format!("blocks.{l}.hook_attn_out")))
            .unwrap();
            assert!(
                max_abs(&mid, &c(&format!("blocks.{l}.hook_resid_mid"))) < 1e-5,
                "{key} {l} mid"
            );
            let post = (c(&format!("blocks.{l}.hook_resid_mid"))
                + c(&format!("blocks.{l}.hook_mlp_out")))
            .unwrap();
            assert!(
                max_abs(&post, &c(&format!("blocks.{l}.hook_resid_post"))) < 1e-5,
                "{key} {l} post"
            );
            if l + 1 < n {
                assert_eq!(
                    max_abs(
                        &c(&format!("blocks.{l}.hook_resid_post")),
                        &c(&format!("blocks.{}.hook_resid_pre", l + 1))
                    ),
                    0.0
                );
            }
            // The pattern is a causal distribution over keys.
            let p = c(&format!("blocks.{l}.attn.hook_pattern"));
            let sums = p.sum(D::Minus1).unwrap();
            assert!(max_abs(&sums, &sums.ones_like().unwrap()) < 1e-5);
            assert_eq!(
                p.i((0, 0, 0, 1)).unwrap().to_scalar::<f32>().unwrap(),
                0.0,
                "causal"
            );
        }
    }
}

#[test]
fn stopping_early_gives_the_same_activations_and_no_logits() {
    let model = tiny("llama");
    let toks = some_tokens(2, 5, model.config().vocab_size);
    let h = HookPoint::mlp_post(1);
    let full = model
        .forward(
            &toks,
            &mut Hooks::new().capture(h).capture(HookPoint::resid_pre(0)),
        )
        .unwrap();
    let early = model
        .forward(
            &toks,
            &mut Hooks::new()
                .capture(h)
                .capture(HookPoint::resid_pre(0))
                .stop_at_deepest_capture(),
        )
        .unwrap();
    assert!(full.logits.is_some());
    assert!(early.logits.is_none());
    assert_eq!(
        max_abs(
            full.cache.require(h).unwrap(),
            early.cache.require(h).unwrap()
        ),
        0.0
    );
    // Later layers were not run: an intervention there that would fail is never reached.
    let mut hooks = Hooks::new()
        .capture(h)
        .intervene(
            HookPoint::resid_post(2),
            Intervention::map(|_| Err("must not run".into())),
        )
        .stop_at_deepest_capture();
    assert!(model.forward(&toks, &mut hooks).is_ok());
    let cache = model.run_with_cache(&toks, &[h, HookPoint::Embed]).unwrap();
    assert_eq!(cache.len(), 2);
}

#[test]
fn interventions_change_what_they_should() {
    let model = tiny("gemma3");
    let toks = some_tokens(2, 6, model.config().vocab_size);
    let logits = |hooks: &mut Hooks| model.forward(&toks, hooks).unwrap().logits.unwrap();
    let clean = logits(&mut Hooks::new());
    let h = HookPoint::mlp_post(1);

    // Identity edits leave the logits alone.
    let captured = model
        .run_with_cache(&toks, &[h])
        .unwrap()
        .require(h)
        .unwrap()
        .clone();
    for iv in [
        Intervention::Scale(1.0),
        Intervention::Add(
            Tensor::zeros(model.config().d_mlp, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
        Intervention::Replace(captured.clone()),
        Intervention::map(|x| Ok(x.clone())),
    ] {
        let name = format!("{iv:?}");
        assert!(
            max_abs(&logits(&mut Hooks::new().intervene(h, iv)), &clean) < 1e-5,
            "{name}"
        );
    }
    // Zero at the neurons equals zero at the MLP output (no bias, and Gemma's post-norm of 0 is 0).
    let a = logits(&mut Hooks::new().intervene(h, Intervention::Zero));
    let b = logits(&mut Hooks::new().intervene(HookPoint::mlp_out(1), Intervention::Zero));
    assert!(max_abs(&a, &b) < 1e-5);
    assert!(
        max_abs(&a, &clean) > 1e-3,
        "zero-ablation must change the logits"
    );
    // Scale(0) is Zero; the capture records the edited value.
    let mut hooks = Hooks::new()
        .intervene(h, Intervention::Scale(0.0))
        .capture(h);
    let out = model.forward(&toks, &mut hooks).unwrap();
    assert!(max_abs(&out.logits.unwrap(), &a) < 1e-5);
    assert_eq!(
        out.cache
            .require(h)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // Interventions at one point compose in order: x*2 then +1 differs from +1 then *2.
    let one = Tensor::ones(model.config().d_mlp, candle_core::DType::F32, &Device::Cpu).unwrap();
    let ab = logits(
        &mut Hooks::new()
            .intervene(h, Intervention::Scale(2.0))
            .intervene(h, Intervention::Add(one.clone())),
    );
    let ba = logits(
        &mut Hooks::new()
            .intervene(h, Intervention::Add(one))
            .intervene(h, Intervention::Scale(2.0)),
    );
    assert!(max_abs(&ab, &ba) > 1e-4);
}

#[test]
fn a_per_position_edit_changes_only_that_position_and_later() {
    let model = tiny("llama");
    let toks = some_tokens(1, 8, model.config().vocab_size);
    let clean = model
        .forward(&toks, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let edit_at = 4;
    let mut calls = 0;
    let mut hooks = Hooks::new().intervene(
        HookPoint::resid_mid(0),
        Intervention::map(|x| {
            calls += 1;
            // Add 1.0 at one position only.
            let (b, s, d) = x.dims3()?;
            let mut m = vec![0f32; b * s * d];
            m[edit_at * d..(edit_at + 1) * d]
                .iter_mut()
                .for_each(|v| *v = 1.0);
            Ok((x + Tensor::from_vec(m, (b, s, d), x.device())?)?)
        }),
    );
    let edited = model.forward(&toks, &mut hooks).unwrap().logits.unwrap();
    drop(hooks);
    assert_eq!(calls, 1);
    for pos in 0..8 {
        let d = max_abs(&clean.i((.., pos)).unwrap(), &edited.i((.., pos)).unwrap());
        if pos < edit_at {
            assert!(d < 1e-6, "position {pos} before the edit changed by {d}");
        } else {
            assert!(d > 1e-4, "position {pos} after the edit unchanged");
        }
    }
}

#[test]
fn splicing_a_reconstruction_is_one_pass_with_a_closure() {
    // An "SAE" that is the identity reconstruction plus a known error: the spliced pass must equal
    // a pass with the error added directly.
    let model = tiny("qwen2");
    let toks = some_tokens(2, 5, model.config().vocab_size);
    let h = HookPoint::mlp_post(0);
    let err = Tensor::full(0.25f32, model.config().d_mlp, &Device::Cpu).unwrap();
    let e2 = err.clone();
    let spliced = model
        .forward(
            &toks,
            &mut Hooks::new().intervene(h, Intervention::map(move |x| Ok(x.broadcast_add(&e2)?))),
        )
        .unwrap()
        .logits
        .unwrap();
    let direct = model
        .forward(
            &toks,
            &mut Hooks::new().intervene(h, Intervention::Add(err)),
        )
        .unwrap()
        .logits
        .unwrap();
    assert!(max_abs(&spliced, &direct) < 1e-6);
}

#[test]
fn bad_interventions_are_errors_naming_the_hook() {
    let model = tiny("llama");
    let toks = some_tokens(1, 4, model.config().vocab_size);
    let h = HookPoint::mlp_post(0);
    let e = model
        .forward(
            &toks,
            &mut Hooks::new().intervene(h, Intervention::map(|x| Ok(x.narrow(2, 0, 3)?))),
        )
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("blocks.0.mlp.hook_post"), "{e}");
    let e = model
        .forward(
            &toks,
            &mut Hooks::new().intervene(h, Intervention::map(|_| Err("SAE exploded".into()))),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Intervention { .. }));
    assert!(
        e.to_string().contains("blocks.0.mlp.hook_post") && e.to_string().contains("SAE exploded"),
        "{e}"
    );
    let wrong = Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = model
        .forward(
            &toks,
            &mut Hooks::new().intervene(h, Intervention::Add(wrong)),
        )
        .unwrap_err();
    assert!(e.to_string().contains("blocks.0.mlp.hook_post"), "{e}");
}

#[test]
fn padding_is_invisible_on_either_side() {
    for key in ["llama", "gpt2", "gemma3"] {
        let model = tiny(key);
        let v = model.config().vocab_size as u32;
        let a: Vec<u32> = (0..9).map(|i| (i * 13 + 5) % v).collect();
        let b: Vec<u32> = (0..5).map(|i| (i * 7 + 3) % v).collect();
        let alone = |s: &[u32]| {
            model
                .forward(&model.tokens(s).unwrap(), &mut Hooks::new())
                .unwrap()
                .logits
                .unwrap()
        };
        let (la, lb) = (alone(&a), alone(&b));
        for left in [true, false] {
            let (toks, mask) = model.pad_batch(&[a.clone(), b.clone()], 0, left).unwrap();
            let out = model
                .forward_masked(&toks, &mask, &mut Hooks::new())
                .unwrap()
                .logits
                .unwrap();
            assert!(
                max_abs(&out.i(0).unwrap(), &la.i(0).unwrap()) < 1e-4,
                "{key} left={left} row 0"
            );
            let off = if left { 4 } else { 0 };
            let got = out.i(1).unwrap().narrow(0, off, 5).unwrap();
            let d = max_abs(&got, &lb.i(0).unwrap());
            assert!(d < 1e-4, "{key} left={left}: padded row differs by {d}");
        }
    }
}

#[test]
fn logprobs_are_the_log_softmax_at_the_next_token() {
    let model = tiny("gpt2");
    let toks = some_tokens(2, 6, model.config().vocab_size);
    let lp = model.logprobs(&toks).unwrap();
    assert_eq!(lp.dims(), &[2, 5]);
    let logits = model
        .forward(&toks, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let ids: Vec<Vec<u32>> = toks.to_vec2().unwrap();
    for (r, row) in ids.iter().enumerate() {
        for p in 0..5 {
            let want = lsm
                .i((r, p, row[p + 1] as usize))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let got = lp.i((r, p)).unwrap().to_scalar::<f32>().unwrap();
            assert!((want - got).abs() < 1e-5);
        }
    }
}

#[test]
fn hook_names_parse_print_and_reject_typos() {
    for name in [
        "hook_embed",
        "hook_pos_embed",
        "ln_final.hook_normalized",
        "blocks.0.hook_resid_pre",
        "blocks.12.ln1.hook_normalized",
        "blocks.3.attn.hook_q",
        "blocks.3.attn.hook_rot_k",
        "blocks.3.attn.hook_attn_scores",
        "blocks.3.attn.hook_pattern",
        "blocks.3.attn.hook_z",
        "blocks.15.mlp.hook_post",
        "blocks.15.mlp.hook_pre_linear",
        "blocks.29.hook_resid_post",
    ] {
        let h: HookPoint = name.parse().unwrap();
        assert_eq!(h.to_string(), name);
        assert_eq!(serde_json::to_string(&h).unwrap(), format!("\"{name}\""));
        assert_eq!(
            serde_json::from_str::<HookPoint>(&format!("\"{name}\"")).unwrap(),
            h
        );
    }
    for bad in [
        "blocks.15.mlp.hook_pots",
        "blocks.15.hook_mlp_post",
        "blocks.x.hook_resid_pre",
        "blocks.-1.hook_resid_pre",
        "blocks.01.hook_resid_pre",
        "blocks..hook_resid_pre",
        "block.1.hook_resid_pre",
        "hook_embed ",
        "blocks.1.attn.hook_scores",
        "",
    ] {
        let e = bad.parse::<HookPoint>().unwrap_err();
        assert!(matches!(e, Error::UnknownHookPoint { .. }), "{bad}");
        assert!(e.to_string().contains(bad), "{e}");
    }
    assert!(serde_json::from_str::<HookPoint>("\"blocks.1.mlp.hook_pots\"").is_err());
}

fn any_hook() -> impl Strategy<Value = HookPoint> {
    prop_oneof![
        Just(HookPoint::Embed),
        Just(HookPoint::PosEmbed),
        Just(HookPoint::LnFinalNormalized),
        (0usize..10_000, 0usize..Site::ALL.len())
            .prop_map(|(l, s)| HookPoint::Block(l, Site::ALL[s])),
    ]
}

proptest! {
    #[test]
    fn hook_point_round_trips(h in any_hook()) {
        let s = h.to_string();
        prop_assert_eq!(s.parse::<HookPoint>().unwrap(), h);
    }

    #[test]
    fn forward_order_is_execution_order(a in any_hook(), b in any_hook()) {
        // Greater means later in the pass: a block's points all come after earlier blocks'.
        if let (Some(la), Some(lb)) = (a.layer(), b.layer()) && la < lb {
            prop_assert!(a < b);
        }
        if a == HookPoint::Embed && b != HookPoint::Embed { prop_assert!(a < b); }
        if b == HookPoint::LnFinalNormalized && a != b { prop_assert!(a < b); }
    }
}
