//! Cue adjustment's measurements on SmolLM2-135M (skipped when the asset is absent): the prompt
//! peak against the dense encoding, word effects against edited prompts measured directly, the
//! meaning score's zero, and fluency's direction.

use candle_core::Device;
mod common;

use common::{random_topk, random_topk_offset};
use steering::cue::{
    edited, grammar_jump, meaning_score, prompt_peak, sense_similarity, text_nll, token_nlls,
    word_effects, words,
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

    // Per-token NLLs: the text's own tokens, the first included, and the token closing the
    // user's turn, each scored where it stands in the chat template; text_nll is their mean.
    let (ids, nll) = token_nlls(&model, text).unwrap();
    let plain = tok.encode(text, false).unwrap();
    let turn = tok.encode_chat(&[ChatMessage::user(text)], false).unwrap();
    let at = turn.windows(plain.len()).position(|w| w == plain).unwrap();
    assert_eq!(ids.len(), plain.len() + 1);
    assert_eq!(ids[..plain.len()], plain[..]);
    assert_eq!(ids[plain.len()], turn[at + plain.len()]);
    let lp: Vec<f32> = model
        .logprobs(&model.tokens(&turn).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (k, v) in nll.iter().enumerate() {
        assert!((v + f64::from(lp[at + k - 1])).abs() < 1e-6, "token {k}");
    }
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

    // The sense check: the cosine between the activations at "sea" and at "ocean", each less
    // b_dec and without its component along the feature's decoder row, computed here with
    // tensor ops at the positions the tokenizer gives the two words.
    // An SAE whose b_dec is not zero, so that the measurement's centring shows.
    let sae = random_topk_offset(d_in, 128, 8, 11, 0.5);
    let ocean = encode("My grandfather worked at ocean for years.").unwrap();
    let at = |toks: &[u32], word: &str| {
        let id = tok.encode(word, false).unwrap()[0];
        let pos = toks.iter().position(|&t| t == id).unwrap();
        let c = model
            .run_with_cache(&model.tokens(toks).unwrap(), &[hook])
            .unwrap();
        let x = c
            .require(hook)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(pos)
            .unwrap();
        let b = candle_core::Tensor::new(sae.b_dec().unwrap(), &Device::Cpu).unwrap();
        x.sub(&b).unwrap()
    };
    let d = candle_core::Tensor::new(sae.w_dec_row(f).unwrap(), &Device::Cpu).unwrap();
    let d = d
        .broadcast_div(&d.sqr().unwrap().sum_all().unwrap().sqrt().unwrap())
        .unwrap();
    let strip = |x: candle_core::Tensor| {
        let along = x.mul(&d).unwrap().sum_all().unwrap();
        x.sub(&d.broadcast_mul(&along).unwrap()).unwrap()
    };
    let (a, b) = (strip(at(&tokens, " sea")), strip(at(&ocean, " ocean")));
    let dot: f32 = a.mul(&b).unwrap().sum_all().unwrap().to_scalar().unwrap();
    let norm = |x: &candle_core::Tensor| -> f32 {
        let sq: f32 = x.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        sq.sqrt()
    };
    let direct = f64::from(dot / (norm(&a) * norm(&b)));
    let s = sense_similarity(&model, &sae, hook, &tokens, &ocean, f)
        .unwrap()
        .unwrap();
    assert!((s - direct).abs() < 1e-4, "{s} vs {direct}");
    assert!(s < 0.9999, "different words are not identical: {s}");
    // Symmetric; nothing to compare for a deletion or no edit; a feature past the dictionary
    // is refused.
    let back = sense_similarity(&model, &sae, hook, &ocean, &tokens, f)
        .unwrap()
        .unwrap();
    assert!((back - s).abs() < 1e-9);
    let deleted = encode("My grandfather worked at for years.").unwrap();
    assert_eq!(
        sense_similarity(&model, &sae, hook, &tokens, &deleted, f).unwrap(),
        None
    );
    assert_eq!(
        sense_similarity(&model, &sae, hook, &tokens, &tokens, f).unwrap(),
        None
    );
    assert!(sense_similarity(&model, &sae, hook, &tokens, &ocean, 128).is_err());
}
