//! Reading tensors and metadata out of GGUF files and HF safetensors folders.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Tensors by this crate's canonical names (see [`crate::Model::params`]), in the model's dtype.
pub type Weights = BTreeMap<String, Tensor>;

/// The format a checkpoint was read from; families map names per format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Gguf,
    Hf,
}

enum Source {
    Gguf {
        content: gguf_file::Content,
        reader: BufReader<File>,
    },
    Safetensors {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        index: HashMap<String, usize>,
    },
}

/// An open checkpoint: tensors are read (and dequantized) one at a time, by their file names.
pub(crate) struct Checkpoint {
    pub(crate) path: PathBuf,
    pub(crate) arch: String,
    source: Source,
    device: Device,
    dtype: DType,
}

impl Checkpoint {
    pub(crate) fn open_gguf(
        path: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, GgufMeta)> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::Gguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let meta = GgufMeta {
            path: path.to_path_buf(),
            map: content.metadata.clone(),
        };
        let arch = meta.str("general.architecture")?.to_string();
        Ok((
            Self {
                path: path.to_path_buf(),
                arch,
                source: Source::Gguf { content, reader },
                device: device.clone(),
                dtype,
            },
            meta,
        ))
    }

    /// Opens every shard of an HF folder: those listed by `model.safetensors.index.json` if there
    /// is one, else every `*.safetensors` file in it.
    pub(crate) fn open_safetensors(
        dir: &Path,
        arch: String,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Safetensors {
                    path: index_path.clone(),
                    reason: format!("invalid index JSON: {e}"),
                })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Safetensors {
                    path: index_path.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        };
        shards.sort();
        if shards.is_empty() {
            return Err(Error::Safetensors {
                path: dir.to_path_buf(),
                reason: "no *.safetensors file in the folder".into(),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in shards.into_iter().enumerate() {
            if !p.exists() {
                return Err(Error::Safetensors {
                    path: p,
                    reason: "listed in model.safetensors.index.json but missing".into(),
                });
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it not
            // being modified while the checkpoint is open (it is closed once the model is built).
            let st = unsafe { MmapedSafetensors::new(&p) }.map_err(|e| Error::Safetensors {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            for (name, _) in st.tensors() {
                index.insert(name, i);
            }
            files.push((p, st));
        }
        Ok(Self {
            path: dir.to_path_buf(),
            arch,
            source: Source::Safetensors { files, index },
            device: device.clone(),
            dtype,
        })
    }

    pub(crate) fn names(&self) -> Vec<String> {
        match &self.source {
            Source::Gguf { content, .. } => content.tensor_infos.keys().cloned().collect(),
            Source::Safetensors { index, .. } => index.keys().cloned().collect(),
        }
    }

    /// The shape of tensor `name` as the file declares it, without reading it.
    pub(crate) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Gguf { content, .. } => content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec()),
            Source::Safetensors { files, index } => {
                let (_, st) = &files[*index.get(name)?];
                st.get(name).ok().map(|v| v.shape().to_vec())
            }
        }
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        match &self.source {
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Source::Safetensors { index, .. } => index.contains_key(name),
        }
    }

    /// The tensor `name`, converted to the model's dtype on its device.
    pub(crate) fn load(&mut self, name: &str) -> Result<Tensor> {
        if !self.has(name) {
            return Err(Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
                arch: self.arch.clone(),
            });
        }
        let t = match &mut self.source {
            Source::Gguf { content, reader } => {
                // candle multiplies the dims without checking (a debug-build panic, a wrapped
                // size in release): refuse a shape whose element count overflows first.
                if let Some(info) = content.tensor_infos.get(name)
                    && info
                        .shape
                        .dims()
                        .iter()
                        .try_fold(1usize, |a, &d| a.checked_mul(d))
                        .and_then(|n| n.checked_mul(info.ggml_dtype.type_size()))
                        .is_none()
                {
                    return Err(Error::Gguf {
                        path: self.path.clone(),
                        reason: format!(
                            "tensor `{name}`: shape {:?} has more elements than can be addressed",
                            info.shape.dims()
                        ),
                    });
                }
                let q = content
                    .tensor(reader, name, &self.device)
                    .map_err(|e| Error::Gguf {
                        path: self.path.clone(),
                        reason: format!("tensor `{name}`: {e}"),
                    })?;
                q.dequantize(&self.device).map_err(|e| Error::Gguf {
                    path: self.path.clone(),
                    reason: format!("tensor `{name}`: {e}"),
                })?
            }
            Source::Safetensors { files, index } => {
                let (path, st) = &files[index[name]];
                st.load(name, &self.device)
                    .map_err(|e| Error::Safetensors {
                        path: path.clone(),
                        reason: format!("tensor `{name}`: {e}"),
                    })?
            }
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    /// The tensor `name`, checked to have `shape`.
    pub(crate) fn load_shaped(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.load(name)?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                what: format!("tensor `{name}` in {}", self.path.display()),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t)
    }
}

/// GGUF metadata with typed getters whose errors name the file and key.
pub(crate) struct GgufMeta {
    pub(crate) path: PathBuf,
    pub(crate) map: HashMap<String, gguf_file::Value>,
}

impl GgufMeta {
    fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.map
            .get(key)
            .ok_or_else(|| Error::metadata(&self.path, key, "missing"))
    }

    pub(crate) fn str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| Error::metadata(&self.path, key, e.to_string()))
    }

    pub(crate) fn opt_str(&self, key: &str) -> Option<&str> {
        self.map
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = match v {
            gguf_file::Value::U8(x) => Some(*x as u64),
            gguf_file::Value::U16(x) => Some(*x as u64),
            gguf_file::Value::U32(x) => Some(*x as u64),
            gguf_file::Value::U64(x) => Some(*x),
            gguf_file::Value::I8(x) => u64::try_from(*x).ok(),
            gguf_file::Value::I16(x) => u64::try_from(*x).ok(),
            gguf_file::Value::I32(x) => u64::try_from(*x).ok(),
            gguf_file::Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Error::metadata(&self.path, key, format!("expected a count, got {v:?}")))
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.map.contains_key(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt_usize(key)?
            .map(|n| {
                u32::try_from(n)
                    .map_err(|_| Error::metadata(&self.path, key, format!("{n} is not a token id")))
            })
            .transpose()
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::F32(x)) => Ok(Some(*x as f64)),
            Some(gguf_file::Value::F64(x)) => Ok(Some(*x)),
            Some(_) => self.usize(key).map(|n| Some(n as f64)),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Option<bool> {
        self.map.get(key).and_then(|v| v.to_bool().ok())
    }

    /// An array value, each element converted, or an error naming the key and the element.
    fn array<T>(
        &self,
        key: &str,
        expected: &str,
        convert: impl Fn(&gguf_file::Value) -> Option<T>,
    ) -> Result<Vec<T>> {
        let arr = self
            .get(key)?
            .to_vec()
            .map_err(|e| Error::metadata(&self.path, key, e.to_string()))?;
        arr.iter()
            .map(|v| {
                convert(v).ok_or_else(|| {
                    Error::metadata(&self.path, key, format!("expected {expected}, got {v:?}"))
                })
            })
            .collect()
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key, "strings", |v| v.to_string().ok().cloned())
    }

    pub(crate) fn floats(&self, key: &str) -> Result<Vec<f32>> {
        self.array(key, "floats", |v| match v {
            gguf_file::Value::F32(x) => Some(*x),
            gguf_file::Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }

    pub(crate) fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key, "integers", |v| match v {
            gguf_file::Value::I32(x) => Some(*x as i64),
            gguf_file::Value::U32(x) => Some(*x as i64),
            gguf_file::Value::I64(x) => Some(*x),
            gguf_file::Value::U8(x) => Some(*x as i64),
            gguf_file::Value::I8(x) => Some(*x as i64),
            _ => None,
        })
    }
}

/// An HF `config.json` with getters whose errors name the file and key. Unknown keys are kept and
/// ignored; a missing required key is an error naming it.
pub(crate) struct HfConfig {
    pub(crate) path: PathBuf,
    pub(crate) json: serde_json::Value,
}

impl HfConfig {
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::metadata(path, "config.json", format!("invalid JSON: {e}")))?;
        if !json.is_object() {
            return Err(Error::metadata(path, "config.json", "not a JSON object"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            json,
        })
    }

    /// The config of the text model: Gemma 3's multimodal configs nest it under `text_config`.
    pub(crate) fn text(&self) -> HfConfig {
        match self.json.get("text_config") {
            Some(t) if t.is_object() => HfConfig {
                path: self.path.clone(),
                json: t.clone(),
            },
            _ => HfConfig {
                path: self.path.clone(),
                json: self.json.clone(),
            },
        }
    }

    pub(crate) fn value(&self, key: &str) -> Option<&serde_json::Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| Error::metadata(&self.path, key, "missing"))
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    Error::metadata(&self.path, key, format!("expected a count, got {v}"))
                }),
        }
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::metadata(&self.path, key, format!("expected a number, got {v}"))
            }),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Option<bool> {
        self.value(key).and_then(|v| v.as_bool())
    }

    pub(crate) fn opt_str(&self, key: &str) -> Option<&str> {
        self.value(key).and_then(|v| v.as_str())
    }

    /// A token id, or the first of a list of them (HF allows `eos_token_id: [1, 106]`).
    pub(crate) fn opt_token(&self, key: &str) -> Option<u32> {
        match self.value(key)? {
            serde_json::Value::Array(a) => a.first()?.as_u64(),
            v => v.as_u64(),
        }
        .and_then(|n| u32::try_from(n).ok())
    }
}
