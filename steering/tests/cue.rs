//! Cue adjustment's measurements on SmolLM2-135M (skipped when the asset is absent): the prompt
//! peak against the dense encoding, word effects against edited prompts measured directly, the
//! meaning score's zero, and fluency's direction.

use candle_core::Device;
mod common;

use common::random_topk;
use steering::cue::{
    edited, grammar_jump, meaning_score, prompt_peak, text_nll, token_nlls, word_effects, words,
};
use transformer_hooks::{ChatMessage, HookPoint, Model, assets};

#[test]
fn cue_measurements_agree_with_direct_figures() {
    let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
        return;
    };
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let hook = HookPoint::resid_post(5);
    let d_in = model.config().d_model;
    let sae = random_topk(d_in, 128, 8, 11);
    let tok = model.tokenizer().unwrap();
    let encode = |t: &str| -> steering::Result<Vec<u32>> {
        Ok(tok.encode_chat(&[ChatMessage::user(t)], true)?)
    };
    let text = "My grandfather worked at sea for years.";
    let tokens = encode(text).unwrap();

    // The feature that fires hardest anywhere past BOS, from the dense encoding.
    let cache = model
        .run_with_cache(&model.tokens(&tokens).unwrap(), &[hook])
        .unwrap();
    let x = cache.require(hook).unwrap().squeeze(0).unwrap();
    let dense: Vec<Vec<f32>> = sae.encode(&x).unwrap().to_vec2().unwrap();
    let (mut f, mut v, mut p) = (0, 0.0f32, 0);
    for (pos, row) in dense.iter().enumerate().skip(1) {
        for (j, &a) in row.iter().enumerate() {
            if a > v {
                (f, v, p) = (j, a, pos);
            }
        }
    }
    let (peak, at) = prompt_peak(&model, &sae, hook, &tokens, f).unwrap();
    assert!((peak - v).abs() <= 1e-4 * v.max(1.0), "{peak} vs {v}");
    assert_eq!(at, p);

    // Word effects are the peaks of the prompts with each word deleted.
    let ws = words(text);
    let eff = word_effects(&model, &sae, hook, &encode, text, f).unwrap();
    assert_eq!(eff.len(), ws.len());
    for i in [0, 3, ws.len() - 1] {
        let direct = prompt_peak(
            &model,
            &sae,
            hook,
            &encode(&edited(&ws, &[i], None)).unwrap(),
            f,
        )
        .unwrap()
        .0;
        assert!((eff[i] - direct).abs() < 1e-5);
    }

    // A prompt predicts its own answer exactly as well as itself; another predicts it worse.
    let answer = tok.encode(" He sailed on whaling ships.", false).unwrap();
    let same = meaning_score(&model, &tokens, &tokens, &answer).unwrap();
    assert!(same.abs() < 1e-6, "{same}");
    let other = encode("What is the capital of France?").unwrap();
    assert!(meaning_score(&model, &tokens, &other, &answer).unwrap() < 0.0);

    // Shuffled words read less naturally than the sentence.
    let shuffled = "years for sea worked at grandfather My.";
    assert!(text_nll(&model, shuffled).unwrap() > text_nll(&model, text).unwrap());

    assert!(prompt_peak(&model, &sae, hook, &tokens, 128).is_err());

    // Per-token NLLs are the mean of text_nll, over the text's tokens after the first.
    let (ids, nll) = token_nlls(&model, text).unwrap();
    let all = tok.encode(text, model.config().add_bos).unwrap();
    assert_eq!(ids, all[1..]);
    let mean = nll.iter().sum::<f64>() / nll.len() as f64;
    assert!((mean - text_nll(&model, text).unwrap()).abs() < 1e-9);

    // A hole in the grammar makes the word after it far less likely; a synonym does not, and the
    // default bar tells them apart.
    let jump = |edit: &str| {
        let (ei, en) = token_nlls(&model, edit).unwrap();
        grammar_jump((&ids, &nll), (&ei, &en), false)
    };
    let hole = jump("My grandfather worked at for years.");
    let synonym = jump("My grandfather worked at the ocean for years.");
    let bar = steering::cue::AdjustOptions::default().max_grammar_jump;
    assert!(
        hole > bar && synonym <= bar,
        "hole {hole}, synonym {synonym}, bar {bar}"
    );
    assert_eq!(jump(text), 0.0);
}
