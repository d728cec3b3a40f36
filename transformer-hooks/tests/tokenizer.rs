//! Tokenizers and chat templates: exact prompt strings, special tokens kept whole, digits split
//! one by one for SmolLM2, decode(encode(text)) == text; real files skip when absent (token ids
//! against HF's tokenizer are in hf_parity.rs).

use transformer_hooks::{ChatMessage, ChatTemplate, Tokenizer, assets};

const SMOLLM_JINJA: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const QWEN_JINJA_PART: &str = "{%- else %}\n        {%- if messages[0]['role'] == 'system' %}\n            {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n        {%- else %}\n            {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}";

#[test]
fn chatml_renders_like_the_jinja_template() {
    let t = ChatTemplate::detect(SMOLLM_JINJA).unwrap();
    assert_eq!(
        t,
        ChatTemplate::ChatMl {
            default_system: Some(
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
            )
        }
    );
    let s = t
        .render(
            &[
                ChatMessage::user("Hi"),
                ChatMessage::assistant("Hello!"),
                ChatMessage::user("Bye"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let s = t
        .render(
            &[ChatMessage::system("Be terse."), ChatMessage::user("Hi")],
            false,
        )
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    let q = ChatTemplate::detect(QWEN_JINJA_PART).unwrap();
    assert_eq!(
        q,
        ChatTemplate::ChatMl {
            default_system: Some(
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".into()
            )
        }
    );
}

#[test]
fn gemma_renders_like_the_jinja_template() {
    let t = ChatTemplate::Gemma;
    let s = t
        .render(
            &[
                ChatMessage::system("Be terse."),
                ChatMessage::user(" Hi "),
                ChatMessage::assistant("Hello!"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        s,
        "<bos><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>model\n"
    );
    assert!(t.render(&[ChatMessage::assistant("first")], true).is_err());
}

#[test]
fn smollm2_tokenizer() {
    let Some(path) = assets::asset_or_skip(assets::SMOLLM2) else {
        return;
    };
    let tok = &Tokenizer::load(&path).unwrap();
    assert!(!tok.adds_bos());
    assert_eq!(tok.vocab_size(), 49152);
    for text in [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
        "Prices rose 12.5% in 1861 — “quite” naïve café ☕ 日本語 \t tabs\n\nnewlines  double  spaces",
        "<|im_start|>user\nHi<|im_end|>",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    // SmolLM2 splits digits one by one.
    let ids = tok.encode("1861", false).unwrap();
    assert_eq!(ids.len(), 4);
    // Control tokens stay whole.
    let ids = tok.encode("<|im_start|>user", false).unwrap();
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    assert_eq!(ids.len(), 2);
    assert_eq!(tok.encode("x", true).unwrap()[0], tok.bos_id().unwrap());
    // Its GGUF carries the ChatML template with SmolLM's default system prompt.
    let chat = tok.encode_chat(&[ChatMessage::user("Hi")], true).unwrap();
    assert!(
        tok.decode(&chat)
            .unwrap()
            .starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    );
    assert!(
        tok.stop_tokens()
            .contains(&tok.token_to_id("<|im_end|>").unwrap())
    );
}

#[test]
fn gemma3_tokenizer() {
    // Built from the GGUF's own SentencePiece vocabulary: no tokenizer.json is needed
    // (`tests/gguf_tokenizer.rs` compares it with HF's on the corpora).
    let Some(path) = assets::asset_or_skip(assets::GEMMA3) else {
        return;
    };
    let tok = &Tokenizer::load(&path).unwrap();
    assert!(tok.adds_bos());
    assert_eq!(tok.bos_id(), Some(2));
    let ids = tok.encode_document("Hello world").unwrap();
    assert_eq!(ids[0], 2);
    assert_eq!(tok.decode(&ids[1..]).unwrap(), "Hello world");
    assert_eq!(tok.chat_template(), Some(&ChatTemplate::Gemma));
    let chat = tok.encode_chat(&[ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(chat[0], 2);
    assert_eq!(chat[1], tok.token_to_id("<start_of_turn>").unwrap());
    assert!(
        tok.stop_tokens()
            .contains(&tok.token_to_id("<end_of_turn>").unwrap())
    );
}

#[test]
fn qwen2_tokenizer() {
    let Some(path) = assets::asset_or_skip(assets::QWEN2) else {
        return;
    };
    let tok = &Tokenizer::load(&path).unwrap();
    assert!(!tok.adds_bos());
    for text in [
        "def f(x):\n    return x ** 2  # square\n",
        "naïve 1861 日本語",
    ] {
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap()).unwrap(), text);
    }
    let chat = tok
        .apply_chat_template(&[ChatMessage::user("Hi")], true)
        .unwrap();
    assert!(
        chat.starts_with("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."),
        "{chat}"
    );
}
