//! The adapter from a `transformer-hooks` [`Model`] to [`ActivationSource`], and the tokenizer
//! pieces the windows need (encoder, BOS, special tokens).

use std::collections::HashMap;

use candle_core::Tensor;
use transformer_hooks::{HookPoint, Model};

use crate::error::{Error, Result};
use crate::harvest::{ActivationSource, ModelIdentity};

/// A real checkpoint as an activation source: one `run_with_cache` pass per batch, stopping after
/// the deepest hook asked for.
pub struct HookedModel {
    model: Model,
    parsed: HashMap<String, HookPoint>,
}

impl std::fmt::Debug for HookedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookedModel")
            .field("path", &self.model.path())
            .finish()
    }
}

impl HookedModel {
    pub fn new(model: Model) -> Self {
        HookedModel {
            model,
            parsed: HashMap::new(),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Parses and checks hook names against this model, so a typo fails before any work.
    ///
    /// # Errors
    /// [`Error::Model`] naming the hook (unknown name, or a layer the model does not have).
    pub fn check_hooks(&mut self, hooks: &[String]) -> Result<()> {
        for h in hooks {
            if !self.parsed.contains_key(h) {
                let p = self.model.hook_point(h)?;
                self.parsed.insert(h.clone(), p);
            }
        }
        Ok(())
    }

    /// Checks that windows of `context_len` tokens fit the model's context, so that a harvest
    /// asking for longer ones fails before reading the corpora rather than at the first pass.
    ///
    /// # Errors
    /// [`Error::Config`] naming both lengths.
    pub fn check_context(&self, context_len: usize) -> Result<()> {
        let n_ctx = self.model.config().n_ctx;
        if context_len > n_ctx {
            return Err(Error::Config {
                field: "context_len",
                message: format!(
                    "{context_len} tokens exceed the model's context of {n_ctx} tokens"
                ),
            });
        }
        Ok(())
    }

    /// The model file's sha256 and a tokenizer description, for the manifest.
    pub fn identity(&self) -> Result<ModelIdentity> {
        let tok = self.model.tokenizer()?;
        let origin = self
            .model
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ModelIdentity::from_file(
            self.model.path(),
            format!(
                "{origin} tokenizer (vocab {}, bos {:?})",
                tok.vocab_size(),
                tok.bos_id()
            ),
        )
    }

    /// The token that starts every window: the model's BOS.
    ///
    /// # Errors
    /// [`Error::Config`] when the tokenizer has none.
    pub fn bos(&self) -> Result<u32> {
        self.model
            .tokenizer()?
            .bos_id()
            .or(self.model.config().bos_token_id)
            .ok_or_else(|| Error::Config {
                field: "bos",
                message: format!("{} has no BOS token", self.model.path().display()),
            })
    }

    /// Ids of the tokenizer's special tokens (`<|im_start|>`, `<eos>`, ...): their rows are
    /// excluded by default, since they carry formatting, not text.
    pub fn special_token_ids(&self) -> Result<Vec<u32>> {
        let tok = self.model.tokenizer()?;
        let mut ids: Vec<u32> = tok
            .inner()
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Text to token ids, without BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.model.tokenizer()?.encode(text, false)?)
    }
}

impl ActivationSource for HookedModel {
    fn forward(&mut self, tokens: &Tensor, hooks: &[String]) -> Result<Vec<Tensor>> {
        self.check_hooks(hooks)?;
        let points: Vec<HookPoint> = hooks.iter().map(|h| self.parsed[h]).collect();
        let cache = self.model.run_with_cache(tokens, &points)?;
        points
            .iter()
            .map(|&p| Ok(cache.require(p)?.clone()))
            .collect()
    }
}
