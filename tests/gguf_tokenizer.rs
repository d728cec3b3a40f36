//! A GGUF alone is enough: Gemma-3's tokenizer built from the SentencePiece vocabulary and scores
//! in its GGUF must encode every document of the four corpora to the same ids as HF's
//! `tokenizer.json`, and decode them back to the text. Skips when Gemma-3, its tokenizer.json or
//! the corpora have not been fetched (`python3 scripts/fetch_assets.py gemma3 corpora`).

use sae_workbench::activation_store::{CorpusName, default_corpora_root, load_corpora};
use sae_workbench::transformer_hooks::{ChatMessage, ChatTemplate, Tokenizer, assets};

#[test]
fn gemma3_tokenizer_from_the_gguf_alone_matches_tokenizer_json_on_the_corpora() {
    let Some(gguf) = assets::asset_or_skip(assets::GEMMA3) else {
        return;
    };
    let Some(json) = assets::asset_or_skip(assets::GEMMA3_TOKENIZER) else {
        return;
    };
    let root = default_corpora_root();
    if !root.join("moby-dick/data.txt").exists() {
        eprintln!("skipping: corpora not fetched (python3 scripts/fetch_assets.py corpora)");
        return;
    }
    // A copy of the GGUF in a folder of its own, so that no tokenizer.json can be found beside
    // it; SAE_ASSETS is not consulted for a vocabulary the file describes.
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("gemma-3-270m.gguf");
    std::fs::hard_link(&gguf, &alone)
        .or_else(|_| std::fs::copy(&gguf, &alone).map(|_| ()))
        .unwrap();
    let ours = Tokenizer::load(&alone).unwrap();
    let theirs = Tokenizer::from_file(&json, None, None, true).unwrap();
    assert_eq!(ours.vocab_size(), 262_144);
    assert_eq!(ours.bos_id(), Some(2));
    assert!(ours.adds_bos());
    assert_eq!(ours.chat_template(), Some(&ChatTemplate::Gemma));

    let docs = load_corpora(&root, &CorpusName::ALL).unwrap();
    let mut tokens = 0usize;
    for doc in &docs {
        let a = ours.encode(&doc.text, false).unwrap();
        let b = theirs.encode(&doc.text, false).unwrap();
        if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!(
                "{}: ids part at token {at}: ours {:?}, tokenizer.json {:?} ({:?})",
                doc.id,
                &a[at..(at + 8).min(a.len())],
                &b[at..(at + 8).min(b.len())],
                theirs.decode(&b[at..(at + 8).min(b.len())]).unwrap()
            );
        }
        assert_eq!(a.len(), b.len(), "{}: lengths differ", doc.id);
        assert_eq!(ours.decode(&a).unwrap(), doc.text, "{}", doc.id);
        tokens += a.len();
    }
    eprintln!(
        "{} documents, {tokens} tokens: identical ids from the GGUF alone and from tokenizer.json",
        docs.len()
    );
    assert!(tokens > 1_000_000, "only {tokens} tokens compared");

    // Whitespace runs, control and user-defined tokens, bytes outside the vocabulary.
    for text in [
        "  two  spaces\t\ttabs\n\n\nlines     five",
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "naïve 日本語 🙂\u{1F9EC} <unused3> <mask> [multimodal]",
    ] {
        assert_eq!(
            ours.encode(text, true).unwrap(),
            theirs.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    let chat = ours
        .encode_chat(&[ChatMessage::user("Hello")], true)
        .unwrap();
    assert_eq!(chat[1], ours.token_to_id("<start_of_turn>").unwrap());
}
