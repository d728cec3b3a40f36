//! Crash-safe cache writing.
//!
//! A shard is written to `shard-N.bin.tmp` files (one per hook plus provenance), each flushed
//! and fsynced, then renamed into place, the folders fsynced, and only then is the manifest that
//! lists the shard written (again temporary file, fsync, rename, fsync of the folder). The
//! manifest is the commit point: after a `kill -9` at any instant, either it lists the shard, and
//! every byte of the shard is on disk, or it does not, and the next run deletes whatever files the
//! shard left and makes it again from the same forward batches.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::manifest::{
    CacheSettings, FORMAT, FileInfo, HookInfo, HookShard, Manifest, Provenance, ShardInfo,
    SourceInfo, shard_path,
};

pub(crate) const MANIFEST: &str = "manifest.json";
pub(crate) const PLAN: &str = "plan.json";
pub(crate) const PROVENANCE: &str = "provenance";

/// fsyncs a folder, so that renames and creations inside it survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .at("fsync folder", dir)
}

/// Writes `bytes` to `path` atomically: `atomic-write-file` writes a temporary file, fsyncs
/// it, renames it into place and fsyncs the folder, returning every failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = atomic_write_file::AtomicWriteFile::open(path).at("create", path)?;
    f.write_all(bytes).at("write", path)?;
    f.commit().at("commit", path)
}

/// A temporary file that a killed run left at the top of a cache folder: `manifest.json.tmp`
/// (older versions) or `.manifest.json.XXXXXX` / `.plan.json.XXXXXX` from [`write_atomic`]
/// where the filesystem has no unnamed temporary files.
fn interrupted_write(name: &str) -> bool {
    name.ends_with(".tmp")
        || [MANIFEST, PLAN].iter().any(|f| {
            name.strip_prefix('.')
                .is_some_and(|r| r.starts_with(&format!("{f}.")))
        })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

pub(crate) fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    let raw = match fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let m: Manifest = serde_json::from_slice(&raw).map_err(|e| Error::Manifest {
        path: path.clone(),
        what: format!("not a valid manifest: {e}"),
    })?;
    if m.format != FORMAT {
        return Err(Error::Manifest {
            path,
            what: format!("format {:?}, this reader reads {FORMAT:?}", m.format),
        });
    }
    Ok(Some(m))
}

/// A file being written: buffered, hashed as it goes.
struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
    rel: String,
    out: BufWriter<File>,
    hash: Sha256,
    bytes: u64,
}

impl PendingFile {
    fn create(dir: &Path, rel: String) -> Result<Self> {
        let dest = dir.join(&rel);
        let tmp = tmp_path(&dest);
        // Not `create_new`: a stale temporary file from a killed run is simply overwritten.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .at("create", &tmp)?;
        Ok(PendingFile {
            tmp,
            dest,
            rel,
            out: BufWriter::with_capacity(1 << 20, f),
            hash: Sha256::new(),
            bytes: 0,
        })
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b).at("write", &self.tmp)
    }

    /// Flushes, fsyncs and renames into place.
    fn finish(self) -> Result<FileInfo> {
        let f = self
            .out
            .into_inner()
            .map_err(|e| Error::io("write", &self.tmp, e.into_error()))?;
        f.sync_all().at("fsync", &self.tmp)?;
        drop(f);
        fs::rename(&self.tmp, &self.dest).at("rename into place", &self.dest)?;
        Ok(FileInfo {
            path: self.rel,
            bytes: self.bytes,
            sha256: hex::encode(self.hash.finalize()),
        })
    }
}

/// A shard being filled. Rows go straight to temporary files, so memory stays flat however
/// large shards are. Dropping it without [`CacheWriter::commit`] leaves only temporary files.
pub struct ShardBuilder {
    index: u64,
    dtype: crate::StoreDtype,
    widths: Vec<usize>,
    hooks: Vec<PendingFile>,
    provenance: PendingFile,
    norm_sums: Vec<f64>,
    rows: u64,
    scratch: Vec<u8>,
}

impl ShardBuilder {
    /// Appends one token's row for every hook (in the manifest's hook order).
    ///
    /// # Errors
    /// [`Error::Shape`] for a row of the wrong width; [`Error::DiskFull`] / [`Error::Io`] naming
    /// the shard file.
    pub fn push(&mut self, prov: Provenance, rows: &[&[f32]]) -> Result<()> {
        if rows.len() != self.hooks.len() {
            return Err(Error::Shape {
                what: "rows per token".into(),
                expected: format!("one per hook ({})", self.hooks.len()),
                got: rows.len().to_string(),
            });
        }
        for (i, row) in rows.iter().enumerate() {
            if row.len() != self.widths[i] {
                return Err(Error::Shape {
                    what: format!("row of {}", self.hooks[i].rel),
                    expected: format!("[{}]", self.widths[i]),
                    got: format!("[{}]", row.len()),
                });
            }
            self.scratch.clear();
            self.dtype.encode(row, &mut self.scratch);
            self.norm_sums[i] += row
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt();
            let (pending, scratch) = (&mut self.hooks[i], &self.scratch);
            pending.write(scratch)?;
        }
        self.provenance.write(&prov.to_bytes())?;
        self.rows += 1;
        Ok(())
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The shard's index in the cache.
    pub fn index(&self) -> u64 {
        self.index
    }
}

/// Appends shards to a cache folder. See the module docs for the commit protocol.
pub struct CacheWriter {
    dir: PathBuf,
    manifest: Manifest,
}

/// The first setting in which `asked` and `found` differ, with both values. Destructured in
/// full, so a setting added to [`CacheSettings`] cannot be left out of the comparison.
fn first_difference(
    asked: &CacheSettings,
    found: &CacheSettings,
) -> Option<(&'static str, String, String)> {
    fn differ<T: PartialEq + std::fmt::Debug>(
        name: &'static str,
        a: &T,
        b: &T,
    ) -> Option<(&'static str, String, String)> {
        (a != b).then(|| (name, format!("{a:?}"), format!("{b:?}")))
    }
    let CacheSettings {
        dtype,
        shard_rows,
        batch_windows,
        exclude_bos,
        exclude_token_ids,
        outlier_factor,
    } = asked;
    differ("dtype", dtype, &found.dtype)
        .or_else(|| differ("shard_rows", shard_rows, &found.shard_rows))
        .or_else(|| differ("batch_windows", batch_windows, &found.batch_windows))
        .or_else(|| differ("exclude_bos", exclude_bos, &found.exclude_bos))
        .or_else(|| {
            differ(
                "exclude_token_ids",
                exclude_token_ids,
                &found.exclude_token_ids,
            )
        })
        .or_else(|| differ("outlier_factor", outlier_factor, &found.outlier_factor))
}

impl CacheWriter {
    /// Opens the cache in `dir` for appending when its manifest exists, checking that it was made
    /// from the same source with the same settings, and deletes files of uncommitted shards.
    /// Returns `None` when `dir` holds no manifest yet.
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] naming the first differing field.
    pub fn resume(
        dir: &Path,
        source: &SourceInfo,
        settings: &CacheSettings,
    ) -> Result<Option<Self>> {
        let Some(manifest) = read_manifest(dir)? else {
            return Ok(None);
        };
        let mismatch = |field: &'static str, expected: String, found: String| {
            Err(Error::ManifestMismatch {
                path: dir.join(MANIFEST),
                field,
                expected,
                found,
            })
        };
        let (s, m) = (source, &manifest.source);
        if s.model_sha256 != m.model_sha256 {
            return mismatch(
                "model_sha256",
                s.model_sha256.clone(),
                m.model_sha256.clone(),
            );
        }
        if s.tokenizer != m.tokenizer {
            return mismatch("tokenizer", s.tokenizer.clone(), m.tokenizer.clone());
        }
        if s.context_len != m.context_len {
            return mismatch(
                "context_len",
                s.context_len.to_string(),
                m.context_len.to_string(),
            );
        }
        if s.split != m.split {
            return mismatch("split", s.split.clone(), m.split.clone());
        }
        if s.plan_sha256 != m.plan_sha256 {
            return mismatch(
                "plan_sha256 (corpus or tokenizer changed)",
                s.plan_sha256.clone(),
                m.plan_sha256.clone(),
            );
        }
        if let Some((field, expected, found)) = first_difference(settings, &manifest.settings) {
            return mismatch(field, expected, found);
        }
        let w = CacheWriter {
            dir: dir.to_path_buf(),
            manifest,
        };
        w.remove_uncommitted()?;
        Ok(Some(w))
    }

    /// Starts a new cache in `dir` (created if needed), which must not hold a manifest.
    ///
    /// # Errors
    /// [`Error::Config`] when `dir` already holds files other than a previous, uncommitted
    /// attempt's, so nothing unrelated is ever deleted.
    pub fn create(
        dir: &Path,
        source: SourceInfo,
        settings: CacheSettings,
        hooks: Vec<HookInfo>,
    ) -> Result<Self> {
        if hooks.is_empty() {
            return Err(Error::Config {
                field: "hooks",
                message: "at least one hook is needed".into(),
            });
        }
        for h in &hooks {
            if h.name.is_empty()
                || h.name.contains('/')
                || h.name.starts_with('.')
                || h.name == PROVENANCE
            {
                return Err(Error::Config {
                    field: "hooks",
                    message: format!("{:?} cannot be a folder name", h.name),
                });
            }
        }
        fs::create_dir_all(dir).at("create folder", dir)?;
        if read_manifest(dir)?.is_some() {
            return Err(Error::Config {
                field: "out",
                message: format!("{} already holds a cache; resume it instead", dir.display()),
            });
        }
        let ours = |name: &str| {
            name == PLAN
                || interrupted_write(name)
                || name == PROVENANCE
                || hooks.iter().any(|h| h.name == name)
        };
        for entry in fs::read_dir(dir).at("list", dir)? {
            let entry = entry.at("list", dir)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if interrupted_write(&name) {
                fs::remove_file(entry.path()).at("remove uncommitted", &entry.path())?;
            } else if !ours(&name) {
                return Err(Error::Config {
                    field: "out",
                    message: format!(
                        "{} is not empty (holds {name:?}); use an empty or new folder",
                        dir.display()
                    ),
                });
            }
        }
        for sub in hooks.iter().map(|h| h.name.as_str()).chain([PROVENANCE]) {
            let p = dir.join(sub);
            fs::create_dir_all(&p).at("create folder", &p)?;
        }
        let w = CacheWriter {
            dir: dir.to_path_buf(),
            manifest: Manifest {
                format: FORMAT.to_string(),
                source,
                settings,
                hooks,
                shards: Vec::new(),
                rows: 0,
                dropped_outliers: 0,
                batches_done: 0,
                windows_done: 0,
            },
        };
        w.remove_uncommitted()?;
        w.write_manifest()?;
        Ok(w)
    }

    /// Deletes temporary files and shard files the manifest does not list (a killed run's).
    fn remove_uncommitted(&self) -> Result<()> {
        let committed = self.manifest.shards.len() as u64;
        let subs = self
            .manifest
            .hooks
            .iter()
            .map(|h| h.name.as_str())
            .chain([PROVENANCE]);
        for sub in subs {
            let d = self.dir.join(sub);
            let entries = match fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    fs::create_dir_all(&d).at("create folder", &d)?;
                    continue;
                }
                Err(e) => return Err(Error::io("list", d, e)),
            };
            for entry in entries {
                let entry = entry.at("list", &d)?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let index = name
                    .strip_prefix("shard-")
                    .and_then(|r| r.strip_suffix(".bin"))
                    .and_then(|n| n.parse::<u64>().ok());
                let stale = name.ends_with(".tmp") || index.is_some_and(|i| i >= committed);
                if stale {
                    fs::remove_file(entry.path()).at("remove uncommitted", &entry.path())?;
                }
            }
        }
        // Temporary files of a killed atomic write: `manifest.json.tmp` from older versions,
        // `.manifest.json.XXXXXX` where the filesystem has no unnamed temporary files.
        for entry in fs::read_dir(&self.dir).at("list", &self.dir)? {
            let entry = entry.at("list", &self.dir)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = [MANIFEST, PLAN]
                .iter()
                .any(|f| name == format!("{f}.tmp") || name.starts_with(&format!(".{f}.")));
            if stale {
                fs::remove_file(entry.path()).at("remove uncommitted", &entry.path())?;
            }
        }
        Ok(())
    }

    fn write_manifest(&self) -> Result<()> {
        let path = self.dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&self.manifest).map_err(|e| Error::Manifest {
            path: path.clone(),
            what: e.to_string(),
        })?;
        write_atomic(&path, &json)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens temporary files for the next shard.
    pub fn begin_shard(&self) -> Result<ShardBuilder> {
        let index = self.manifest.shards.len() as u64;
        let hooks = self
            .manifest
            .hooks
            .iter()
            .map(|h| PendingFile::create(&self.dir, shard_path(&h.name, index)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardBuilder {
            index,
            dtype: self.manifest.settings.dtype,
            widths: self.manifest.hooks.iter().map(|h| h.width).collect(),
            hooks,
            provenance: PendingFile::create(&self.dir, shard_path(PROVENANCE, index))?,
            norm_sums: vec![0.0; self.manifest.hooks.len()],
            rows: 0,
            scratch: Vec::new(),
        })
    }

    /// Makes the shard durable and lists it in the manifest; `batches_end`/`windows_end` are the
    /// first batch and window *not* in this shard, where a resumed run starts.
    pub fn commit(
        &mut self,
        shard: ShardBuilder,
        batches_end: u64,
        windows_end: u64,
        dropped_outliers: u64,
    ) -> Result<&ShardInfo> {
        let mut hooks = Vec::with_capacity(shard.hooks.len());
        for (pending, norm_sum) in shard.hooks.into_iter().zip(shard.norm_sums) {
            hooks.push(HookShard {
                file: pending.finish()?,
                norm_sum: norm_sum as f32,
            });
        }
        let provenance = shard.provenance.finish()?;
        for sub in self
            .manifest
            .hooks
            .iter()
            .map(|h| h.name.as_str())
            .chain([PROVENANCE])
        {
            sync_dir(&self.dir.join(sub))?;
        }
        let m = &mut self.manifest;
        m.shards.push(ShardInfo {
            index: shard.index,
            first_row: m.rows,
            rows: shard.rows,
            batches: [m.batches_done, batches_end],
            windows: [m.windows_done, windows_end],
            dropped_outliers,
            provenance,
            hooks,
        });
        m.rows += shard.rows;
        m.dropped_outliers += dropped_outliers;
        m.batches_done = batches_end;
        m.windows_done = windows_end;
        if let Err(e) = self.write_manifest() {
            // Keep memory in line with disk: the shard is not committed.
            let m = &mut self.manifest;
            if let Some(s) = m.shards.pop() {
                m.rows -= s.rows;
                m.dropped_outliers -= s.dropped_outliers;
                m.batches_done = s.batches[0];
                m.windows_done = s.windows[0];
            }
            return Err(e);
        }
        Ok(self.manifest.shards.last().expect("just pushed"))
    }
}
