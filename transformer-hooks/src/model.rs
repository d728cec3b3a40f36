//! [`Model`]: a loaded checkpoint with its tokenizer, and the calls that run it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::assets;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::families;
use crate::generate::{GenerateOptions, Generation, Sampler, StopReason};
use crate::hook_point::HookPoint;
use crate::hooks::{ActivationCache, HookRun, Hooks};
use crate::layers::{LayerKv, Positions, Transformer};
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::weights::{Checkpoint, Format, HfConfig, Weights};

/// How to load a checkpoint.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Dtype of the weights and activations. `F32` (default) is what the parity tests check;
    /// `BF16`/`F16` halve memory where the device runs them.
    pub dtype: DType,
    /// A `tokenizer.json` to use instead of the one found beside the model or built from it.
    pub tokenizer: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            tokenizer: None,
        }
    }
}

impl LoadOptions {
    /// Load in `dtype`.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Use this `tokenizer.json`.
    pub fn with_tokenizer(mut self, path: impl Into<PathBuf>) -> Self {
        self.tokenizer = Some(path.into());
        self
    }
}

/// What one forward pass returns.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Output {
    /// `[batch, seq, vocab]` logits at every position; `None` when the pass stopped early.
    pub logits: Option<Tensor>,
    /// The captured activations.
    pub cache: ActivationCache,
}

/// The keys and values of every layer for the positions run so far, so that generation runs one
/// new position per step instead of the whole sequence. Made by [`Model::kv_cache`], filled by
/// [`Model::forward_cached`]. Holds a batch of sequences in the padded layout: every row has the
/// same number of positions, some of which may be padding that is never attended to.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// `[batch][positions]`: whether each cached position is a real token.
    real: Vec<Vec<bool>>,
    /// Per row, the number of real tokens cached: the rotary position of its next real token.
    next: Vec<u32>,
}

impl KvCache {
    /// Rows (sequences).
    pub fn batch(&self) -> usize {
        self.real.len()
    }

    /// Positions cached per row (padding included).
    pub fn len(&self) -> usize {
        self.real.first().map_or(0, Vec::len)
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LogitsFor {
    All,
    Last,
}

/// A transformer with its tokenizer, ready to run with hooks.
pub struct Model {
    cfg: ModelConfig,
    params: Weights,
    net: Transformer,
    tokenizer: Option<Tokenizer>,
    /// Why there is no tokenizer, to say so when one is asked for.
    no_tokenizer: String,
    device: Device,
    dtype: DType,
    path: PathBuf,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("config", &self.cfg)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("tokenizer", &self.tokenizer)
            .finish()
    }
}

/// `config.json` of a model saved by [`Model::save`].
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedConfig {
    format: String,
    config: ModelConfig,
    chat_template: Option<ChatTemplate>,
}

const SAVED_FORMAT: &str = "transformer-hooks";

/// The tokenizer of a GGUF model, built from its own metadata: the byte-level BPE (`gpt2`:
/// SmolLM2, Qwen2) or the SentencePiece BPE (`llama`: Gemma, Llama 2) it describes. For any other
/// kind, a `tokenizer.json` beside it or in the assets folder; else why not.
fn gguf_tokenizer(
    path: &Path,
    meta: &crate::weights::GgufMeta,
    cfg: &ModelConfig,
) -> Result<(Option<Tokenizer>, String)> {
    let (bos, eos, add_bos) = (cfg.bos_token_id, cfg.eos_token_id, cfg.add_bos);
    match meta.opt_str("tokenizer.ggml.model") {
        Some("gpt2") => {
            return Ok((
                Some(Tokenizer::from_gguf(meta, bos, eos, add_bos)?),
                String::new(),
            ));
        }
        Some("llama") if meta.map.contains_key("tokenizer.ggml.scores") => {
            return Ok((
                Some(Tokenizer::from_gguf_sentencepiece(meta, bos, eos, add_bos)?),
                String::new(),
            ));
        }
        _ => {}
    }
    let arch = cfg.arch.as_str();
    let dir = path.parent().unwrap_or(Path::new("."));
    let candidates = [
        dir.join("tokenizer.json"),
        dir.join("..")
            .join("tokenizers")
            .join(arch)
            .join("tokenizer.json"),
        assets::assets_dir()
            .join("tokenizers")
            .join(arch)
            .join("tokenizer.json"),
    ];
    match candidates.iter().find(|p| p.exists()) {
        Some(p) => Ok((
            Some(Tokenizer::from_file(p, bos, eos, add_bos)?),
            String::new(),
        )),
        None => Ok((
            None,
            format!(
                "{} stores a `{}` vocabulary, which is not built from the file; put its tokenizer.json at one of {:?} or pass LoadOptions::with_tokenizer",
                path.display(),
                meta.opt_str("tokenizer.ggml.model")
                    .unwrap_or("(no tokenizer.ggml.model)"),
                candidates
            ),
        )),
    }
}

impl Tokenizer {
    /// The tokenizer [`Model::load`] would attach to the model at `path` (GGUF file or HF
    /// folder), without reading any weights: cheap enough to tokenize a corpus before loading.
    ///
    /// # Errors
    /// As [`Model::load`] for the metadata; [`Error::Tokenizer`] when the model has none.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let (tok, why) = if meta.is_dir() {
            let hf = HfConfig::read(&path.join("config.json"))?;
            let cfg = if hf.opt_str("format") == Some(SAVED_FORMAT) {
                let saved: SavedConfig = serde_json::from_value(hf.json.clone())
                    .map_err(|e| Error::metadata(&hf.path, "config", e.to_string()))?;
                saved.config
            } else {
                let (arch, _) = families::hf_architecture(&hf)?;
                let ckpt =
                    Checkpoint::open_safetensors(path, arch.to_string(), &Device::Cpu, DType::F32)?;
                families::config_from_hf(arch, &hf, &ckpt)?
            };
            let p = path.join("tokenizer.json");
            if p.exists() {
                (
                    Some(Tokenizer::from_file(
                        &p,
                        cfg.bos_token_id,
                        cfg.eos_token_id,
                        cfg.add_bos,
                    )?),
                    String::new(),
                )
            } else {
                (None, format!("{} has no tokenizer.json", path.display()))
            }
        } else {
            let (ckpt, meta) = Checkpoint::open_gguf(path, &Device::Cpu, DType::F32)?;
            let cfg = families::config_from_gguf(&meta, &ckpt)?;
            gguf_tokenizer(path, &meta, &cfg)?
        };
        tok.ok_or(Error::Tokenizer {
            what: path.display().to_string(),
            reason: why,
        })
    }
}

impl Model {
    /// Loads a GGUF file, an HF folder (`config.json` + `*.safetensors`, sharded or not), or a
    /// folder written by [`Model::save`], in f32.
    ///
    /// # Errors
    /// The file is missing or unreadable, its architecture is unsupported, a tensor is missing or
    /// has the wrong shape, or a GGUF file is truncated: each an [`Error`] naming the thing.
    pub fn load(path: &Path, device: &Device) -> Result<Model> {
        Self::load_with(path, device, &LoadOptions::default())
    }

    /// [`Model::load`] with options (dtype, tokenizer file).
    pub fn load_with(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Model> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let dir_of_file = path
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "json");
        let mut model = if meta.is_dir() || dir_of_file {
            let dir = if meta.is_dir() {
                path
            } else {
                path.parent().unwrap_or(Path::new("."))
            };
            Self::load_dir(dir, device, opts.dtype)?
        } else {
            Self::load_gguf(path, device, opts.dtype)?
        };
        if let Some(t) = &opts.tokenizer {
            let tok = Tokenizer::from_file(
                t,
                model.cfg.bos_token_id,
                model.cfg.eos_token_id,
                model.cfg.add_bos,
            )?;
            model.tokenizer = Some(tok);
        }
        Ok(model)
    }

    fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<Model> {
        let (mut ckpt, meta) = Checkpoint::open_gguf(path, device, dtype)?;
        let cfg = families::config_from_gguf(&meta, &ckpt)?;
        let params = families::load_params(&cfg, &mut ckpt, Format::Gguf)?;
        let (tokenizer, why) = gguf_tokenizer(path, &meta, &cfg)?;
        Self::assemble(cfg, params, tokenizer, why, device, dtype, path)
    }

    fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Model> {
        let config_path = dir.join("config.json");
        let hf = HfConfig::read(&config_path)?;
        if hf.opt_str("format") == Some(SAVED_FORMAT) {
            return Self::load_saved(dir, hf, device, dtype);
        }
        let (arch, _) = families::hf_architecture(&hf)?;
        let mut ckpt = Checkpoint::open_safetensors(dir, arch.to_string(), device, dtype)?;
        let cfg = families::config_from_hf(arch, &hf, &ckpt)?;
        let params = families::load_params(&cfg, &mut ckpt, Format::Hf)?;
        let tok_path = dir.join("tokenizer.json");
        let (tokenizer, why) = if tok_path.exists() {
            (
                Some(Tokenizer::from_file(
                    &tok_path,
                    cfg.bos_token_id,
                    cfg.eos_token_id,
                    cfg.add_bos,
                )?),
                String::new(),
            )
        } else {
            (None, format!("{} has no tokenizer.json", dir.display()))
        };
        Self::assemble(cfg, params, tokenizer, why, device, dtype, dir)
    }

    fn load_saved(dir: &Path, hf: HfConfig, device: &Device, dtype: DType) -> Result<Model> {
        let saved: SavedConfig = serde_json::from_value(hf.json.clone())
            .map_err(|e| Error::metadata(&hf.path, "config", e.to_string()))?;
        saved.config.validate()?;
        let cfg = saved.config;
        let mut ckpt = Checkpoint::open_safetensors(dir, cfg.arch.to_string(), device, dtype)?;
        let mut params = Weights::new();
        for name in ckpt.names() {
            let t = ckpt.load_shaped(&name, &families::expected_shape(&cfg, &name))?;
            params.insert(name, t);
        }
        let tok_path = dir.join("tokenizer.json");
        let (tokenizer, why) = if tok_path.exists() {
            let mut t =
                Tokenizer::from_file(&tok_path, cfg.bos_token_id, cfg.eos_token_id, cfg.add_bos)?;
            t.set_chat_template(saved.chat_template);
            (Some(t), String::new())
        } else {
            (None, format!("{} has no tokenizer.json", dir.display()))
        };
        Self::assemble(cfg, params, tokenizer, why, device, dtype, dir)
    }

    fn assemble(
        cfg: ModelConfig,
        params: Weights,
        tokenizer: Option<Tokenizer>,
        no_tokenizer: String,
        device: &Device,
        dtype: DType,
        path: &Path,
    ) -> Result<Model> {
        let net = Transformer::new(&cfg, &params)?;
        // candle queues a CUDA device's work on the calling thread's own stream (CUDA's
        // per-thread default stream), which another thread's stream does not wait for: the
        // weights' copies end here, so that a model loaded on one thread can run on others (a
        // server's worker threads).
        device.synchronize()?;
        Ok(Model {
            cfg,
            params,
            net,
            tokenizer,
            no_tokenizer,
            device: device.clone(),
            dtype,
            path: path.to_path_buf(),
        })
    }

    /// A model from a config and canonical parameters (see [`Model::params`] for the names),
    /// e.g. random weights for a test or weights trained elsewhere. Every tensor's shape is checked.
    pub fn from_params(
        cfg: ModelConfig,
        params: Weights,
        tokenizer: Option<Tokenizer>,
    ) -> Result<Model> {
        cfg.validate()?;
        let first = params
            .values()
            .next()
            .ok_or_else(|| Error::invalid("params", "empty"))?;
        let (device, dtype) = (first.device().clone(), first.dtype());
        for (name, t) in &params {
            let expected = families::expected_shape(&cfg, name);
            if t.dims() != expected.as_slice() {
                return Err(Error::ShapeMismatch {
                    what: format!("parameter `{name}`"),
                    expected,
                    got: t.dims().to_vec(),
                });
            }
        }
        Self::assemble(
            cfg,
            params,
            tokenizer,
            "built from parameters without one".into(),
            &device,
            dtype,
            Path::new("<params>"),
        )
    }

    /// Writes the model (canonical safetensors, config and tokenizer) to `dir`, loadable by
    /// [`Model::load`]; for a fine-tuned model, whose weights no longer match any GGUF file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg = SavedConfig {
            format: SAVED_FORMAT.into(),
            config: self.cfg.clone(),
            chat_template: self
                .tokenizer
                .as_ref()
                .and_then(|t| t.chat_template().cloned()),
        };
        let json = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::invalid("config", e.to_string()))?;
        let tmp = dir.join("config.json.tmp");
        std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, dir.join("config.json")).map_err(|e| Error::io(dir, e))?;
        let st_tmp = dir.join("model.safetensors.tmp");
        let tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.detach().contiguous()?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&tensors.into_iter().collect(), &st_tmp)?;
        std::fs::rename(&st_tmp, dir.join("model.safetensors")).map_err(|e| Error::io(dir, e))?;
        if let Some(t) = &self.tokenizer {
            let p = dir.join("tokenizer.json");
            t.inner().save(&p, false).map_err(|e| Error::Tokenizer {
                what: p.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Writes the model as an HF transformers folder (`config.json`, `model.safetensors` in f32,
    /// `generation_config.json`, and the tokenizer with its chat template), so that
    /// `AutoModelForCausalLM.from_pretrained(dir)` loads it and [`Model::load`] reads it back.
    /// This is how a model fine-tuned here leaves the workspace. Each file is written under a
    /// temporary name and renamed.
    ///
    /// # Errors
    /// A family other than Gemma 3 (the one fine-tuned here so far), or a file that cannot be
    /// written.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        if self.cfg.arch != crate::config::Architecture::Gemma3 {
            return Err(Error::invalid(
                "save_hf",
                format!(
                    "writing an HF folder is implemented for gemma3, not {}",
                    self.cfg.arch
                ),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let write = |name: &str, bytes: &[u8]| -> Result<()> {
            let tmp = dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, dir.join(name)).map_err(|e| Error::io(dir, e))
        };
        let json = |v: &serde_json::Value| {
            serde_json::to_vec_pretty(v).map_err(|e| Error::invalid("config", e.to_string()))
        };
        let tensors: Vec<(String, Tensor)> = families::gemma3::hf_tensors(&self.cfg, &self.params)?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let st_tmp = dir.join("model.safetensors.tmp");
        candle_core::safetensors::save(&tensors.into_iter().collect(), &st_tmp)?;
        std::fs::rename(&st_tmp, dir.join("model.safetensors")).map_err(|e| Error::io(dir, e))?;
        write(
            "config.json",
            &json(&families::gemma3::hf_config(&self.cfg))?,
        )?;
        let stop = match &self.tokenizer {
            Some(t) => t.stop_tokens(),
            None => self.cfg.eos_token_id.into_iter().collect(),
        };
        write(
            "generation_config.json",
            &json(&serde_json::json!({
                "bos_token_id": self.cfg.bos_token_id,
                "eos_token_id": stop,
                "pad_token_id": self.cfg.pad_token_id,
            }))?,
        )?;
        // Without a tokenizer the folder still loads as a model (weights and config).
        let Some(tok) = &self.tokenizer else {
            return Ok(());
        };
        let p = dir.join("tokenizer.json");
        let tmp = dir.join("tokenizer.json.tmp");
        tok.inner()
            .save(&tmp, false)
            .map_err(|e| Error::Tokenizer {
                what: p.display().to_string(),
                reason: e.to_string(),
            })?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(dir, e))?;
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
        let mut tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.cfg.bos_token_id),
            "eos_token": name(self.cfg.eos_token_id),
            "pad_token": name(self.cfg.pad_token_id),
            "add_bos_token": self.cfg.add_bos,
            "model_max_length": self.cfg.n_ctx,
        });
        if let Some(t) = tok.chat_template() {
            tc["chat_template"] = serde_json::Value::String(t.jinja());
        }
        write("tokenizer_config.json", &json(&tc)?)?;
        Ok(())
    }

    /// The model's dimensions, family and special tokens.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model's tokenizer.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] saying why none was found and where to put one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer {
            what: "none loaded".into(),
            reason: self.no_tokenizer.clone(),
        })
    }

    /// Replaces the tokenizer.
    pub fn set_tokenizer(&mut self, tokenizer: Option<Tokenizer>) {
        self.tokenizer = tokenizer;
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The file or folder the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The weights by canonical name (`blocks.3.mlp.up.weight`, ...; listed in the `families`
    /// module docs), linear weights as `[out, in]`, norm weights as the factor applied.
    pub fn params(&self) -> &Weights {
        &self.params
    }

    /// Makes every weight a [`Var`] (once; later calls return the same ones) and rebuilds the
    /// network on them, so that the same forward pass is differentiable through candle autograd.
    /// The fused kernels switch to composed ops automatically wherever a `Var` is upstream.
    pub fn trainable_params(&mut self) -> Result<Vec<(String, Var)>> {
        self.trainable_params_where(|_| true)
    }

    /// [`Model::trainable_params`] for the weights whose canonical name passes `train` only; the
    /// others stay constants, so autograd computes no gradient for them (freezing the 262k x 640
    /// embedding of Gemma-3 skips its two largest weight-gradient products).
    pub fn trainable_params_where(
        &mut self,
        train: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::with_capacity(self.params.len());
        for (name, t) in self.params.iter_mut() {
            if !train(name) {
                continue;
            }
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            vars.push((name.clone(), v));
        }
        self.net = Transformer::new(&self.cfg, &self.params)?;
        Ok(vars)
    }

    /// Runs every weight product (attention, MLP) on `dtype` block-quantized weights, and the
    /// unembedding on Q8_0, with candle's quantized CPU kernels (llama.cpp's formats and
    /// arithmetic): at batch 1 a generation step reads every weight once, so 4-5 bit weights make
    /// it several times faster than f32. `Q4_1` reproduces SmolLM2's GGUF file, whose weights
    /// the f32 model holds dequantized. Results differ slightly from the f32 path (report the
    /// difference: `bench_generate --quantized` prints it); hooks and parameters are unchanged,
    /// and [`Model::trainable_params`] returns to f32.
    ///
    /// # Errors
    /// A layer width that is not a multiple of the format's block size (32 or 256).
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<()> {
        let mut net = Transformer::new(&self.cfg, &self.params)?;
        net.quantize(dtype, candle_core::quantized::GgmlDType::Q8_0)?;
        self.net = net;
        Ok(())
    }

    /// Every hook point this model has, in forward order.
    pub fn hook_points(&self) -> Vec<HookPoint> {
        HookPoint::all(&self.cfg)
    }

    /// Parses a TransformerLens name and checks this model has it.
    ///
    /// # Errors
    /// [`Error::UnknownHookPoint`] for a malformed name, [`Error::HookNotInModel`] for e.g.
    /// `blocks.99.mlp.hook_post` on a 30-layer model.
    pub fn hook_point(&self, name: &str) -> Result<HookPoint> {
        let h: HookPoint = name.parse()?;
        h.check(&self.cfg)?;
        Ok(h)
    }

    /// `[1, n]` u32 tokens on the model's device.
    pub fn tokens(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(Tensor::new(ids, &self.device)?.unsqueeze(0)?)
    }

    /// `[batch, seq]` tokens and `[batch, seq]` attention mask (1 real, 0 padding) of sequences of
    /// different lengths, padded with `pad_id` on the `left` (for generation) or the right.
    pub fn pad_batch(
        &self,
        seqs: &[Vec<u32>],
        pad_id: u32,
        left: bool,
    ) -> Result<(Tensor, Tensor)> {
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if len == 0 {
            return Err(Error::invalid(
                "sequences",
                "empty batch or all sequences empty",
            ));
        }
        let mut ids: Vec<u32> = Vec::with_capacity(seqs.len() * len);
        let mut mask: Vec<u32> = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            let pad = len - s.len();
            let (pi, pm) = (vec![pad_id; pad], vec![0u32; pad]);
            if left {
                ids.extend(&pi);
                mask.extend(&pm);
            }
            ids.extend(s);
            mask.extend(std::iter::repeat_n(1u32, s.len()));
            if !left {
                ids.extend(&pi);
                mask.extend(&pm);
            }
        }
        let shape = (seqs.len(), len);
        Ok((
            Tensor::from_vec(ids, shape, &self.device)?,
            Tensor::from_vec(mask, shape, &self.device)?,
        ))
    }

    /// Checks `tokens` is `[batch, seq]` of in-range integer ids; returns them as u32.
    fn check_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, s) = tokens.dims2().map_err(|_| Error::ShapeMismatch {
            what: "tokens (expected [batch, seq])".into(),
            expected: vec![],
            got: tokens.dims().to_vec(),
        })?;
        if b == 0 || s == 0 {
            return Err(Error::invalid("tokens", format!("empty batch [{b}, {s}]")));
        }
        // Positions past the trained context are extrapolated (RoPE) or missing (learned
        // positions): activations from them are not the model's, so refuse, as
        // TransformerLens's `n_ctx` does, rather than hand back plausible numbers.
        if s > self.cfg.n_ctx {
            return Err(Error::invalid(
                "sequence length",
                format!(
                    "{s} positions exceed the model's context of {} tokens",
                    self.cfg.n_ctx
                ),
            ));
        }
        if tokens.dtype().is_float() {
            return Err(Error::invalid(
                "tokens",
                format!(
                    "dtype {:?}; token ids must be integers (u32)",
                    tokens.dtype()
                ),
            ));
        }
        let ids = tokens.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        for (bi, row) in ids.iter().enumerate() {
            for (pi, &id) in row.iter().enumerate() {
                if id < 0 || id as u64 >= self.cfg.vocab_size as u64 {
                    return Err(Error::TokenOutOfRange {
                        id,
                        batch: bi,
                        position: pi,
                        vocab_size: self.cfg.vocab_size,
                    });
                }
            }
        }
        Ok(tokens.to_dtype(DType::U32)?.to_device(&self.device)?)
    }

    fn positions(&self, tokens: &Tensor, mask: Option<&Tensor>) -> Result<Positions> {
        let Some(mask) = mask else {
            return Ok(Positions::from_mask(None));
        };
        if mask.dims() != tokens.dims() {
            return Err(Error::ShapeMismatch {
                what: "attention_mask (must match tokens)".into(),
                expected: tokens.dims().to_vec(),
                got: mask.dims().to_vec(),
            });
        }
        let rows = mask.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let rows = rows
            .into_iter()
            .map(|r| r.into_iter().map(|m| u32::from(m != 0)).collect())
            .collect();
        Ok(Positions::from_mask(Some(rows)))
    }

    /// Runs to the final norm; `None` if the hooks stopped the pass earlier.
    fn run(
        &self,
        tokens: &Tensor,
        mask: Option<&Tensor>,
        hooks: &mut Hooks,
    ) -> Result<(Tensor, Option<Tensor>, ActivationCache)> {
        let tokens = self.check_tokens(tokens)?;
        hooks.validate(&self.cfg)?;
        let pos = self.positions(&tokens, mask)?;
        let mut run = HookRun::new(hooks, 0);
        let x = self.net.forward(&self.cfg, &tokens, &pos, None, &mut run)?;
        Ok((tokens, x, run.cache))
    }

    fn logits_of(&self, x: &Tensor, which: LogitsFor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let x = match which {
            LogitsFor::All => x.clone(),
            LogitsFor::Last => x.narrow(1, s - 1, 1)?,
        };
        let rows = x.dim(1)?;
        let logits = self.net.unembed(&self.cfg, &x.reshape((b * rows, d))?)?;
        Ok(logits.reshape((b, rows, self.cfg.vocab_size))?)
    }

    /// One forward pass over `tokens` (`[batch, seq]` u32), applying `hooks`.
    ///
    /// # Shapes
    /// `tokens: [batch, seq]` -> `logits: [batch, seq, vocab]` (unless stopped early).
    ///
    /// # Errors
    /// Malformed or out-of-range tokens, a hook point this model lacks, an intervention that
    /// fails or changes a shape.
    pub fn forward(&self, tokens: &Tensor, hooks: &mut Hooks) -> Result<Output> {
        self.forward_impl(tokens, None, hooks)
    }

    /// [`Model::forward`] on a padded batch: `attention_mask` `[batch, seq]` is 1 for real tokens
    /// and 0 for padding (either side). Padding is never attended to and positions count real
    /// tokens only, so each row's outputs at real positions equal those of the unpadded sequence.
    pub fn forward_masked(
        &self,
        tokens: &Tensor,
        attention_mask: &Tensor,
        hooks: &mut Hooks,
    ) -> Result<Output> {
        self.forward_impl(tokens, Some(attention_mask), hooks)
    }

    fn forward_impl(
        &self,
        tokens: &Tensor,
        mask: Option<&Tensor>,
        hooks: &mut Hooks,
    ) -> Result<Output> {
        let (_, x, cache) = self.run(tokens, mask, hooks)?;
        let logits = match x {
            Some(x) => Some(self.logits_of(&x, LogitsFor::All)?),
            None => None,
        };
        Ok(Output { logits, cache })
    }

    /// Captures `hooks` in one pass that stops after the deepest of them.
    pub fn run_with_cache(&self, tokens: &Tensor, hooks: &[HookPoint]) -> Result<ActivationCache> {
        let mut h = Hooks::new()
            .capture_all(hooks.iter().copied())
            .stop_at_deepest_capture();
        Ok(self.forward(tokens, &mut h)?.cache)
    }

    /// `[batch, seq - 1]`: the log-probability of each actual next token, `log p(t[i+1] | t[..=i])`.
    pub fn logprobs(&self, tokens: &Tensor) -> Result<Tensor> {
        self.logprobs_with_hooks(tokens, None, &mut Hooks::new())
    }

    /// [`Model::logprobs`] with an optional attention mask and with hooks applied (e.g. an SAE
    /// spliced in at `mlp.hook_post`). The vocabulary-sized logits are made a few rows at a time,
    /// so memory stays bounded for 262k-token vocabularies. Values at padding are meaningless.
    pub fn logprobs_with_hooks(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let (tokens, x, _) = self.run(tokens, attention_mask, hooks)?;
        let x = x.ok_or_else(|| Error::invalid("hooks", "they stop the pass before the logits"))?;
        let (b, s, d) = x.dims3()?;
        if s < 2 {
            return Err(Error::invalid(
                "tokens",
                "need at least 2 tokens per row for next-token log-probabilities",
            ));
        }
        let rows = b * (s - 1);
        let x = x.narrow(1, 0, s - 1)?.reshape((rows, d))?;
        let targets: Vec<u32> = tokens
            .narrow(1, 1, s - 1)?
            .contiguous()?
            .reshape(rows)?
            .to_vec1()?;
        Ok(self.unembed_logprobs(&x, &targets)?.reshape((b, s - 1))?)
    }

    /// The log-probability of the next token at chosen `(row, position)` pairs only, `[n]` in
    /// their order: `log p(t[row][pos+1] | t[row][..=pos])`.
    ///
    /// Fine-tuning on chat scores only the model's turns, and the unembedding of a 262k-token
    /// vocabulary costs more than the rest of a small model; scoring only those positions skips
    /// the rest of that cost, forward and backward.
    ///
    /// # Errors
    /// As [`Model::logprobs_with_hooks`]; a position past the second-to-last token or a row
    /// outside the batch.
    pub fn next_token_logprobs(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        hooks: &mut Hooks,
        positions: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (tokens, x, _) = self.run(tokens, attention_mask, hooks)?;
        let x = x.ok_or_else(|| Error::invalid("hooks", "they stop the pass before the logits"))?;
        let (b, s, d) = x.dims3()?;
        if positions.is_empty() {
            return Err(Error::invalid("positions", "none given"));
        }
        let ids = tokens.to_vec2::<u32>()?;
        let mut rows = Vec::with_capacity(positions.len());
        let mut targets = Vec::with_capacity(positions.len());
        for &(r, p) in positions {
            if r >= b || p + 1 >= s {
                return Err(Error::invalid(
                    "positions",
                    format!(
                        "({r}, {p}) outside a batch of {b} rows of {s} tokens (the last position has no next token)"
                    ),
                ));
            }
            rows.push((r * s + p) as u32);
            targets.push(ids[r][p + 1]);
        }
        let rows = Tensor::new(rows.as_slice(), x.device())?;
        let x = x.reshape((b * s, d))?.index_select(&rows, 0)?;
        self.unembed_logprobs(&x, &targets)
    }

    /// `log softmax(unembed(x))[targets]` for `x` `[rows, d_model]`, a few rows at a time so that
    /// memory stays bounded for 262k-token vocabularies.
    fn unembed_logprobs(&self, x: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let rows = x.dim(0)?;
        // About 256 MB of f32 logits per chunk.
        let chunk = ((1usize << 26) / self.cfg.vocab_size).max(1);
        let mut parts = Vec::with_capacity(rows.div_ceil(chunk));
        let mut start = 0;
        while start < rows {
            let n = chunk.min(rows - start);
            parts.push(self.net.unembed_logprobs(
                &self.cfg,
                &x.narrow(0, start, n)?,
                &targets[start..start + n],
            )?);
            start += n;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// An empty [`KvCache`] for `batch` sequences.
    pub fn kv_cache(&self, batch: usize) -> KvCache {
        KvCache {
            layers: vec![None; self.cfg.n_layers],
            real: vec![Vec::new(); batch],
            next: vec![0; batch],
        }
    }

    /// Runs `tokens` (`[batch, seq]`) as the positions that follow those already in `cache`,
    /// adds their keys and values to it, and returns the `[batch, vocab]` logits of the last
    /// position. `attention_mask` (`[batch, seq]`, 1 real, 0 padding) marks padding, e.g. the
    /// left padding of a batch of prompts of different lengths; `None` means all are real.
    ///
    /// Hooks see only these positions: a `Map` intervention gets `[batch, seq, d]`, and a
    /// [`crate::Intervention::map_at`] one is told where they start (`cache.len()` before the
    /// call). An intervention that acts on each position independently (a clamp, an addition, an
    /// SAE splice) therefore gives the same result as on a full pass over the whole sequence.
    ///
    /// # Errors
    /// As [`Model::forward`]; also a batch size other than the cache's, a sequence past the
    /// model's context, and hooks that stop the pass before the logits.
    pub fn forward_cached(
        &self,
        tokens: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let tokens = self.check_tokens(tokens)?;
        hooks.validate(&self.cfg)?;
        let (b, s) = tokens.dims2()?;
        if b != cache.batch() {
            return Err(Error::ShapeMismatch {
                what: "tokens for the KV cache (batch must match the cache's)".into(),
                expected: vec![cache.batch(), s],
                got: vec![b, s],
            });
        }
        if cache.len() + s > self.cfg.n_ctx {
            return Err(Error::invalid(
                "sequence length",
                format!(
                    "{} cached + {s} new positions exceed the context of {}",
                    cache.len(),
                    self.cfg.n_ctx
                ),
            ));
        }
        let new_real: Vec<Vec<bool>> = match attention_mask {
            None => vec![vec![true; s]; b],
            Some(m) => {
                if m.dims() != tokens.dims() {
                    return Err(Error::ShapeMismatch {
                        what: "attention_mask (must match tokens)".into(),
                        expected: tokens.dims().to_vec(),
                        got: m.dims().to_vec(),
                    });
                }
                m.to_dtype(DType::I64)?
                    .to_vec2::<i64>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v != 0).collect())
                    .collect()
            }
        };
        let pos = Positions::continuing(&cache.real, &cache.next, &new_real);
        let mut run = HookRun::new(hooks, pos.offset);
        // On an error the cache may hold some layers' new keys but not others': drop it all
        // rather than leave it inconsistent.
        let x = match self
            .net
            .forward(&self.cfg, &tokens, &pos, Some(&mut cache.layers), &mut run)
        {
            Ok(x) => x,
            Err(e) => {
                *cache = self.kv_cache(b);
                return Err(e);
            }
        };
        for ((real, next), new) in cache.real.iter_mut().zip(&mut cache.next).zip(&new_real) {
            real.extend(new);
            *next += new.iter().filter(|&&r| r).count() as u32;
        }
        let x = x.ok_or_else(|| Error::invalid("hooks", "they stop the pass before the logits"))?;
        Ok(self.logits_of(&x, LogitsFor::Last)?.squeeze(1)?)
    }

    /// Continues `prompt`, applying `hooks` at every step (see [`Model::generate_batch`]).
    ///
    /// # Errors
    /// Invalid options (temperature <= 0, top_p outside (0, 1]), hooks that stop the pass early,
    /// and everything [`Model::forward`] can fail with.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        hooks: &mut Hooks,
    ) -> Result<Generation> {
        let mut out = self.generate_batch(&[prompt.to_vec()], opts, hooks)?;
        Ok(out.remove(0))
    }

    /// Continues each of `prompts` in one batch, left-padded to a common length.
    ///
    /// With `opts.kv_cache` (the default) the prompts run once (prefill) and each step runs one
    /// new position per row; hooks then see only the new positions (see
    /// [`Model::forward_cached`]). Without it every step reruns the whole sequence, so hooks see
    /// every position at every step; for interventions that act on each position independently
    /// the two give the same tokens (`tests/generate.rs`). Rows step together; a row that has
    /// stopped keeps running (its tokens are dropped) until every row has stopped. With
    /// sampling, row `r` draws from stream `r` of the seed, so a row's text does not depend on
    /// the other rows and a batch of one equals [`Model::generate`].
    ///
    /// # Errors
    /// As [`Model::generate`]; also an empty prompt in the batch.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        hooks: &mut Hooks,
    ) -> Result<Vec<Generation>> {
        self.generate_stepwise(prompts, opts, hooks, &mut |_| true)
    }

    /// Continues `prompt` as [`Model::generate`] does, handing each new token to `on_token` as
    /// soon as it is chosen (to stream text to a user); when `on_token` returns `false`,
    /// generation ends there with [`StopReason::Cancelled`] (the user pressed stop, or went away).
    ///
    /// # Errors
    /// As [`Model::generate`].
    pub fn generate_streaming(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        hooks: &mut Hooks,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        let mut out =
            self.generate_stepwise(&[prompt.to_vec()], opts, hooks, &mut |t| on_token(t[0]))?;
        Ok(out.remove(0))
    }

    /// [`Model::generate_batch`], calling `on_step` with each step's tokens (one per row, rows
    /// that have stopped included); `false` cancels.
    fn generate_stepwise(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        hooks: &mut Hooks,
        on_step: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<Vec<Generation>> {
        opts.validate()?;
        if prompts.is_empty() {
            return Err(Error::invalid("prompts", "empty batch"));
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::invalid(
                "prompt",
                format!("prompt {i} is empty (start with BOS if the model has one)"),
            ));
        }
        if hooks.stop_point().is_some() {
            return Err(Error::invalid(
                "hooks",
                "stop_at_deepest_capture leaves no logits to generate from",
            ));
        }
        let b = prompts.len();
        let pad = opts.pad_token.unwrap_or(prompts[0][0]);
        let (mut tokens, mut mask) = self.pad_batch(prompts, pad, true)?;
        let mut samplers: Vec<Sampler> = (0..b)
            .map(|r| Sampler::for_row(&opts.sampling, r as u64))
            .collect();
        let mut cache = opts.kv_cache.then(|| self.kv_cache(b));
        let mut step_tokens = tokens.clone();
        let mut step_mask = Some(mask.clone());
        let mut out: Vec<Generation> = (0..b)
            .map(|_| Generation {
                tokens: Vec::new(),
                stop: StopReason::MaxTokens,
            })
            .collect();
        let mut running = vec![true; b];
        let mut steps = 0;
        while running.iter().any(|&r| r) {
            let len = tokens.dim(1)?;
            if steps >= opts.max_new_tokens || len >= self.cfg.n_ctx {
                let why = if steps >= opts.max_new_tokens {
                    StopReason::MaxTokens
                } else {
                    StopReason::ContextFull
                };
                for (g, _) in out.iter_mut().zip(&running).filter(|(_, r)| **r) {
                    g.stop = why;
                }
                break;
            }
            let logits = match cache.as_mut() {
                Some(c) => self.forward_cached(&step_tokens, step_mask.as_ref(), c, hooks)?,
                None => {
                    let (_, x, _) = self.run(&tokens, Some(&mask), hooks)?;
                    let x = x.ok_or_else(|| {
                        Error::invalid("hooks", "they stop the pass before the logits")
                    })?;
                    self.logits_of(&x, LogitsFor::Last)?.squeeze(1)?
                }
            };
            let mut next = Vec::with_capacity(b);
            for r in 0..b {
                let t = samplers[r].next(&logits.get(r)?)?;
                if running[r] {
                    out[r].tokens.push(t);
                    if opts.stop_tokens.contains(&t) {
                        out[r].stop = StopReason::StopToken(t);
                        running[r] = false;
                    }
                }
                next.push(t);
            }
            steps += 1;
            if !on_step(&next) {
                for (g, _) in out.iter_mut().zip(&running).filter(|(_, r)| **r) {
                    g.stop = StopReason::Cancelled;
                }
                break;
            }
            step_tokens = Tensor::from_vec(next, (b, 1), &self.device)?;
            step_mask = None;
            tokens = Tensor::cat(&[&tokens, &step_tokens], 1)?;
            mask = Tensor::cat(&[&mask, &step_tokens.ones_like()?], 1)?;
        }
        Ok(out)
    }
}
