//! Everything a user can pass in that is wrong gives an error naming it, never a panic.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use common::*;
use transformer_hooks::{Error, GenerateOptions, HookPoint, Hooks, Model, Sampling, assets};

fn load_err(path: &std::path::Path) -> Error {
    Model::load(path, &Device::Cpu).unwrap_err()
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    write_gguf(&tiny("llama"), &path, GgmlDType::F32, |meta, _| {
        meta[0].1 = Value::String("mamba".into());
    });
    let e = load_err(&path);
    assert!(
        matches!(e, Error::UnsupportedArchitecture { ref arch, .. } if arch == "mamba"),
        "{e}"
    );
    assert!(
        e.to_string().contains("mamba") && e.to_string().contains("llama, gemma3"),
        "{e}"
    );

    let dir = tmp.path().join("hf");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "mamba", "hidden_size": 8}"#,
    )
    .unwrap();
    std::fs::copy(
        tiny_dir("llama").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.to_string().contains("mamba"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    write_gguf(&tiny("llama"), &path, GgmlDType::F32, |_, tensors| {
        tensors.retain(|(n, _)| n != "blk.1.ffn_up.weight");
    });
    let e = load_err(&path);
    assert!(
        matches!(e, Error::MissingTensor { ref name, .. } if name == "blk.1.ffn_up.weight"),
        "{e}"
    );
    assert!(e.to_string().contains("m.gguf"), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    write_gguf(&tiny("qwen2"), &path, GgmlDType::F32, |_, tensors| {
        for (n, t) in tensors.iter_mut() {
            if n == "blk.2.attn_k.weight" {
                // A fresh tensor: candle's quantizer ignores a view's offset.
                let rows: Vec<f32> = t
                    .narrow(0, 0, 8)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                *t = Tensor::from_vec(rows, (8, 32), &Device::Cpu).unwrap();
            }
        }
    });
    let e = load_err(&path);
    match &e {
        Error::ShapeMismatch {
            what,
            expected,
            got,
        } => {
            assert!(what.contains("blk.2.attn_k.weight"), "{e}");
            assert_eq!(expected, &vec![16, 32]);
            assert_eq!(got, &vec![8, 32]);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
}

#[test]
fn truncated_or_foreign_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    write_gguf(&tiny("gemma3"), &path, GgmlDType::F32, |_, _| {});
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 100, bytes.len() / 2, 200, 10, 0] {
        let cut = tmp.path().join(format!("cut{keep}.gguf"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let e = load_err(&cut);
        assert!(
            matches!(e, Error::Gguf { .. } | Error::Metadata { .. }),
            "{keep}: {e}"
        );
        assert!(e.to_string().contains(&format!("cut{keep}.gguf")), "{e}");
    }
    // The last tensor is the one cut short: the error names it.
    let cut = tmp.path().join("short.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    assert!(
        load_err(&cut).to_string().contains("tensor `"),
        "{}",
        load_err(&cut)
    );
    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "not a model").unwrap();
    assert!(matches!(load_err(&text), Error::Gguf { .. }));
    assert!(matches!(
        load_err(&tmp.path().join("absent.gguf")),
        Error::Io { .. }
    ));

    // A truncated safetensors shard.
    let dir = tmp.path().join("hf");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        tiny_dir("gpt2").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let st = std::fs::read(tiny_dir("gpt2").join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, Error::Safetensors { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn bad_config_json_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        tiny_dir("llama").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(tiny_dir("llama").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, Error::Metadata { ref key, .. } if key == "num_hidden_layers"),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), "{not json").unwrap();
    assert!(matches!(load_err(&dir), Error::Metadata { .. }));
    v["num_hidden_layers"] = serde_json::json!(3);
    v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    assert!(load_err(&dir).to_string().contains("llama3"));
}

/// Sizes that would allocate without bound or divide by zero (10^12 layers, 0 heads) are
/// refused naming the key, for every family's HF config, before anything is allocated.
#[test]
fn absurd_sizes_in_a_config_are_named_not_allocated() {
    for (family, layers_key, heads_key) in [
        ("llama", "num_hidden_layers", "num_attention_heads"),
        ("gemma3", "num_hidden_layers", "num_attention_heads"),
        ("qwen2", "num_hidden_layers", "num_attention_heads"),
        ("gpt2", "n_layer", "n_head"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(family);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(
            tiny_dir(family).join("model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
        let cfg = std::fs::read_to_string(tiny_dir(family).join("config.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        for (key, value) in [(layers_key, 1_000_000_000_000u64), (heads_key, 0)] {
            let mut w = v.clone();
            w[key] = serde_json::json!(value);
            if family == "gemma3" {
                // Its explicit per-layer list would otherwise be checked first.
                w.as_object_mut().unwrap().remove("layer_types");
            }
            std::fs::write(dir.join("config.json"), w.to_string()).unwrap();
            let e = load_err(&dir);
            assert!(
                matches!(e, Error::Metadata { key: ref k, .. } if k == key),
                "{family} {key}={value}: {e}"
            );
        }
    }
}

/// The same absurd sizes in a GGUF's metadata: named, and nothing allocated from them.
#[test]
fn absurd_sizes_in_a_gguf_are_named_not_allocated() {
    for family in ["llama", "gemma3", "qwen2", "gpt2"] {
        for (key, value) in [("block_count", u32::MAX), ("attention.head_count", 0)] {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("m.gguf");
            write_gguf(&tiny(family), &path, GgmlDType::F32, |meta, _| {
                let k = format!("{family}.{key}");
                for (name, v) in meta.iter_mut() {
                    if *name == k {
                        *v = Value::U32(value);
                    }
                }
            });
            let e = load_err(&path);
            let full_key = format!("{family}.{key}");
            assert!(
                matches!(e, Error::Metadata { key: ref k, .. } if *k == full_key),
                "{family} {key}={value}: {e}"
            );
        }
    }
}

/// A tensor whose dims multiply past the address space (found by `fuzz/`'s `gguf` target: a
/// debug-build overflow panic inside candle, a wrapped size in release) is an error naming it.
#[test]
fn a_tensor_shape_that_overflows_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    write_gguf(&tiny("llama"), &path, GgmlDType::F32, |_, _| {});
    let mut bytes = std::fs::read(&path).unwrap();
    // The tensor table: name (u64 length + bytes), n_dims (u32), dims (u64 each), ...
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the file")
        + name.len();
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 2);
    bytes[at + 4..at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bytes[at + 12..at + 20].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(&path);
    assert!(
        matches!(e, Error::Gguf { .. }) && e.to_string().contains("token_embd.weight"),
        "{e}"
    );
}

/// A `tokenizer.json` cut short (inside its decoder section, where the `tokenizers` crate itself
/// panics) is an error naming the file.
#[test]
fn a_truncated_tokenizer_json_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(
        &path,
        r#"{"version":"1.0","added_tokens":[],"decoder":{"type":"ByteLevel","add_prefix_space":tr"#,
    )
    .unwrap();
    let e = transformer_hooks::Tokenizer::from_file(&path, None, None, false).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("tokenizer.json") && msg.contains("not valid JSON"),
        "{msg}"
    );
}

/// Valid JSON on which the `tokenizers` crate (0.23.2) itself panics: a byte-level BPE whose
/// vocabulary lost its multi-character entries, so the merge `a t` is longer than the buffer the
/// crate sizes from the longest entry (an out-of-range slice instead of its "merge token out of
/// vocabulary" error); found by `fuzz/`'s `tokenizer_json` target. The loader turns the panic
/// into an error naming the file.
#[test]
fn a_tokenizer_json_that_panics_inside_tokenizers_is_an_error() {
    for name in [
        "tokenizer_bpe_merge_panic.json",
        "tokenizer_bpe_merge_panic_2.json",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bad")
            .join(name);
        let e = transformer_hooks::Tokenizer::from_file(&path, None, None, false).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(name), "{msg}");
        println!("{msg}");
    }
}

/// A `tokenizer.json` with a byte that is not UTF-8 inside a key of its decoder section: serde
/// skips such strings unchecked, and `tokenizers` 0.23.2 then panics at `decoders/mod.rs:90`
/// (`expect("Helper")`). Found 24 times by `fuzz/`'s `tokenizer_json` target; the loader checks
/// the encoding first and names the offset.
#[test]
fn a_tokenizer_json_that_is_not_utf8_is_named_with_the_offset() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bad/tokenizer_not_utf8.json");
    let bytes = std::fs::read(&path).unwrap();
    let offset = std::str::from_utf8(&bytes).unwrap_err().valid_up_to();
    let e = transformer_hooks::Tokenizer::from_file(&path, None, None, false).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("tokenizer_not_utf8.json")
            && msg.contains(&format!("not UTF-8 (invalid byte at offset {offset})")),
        "{msg}"
    );
}

#[test]
fn hook_points_the_model_lacks_are_named() {
    let model = tiny("llama");
    let e = model.hook_point("blocks.99.mlp.hook_post").unwrap_err();
    assert!(matches!(e, Error::HookNotInModel { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("blocks.99.mlp.hook_post") && msg.contains("3 layers"),
        "{msg}"
    );
    let toks = some_tokens(1, 4, model.config().vocab_size);
    let e = model
        .run_with_cache(&toks, &[HookPoint::mlp_post(99)])
        .unwrap_err();
    assert!(e.to_string().contains("blocks.99.mlp.hook_post"), "{e}");
    assert!(model.hook_point("hook_pos_embed").is_err());
    assert!(
        tiny("gpt2")
            .hook_point("blocks.0.mlp.hook_pre_linear")
            .is_err()
    );
}

#[test]
fn bad_tokens_are_named() {
    let model = tiny("llama");
    let v = model.config().vocab_size as u32;
    let toks = Tensor::new(&[[1u32, 2, v, 3]], &Device::Cpu).unwrap();
    let e = model.forward(&toks, &mut Hooks::new()).unwrap_err();
    match e {
        Error::TokenOutOfRange {
            id,
            batch,
            position,
            vocab_size,
        } => {
            assert_eq!(
                (id, batch, position, vocab_size),
                (v as i64, 0, 2, v as usize)
            );
        }
        other => panic!("{other}"),
    }
    let neg = Tensor::new(&[[1i64, -4]], &Device::Cpu).unwrap();
    assert!(matches!(
        model.logprobs(&neg).unwrap_err(),
        Error::TokenOutOfRange { id: -4, .. }
    ));
    let flat = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&flat, &mut Hooks::new()).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    let floats = Tensor::new(&[[1f32, 2.]], &Device::Cpu).unwrap();
    assert!(model.forward(&floats, &mut Hooks::new()).is_err());
    let empty = Tensor::zeros((1, 0), DType::U32, &Device::Cpu).unwrap();
    assert!(model.forward(&empty, &mut Hooks::new()).is_err());
    let toks = some_tokens(2, 4, v as usize);
    let mask = Tensor::ones((2, 3), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        model
            .forward_masked(&toks, &mask, &mut Hooks::new())
            .unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    assert!(model.logprobs(&some_tokens(1, 1, v as usize)).is_err());
}

/// A sequence longer than the model's context is refused by every family (rotary ones would
/// otherwise extrapolate silently), naming the length and the context; at the context it runs.
#[test]
fn sequences_past_the_context_are_refused() {
    for family in ["llama", "qwen2", "gemma3", "gpt2"] {
        let model = tiny(family);
        let (n_ctx, v) = (model.config().n_ctx, model.config().vocab_size);
        assert!(
            model
                .forward(&some_tokens(1, n_ctx, v), &mut Hooks::new())
                .is_ok()
        );
        let long = some_tokens(1, n_ctx + 1, v);
        let e = model.forward(&long, &mut Hooks::new()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{} positions", n_ctx + 1)) && msg.contains(&n_ctx.to_string()),
            "{family}: {msg}"
        );
        assert!(model.logprobs(&long).is_err(), "{family}");
        assert!(
            model
                .run_with_cache(&long, &[HookPoint::mlp_post(0)])
                .is_err(),
            "{family}"
        );
    }
}

#[test]
fn bad_generation_options_are_errors() {
    let model = tiny("llama");
    let mut opts = GenerateOptions::sampled(3, 0.0, 1);
    assert!(
        model
            .generate(&[1, 2], &opts, &mut Hooks::new())
            .unwrap_err()
            .to_string()
            .contains("temperature")
    );
    opts.sampling = Sampling::Sample {
        temperature: 1.0,
        top_k: Some(0),
        top_p: None,
        seed: 0,
    };
    assert!(model.generate(&[1, 2], &opts, &mut Hooks::new()).is_err());
    opts.sampling = Sampling::Sample {
        temperature: 1.0,
        top_k: None,
        top_p: Some(1.5),
        seed: 0,
    };
    assert!(model.generate(&[1, 2], &opts, &mut Hooks::new()).is_err());
    assert!(
        model
            .generate(&[], &GenerateOptions::greedy(2), &mut Hooks::new())
            .is_err()
    );
    let mut stop = Hooks::new()
        .capture(HookPoint::resid_pre(0))
        .stop_at_deepest_capture();
    assert!(
        model
            .generate(&[1], &GenerateOptions::greedy(2), &mut stop)
            .is_err()
    );
}

#[test]
fn blocks_99_on_smollm2_names_the_hook_and_the_layer_count() {
    let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
        return;
    };
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let msg = model
        .hook_point("blocks.99.mlp.hook_post")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("blocks.99.mlp.hook_post") && msg.contains("30 layers"),
        "{msg}"
    );
    let ids = Tensor::new(&[[1u32, 49152]], &Device::Cpu).unwrap();
    let msg = model.logprobs(&ids).unwrap_err().to_string();
    assert!(msg.contains("49152") && msg.contains("position 1"), "{msg}");
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model = llama`) of 128 pieces for the tiny Gemma:
/// control tokens, `▁`, `a`, `b`, three merged pieces with their scores, byte pieces, padding.
fn sentencepiece_meta(meta: &mut Vec<(String, Value)>, scores_len: usize) {
    let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "b"]
        .map(String::from)
        .to_vec();
    let mut scores = vec![-1000.0f32, -1000.0, -1000.0, -1000.0, -10.0, -11.0, -12.0];
    let mut types = vec![3i32, 3, 3, 3, 1, 1, 1];
    for (piece, score) in [("▁a", -1.0), ("ab", -2.0), ("▁ab", -3.0)] {
        tokens.push(piece.into());
        scores.push(score);
        types.push(1);
    }
    for byte in 0..100u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        scores.push(0.0);
        types.push(6);
    }
    while tokens.len() < 128 {
        tokens.push(format!("<unused{}>", tokens.len()));
        scores.push(-1000.0);
        types.push(3);
    }
    scores.truncate(scores_len);
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    meta.extend([
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
    ]);
}

/// The merges come from the scores: `▁a` (score -1) merges before `ab` (-2), then `▁a` + `b`
/// makes `▁ab`; a character outside the vocabulary falls back to its bytes. Scores that do not
/// match the tokens are an error naming the key.
#[test]
fn a_sentencepiece_gguf_builds_its_tokenizer_and_mismatched_scores_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("spm.gguf");
    write_gguf(&tiny("gemma3"), &path, GgmlDType::F32, |meta, _| {
        sentencepiece_meta(meta, 128)
    });
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    // "ab ab" -> a b ▁ a b -> (▁a) -> (ab) -> (▁a b = ▁ab): [ab, ▁ab].
    assert_eq!(tok.encode("ab ab", false).unwrap(), vec![8, 9]);
    assert_eq!(tok.encode("ab ab", true).unwrap(), vec![2, 8, 9]);
    // "c" is not a piece: its byte 0x63 is.
    assert_eq!(tok.encode("c", false).unwrap(), vec![10 + 0x63]);
    assert_eq!(tok.decode(&[8, 9, 10 + 0x63]).unwrap(), "ab abc");

    let bad = tmp.path().join("bad.gguf");
    write_gguf(&tiny("gemma3"), &bad, GgmlDType::F32, |meta, _| {
        sentencepiece_meta(meta, 127)
    });
    let e = load_err(&bad).to_string();
    assert!(
        e.contains("tokenizer.ggml.scores") && e.contains("127 scores for 128 tokens"),
        "{e}"
    );
}
