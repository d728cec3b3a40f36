//! Tokenizers: `tokenizer.json` for an HF folder; for a GGUF file, the tokenizer its metadata
//! describes (byte-level BPE with merges, or SentencePiece BPE from scores), so that the file alone
//! is enough; BOS handling per model; chat templates for ChatML (SmolLM2, Qwen) and Gemma.

use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{
    NFC, NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::weights::GgufMeta;

/// Qwen2's split regex (transformers `PRETOKENIZE_REGEX`, llama.cpp `qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split regex (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Who says a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Instructions for the whole conversation.
    System,
    /// The human.
    User,
    /// The model.
    Assistant,
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// Who says it.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// How a model's chat prompts are laid out (the Jinja templates these models ship, written out).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChatTemplate {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n` per message; `default_system` is inserted when
    /// the conversation does not start with a system message (SmolLM2, Qwen2.5).
    ChatMl {
        /// System prompt used when none is given.
        default_system: Option<String>,
    },
    /// `<bos><start_of_turn>{user|model}\n{content}<end_of_turn>\n`; a system message is prefixed
    /// to the first user turn (Gemma).
    Gemma,
}

impl ChatTemplate {
    /// Recognises the template of a `tokenizer.chat_template` / `chat_template` string.
    pub fn detect(jinja: &str) -> Option<Self> {
        if jinja.contains("<start_of_turn>") {
            return Some(ChatTemplate::Gemma);
        }
        if jinja.contains("<|im_start|>") {
            return Some(ChatTemplate::ChatMl {
                default_system: chatml_default_system(jinja),
            });
        }
        None
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ends where the assistant's
    /// reply should begin. The text contains the special tokens, so encode it without adding BOS.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if Gemma's turns do not alternate user/assistant.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut out = String::new();
        match self {
            ChatTemplate::ChatMl { default_system } => {
                if let Some(sys) = default_system
                    && messages.first().is_none_or(|m| m.role != Role::System)
                {
                    out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
                for m in messages {
                    let role = match m.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    out.push_str(&format!("<|im_start|>{role}\n{}<|im_end|>\n", m.content));
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
            ChatTemplate::Gemma => {
                out.push_str("<bos>");
                let (prefix, rest) = match messages.first() {
                    Some(m) if m.role == Role::System => {
                        (format!("{}\n\n", m.content), &messages[1..])
                    }
                    _ => (String::new(), messages),
                };
                for (i, m) in rest.iter().enumerate() {
                    let expected = if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    };
                    if m.role != expected {
                        return Err(Error::invalid(
                            "chat messages",
                            format!(
                                "Gemma's template needs turns alternating user/assistant; message {i} is {:?}",
                                m.role
                            ),
                        ));
                    }
                    let role = if m.role == Role::Assistant {
                        "model"
                    } else {
                        "user"
                    };
                    let p = if i == 0 { prefix.as_str() } else { "" };
                    out.push_str(&format!(
                        "<start_of_turn>{role}\n{p}{}<end_of_turn>\n",
                        m.content.trim()
                    ));
                }
                if add_generation_prompt {
                    out.push_str("<start_of_turn>model\n");
                }
            }
        }
        Ok(out)
    }

    /// A Jinja template equivalent to [`ChatTemplate::render`], for an HF `tokenizer_config.json`
    /// (HF's `apply_chat_template` gives the same text, and [`ChatTemplate::detect`] reads it back).
    pub fn jinja(&self) -> String {
        match self {
            ChatTemplate::ChatMl { default_system } => {
                let sys = default_system.as_deref().map_or(String::new(), |s| {
                    format!(
                        "{{% if messages[0]['role'] != 'system' %}}<|im_start|>system\n{s}<|im_end|>\n{{% endif %}}"
                    )
                });
                format!(
                    "{sys}{{% for message in messages %}}<|im_start|>{{{{ message['role'] }}}}\n{{{{ message['content'] }}}}<|im_end|>\n{{% endfor %}}{{% if add_generation_prompt %}}<|im_start|>assistant\n{{% endif %}}"
                )
            }
            ChatTemplate::Gemma => concat!(
                "{{ bos_token }}",
                "{% if messages[0]['role'] == 'system' %}",
                "{% set prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}",
                "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}",
                "{% for message in loop_messages %}",
                "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}",
                "<start_of_turn>{{ role }}\n{{ prefix if loop.first else '' }}{{ message['content'] | trim }}<end_of_turn>\n",
                "{% endfor %}",
                "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
            )
            .to_string(),
        }
    }

    /// The token text that ends an assistant turn.
    pub fn end_of_turn(&self) -> &'static str {
        match self {
            ChatTemplate::ChatMl { .. } => "<|im_end|>",
            ChatTemplate::Gemma => "<end_of_turn>",
        }
    }
}

/// The literal system prompt a ChatML template inserts when none is given.
fn chatml_default_system(jinja: &str) -> Option<String> {
    let marker = "<|im_start|>system";
    let mut rest = jinja;
    while let Some(i) = rest.find(marker) {
        rest = &rest[i + marker.len()..];
        let body = rest.strip_prefix("\\n").or_else(|| rest.strip_prefix('\n'));
        if let Some(body) = body
            && let Some(end) = body.find("<|im_end|>")
        {
            let text = &body[..end];
            if !text.is_empty() && !text.contains(['\'', '{', '}', '"']) {
                return Some(text.to_string());
            }
        }
    }
    None
}

/// A model's tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    chat: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("chat", &self.chat)
            .finish()
    }
}

fn tok_err(what: impl Into<String>) -> impl FnOnce(tokenizers::Error) -> Error {
    let what = what.into();
    move |e| Error::Tokenizer {
        what,
        reason: e.to_string(),
    }
}

/// The longest piece, in bytes, that [`sentencepiece_merges`] splits into merges.
const MAX_MERGED_PIECE: usize = 1024;

/// Adds a GGUF vocabulary's control tokens (type 3, e.g. `<|im_start|>`) as special tokens and
/// its user-defined ones (type 4) as plain added tokens: both are matched whole in text, as
/// llama.cpp and HF do.
fn add_gguf_tokens(
    inner: &mut tokenizers::Tokenizer,
    tokens: &[String],
    types: &[i64],
    what: &str,
) -> Result<()> {
    let of_type = |want: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, t)| **t == want)
            .map(|(tok, _)| AddedToken::from(tok.clone(), special))
            .collect()
    };
    inner
        .add_special_tokens(of_type(3, true))
        .map_err(tok_err(what))?;
    inner.add_tokens(of_type(4, false)).map_err(tok_err(what))?;
    Ok(())
}

/// The merges of a SentencePiece BPE vocabulary, as HF transformers derives them from scores:
/// each piece contributes every split into two vocabulary pieces (ordered by their ids), and the
/// merges are ranked by the piece's score, then the left part's length, then the right part's,
/// highest first (a stable sort, so equal keys keep vocabulary order). Pieces longer than
/// [`MAX_MERGED_PIECE`] bytes contribute no merges, which bounds the search (quadratic in a
/// piece's length) on a hostile file; Gemma-3's longest piece is 93 bytes.
fn sentencepiece_merges(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(u32, u32, f32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        if piece.len() > MAX_MERGED_PIECE {
            continue;
        }
        let start = merges.len();
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&l), Some(&r)) = (vocab.get(l), vocab.get(r)) {
                merges.push((l, r, score));
            }
        }
        merges[start..].sort_by_key(|&(l, r, _)| (l, r));
    }
    let len = |id: u32| tokens[id as usize].chars().count();
    merges.sort_by(|a, b| {
        (b.2, len(b.0), len(b.1))
            .partial_cmp(&(a.2, len(a.0), len(a.1)))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect()
}

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer with the model's BOS convention and chat template.
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        chat: Option<ChatTemplate>,
    ) -> Self {
        Self {
            inner,
            bos,
            eos,
            add_bos,
            chat,
        }
    }

    /// Loads a `tokenizer.json`. BOS/EOS are looked up by their usual spellings unless given;
    /// the chat template comes from a `tokenizer_config.json` beside it, if any.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the file cannot be read or parsed.
    pub fn from_file(
        path: &Path,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer {
                what: path.display().to_string(),
                reason: "file not found".into(),
            });
        }
        let inner = parse_tokenizer_json(path)?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = bos.or_else(|| find(&["<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>"]));
        let eos = eos.or_else(|| find(&["<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"]));
        let chat = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("chat_template")?
                    .as_str()
                    .and_then(ChatTemplate::detect)
            });
        Ok(Self::new(inner, bos, eos, add_bos, chat))
    }

    /// Builds the byte-level BPE a GGUF file describes (`tokenizer.ggml.model == "gpt2"`): its
    /// vocabulary, merges, control tokens and pre-tokenizer (`smollm`: digits one by one, then
    /// GPT-2's split; `qwen2`: Qwen2's regex and NFC; `llama-bpe`: Llama 3's regex).
    pub(crate) fn from_gguf(
        meta: &GgufMeta,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self> {
        let what = format!("{} (tokenizer.ggml.*)", meta.path.display());
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = meta
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(Error::metadata(
                    &meta.path,
                    "tokenizer.ggml.merges",
                    format!("merge `{m}` is not two tokens separated by a space"),
                )),
            })
            .collect::<Result<_>>()?;
        let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_default();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err(what.clone()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            Ok(PreTokenizerWrapper::Split(
                Split::new(
                    SplitPattern::Regex(re.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tok_err(what.clone()))?,
            ))
        };
        let pre = meta.opt_str("tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer = match pre {
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ])),
            "qwen2" | "deepseek-r1-qwen" => {
                inner
                    .with_normalizer(Some(NormalizerWrapper::NFC(NFC)))
                    .map_err(tok_err(what.clone()))?;
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    split(QWEN2_SPLIT)?,
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
                ]))
            }
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => {
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    split(LLAMA3_SPLIT)?,
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
                ]))
            }
            // GPT-2's own split.
            _ => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
        add_gguf_tokens(&mut inner, &tokens, &types, &what)?;
        let chat = meta
            .opt_str("tokenizer.chat_template")
            .and_then(ChatTemplate::detect);
        Ok(Self::new(inner, bos, eos, add_bos, chat))
    }

    /// Builds the SentencePiece BPE a GGUF file describes (`tokenizer.ggml.model == "llama"`,
    /// Gemma's and Llama 2's): no merges are stored, only each piece's score, so the merges are
    /// made the way HF transformers converts a SentencePiece model: every split of a piece into two
    /// pieces of the vocabulary is a merge ranked by the whole piece's score (then by the longer
    /// left and right part). llama.cpp writes -1000 as the score of user-defined pieces (type 4)
    /// where SentencePiece has 0, and their spaces as spaces where the vocabulary has `▁`; both
    /// are undone, which makes Gemma-3's merges equal HF's `tokenizer.json` entry for entry.
    pub(crate) fn from_gguf_sentencepiece(
        meta: &GgufMeta,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self> {
        let what = format!("{} (tokenizer.ggml.*)", meta.path.display());
        let mut tokens = meta.strings("tokenizer.ggml.tokens")?;
        let mut scores = meta.floats("tokenizer.ggml.scores")?;
        let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_default();
        if scores.len() != tokens.len() {
            return Err(Error::metadata(
                &meta.path,
                "tokenizer.ggml.scores",
                format!("{} scores for {} tokens", scores.len(), tokens.len()),
            ));
        }
        for ((tok, score), &ty) in tokens.iter_mut().zip(scores.iter_mut()).zip(types.iter()) {
            if ty == 4 {
                *tok = tok.replace(' ', "▁");
                *score = 0.0;
            }
        }
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = sentencepiece_merges(&tokens, &scores, &vocab);
        let unk = meta
            .opt_u32("tokenizer.ggml.unknown_token_id")?
            .and_then(|id| tokens.get(id as usize))
            .cloned()
            .unwrap_or_else(|| "<unk>".to_string());
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk)
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(tok_err(what.clone()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let replace =
            NormalizerWrapper::Replace(Replace::new(" ", "▁").map_err(tok_err(what.clone()))?);
        let mut decoders = vec![
            DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tok_err(what.clone()))?),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ];
        // Llama 2 puts `▁` before the text (and its decoder takes it off); Gemma does not.
        let normalizer = if meta.opt_bool("tokenizer.ggml.add_space_prefix") == Some(true) {
            decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
            NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
                NormalizerWrapper::Prepend(Prepend::new("▁".into())),
                replace,
            ]))
        } else {
            replace
        };
        inner
            .with_normalizer(Some(normalizer))
            .map_err(tok_err(what.clone()))?;
        inner.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
            decoders,
        ))));
        add_gguf_tokens(&mut inner, &tokens, &types, &what)?;
        // A GGUF converted from Gemma's HF folder carries no chat template; its turn markers
        // are control tokens of the vocabulary, which is how the Gemma template is known.
        let chat = meta
            .opt_str("tokenizer.chat_template")
            .and_then(ChatTemplate::detect)
            .or_else(|| {
                let has = |t: &str| inner.token_to_id(t).is_some();
                (has("<start_of_turn>") && has("<end_of_turn>")).then_some(ChatTemplate::Gemma)
            });
        Ok(Self::new(inner, bos, eos, add_bos, chat))
    }

    /// Token ids of `text`, with the model's BOS first if `add_bos`. Special-token text in
    /// `text` (`<|im_start|>`, `<start_of_turn>`) becomes the special token.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the tokenizer fails; [`Error::InvalidInput`] if `add_bos` but the
    /// model has no BOS token.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err("encode"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.push(
                self.bos
                    .ok_or_else(|| Error::invalid("add_bos", "this tokenizer has no BOS token"))?,
            );
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// `encode(text, self.adds_bos())`: the ids the model saw in training for a document.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, self.add_bos)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err("decode"))
    }

    /// The text of each id on its own (for rendering tokens one by one).
    pub fn decode_each(&self, ids: &[u32]) -> Result<Vec<String>> {
        ids.iter().map(|&id| self.decode(&[id])).collect()
    }

    /// The id of a token's text (vocabulary spelling, e.g. `Ġthe` for byte-level BPE).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary spelling of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model expects BOS before a document.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Sets the chat template (for a base model being made into a chat model).
    pub fn set_chat_template(&mut self, chat: Option<ChatTemplate>) {
        self.chat = chat;
    }

    /// The chat prompt text of `messages`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the model has no chat template or the turns do not fit it.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat
            .as_ref()
            .ok_or_else(|| Error::invalid("chat template", "this tokenizer has no chat template"))?
            .render(messages, add_generation_prompt)
    }

    /// Token ids of the chat prompt of `messages` (BOS comes from the template, if it has one).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(
            &self.apply_chat_template(messages, add_generation_prompt)?,
            false,
        )
    }

    /// Tokens that end generation: EOS and, with a chat template, its end-of-turn token.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.eos.into_iter().collect();
        if let Some(id) = self
            .chat
            .as_ref()
            .and_then(|c| self.token_to_id(c.end_of_turn()))
            && !out.contains(&id)
        {
            out.push(id);
        }
        out
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Reads a `tokenizer.json`. The `tokenizers` crate panics on some malformed files (a truncated
/// decoder section hits an `expect` inside its deserializer), so the JSON is checked first and
/// the crate's parse runs under `catch_unwind`: a bad file is an error naming it, never a crash.
fn parse_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // JSON is UTF-8, but serde_json skips the bytes of strings it ignores without checking them,
    // and `tokenizers` then panics on them deep in its decoder section: check the encoding first.
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::Tokenizer {
        what: what.clone(),
        reason: format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
    })?;
    // IgnoredAny checks the syntax without building a tree: a 30 MB file is not parsed twice
    // into memory.
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(Error::Tokenizer {
            what,
            reason: format!("not valid JSON: {e}"),
        });
    }
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes)) {
        Ok(parsed) => parsed.map_err(tok_err(what)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            Err(Error::Tokenizer {
                what,
                reason: format!("the tokenizers library could not read it ({msg})"),
            })
        }
    }
}
