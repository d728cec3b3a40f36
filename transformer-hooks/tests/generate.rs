//! Generation: greedy equals repeated argmax, sampling is reproducible from its seed, hooks act
//! at every step, stop tokens stop, the KV cache gives the recompute path's tokens (batched, padded,
//! with and without a clamp), streaming sees every token and stops when told; and a real chat model answers a chat-formatted question.

mod common;

use candle_core::{D, Device, Tensor};
use common::*;
use transformer_hooks::{
    BoxError, ChatMessage, GenerateOptions, HookPoint, Hooks, Intervention, Model, StopReason,
    assets,
};

#[test]
fn greedy_is_repeated_argmax() {
    let model = tiny("llama");
    let prompt = [3u32, 17, 42];
    let g = model
        .generate(&prompt, &GenerateOptions::greedy(6), &mut Hooks::new())
        .unwrap();
    assert_eq!(g.stop, StopReason::MaxTokens);
    let mut seq = prompt.to_vec();
    for _ in 0..6 {
        let logits = model
            .forward(&model.tokens(&seq).unwrap(), &mut Hooks::new())
            .unwrap()
            .logits
            .unwrap();
        let last = logits.squeeze(0).unwrap().get(seq.len() - 1).unwrap();
        seq.push(last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap());
    }
    assert_eq!(g.tokens, seq[prompt.len()..]);
}

#[test]
fn sampling_is_reproducible_from_its_seed() {
    let model = tiny("gemma3");
    let run = |seed| {
        model
            .generate(
                &[2, 5],
                &GenerateOptions::sampled(16, 1.0, seed),
                &mut Hooks::new(),
            )
            .unwrap()
            .tokens
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn hooks_act_at_every_step_on_every_position() {
    let model = tiny("llama");
    // Steer: add a large multiple of token 99's embedding to the final residual at every
    // position; with tied embeddings, greedy decoding then always picks 99.
    let target = 99u32;
    let dir = model.params()["embed.weight"].get(target as usize).unwrap();
    let mut lens = Vec::new();
    let steer = (dir * 50.0).unwrap();
    let mut hooks = Hooks::new().intervene(
        HookPoint::LnFinalNormalized,
        Intervention::map(|x| {
            lens.push(x.dim(1)?);
            Ok(x.broadcast_add(&steer)?)
        }),
    );
    let g = model
        .generate(
            &[1, 2, 3],
            &GenerateOptions::greedy(5).without_kv_cache(),
            &mut hooks,
        )
        .unwrap();
    drop(hooks);
    assert_eq!(g.tokens, vec![target; 5]);
    assert_eq!(
        lens,
        vec![3, 4, 5, 6, 7],
        "without the cache the intervention sees every position at every step"
    );
    // With the cache: the prompt once, then each new position once, at its own offset.
    let mut seen = Vec::new();
    let mut hooks = Hooks::new().intervene(
        HookPoint::LnFinalNormalized,
        Intervention::map_at(|x, offset| {
            seen.push((x.dim(1)?, offset));
            Ok(x.broadcast_add(&steer)?)
        }),
    );
    let g = model
        .generate(&[1, 2, 3], &GenerateOptions::greedy(5), &mut hooks)
        .unwrap();
    drop(hooks);
    assert_eq!(g.tokens, vec![target; 5]);
    assert_eq!(seen, vec![(3, 0), (1, 3), (1, 4), (1, 5), (1, 6)]);
}

/// A clamp of the residual stream along a fixed unit direction `d` to `value`, per position:
/// `x + (value - x·d) d`, the arithmetic of an SAE-feature clamp with the error term kept.
fn clamp_along(d: &Tensor, value: f64) -> impl FnMut(&Tensor) -> Result<Tensor, BoxError> + '_ {
    move |x: &Tensor| {
        let proj = x.broadcast_mul(d)?.sum_keepdim(D::Minus1)?;
        let delta = proj.affine(-1.0, value)?;
        Ok(x.broadcast_add(&delta.broadcast_mul(d)?)?)
    }
}

#[test]
fn kv_cache_gives_the_recompute_tokens() {
    // Prompts of different lengths (left padding), every family (Gemma 3's tiny config has a
    // sliding window of 4, so the windowed mask over cached keys is exercised), greedy and sampled,
    // with and without a clamp at a middle layer.
    let prompts = vec![vec![3u32, 17, 42, 5, 9], vec![7, 1], vec![11, 12, 13]];
    for key in ["llama", "gemma3", "qwen2", "gpt2"] {
        let model = tiny(key);
        let d_model = model.config().d_model;
        let dir: Vec<f32> = (0..d_model).map(|i| ((i * 7 % 5) as f32) - 2.0).collect();
        let dir = Tensor::new(dir.as_slice(), &Device::Cpu).unwrap();
        let norm = dir.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let dir = dir.broadcast_div(&norm).unwrap();
        for opts in [
            GenerateOptions::greedy(12),
            GenerateOptions::sampled(12, 1.0, 3),
        ] {
            for clamp in [None, Some(8.0)] {
                let run = |o: &GenerateOptions| {
                    let mut hooks = match clamp {
                        None => Hooks::new(),
                        Some(v) => Hooks::new().intervene(
                            HookPoint::resid_post(1),
                            Intervention::map(clamp_along(&dir, v)),
                        ),
                    };
                    model.generate_batch(&prompts, o, &mut hooks).unwrap()
                };
                let cached = run(&opts);
                let recomputed = run(&opts.clone().without_kv_cache());
                assert_eq!(cached, recomputed, "{key}, {opts:?}, clamp {clamp:?}");
                assert!(cached.iter().all(|g| g.tokens.len() == 12));
            }
        }
        // A batch of one is `generate`, and each row of a batch continues its own prompt as if
        // alone (greedy: the same tokens despite the padding).
        let batch = model
            .generate_batch(&prompts, &GenerateOptions::greedy(8), &mut Hooks::new())
            .unwrap();
        for (p, g) in prompts.iter().zip(&batch) {
            let alone = model
                .generate(p, &GenerateOptions::greedy(8), &mut Hooks::new())
                .unwrap();
            assert_eq!(&alone, g, "{key}: row {p:?}");
        }
    }
}

#[test]
fn kv_cache_logits_match_a_full_pass() {
    // Prefill 4 tokens, then 3 single steps: each step's logits equal the full pass's at that
    // position, for a padded batch.
    let model = tiny("gemma3");
    let seqs = [vec![5u32, 6, 7, 8, 9, 10, 11], vec![0, 0, 4, 3, 2, 1, 9]];
    let mask_rows = [vec![1u32; 7], vec![0, 0, 1, 1, 1, 1, 1]];
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    let all = Tensor::from_vec(flat, (2, 7), &Device::Cpu).unwrap();
    let mflat: Vec<u32> = mask_rows.iter().flatten().copied().collect();
    let mask = Tensor::from_vec(mflat, (2, 7), &Device::Cpu).unwrap();
    let full = model
        .forward_masked(&all, &mask, &mut Hooks::new())
        .unwrap()
        .logits
        .unwrap();
    let mut cache = model.kv_cache(2);
    let first = model
        .forward_cached(
            &all.narrow(1, 0, 4).unwrap(),
            Some(&mask.narrow(1, 0, 4).unwrap()),
            &mut cache,
            &mut Hooks::new(),
        )
        .unwrap();
    let at = |p: usize| full.narrow(1, p, 1).unwrap().squeeze(1).unwrap();
    assert!(max_abs(&first, &at(3)) < 1e-4);
    for p in 4..7 {
        let step = model
            .forward_cached(
                &all.narrow(1, p, 1).unwrap(),
                None,
                &mut cache,
                &mut Hooks::new(),
            )
            .unwrap();
        assert!(max_abs(&step, &at(p)) < 1e-4, "position {p}");
    }
    assert_eq!(cache.len(), 7);
    // A batch that does not match the cache is an error, not a panic.
    assert!(
        model
            .forward_cached(
                &all.narrow(0, 0, 1).unwrap(),
                None,
                &mut cache,
                &mut Hooks::new()
            )
            .is_err()
    );
}

/// A cloned cache goes its own way: the cache writes each step's keys in place, and neither a
/// clone's steps nor the original's may show up in the other. Each continuation gives the
/// logits of a full pass over its own sequence.
#[test]
fn a_cloned_kv_cache_is_independent_of_its_original() {
    let model = tiny("gemma3");
    let prompt = Tensor::from_vec(vec![5u32, 6, 7, 8], (1, 4), &Device::Cpu).unwrap();
    let mut original = model.kv_cache(1);
    model
        .forward_cached(&prompt, None, &mut original, &mut Hooks::new())
        .unwrap();
    let step = |cache: &mut transformer_hooks::KvCache, tok: u32| {
        let t = Tensor::from_vec(vec![tok], (1, 1), &Device::Cpu).unwrap();
        model
            .forward_cached(&t, None, cache, &mut Hooks::new())
            .unwrap()
    };
    // One step first, so that the buffers have room to spare when they are shared.
    step(&mut original, 8);
    let mut clone = original.clone();
    let full_last = |seq: Vec<u32>| {
        let n = seq.len();
        let t = Tensor::from_vec(seq, (1, n), &Device::Cpu).unwrap();
        let logits = model
            .forward(&t, &mut Hooks::new())
            .unwrap()
            .logits
            .unwrap();
        logits.narrow(1, n - 1, 1).unwrap().squeeze(1).unwrap()
    };
    // Interleaved, several steps each, past the first growth of the buffers.
    let (a, b) = ([9u32, 3, 11, 2, 4, 1], [1u32, 12, 0, 7, 7, 3]);
    let (mut seq_a, mut seq_b) = (vec![5u32, 6, 7, 8, 8], vec![5u32, 6, 7, 8, 8]);
    for (&ta, &tb) in a.iter().zip(&b) {
        let la = step(&mut original, ta);
        let lb = step(&mut clone, tb);
        seq_a.push(ta);
        seq_b.push(tb);
        assert!(
            max_abs(&la, &full_last(seq_a.clone())) < 1e-4,
            "original at {seq_a:?}"
        );
        assert!(
            max_abs(&lb, &full_last(seq_b.clone())) < 1e-4,
            "clone at {seq_b:?}"
        );
    }
}

/// Streaming hands over each token as `generate` would produce it, and stops when told to.
#[test]
fn streaming_sees_every_token_and_can_be_cancelled() {
    let model = tiny("llama");
    let prompt = [3u32, 17, 42];
    let opts = GenerateOptions::sampled(8, 0.9, 11);
    let whole = model.generate(&prompt, &opts, &mut Hooks::new()).unwrap();
    let mut seen = Vec::new();
    let streamed = model
        .generate_streaming(&prompt, &opts, &mut Hooks::new(), &mut |t| {
            seen.push(t);
            true
        })
        .unwrap();
    assert_eq!(streamed, whole);
    assert_eq!(seen, whole.tokens);

    let mut n = 0;
    let cut = model
        .generate_streaming(&prompt, &opts, &mut Hooks::new(), &mut |_| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(cut.stop, StopReason::Cancelled);
    assert_eq!(cut.tokens, whole.tokens[..3]);
}

#[test]
fn stop_tokens_stop() {
    let model = tiny("qwen2");
    let free = model
        .generate(&[4, 8], &GenerateOptions::greedy(5), &mut Hooks::new())
        .unwrap();
    let stop_on = free.tokens[2];
    let g = model
        .generate(
            &[4, 8],
            &GenerateOptions::greedy(5).stop_at([stop_on]),
            &mut Hooks::new(),
        )
        .unwrap();
    let first = free.tokens.iter().position(|&t| t == stop_on).unwrap();
    assert_eq!(g.tokens, free.tokens[..=first]);
    assert_eq!(g.stop, StopReason::StopToken(stop_on));
}

#[test]
fn smollm2_answers_a_chat_question() {
    let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
        return;
    };
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let prompt = tok
        .encode_chat(&[ChatMessage::user("What is the capital of France?")], true)
        .unwrap();
    let opts = GenerateOptions::greedy(12).stop_at(tok.stop_tokens());
    let g = model.generate(&prompt, &opts, &mut Hooks::new()).unwrap();
    let text = tok.decode(&g.tokens).unwrap();
    eprintln!("SmolLM2: {text:?}");
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn smollm2_kv_cache_gives_the_recompute_tokens() {
    // The real model, three chat prompts in one padded batch, greedy, with and without a clamp
    // of a residual direction at layer 15: the cache changes nothing.
    let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
        return;
    };
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Describe your ideal morning.",
        "Name a large animal that lives in the sea.",
    ]
    .iter()
    .map(|q| tok.encode_chat(&[ChatMessage::user(*q)], true).unwrap())
    .collect();
    let embed = &model.params()["embed.weight"];
    let dir = embed
        .get(tok.encode("whale", false).unwrap()[0] as usize)
        .unwrap();
    let norm = dir.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    let dir = dir.broadcast_div(&norm).unwrap();
    for clamp in [None, Some(30.0)] {
        let run = |o: &GenerateOptions| {
            let mut hooks = match clamp {
                None => Hooks::new(),
                Some(v) => Hooks::new().intervene(
                    HookPoint::resid_post(15),
                    Intervention::map(clamp_along(&dir, v)),
                ),
            };
            model.generate_batch(&prompts, o, &mut hooks).unwrap()
        };
        let opts = GenerateOptions::greedy(24);
        let cached = run(&opts);
        let recomputed = run(&opts.clone().without_kv_cache());
        for g in &cached {
            eprintln!("clamp {clamp:?}: {:?}", tok.decode(&g.tokens).unwrap());
        }
        assert_eq!(cached, recomputed, "clamp {clamp:?}");
    }
}
