//! Whether two models are a base/chat pair: the same network shape and vocabulary, so that an
//! SAE of one reads the other's activations and the two models' losses compare token for token.

use transformer_hooks::Model;

use crate::error::{Error, Result};

/// Checks that `chat` can be compared with `base`: same architecture, layer count, widths, heads
/// and vocabulary, and the same tokenizer where both have one (checked on the ids of a sample
/// of text and of the chat template's special tokens).
///
/// # Errors
/// [`Error::PairMismatch`] naming the first difference and both values.
pub fn check_pair(base: &Model, chat: &Model) -> Result<()> {
    let (a, b) = (base.config(), chat.config());
    let fields: [(&str, String, String); 7] = [
        ("architecture", a.arch.to_string(), b.arch.to_string()),
        (
            "layer count",
            a.n_layers.to_string(),
            b.n_layers.to_string(),
        ),
        ("d_model", a.d_model.to_string(), b.d_model.to_string()),
        ("d_mlp", a.d_mlp.to_string(), b.d_mlp.to_string()),
        (
            "attention heads (q/kv)",
            format!("{}/{}", a.n_heads, a.n_kv_heads),
            format!("{}/{}", b.n_heads, b.n_kv_heads),
        ),
        ("d_head", a.d_head.to_string(), b.d_head.to_string()),
        (
            "vocabulary size",
            a.vocab_size.to_string(),
            b.vocab_size.to_string(),
        ),
    ];
    for (what, x, y) in fields {
        if x != y {
            return Err(Error::PairMismatch {
                what: what.into(),
                base: x,
                chat: y,
            });
        }
    }
    if let (Ok(ta), Ok(tb)) = (base.tokenizer(), chat.tokenizer()) {
        let sample = "The quick brown fox, 1776: <start_of_turn>user\nWhat's \"ahimsa\"?<end_of_turn>\n\u{00e9}t\u{00e9} \u{4e2d}\u{6587}";
        let (ia, ib) = (ta.encode(sample, false)?, tb.encode(sample, false)?);
        if ia != ib {
            return Err(Error::PairMismatch {
                what: "tokenizer (ids of a sample text)".into(),
                base: format!("{ia:?}"),
                chat: format!("{ib:?}"),
            });
        }
    }
    Ok(())
}
