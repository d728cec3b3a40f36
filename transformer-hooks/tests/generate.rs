//! Generation: greedy equals repeated argmax, sampling is reproducible from its seed, hooks act
//! at every step, stop tokens stop; and a real chat model answers a chat-formatted question.

mod common;

use candle_core::{D, Device, Tensor};
use common::*;
use transformer_hooks::{
    ChatMessage, GenerateOptions, HookPoint, Hooks, Intervention, Model, StopReason, assets,
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
        .generate(&[1, 2, 3], &GenerateOptions::greedy(5), &mut hooks)
        .unwrap();
    drop(hooks);
    assert_eq!(g.tokens, vec![target; 5]);
    assert_eq!(
        lens,
        vec![3, 4, 5, 6, 7],
        "the intervention sees every position at every step"
    );
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
    let _ = Tensor::new(&[0u32], &Device::Cpu);
}
