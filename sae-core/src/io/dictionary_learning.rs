//! dictionary_learning's folders (Marks et al.; the SAEs of SAEBench): `ae.pt`, the state dict
//! `torch.save` wrote, and `config.json`, whose `trainer` section names the class. Each class is
//! read as the SAELens architecture that computes the same codes, with the tensors renamed and
//! laid out as SAELens's, so that everything after the load is the SAELens path:
//!
//! | `dict_class` | read as | differences absorbed here |
//! |---|---|---|
//! | `AutoEncoder` | standard | the pre-encoder bias is `bias` |
//! | `AutoEncoderTopK` | topk | ReLU before the top k rather than after: the same non-zero codes |
//! | `BatchTopKSAE`, `MatryoshkaBatchTopKSAE` | jumprelu, one threshold for every feature | their inference form (`use_threshold`, the default): `ReLU(v) · [ReLU(v) > θ]`; Matryoshka's nested groups only shape its training |
//! | `JumpReluAutoEncoder` | jumprelu | `b_dec` is not subtracted from the input (`apply_b_dec_to_input` is false there) |
//! | `GatedAutoEncoder` | gated | `gate_bias`, `mag_bias`, `decoder_bias` |
//!
//! SAEBench's `submodule_name`s (`resid_post_layer_12`, `mlp_out_layer_3`, `attn_out_layer_0`)
//! become TransformerLens hook names; any other leaves the hook unnamed.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};

use super::{
    DICTIONARY_LEARNING_CFG_FILE, DICTIONARY_LEARNING_WEIGHTS_FILE, HostTensor, LoadedFiles,
    read_json,
};
use crate::arch::transpose;
use crate::config::SaeConfig;
use crate::error::{Result, SaeError};

/// Reads a dictionary_learning folder as [`super::load_sae_files`] reads SAELens's.
pub(super) fn load(dir: &Path) -> Result<LoadedFiles> {
    let cfg_path = dir.join(DICTIONARY_LEARNING_CFG_FILE);
    let weights_file = dir.join(DICTIONARY_LEARNING_WEIGHTS_FILE);
    let trainer = match read_json(&cfg_path)? {
        Value::Object(mut m) => match m.remove("trainer") {
            Some(Value::Object(t)) => t,
            _ => {
                return Err(corrupt(
                    &cfg_path,
                    "no `trainer` section: expected dictionary_learning's {\"trainer\": {\"dict_class\": ...}}",
                ));
            }
        },
        _ => return Err(corrupt(&cfg_path, "not a JSON object")),
    };
    let class = trainer
        .get("dict_class")
        .and_then(Value::as_str)
        .ok_or_else(|| corrupt(&cfg_path, "`trainer.dict_class` is missing"))?
        .to_string();
    let mut state = read_state_dict(&weights_file)?;
    let mut take = |name: &str| {
        state.remove(name).ok_or_else(|| SaeError::MissingTensor {
            file: weights_file.clone(),
            name: name.to_string(),
            architecture: class.clone(),
            expected: vec![name.to_string()],
        })
    };

    // (architecture, apply_b_dec_to_input, tensors under SAELens's names, W_enc feature-major)
    let mut tensors = HashMap::new();
    let (architecture, apply_b_dec, feature_major) = match class.as_str() {
        "AutoEncoder" | "AutoEncoderTopK" | "BatchTopKSAE" => {
            tensors.insert("W_enc".to_string(), take("encoder.weight")?);
            tensors.insert("b_enc".to_string(), take("encoder.bias")?);
            tensors.insert("W_dec".to_string(), transposed(take("decoder.weight")?));
            let b_dec = if class == "AutoEncoder" {
                "bias"
            } else {
                "b_dec"
            };
            tensors.insert("b_dec".to_string(), take(b_dec)?);
            match class.as_str() {
                "AutoEncoder" => ("standard", true, true),
                "AutoEncoderTopK" => ("topk", true, true),
                _ => {
                    let theta = scalar(&take("threshold")?, "threshold", &weights_file)?;
                    tensors.insert("threshold".to_string(), every_feature(theta, &tensors));
                    ("jumprelu", true, true)
                }
            }
        }
        "MatryoshkaBatchTopKSAE" => {
            for name in ["W_enc", "b_enc", "W_dec", "b_dec"] {
                tensors.insert(name.to_string(), take(name)?);
            }
            let theta = scalar(&take("threshold")?, "threshold", &weights_file)?;
            tensors.insert("threshold".to_string(), every_feature(theta, &tensors));
            ("jumprelu", true, false)
        }
        "JumpReluAutoEncoder" => {
            for name in ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"] {
                tensors.insert(name.to_string(), take(name)?);
            }
            ("jumprelu", false, false)
        }
        "GatedAutoEncoder" => {
            tensors.insert("W_enc".to_string(), take("encoder.weight")?);
            tensors.insert("W_dec".to_string(), transposed(take("decoder.weight")?));
            tensors.insert("b_dec".to_string(), take("decoder_bias")?);
            tensors.insert("b_gate".to_string(), take("gate_bias")?);
            tensors.insert("b_mag".to_string(), take("mag_bias")?);
            tensors.insert("r_mag".to_string(), take("r_mag")?);
            ("gated", true, true)
        }
        other => {
            return Err(SaeError::Unsupported {
                file: cfg_path,
                reason: format!(
                    "dictionary_learning class {other}: this crate reads AutoEncoder, \
                     AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, \
                     JumpReluAutoEncoder and GatedAutoEncoder"
                ),
            });
        }
    };

    // Sizes from the weights themselves (the config's may be absent); `W_dec` is `[d_sae, d_in]`.
    let (d_sae, d_in) = match tensors["W_dec"].shape.as_slice() {
        &[s, i] => (s, i),
        other => {
            return Err(SaeError::ShapeMismatch {
                what: format!("{}: the decoder", weights_file.display()),
                expected: vec![0, 0],
                got: other.to_vec(),
            });
        }
    };
    let mut cfg = json!({
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "metadata": metadata(&trainer),
    });
    if architecture == "topk" {
        // torch keeps `k` as an int32 buffer, which candle's reader skips (saying so on
        // stderr); the trainer's config has it too.
        let k = match state.remove("k") {
            Some(k) => scalar(&k, "k", &weights_file)? as u64,
            None => trainer
                .get("k")
                .and_then(Value::as_u64)
                .ok_or_else(|| corrupt(&cfg_path, "an AutoEncoderTopK with no `k`"))?,
        };
        cfg["k"] = json!(k);
    }
    let cfg = SaeConfig::from_json_value(cfg, &cfg_path)?;
    Ok(LoadedFiles {
        cfg,
        tensors,
        log10_sparsity: None,
        weights_file,
        w_enc_feature_major: feature_major,
    })
}

/// Every tensor of a `torch.save` state dict, as f32. candle's reader indexes the pickle's
/// tuples without checking their length (a damaged file panics in `rebuild_args`; found by
/// libFuzzer), so it runs under `catch_unwind`: a bad file is an error naming it, not a crash.
fn read_state_dict(path: &Path) -> Result<HashMap<String, HostTensor>> {
    if !path.exists() {
        return Err(SaeError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let read = match std::panic::catch_unwind(|| candle_core::pickle::read_all(path)) {
        Ok(read) => read.map_err(|e| corrupt(path, &format!("not a torch state dict ({e})")))?,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            return Err(corrupt(
                path,
                &format!("candle's torch reader could not read it ({msg})"),
            ));
        }
    };
    read.into_iter()
        .map(|(name, t)| {
            let shape = t.dims().to_vec();
            let data = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| corrupt(path, &format!("tensor `{name}`: {e}")))?;
            Ok((name, HostTensor { shape, data }))
        })
        .collect()
}

/// BatchTopK's one inference threshold as JumpReLU's per-feature ones.
fn every_feature(theta: f32, tensors: &HashMap<String, HostTensor>) -> HostTensor {
    let d_sae = tensors["b_enc"].data.len();
    HostTensor {
        shape: vec![d_sae],
        data: vec![theta; d_sae],
    }
}

/// A `[rows, cols]` matrix as `[cols, rows]` (torch's `decoder.weight` is `[d_in, d_sae]`).
fn transposed(t: HostTensor) -> HostTensor {
    let &[rows, cols] = t.shape.as_slice() else {
        return t; // the shape check after the load names it
    };
    HostTensor {
        shape: vec![cols, rows],
        data: transpose(&t.data, rows, cols),
    }
}

fn scalar(t: &HostTensor, name: &str, file: &Path) -> Result<f32> {
    match t.data.as_slice() {
        [v] if v.is_finite() => Ok(*v),
        _ => Err(corrupt(
            file,
            &format!("`{name}` should be one finite number, got {:?}", t.shape),
        )),
    }
}

/// `lm_name` as the model, and the hook named as TransformerLens names it where SAEBench's
/// `submodule_name` says which.
fn metadata(trainer: &serde_json::Map<String, Value>) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(lm) = trainer.get("lm_name").and_then(Value::as_str) {
        m.insert("model_name".into(), json!(lm));
    }
    let hook = trainer
        .get("submodule_name")
        .and_then(Value::as_str)
        .and_then(hook_name);
    if let Some(h) = hook {
        m.insert("hook_name".into(), json!(h));
    }
    Value::Object(m)
}

fn hook_name(submodule: &str) -> Option<String> {
    let (site, layer) = submodule.rsplit_once("_layer_")?;
    let layer: usize = layer.parse().ok()?;
    let site = match site {
        "resid_post" => "hook_resid_post",
        "mlp_out" => "hook_mlp_out",
        "attn_out" => "hook_attn_out",
        _ => return None,
    };
    Some(format!("blocks.{layer}.{site}"))
}

fn corrupt(file: &Path, reason: &str) -> SaeError {
    SaeError::CorruptFile {
        file: file.to_path_buf(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saebench_submodules_become_transformerlens_hooks() {
        assert_eq!(
            hook_name("resid_post_layer_12").as_deref(),
            Some("blocks.12.hook_resid_post")
        );
        assert_eq!(
            hook_name("mlp_out_layer_3").as_deref(),
            Some("blocks.3.hook_mlp_out")
        );
        assert_eq!(
            hook_name("attn_out_layer_0").as_deref(),
            Some("blocks.0.hook_attn_out")
        );
        assert_eq!(hook_name("resid_post_layer_x"), None);
        assert_eq!(hook_name("embed"), None);
    }

    #[test]
    fn transposing_moves_each_entry() {
        let t = HostTensor {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let u = transposed(t);
        assert_eq!(u.shape, vec![3, 2]);
        assert_eq!(u.data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
