//! Inference configs in SAELens v6's `cfg.json` vocabulary, plus the importers for older files.
//!
//! A [`SaeConfig`] is what a saved SAE needs to be run: the architecture (the JSON `architecture`
//! tag), `d_in`, `d_sae` and the few switches SAELens keeps. Keys this crate does not know are kept
//! aside in `extra` (never dropped) and written back on save, so a round trip through this crate
//! loses nothing another tool put there.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, SaeError};

/// The SAELens version whose layout [`crate::io::save_sae`] writes.
pub const SAELENS_FORMAT_VERSION: &str = "6.54.12";

/// Architectures this crate can load (SAELens names).
pub const ARCHITECTURES: [&str; 4] = ["standard", "topk", "jumprelu", "gated"];

/// Where the SAE was trained and on what: SAELens's `metadata` block. Unknown keys go to `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SaeMetadata {
    /// Model the activations came from, e.g. `SmolLM2-135M-Instruct`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// TransformerLens hook name, e.g. `blocks.15.mlp.hook_post`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_name: Option<String>,
    /// Attention head index for per-head hooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_head_index: Option<i64>,
    /// Tokens per context window used when harvesting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_size: Option<u64>,
    /// Whether a BOS token was prepended to each window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepend_bos: Option<bool>,
    /// Corpus the activations came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_path: Option<String>,
    /// SAELens version that wrote the file (we write [`SAELENS_FORMAT_VERSION`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sae_lens_version: Option<String>,
    /// Every other key, kept as found.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// SAELens's `normalize_activations` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeActivations {
    /// Inputs are used as they are.
    #[default]
    None,
    /// Trained on inputs scaled to mean norm sqrt(d_in); the factor is folded into the weights when
    /// saved, so at inference this is the same as `None` (as in SAELens).
    ExpectedAverageOnlyIn,
    /// Each input is scaled to norm sqrt(d_in) on the way in and scaled back on the way out.
    ConstantNormRescale,
    /// Each input is layer-normalised on the way in and de-normalised on the way out.
    LayerNorm,
}

/// Fields every architecture has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommonConfig {
    /// Width of the activations the SAE reads (e.g. d_mlp for MLP neurons).
    pub d_in: usize,
    /// Number of features (dictionary size).
    pub d_sae: usize,
    /// Dtype of the stored weights; this crate computes in f32 whatever is stored.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Device SAELens should load onto; ignored here (the caller picks a candle device).
    #[serde(default = "default_device")]
    pub device: String,
    /// Subtract `b_dec` from the input before encoding (Towards Monosemanticity's tied pre-encoder bias).
    #[serde(default = "default_true")]
    pub apply_b_dec_to_input: bool,
    /// How inputs are normalised.
    #[serde(default)]
    pub normalize_activations: NormalizeActivations,
    /// SAELens's `reshape_activations` (`none` or `hook_z`); inputs here are already `[n, d_in]`.
    #[serde(default = "default_none")]
    pub reshape_activations: String,
    /// Provenance.
    #[serde(default)]
    pub metadata: SaeMetadata,
    /// Unknown keys, kept aside and written back.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn default_dtype() -> String {
    "float32".into()
}
fn default_device() -> String {
    "cpu".into()
}
fn default_none() -> String {
    "none".into()
}
fn default_true() -> bool {
    true
}

impl CommonConfig {
    /// A config with SAELens's defaults.
    pub fn new(d_in: usize, d_sae: usize) -> Self {
        CommonConfig {
            d_in,
            d_sae,
            dtype: default_dtype(),
            device: default_device(),
            apply_b_dec_to_input: true,
            normalize_activations: NormalizeActivations::None,
            reshape_activations: default_none(),
            metadata: SaeMetadata::default(),
            extra: BTreeMap::new(),
        }
    }
}

/// ReLU SAE (`architecture: "standard"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandardConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
}

/// TopK SAE (`architecture: "topk"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopKConfig {
    /// Active features per token.
    pub k: usize,
    /// Select the top k of `pre * ||W_dec row||` and divide activations by the norm when decoding.
    #[serde(default)]
    pub rescale_acts_by_decoder_norm: bool,
    #[serde(flatten)]
    pub common: CommonConfig,
}

/// JumpReLU SAE (`architecture: "jumprelu"`), also what a BatchTopK SAE becomes after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JumpReluConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
}

/// Gated SAE (`architecture: "gated"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatedConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
}

/// The config of a saved SAE, tagged by `architecture` as in SAELens v6 `cfg.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture")]
#[non_exhaustive]
pub enum SaeConfig {
    #[serde(rename = "standard")]
    Standard(StandardConfig),
    #[serde(rename = "topk")]
    TopK(TopKConfig),
    #[serde(rename = "jumprelu")]
    JumpRelu(JumpReluConfig),
    #[serde(rename = "gated")]
    Gated(GatedConfig),
}

impl SaeConfig {
    /// The SAELens architecture name.
    pub fn architecture(&self) -> &'static str {
        match self {
            SaeConfig::Standard(_) => "standard",
            SaeConfig::TopK(_) => "topk",
            SaeConfig::JumpRelu(_) => "jumprelu",
            SaeConfig::Gated(_) => "gated",
        }
    }
    /// Fields shared by all architectures.
    pub fn common(&self) -> &CommonConfig {
        match self {
            SaeConfig::Standard(c) => &c.common,
            SaeConfig::TopK(c) => &c.common,
            SaeConfig::JumpRelu(c) => &c.common,
            SaeConfig::Gated(c) => &c.common,
        }
    }
    /// Mutable access to the shared fields.
    pub fn common_mut(&mut self) -> &mut CommonConfig {
        match self {
            SaeConfig::Standard(c) => &mut c.common,
            SaeConfig::TopK(c) => &mut c.common,
            SaeConfig::JumpRelu(c) => &mut c.common,
            SaeConfig::Gated(c) => &mut c.common,
        }
    }
    pub fn d_in(&self) -> usize {
        self.common().d_in
    }
    pub fn d_sae(&self) -> usize {
        self.common().d_sae
    }
    /// Provenance (hook name, model name, ...).
    pub fn metadata(&self) -> &SaeMetadata {
        &self.common().metadata
    }
    /// The TransformerLens hook the SAE reads, if recorded.
    pub fn hook_name(&self) -> Option<&str> {
        self.metadata().hook_name.as_deref()
    }

    /// Checks the invariants every constructor relies on.
    ///
    /// # Errors
    /// [`SaeError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let c = self.common();
        if c.d_in == 0 {
            return Err(SaeError::config("d_in", "must be at least 1"));
        }
        if c.d_sae == 0 {
            return Err(SaeError::config("d_sae", "must be at least 1"));
        }
        if let SaeConfig::TopK(t) = self
            && (t.k == 0 || t.k > c.d_sae)
        {
            return Err(SaeError::config(
                "k",
                format!("must be in 1..={} (d_sae), got {}", c.d_sae, t.k),
            ));
        }
        if c.reshape_activations != "none" && c.reshape_activations != "hook_z" {
            return Err(SaeError::config(
                "reshape_activations",
                format!(
                    "expected `none` or `hook_z`, got `{}`",
                    c.reshape_activations
                ),
            ));
        }
        Ok(())
    }

    /// Parses a `cfg.json` of any supported vintage: SAELens v6, older flat SAELens configs, and
    /// sparsify's. `file` is only used in error messages.
    ///
    /// # Errors
    /// [`SaeError::UnknownArchitecture`], [`SaeError::Json`], [`SaeError::InvalidConfig`].
    pub fn from_json_value(value: Value, file: &Path) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(SaeError::config(
                file.display().to_string(),
                "cfg.json must hold a JSON object",
            ));
        };
        let map = if is_sparsify(&map) {
            sparsify_to_v6(map, file)?
        } else if is_pre_v6(&map) {
            legacy_to_v6(map)
        } else {
            map
        };
        let arch = map
            .get("architecture")
            .and_then(Value::as_str)
            .unwrap_or("standard")
            .to_string();
        if !ARCHITECTURES.contains(&arch.as_str()) {
            let hint = if arch == "batchtopk" || arch == "matryoshka_batchtopk" {
                " (a BatchTopK training checkpoint; save it with `save_sae` to get its jumprelu inference form)"
            } else {
                ""
            };
            return Err(SaeError::UnknownArchitecture {
                file: file.to_path_buf(),
                name: format!("{arch}{hint}"),
                expected: ARCHITECTURES.iter().map(|s| s.to_string()).collect(),
            });
        }
        let mut map = map;
        map.insert("architecture".into(), Value::String(arch));
        let cfg: SaeConfig =
            serde_json::from_value(Value::Object(map)).map_err(|source| SaeError::Json {
                path: file.to_path_buf(),
                source,
            })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Keys that older flat SAELens configs kept at the top level and v6 keeps under `metadata`.
const LEGACY_METADATA_KEYS: [&str; 16] = [
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_layer",
    "dataset_trust_remote_code",
    "finetuning_scaling_factor",
];

fn is_sparsify(map: &serde_json::Map<String, Value>) -> bool {
    !map.contains_key("d_sae")
        && (map.contains_key("expansion_factor") || map.contains_key("num_latents"))
}

fn is_pre_v6(map: &serde_json::Map<String, Value>) -> bool {
    let version = map
        .get("sae_lens_version")
        .or_else(|| map.get("metadata").and_then(|m| m.get("sae_lens_version")))
        .and_then(Value::as_str);
    match version {
        Some(v) => v
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .is_some_and(|major| major < 6),
        None => !map.contains_key("metadata"),
    }
}

/// Mirrors SAELens's `handle_pre_6_0_config`: renames, defaults, TopK from `activation_fn_kwargs`,
/// boolean `normalize_activations`, metadata keys moved under `metadata`.
fn legacy_to_v6(map: serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let mut metadata = serde_json::Map::new();
    for (k, v) in map {
        let k = match k.as_str() {
            "hook_point" => "hook_name".to_string(),
            "hook_point_head_index" => "hook_head_index".to_string(),
            "activation_fn_str" => "activation_fn".to_string(),
            _ => k,
        };
        if LEGACY_METADATA_KEYS.contains(&k.as_str()) {
            metadata.insert(k, v);
        } else {
            out.insert(k, v);
        }
    }
    let is_topk = out.get("activation_fn").and_then(Value::as_str) == Some("topk");
    if is_topk
        && let Some(k) = out
            .get("activation_fn_kwargs")
            .and_then(|kw| kw.get("k"))
            .cloned()
    {
        out.insert("architecture".into(), Value::String("topk".into()));
        out.insert("k".into(), k);
    }
    out.entry("architecture")
        .or_insert_with(|| Value::String("standard".into()));
    match out.get("normalize_activations") {
        Some(Value::Bool(b)) => {
            let s = if *b {
                "expected_average_only_in"
            } else {
                "none"
            };
            out.insert("normalize_activations".into(), Value::String(s.into()));
        }
        Some(Value::Null) => {
            out.insert("normalize_activations".into(), Value::String("none".into()));
        }
        _ => {}
    }
    if let Some(Value::Null) = out.get("reshape_activations") {
        out.remove("reshape_activations");
    }
    out.insert("metadata".into(), Value::Object(metadata));
    out
}

/// sparsify's `cfg.json` (`expansion_factor`/`num_latents`, `k`, `d_in`) as a v6 TopK config.
fn sparsify_to_v6(
    map: serde_json::Map<String, Value>,
    file: &Path,
) -> Result<serde_json::Map<String, Value>> {
    let get_usize = |key: &str| map.get(key).and_then(Value::as_u64).map(|v| v as usize);
    let d_in = get_usize("d_in").ok_or_else(|| {
        SaeError::config(file.display().to_string(), "sparsify cfg.json lacks `d_in`")
    })?;
    let d_sae = match get_usize("num_latents").filter(|&n| n > 0) {
        Some(n) => n,
        None => {
            let ef = get_usize("expansion_factor").ok_or_else(|| {
                SaeError::config(
                    file.display().to_string(),
                    "sparsify cfg.json lacks both `num_latents` and `expansion_factor`",
                )
            })?;
            d_in.checked_mul(ef).ok_or_else(|| {
                SaeError::config(
                    file.display().to_string(),
                    format!("d_in {d_in} x expansion_factor {ef} overflows"),
                )
            })?
        }
    };
    let k = get_usize("k").ok_or_else(|| {
        SaeError::config(file.display().to_string(), "sparsify cfg.json lacks `k`")
    })?;
    if map.get("skip_connection").and_then(Value::as_bool) == Some(true) {
        return Err(SaeError::Unsupported {
            file: file.to_path_buf(),
            reason: "sparsify SAEs with skip_connection (W_skip) are not an SAELens architecture"
                .into(),
        });
    }
    if map
        .get("activation")
        .and_then(Value::as_str)
        .is_some_and(|a| a != "topk")
    {
        return Err(SaeError::Unsupported {
            file: file.to_path_buf(),
            reason: format!(
                "sparsify activation `{}`; only topk is supported",
                map["activation"]
            ),
        });
    }
    let transcode = map.get("transcode").and_then(Value::as_bool) == Some(true);
    let mut extra = serde_json::Map::new();
    for (key, v) in &map {
        if !["d_in", "k", "num_latents", "expansion_factor"].contains(&key.as_str()) {
            extra.insert(format!("sparsify_{key}"), v.clone());
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("architecture".into(), "topk".into());
    out.insert("d_in".into(), d_in.into());
    out.insert("d_sae".into(), d_sae.into());
    out.insert("k".into(), k.into());
    // sparsify subtracts b_dec before encoding unless the coder is a transcoder.
    out.insert("apply_b_dec_to_input".into(), (!transcode).into());
    out.insert("metadata".into(), Value::Object(serde_json::Map::new()));
    out.extend(extra);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<SaeConfig> {
        SaeConfig::from_json_value(v, Path::new("cfg.json"))
    }

    #[test]
    fn v6_topk_roundtrip_keeps_unknown_keys() {
        let v = json!({"d_in": 4, "d_sae": 8, "architecture": "topk", "k": 2, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": true, "normalize_activations": "none",
            "reshape_activations": "none", "rescale_acts_by_decoder_norm": true,
            "some_future_key": [1, 2],
            "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.mlp.hook_post", "odd": 3}});
        let cfg = parse(v.clone()).unwrap();
        let SaeConfig::TopK(t) = &cfg else {
            panic!("{cfg:?}")
        };
        assert_eq!(t.k, 2);
        assert!(t.rescale_acts_by_decoder_norm);
        assert_eq!(cfg.hook_name(), Some("blocks.0.mlp.hook_post"));
        assert_eq!(cfg.common().extra["some_future_key"], json!([1, 2]));
        assert_eq!(cfg.metadata().extra["odd"], json!(3));
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn legacy_flat_topk_config() {
        let v = json!({"d_in": 16, "d_sae": 64, "hook_name": "blocks.3.hook_resid_post",
            "model_name": "gpt2", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
            "normalize_activations": false, "sae_lens_training_version": "3.13.0", "hook_layer": 3});
        let cfg = parse(v).unwrap();
        let SaeConfig::TopK(t) = &cfg else {
            panic!("{cfg:?}")
        };
        assert_eq!(t.k, 5);
        assert_eq!(cfg.hook_name(), Some("blocks.3.hook_resid_post"));
        assert_eq!(cfg.metadata().model_name.as_deref(), Some("gpt2"));
        assert_eq!(
            cfg.common().normalize_activations,
            NormalizeActivations::None
        );
    }

    #[test]
    fn legacy_standard_with_hook_point() {
        let v = json!({"d_in": 16, "d_sae": 64, "hook_point": "blocks.3.hook_resid_pre",
            "normalize_activations": true});
        let cfg = parse(v).unwrap();
        assert_eq!(cfg.architecture(), "standard");
        assert_eq!(cfg.hook_name(), Some("blocks.3.hook_resid_pre"));
        assert_eq!(
            cfg.common().normalize_activations,
            NormalizeActivations::ExpectedAverageOnlyIn
        );
    }

    #[test]
    fn sparsify_config() {
        let v = json!({"expansion_factor": 4, "normalize_decoder": true, "num_latents": 0, "k": 3,
            "multi_topk": false, "skip_connection": false, "d_in": 8});
        let cfg = parse(v).unwrap();
        let SaeConfig::TopK(t) = &cfg else {
            panic!("{cfg:?}")
        };
        assert_eq!((t.common.d_in, t.common.d_sae, t.k), (8, 32, 3));
        assert!(t.common.apply_b_dec_to_input);
        // A width times expansion factor past usize is an error, not an overflow.
        let v = json!({"expansion_factor": u64::MAX / 2, "num_latents": 0, "k": 3, "d_in": 8});
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let v = json!({"d_in": 4, "d_sae": 8, "architecture": "mystery", "metadata": {}});
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("mystery") && err.contains("jumprelu"), "{err}");
    }

    #[test]
    fn bad_k_is_rejected() {
        let v = json!({"d_in": 4, "d_sae": 8, "architecture": "topk", "k": 9, "metadata": {}});
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("k"), "{err}");
    }
}
