//! Opening, checking and reading a harvested cache.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::manifest::{FileInfo, Manifest, Provenance, StoreDtype};
use crate::stream::{BatchStream, StreamConfig};
use crate::windows::WindowSpan;
use crate::writer::{MANIFEST, PLAN, read_manifest};

/// An activation cache opened for reading. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ActivationStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) manifest: Manifest,
}

/// The window list of `plan.json`, to trace a row back to its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanInfo {
    pub split: String,
    pub context_len: usize,
    pub bos: u32,
    pub seed: u64,
    pub documents: Vec<String>,
    pub windows: Vec<WindowSpan>,
}

/// What [`ActivationStore::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub shards: u64,
    pub files: u64,
    pub bytes: u64,
    pub rows: u64,
}

/// Checks that `path` exists with `bytes` bytes.
pub(crate) fn check_size(path: &Path, bytes: u64) -> Result<()> {
    let found = std::fs::metadata(path).at("stat shard", path)?.len();
    if found != bytes {
        return Err(Error::ShardSize {
            path: path.to_path_buf(),
            expected: bytes,
            found,
        });
    }
    Ok(())
}

/// Streams a file through sha256 and compares with the manifest.
pub(crate) fn check_file(dir: &Path, f: &FileInfo, progress: Option<&ProgressBar>) -> Result<()> {
    let path = dir.join(&f.path);
    check_size(&path, f.bytes)?;
    let mut file = File::open(&path).at("open shard", &path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).at("read shard", &path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(pb) = progress {
            pb.inc(n as u64);
        }
    }
    let found = hex::encode(h.finalize());
    if found != f.sha256 {
        return Err(Error::ChecksumMismatch {
            path,
            expected: f.sha256.clone(),
            found,
        });
    }
    Ok(())
}

impl ActivationStore {
    /// Reads the manifest and checks that every shard file it lists exists with the listed size
    /// (a truncated shard is caught here; a corrupted one by [`verify`](Self::verify)).
    ///
    /// # Errors
    /// [`Error::Manifest`] when there is no valid manifest; [`Error::ShardSize`] naming a
    /// truncated shard; [`Error::Io`] naming a missing one.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let manifest = read_manifest(dir)?.ok_or_else(|| Error::Manifest {
            path: dir.join(MANIFEST),
            what: "missing: not an activation cache (or its harvest never committed a shard)"
                .into(),
        })?;
        // Every size below comes from the file: checked arithmetic, so that an absurd manifest
        // is an error naming it rather than an overflow.
        let invalid = |what: String| Error::Manifest {
            path: dir.join(MANIFEST),
            what,
        };
        if manifest.hooks.is_empty() {
            return Err(invalid(
                "it lists no hook: a cache holds at least one".into(),
            ));
        }
        let row_bytes: Vec<u64> = manifest
            .hooks
            .iter()
            .map(|h| {
                if h.width == 0 {
                    return Err(invalid(format!("hook {} has width 0", h.name)));
                }
                (h.width as u64)
                    .checked_mul(manifest.settings.dtype.size() as u64)
                    .ok_or_else(|| {
                        invalid(format!("hook {} has an absurd width {}", h.name, h.width))
                    })
            })
            .collect::<Result<_>>()?;
        let mut first_row: u64 = 0;
        for s in &manifest.shards {
            let bad = |what: String| Error::Manifest {
                path: dir.join(MANIFEST),
                what: format!("shard {}: {what}", s.index),
            };
            if s.first_row != first_row || s.hooks.len() != manifest.hooks.len() {
                return Err(bad("inconsistent row offsets or hook count".into()));
            }
            first_row = first_row
                .checked_add(s.rows)
                .ok_or_else(|| bad(format!("an absurd row count {}", s.rows)))?;
            if s.rows.checked_mul(Provenance::BYTES as u64) != Some(s.provenance.bytes) {
                return Err(bad("provenance size disagrees with its row count".into()));
            }
            check_size(&dir.join(&s.provenance.path), s.provenance.bytes)?;
            for (h, f) in s.hooks.iter().enumerate() {
                if s.rows.checked_mul(row_bytes[h]) != Some(f.file.bytes) {
                    return Err(bad(format!(
                        "{} size disagrees with rows x width",
                        f.file.path
                    )));
                }
                check_size(&dir.join(&f.file.path), f.file.bytes)?;
            }
        }
        if first_row != manifest.rows {
            return Err(Error::Manifest {
                path: dir.join(MANIFEST),
                what: format!(
                    "shards hold {first_row} rows, the total says {}",
                    manifest.rows
                ),
            });
        }
        Ok(ActivationStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                manifest,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// Rows per hook.
    pub fn rows(&self) -> u64 {
        self.inner.manifest.rows
    }

    /// Fails unless the cache was harvested from the model file with this sha256, so an SAE is
    /// never trained or evaluated on another model's activations by mistake.
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] naming both hashes.
    pub fn expect_model(&self, model_sha256: &str) -> Result<&Self> {
        let found = &self.inner.manifest.source.model_sha256;
        if found != model_sha256 {
            return Err(Error::ManifestMismatch {
                path: self.inner.dir.join(MANIFEST),
                field: "model_sha256",
                expected: model_sha256.to_string(),
                found: found.clone(),
            });
        }
        Ok(self)
    }

    /// One hook's activations.
    ///
    /// # Errors
    /// [`Error::HookNotInCache`] listing the hooks the cache has.
    pub fn hook(&self, name: &str) -> Result<HookActivations> {
        let index = self.inner.manifest.hook_index(&self.inner.dir, name)?;
        Ok(HookActivations {
            cache: self.clone(),
            index,
        })
    }

    /// Recomputes every file's sha256 and compares it with the manifest. `progress` counts bytes.
    ///
    /// # Errors
    /// The first [`Error::ShardSize`] or [`Error::ChecksumMismatch`], naming the file.
    pub fn verify(&self, progress: Option<&ProgressBar>) -> Result<VerifyReport> {
        let m = &self.inner.manifest;
        let mut report = VerifyReport {
            shards: 0,
            files: 0,
            bytes: 0,
            rows: 0,
        };
        if let Some(pb) = progress {
            let total: u64 = m
                .shards
                .iter()
                .map(|s| s.provenance.bytes + s.hooks.iter().map(|h| h.file.bytes).sum::<u64>())
                .sum();
            pb.set_length(total);
        }
        for s in &m.shards {
            for f in s.hooks.iter().map(|h| &h.file).chain([&s.provenance]) {
                check_file(&self.inner.dir, f, progress)?;
                report.files += 1;
                report.bytes += f.bytes;
            }
            report.shards += 1;
            report.rows += s.rows;
        }
        Ok(report)
    }

    /// Where global row `row` came from.
    ///
    /// # Errors
    /// [`Error::Config`] when `row` is past the end.
    pub fn provenance(&self, row: u64) -> Result<Provenance> {
        let (shard, local) = self.locate(row)?;
        let s = &self.inner.manifest.shards[shard];
        let path = self.inner.dir.join(&s.provenance.path);
        let bytes = read_range(&path, local * Provenance::BYTES as u64, Provenance::BYTES)?;
        let record: [u8; Provenance::BYTES] =
            bytes.as_slice().try_into().map_err(|_| Error::ShardSize {
                path: path.clone(),
                expected: (local + 1) * Provenance::BYTES as u64,
                found: bytes.len() as u64,
            })?;
        Ok(Provenance::from_bytes(&record))
    }

    /// The windows harvested, from `plan.json`.
    pub fn plan(&self) -> Result<PlanInfo> {
        let path = self.inner.dir.join(PLAN);
        let raw = std::fs::read(&path).at("read", &path)?;
        serde_json::from_slice(&raw).map_err(|e| Error::Manifest {
            path,
            what: format!("not a valid plan: {e}"),
        })
    }

    /// (shard, row within shard) of a global row.
    pub(crate) fn locate(&self, row: u64) -> Result<(usize, u64)> {
        let shards = &self.inner.manifest.shards;
        let i = shards.partition_point(|s| s.first_row + s.rows <= row);
        match shards.get(i) {
            Some(s) if row >= s.first_row => Ok((i, row - s.first_row)),
            _ => Err(Error::Config {
                field: "row",
                message: format!("row {row} is past the end ({} rows)", self.rows()),
            }),
        }
    }
}

/// Reads `len` bytes at `offset` through a memory map of just that range, so resident memory
/// stays at the range's size however large the file is.
pub(crate) fn read_range(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    with_mapped(path, offset, len, |b| out.copy_from_slice(b))?;
    Ok(out)
}

/// Maps `len` bytes of `path` at `offset` and hands them to `f`; the map is dropped (unmapped)
/// afterwards.
pub(crate) fn with_mapped<R>(
    path: &Path,
    offset: u64,
    len: usize,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R> {
    if len == 0 {
        return Ok(f(&[]));
    }
    let file = File::open(path).at("open shard", path)?;
    let flen = file.metadata().at("stat shard", path)?.len();
    if offset + len as u64 > flen {
        return Err(Error::ShardSize {
            path: path.to_path_buf(),
            expected: offset + len as u64,
            found: flen,
        });
    }
    // SAFETY: shards are written once and only renamed into place; the cache never modifies a
    // committed file. Another process truncating one while it is mapped is outside the contract
    // (as for every mmap reader).
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            // Fault the whole range in with one call (and one large read-ahead) instead of one
            // page fault per 4 KiB page: about 3x faster on a cold cache.
            .populate()
            .map(&file)
    }
    .at("mmap shard", path)?;
    Ok(f(&map))
}

/// One hook of a cache.
#[derive(Debug, Clone)]
pub struct HookActivations {
    cache: ActivationStore,
    index: usize,
}

impl HookActivations {
    pub fn name(&self) -> &str {
        &self.cache.manifest().hooks[self.index].name
    }

    /// `d_in` of an SAE trained on this hook.
    pub fn width(&self) -> usize {
        self.cache.manifest().hooks[self.index].width
    }

    pub fn rows(&self) -> u64 {
        self.cache.rows()
    }

    pub fn dtype(&self) -> StoreDtype {
        self.cache.manifest().settings.dtype
    }

    pub fn cache(&self) -> &ActivationStore {
        &self.cache
    }

    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// Mean L2 norm of the rows, recorded at harvest: the scale that "normalise activations to
    /// norm sqrt(d_in)" divides by.
    pub fn mean_norm(&self) -> f64 {
        let m = self.cache.manifest();
        let sum: f64 = m
            .shards
            .iter()
            .map(|s| s.hooks[self.index].norm_sum as f64)
            .sum();
        sum / m.rows.max(1) as f64
    }

    /// The path of shard `shard`'s file for this hook.
    pub(crate) fn shard_path(&self, shard: usize) -> PathBuf {
        self.cache.dir().join(
            &self.cache.manifest().shards[shard].hooks[self.index]
                .file
                .path,
        )
    }

    /// Rows `start..start + n` in storage order, as f32, row-major.
    ///
    /// # Errors
    /// [`Error::Config`] when the range runs past the end.
    pub fn read_rows(&self, start: u64, n: usize) -> Result<Vec<f32>> {
        let d = self.width();
        let size = self.dtype().size();
        if start + n as u64 > self.rows() {
            return Err(Error::Config {
                field: "rows",
                message: format!(
                    "rows {start}..{} run past the end ({} rows)",
                    start + n as u64,
                    self.rows()
                ),
            });
        }
        let mut out = vec![0f32; n * d];
        let mut done = 0usize;
        while done < n {
            let (shard, local) = self.cache.locate(start + done as u64)?;
            let s = &self.cache.manifest().shards[shard];
            let take = ((s.rows - local) as usize).min(n - done);
            let path = self.shard_path(shard);
            let dtype = self.dtype();
            with_mapped(&path, local * (d * size) as u64, take * d * size, |b| {
                dtype.decode(b, &mut out[done * d..(done + take) * d])
            })?;
            done += take;
        }
        Ok(out)
    }

    /// Rows `start..start + n` as a `[n, width]` f32 tensor on `device`.
    pub fn tensor(&self, start: u64, n: usize, device: &Device) -> Result<Tensor> {
        let v = self.read_rows(start, n)?;
        Ok(Tensor::from_vec(v, (n, self.width()), device)?)
    }

    /// A stream of `[batch, width]` f32 batches, prepared by a background thread.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings; errors while streaming (a corrupt shard, a full
    /// scratch disk) arrive as `Err` items.
    pub fn batches(&self, cfg: StreamConfig) -> Result<BatchStream> {
        BatchStream::new(self.clone(), cfg)
    }
}
