//! The cache's on-disk format.
//!
//! ```text
//! DIR/manifest.json                  this file's types, rewritten atomically after every shard
//! DIR/plan.json                      the windows (document id + token offset), written once
//! DIR/provenance/shard-000000.bin    per row: window u32, position u32, token u32 (little-endian)
//! DIR/<hook>/shard-000000.bin        per row: `width` values of `dtype`, little-endian, no header
//! ```
//!
//! Row `r` of a hook's shard `k` and row `r` of `provenance/shard-k` describe the same token, for
//! every hook: all hooks come from one forward pass and share one set of rows. Shards hold no
//! header, so a shard is a plain `[rows, width]` array that numpy can `memmap` as is; everything
//! about it is in the manifest. The manifest is the only source of truth: a shard file that it
//! does not list is an unfinished leftover and is deleted on the next harvest run.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `format` string of manifests this crate writes and reads.
pub const FORMAT: &str = "activation-store/v1";

/// How activations are stored. Batches are always f32; bf16/f16 halve the disk and page-cache
/// footprint at 8/11 bits of mantissa.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    Bf16,
    F16,
}

impl StoreDtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 | StoreDtype::F16 => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StoreDtype::F32 => "f32",
            StoreDtype::Bf16 => "bf16",
            StoreDtype::F16 => "f16",
        }
    }

    /// Appends `values` in this dtype, little-endian.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            StoreDtype::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            StoreDtype::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            StoreDtype::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Decodes `bytes` (a whole number of values) into `out`, which must have the matching length.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            StoreDtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            StoreDtype::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            StoreDtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        }
    }
}

impl fmt::Display for StoreDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StoreDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(StoreDtype::F32),
            "bf16" => Ok(StoreDtype::Bf16),
            "f16" => Ok(StoreDtype::F16),
            _ => Err(Error::Config {
                field: "dtype",
                message: format!("unknown dtype {s:?}; expected f32, bf16 or f16"),
            }),
        }
    }
}

/// Where one token's activation came from. 12 bytes on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Provenance {
    /// Index into the plan's windows (`plan.json`).
    pub window: u32,
    /// Position in the window; 0 is BOS.
    pub position: u32,
    /// The token id at that position.
    pub token: u32,
}

impl Provenance {
    pub const BYTES: usize = 12;

    pub fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&self.window.to_le_bytes());
        b[4..8].copy_from_slice(&self.position.to_le_bytes());
        b[8..].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    /// The record written by [`Provenance::to_bytes`]; exactly [`Provenance::BYTES`] long, by type,
    /// so that a short read cannot index past the end.
    pub fn from_bytes(b: &[u8; Self::BYTES]) -> Self {
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Provenance {
            window: u(0),
            position: u(4),
            token: u(8),
        }
    }
}

/// What produced the activations. A reader asking for another model gets
/// [`Error::ManifestMismatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The model file's name (informational).
    pub model: String,
    /// sha256 of the model file: the identity a reader checks.
    pub model_sha256: String,
    /// Tokenizer description, e.g. `gguf:SmolLM2-135M-Instruct.Q4_1.gguf`.
    pub tokenizer: String,
    pub context_len: usize,
    /// The corpus split harvested (`train`, `validation`, `test`) or `synthetic`.
    pub split: String,
    /// [`crate::WindowPlan::sha256`] of the windows harvested.
    pub plan_sha256: String,
}

/// How rows were selected and stored. A resumed harvest must use the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheSettings {
    pub dtype: StoreDtype,
    /// A shard is closed at the end of the first forward batch that brings it to this many rows.
    pub shard_rows: u64,
    /// Windows per forward pass. Fixed so that a resumed run batches windows exactly as an
    /// uninterrupted one would (padding and batch shape then match too).
    pub batch_windows: usize,
    /// Whether position 0 (BOS, an attention sink with outsized norm) is left out.
    pub exclude_bos: bool,
    /// Token ids whose rows are left out (special tokens).
    pub exclude_token_ids: Vec<u32>,
    /// Rows with a norm above `factor x` the median norm of the first batch are dropped.
    pub outlier_factor: Option<f32>,
}

/// One hook point stored in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookInfo {
    /// TransformerLens name, e.g. `blocks.15.mlp.hook_post`; also its folder name.
    pub name: String,
    pub width: usize,
    /// The norm above which a row was dropped, when the outlier filter is on.
    pub outlier_threshold: Option<f32>,
}

/// A file of the cache, relative to the cache folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// One hook's file of a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookShard {
    pub file: FileInfo,
    /// Sum of the rows' L2 norms, for the mean norm that SAE training normalises by. Stored as
    /// f32 because serde_json's default float parser round-trips f32 exactly but not every f64,
    /// and a resumed harvest must rewrite the manifest bit for bit.
    pub norm_sum: f32,
}

/// One committed shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub index: u64,
    /// Global index of the shard's first row.
    pub first_row: u64,
    pub rows: u64,
    /// Forward batches `[start, end)` that produced the shard.
    pub batches: [u64; 2],
    /// Windows `[start, end)`.
    pub windows: [u64; 2],
    /// Rows dropped by the outlier filter.
    pub dropped_outliers: u64,
    pub provenance: FileInfo,
    /// In the order of [`Manifest::hooks`].
    pub hooks: Vec<HookShard>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub source: SourceInfo,
    pub settings: CacheSettings,
    pub hooks: Vec<HookInfo>,
    pub shards: Vec<ShardInfo>,
    /// Rows over all shards.
    pub rows: u64,
    pub dropped_outliers: u64,
    /// Forward batches (and windows) whose rows are all in committed shards.
    pub batches_done: u64,
    pub windows_done: u64,
}

impl Manifest {
    /// The index of a hook, or [`Error::HookNotInCache`].
    pub fn hook_index(&self, dir: &std::path::Path, hook: &str) -> Result<usize> {
        self.hooks
            .iter()
            .position(|h| h.name == hook)
            .ok_or_else(|| Error::HookNotInCache {
                path: dir.to_path_buf(),
                hook: hook.to_string(),
                available: self.hooks.iter().map(|h| h.name.clone()).collect(),
            })
    }
}

/// The relative path of shard `index` in folder `sub` (a hook name or `provenance`).
pub fn shard_path(sub: &str, index: u64) -> String {
    format!("{sub}/shard-{index:06}.bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_round_trip_within_their_precision() {
        let v = [0.0f32, 1.0, -2.5, 1234.5678, 1e-3];
        for (dt, tol) in [
            (StoreDtype::F32, 0.0),
            (StoreDtype::Bf16, 1.0 / 128.0),
            (StoreDtype::F16, 1.0 / 1024.0),
        ] {
            let mut b = Vec::new();
            dt.encode(&v, &mut b);
            assert_eq!(b.len(), v.len() * dt.size());
            let mut out = vec![0f32; v.len()];
            dt.decode(&b, &mut out);
            for (a, o) in v.iter().zip(&out) {
                assert!((a - o).abs() <= tol * a.abs(), "{dt}: {a} -> {o}");
            }
            assert_eq!(dt.as_str().parse::<StoreDtype>().unwrap(), dt);
        }
    }

    #[test]
    fn provenance_is_12_little_endian_bytes() {
        let p = Provenance {
            window: 1,
            position: 0x0203,
            token: 0x0a0b0c0d,
        };
        let b = p.to_bytes();
        assert_eq!(b, [1, 0, 0, 0, 3, 2, 0, 0, 0xd, 0xc, 0xb, 0xa]);
        assert_eq!(Provenance::from_bytes(&b), p);
    }
}
