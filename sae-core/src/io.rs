//! Files: SAELens v6 folders, older SAELens folders, sparsify and dictionary_learning folders;
//! atomic writes.
//!
//! | layout | config | weights |
//! |---|---|---|
//! | SAELens v6 | `cfg.json` (tagged by `architecture`, provenance under `metadata`) | `sae_weights.safetensors`: `W_enc` `[d_in, d_sae]`, `b_enc`, `W_dec` `[d_sae, d_in]`, `b_dec`, + `threshold` (jumprelu) or `b_gate`/`b_mag`/`r_mag` (gated); optional `sparsity.safetensors` (`sparsity`: log10 firing rate) |
//! | SAELens < 6 | flat `cfg.json` (`hook_name` at top level, `activation_fn_kwargs.k`, boolean `normalize_activations`) | as v6 (JumpReLU may hold `log_threshold`) |
//! | sparsify | `cfg.json` with `expansion_factor`/`num_latents`, `k`, `d_in` | `sae.safetensors`: `encoder.weight` `[d_sae, d_in]`, `encoder.bias`, `W_dec`, `b_dec` |
//! | dictionary_learning | `config.json`: `trainer.dict_class` (`AutoEncoder`, `AutoEncoderTopK`, `BatchTopKSAE`, `JumpReluAutoEncoder`, `GatedAutoEncoder`), `k`, `lm_name`, `submodule_name` | `ae.pt` (a torch state dict): `encoder.weight` `[d_sae, d_in]`, `decoder.weight` `[d_in, d_sae]`, biases and buffers under the class's names |
//!
//! Every file is written to a temporary name in the same folder, synced, and renamed over the
//! target, so a crash never leaves a half-written file under the real name.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;

use crate::arch::FileTensor;
use crate::config::SaeConfig;
use crate::error::{Result, SaeError};

mod dictionary_learning;

/// SAELens's config file name.
pub const CFG_FILE: &str = "cfg.json";
/// SAELens's weights file name.
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
/// SAELens's feature-sparsity file name.
pub const SPARSITY_FILE: &str = "sparsity.safetensors";
/// sparsify's weights file name.
pub const SPARSIFY_WEIGHTS_FILE: &str = "sae.safetensors";
/// dictionary_learning's weights file name (a torch state dict) and its config beside it.
pub const DICTIONARY_LEARNING_WEIGHTS_FILE: &str = "ae.pt";
pub const DICTIONARY_LEARNING_CFG_FILE: &str = "config.json";

/// A tensor read from a file, converted to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads every tensor of a safetensors file as f32.
///
/// # Errors
/// [`SaeError::Io`], [`SaeError::CorruptFile`] (truncated or not safetensors),
/// [`SaeError::UnsupportedDtype`].
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = fs::read(path).map_err(|e| SaeError::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| SaeError::CorruptFile {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| SaeError::UnsupportedDtype {
            file: path.to_path_buf(),
            name: name.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

fn to_f32(dtype: Dtype, b: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Writes f32 tensors to a safetensors file atomically.
///
/// The tensors stream from the caller's slices to the file: nothing is copied into a buffer of
/// the whole file first (which held a checkpoint's parameters and Adam moments twice more, half
/// a gigabyte each for a 12,288 x 1,536 SAE, while it was written). The header is the
/// `safetensors` crate's own, and so is the order of the data (by name, all being f32).
///
/// # Errors
/// [`SaeError::Io`], or [`SaeError::ShapeMismatch`] if a shape does not match its data.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &[usize], &[f32])]) -> Result<()> {
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(SaeError::ShapeMismatch {
                what: format!("tensor {name} written to {}", path.display()),
                expected: shape.to_vec(),
                got: vec![data.len()],
            });
        }
    }
    // The library's serializer over views that report their length but hand over no bytes:
    // it returns the header alone (length prefix, JSON, padding) with the offsets of the data.
    let header = safetensors::serialize(
        tensors.iter().map(|(name, shape, data)| {
            (
                *name,
                HeaderOnly {
                    shape: shape.to_vec(),
                    bytes: data.len() * 4,
                },
            )
        }),
        None,
    )
    .map_err(|e| SaeError::CorruptFile {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut ordered: Vec<&(&str, &[usize], &[f32])> = tensors.iter().collect();
    ordered.sort_by(|a, b| a.0.cmp(b.0));
    write_atomic_with(path, |f| {
        f.write_all(&header)?;
        for (_, _, data) in ordered {
            write_f32_le(f, data)?;
        }
        Ok(())
    })
}

/// A tensor's place in a safetensors header, without its data.
struct HeaderOnly {
    shape: Vec<usize>,
    bytes: usize,
}

impl safetensors::View for HeaderOnly {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&[])
    }

    fn data_len(&self) -> usize {
        self.bytes
    }
}

/// Writes floats as little-endian bytes: straight from their memory where that is the
/// machine's order, through a small buffer elsewhere.
fn write_f32_le(f: &mut impl Write, data: &[f32]) -> std::io::Result<()> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: any f32 is 4 initialised bytes, u8 has no alignment requirement, and the byte
        // slice covers exactly the floats' memory, borrowed only for this call.
        let bytes =
            unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), data.len() * 4) };
        f.write_all(bytes)
    }
    #[cfg(not(target_endian = "little"))]
    {
        for chunk in data.chunks(1 << 14) {
            let b: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            f.write_all(&b)?;
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` so that a reader (or a rerun after `kill -9`) sees either the old
/// file or the whole new one: `atomic-write-file` writes a temporary file, fsyncs it, renames
/// it into place and fsyncs the folder, and every failure is returned.
///
/// # Errors
/// [`SaeError::Io`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] for content written piece by piece by `write`.
fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut atomic_write_file::AtomicWriteFile) -> std::io::Result<()>,
) -> Result<()> {
    let mut f =
        atomic_write_file::AtomicWriteFile::open(path).map_err(|e| SaeError::io(path, e))?;
    write(&mut f).map_err(|e| SaeError::io(path, e))?;
    f.commit().map_err(|e| SaeError::io(path, e))
}

/// fsyncs a folder, so that renames inside it survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SaeError::io(dir, e))
}

/// Writes `value` as pretty JSON, atomically.
///
/// # Errors
/// [`SaeError::Json`], [`SaeError::Io`].
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let s = serde_json::to_vec_pretty(value).map_err(|source| SaeError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &s)
}

/// Reads a JSON file.
///
/// # Errors
/// [`SaeError::Io`], [`SaeError::Json`].
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = fs::read(path).map_err(|e| SaeError::io(path, e))?;
    serde_json::from_slice(&s).map_err(|source| SaeError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes an SAE folder in the SAELens v6 layout.
///
/// # Errors
/// [`SaeError::Io`], [`SaeError::Json`], shape errors.
pub fn save_sae(
    dir: &Path,
    cfg: &SaeConfig,
    tensors: &[FileTensor],
    log10_sparsity: Option<&[f32]>,
) -> Result<()> {
    cfg.validate()?;
    fs::create_dir_all(dir).map_err(|e| SaeError::io(dir, e))?;
    let refs: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
        .collect();
    write_safetensors(&dir.join(WEIGHTS_FILE), &refs)?;
    if let Some(sp) = log10_sparsity {
        write_safetensors(&dir.join(SPARSITY_FILE), &[("sparsity", &[sp.len()], sp)])?;
    }
    let mut cfg = cfg.clone();
    cfg.common_mut()
        .metadata
        .sae_lens_version
        .get_or_insert_with(|| crate::config::SAELENS_FORMAT_VERSION.to_string());
    write_json(&dir.join(CFG_FILE), &cfg)
}

/// What [`load_sae_files`] found in a folder: the config, the weights in SAELens names and file
/// layout, and the optional sparsity vector.
#[derive(Debug, Clone)]
pub struct LoadedFiles {
    pub cfg: SaeConfig,
    pub tensors: HashMap<String, HostTensor>,
    pub log10_sparsity: Option<Vec<f32>>,
    /// The weights file that was read (for error messages).
    pub weights_file: PathBuf,
    /// Whether `W_enc` is stored feature-major (sparsify's `encoder.weight`).
    pub w_enc_feature_major: bool,
}

/// Reads `cfg.json` and the weights of an SAELens (any version) or sparsify folder, or a
/// dictionary_learning folder (`ae.pt` and `config.json`, no `cfg.json`).
///
/// # Errors
/// Missing files, corrupt safetensors, unknown architecture, invalid config.
pub fn load_sae_files(dir: &Path) -> Result<LoadedFiles> {
    let cfg_path = dir.join(CFG_FILE);
    if !cfg_path.exists() && dir.join(DICTIONARY_LEARNING_WEIGHTS_FILE).exists() {
        return dictionary_learning::load(dir);
    }
    let value = read_json(&cfg_path)?;
    let cfg = SaeConfig::from_json_value(value, &cfg_path)?;
    let saelens = dir.join(WEIGHTS_FILE);
    let sparsify = dir.join(SPARSIFY_WEIGHTS_FILE);
    let (weights_file, is_sparsify) = if saelens.exists() {
        (saelens, false)
    } else if sparsify.exists() {
        (sparsify, true)
    } else {
        return Err(SaeError::io(
            &saelens,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("neither {WEIGHTS_FILE} nor {SPARSIFY_WEIGHTS_FILE} exists"),
            ),
        ));
    };
    let mut tensors: HashMap<String, HostTensor> =
        read_safetensors(&weights_file)?.into_iter().collect();
    let mut w_enc_feature_major = false;
    if is_sparsify {
        if let Some(w) = tensors.remove("encoder.weight") {
            tensors.insert("W_enc".into(), w);
            w_enc_feature_major = true;
        }
        if let Some(b) = tensors.remove("encoder.bias") {
            tensors.insert("b_enc".into(), b);
        }
    }
    if let Some(lt) = tensors.remove("log_threshold") {
        // SAELens < 6 JumpReLU stored log(threshold).
        tensors.insert(
            "threshold".into(),
            HostTensor {
                shape: lt.shape,
                data: lt.data.iter().map(|v| v.exp()).collect(),
            },
        );
    }
    let sp_path = dir.join(SPARSITY_FILE);
    let log10_sparsity = if sp_path.exists() {
        let mut sp = read_safetensors(&sp_path)?;
        sp.remove("sparsity").map(|t| t.data)
    } else {
        None
    };
    Ok(LoadedFiles {
        cfg,
        tensors,
        log10_sparsity,
        weights_file,
        w_enc_feature_major,
    })
}
