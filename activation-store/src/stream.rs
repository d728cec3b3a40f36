//! Shuffled streams of activation batches.
//!
//! Towards Monosemanticity found that drawing activations without replacement mattered, so every
//! mode here yields **every row exactly once per epoch**; they differ in how well they mix and
//! what they cost:
//!
//! | [`Shuffle`] | order within an epoch | memory | disk |
//! |---|---|---|---|
//! | `Sequential` | storage order | one chunk | none |
//! | `Buffer` | chunks of `chunk_rows` in a seeded pseudo-random permutation (a Feistel network, so no index list is stored), rows drawn at random from a mixing buffer of `buffer_bytes` | `buffer_bytes` | none |
//! | `External` | a uniformly random permutation of all rows | `memory_bytes` | one copy of the hook's shards in a scratch folder |
//!
//! `External` is the classic two-pass shuffle: pass one deals every row to one of `B` bucket files
//! uniformly at random, pass two loads one bucket at a time, shuffles it in memory and emits it.
//! Dealing uniformly and then shuffling within buckets gives a uniform permutation; a bucket that
//! comes out larger than memory (by chance, or because a cache over 64x the budget needs more than
//! the 64 buckets dealt at once) is dealt again into smaller ones (a further pass), so memory
//! stays bounded for any cache size.
//!
//! Shards are read through memory maps of one chunk at a time, unmapped after copying, so the
//! process's resident memory does not grow with the cache even though the kernel may keep the
//! files in its page cache. A background thread prepares batches (decode, shuffle, tensor on the
//! device) while the trainer works; `prefetch` batches wait in a channel.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::cache::{HookActivations, check_file, with_mapped};
use crate::error::{Error, IoContext, Result};
use crate::pinned::Uploader;

/// How rows are ordered within an epoch. See the module docs for the trade-offs.
#[derive(Debug, Clone, PartialEq)]
pub enum Shuffle {
    /// Storage order (evaluation, top-activating examples).
    Sequential,
    /// Chunks in a seeded random order through a mixing buffer.
    Buffer {
        /// Memory of the mixing buffer (default 256 MiB).
        buffer_bytes: usize,
        /// Rows read contiguously from one shard (default 512).
        chunk_rows: usize,
    },
    /// A uniform random permutation of all rows, each epoch.
    External {
        /// Most bytes of rows held in memory at once (default 1 GiB).
        memory_bytes: usize,
        /// Where bucket files go (default: inside the cache folder). Needs the hook's size free.
        scratch_dir: Option<PathBuf>,
    },
}

impl Shuffle {
    /// `Buffer` with its defaults.
    pub fn buffer() -> Self {
        Shuffle::Buffer {
            buffer_bytes: 256 << 20,
            chunk_rows: 512,
        }
    }

    /// `External` with its defaults.
    pub fn external() -> Self {
        Shuffle::External {
            memory_bytes: 1 << 30,
            scratch_dir: None,
        }
    }
}

/// Settings of a [`BatchStream`].
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Rows per batch. Batches run across epoch boundaries, so all but the very last have this
    /// size.
    pub batch_size: usize,
    /// Seed of the shuffle; epoch `e` uses the ChaCha stream `e` of it.
    pub seed: u64,
    /// Number of passes over the cache; `None` repeats forever.
    pub epochs: Option<u64>,
    pub shuffle: Shuffle,
    /// Batches prepared ahead of the consumer (default 4).
    pub prefetch: usize,
    /// Where batches are put.
    pub device: Device,
    /// Check the sha256 of every shard read against the manifest (default true). `Sequential` and
    /// `External` hash as they read; `Buffer` reads the hook's files once before the first batch.
    pub verify_checksums: bool,
    /// Batches to leave out at the start, to resume a training run where it stopped: the stream
    /// is deterministic, so the next batch is the one the interrupted run would have drawn.
    /// Skipped rows are still read (the shuffle needs them) but never made into tensors.
    pub skip_batches: u64,
}

impl StreamConfig {
    pub fn new(batch_size: usize) -> Self {
        StreamConfig {
            batch_size,
            seed: 0,
            epochs: None,
            shuffle: Shuffle::buffer(),
            prefetch: 4,
            device: Device::Cpu,
            verify_checksums: true,
            skip_batches: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, message: String| Err(Error::Config { field, message });
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        match &self.shuffle {
            Shuffle::Buffer { chunk_rows: 0, .. } => bad("chunk_rows", "must be at least 1".into()),
            Shuffle::External { memory_bytes, .. } if *memory_bytes < 1 << 20 => {
                bad("memory_bytes", format!("{memory_bytes} is below 1 MiB"))
            }
            _ => Ok(()),
        }
    }
}

/// An iterator of `[batch, width]` f32 tensors. Dropping it stops the background thread.
pub struct BatchStream {
    rx: Option<Receiver<Result<Tensor>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    rows_per_epoch: u64,
    width: usize,
    finished: bool,
}

impl BatchStream {
    pub(crate) fn new(hook: HookActivations, cfg: StreamConfig) -> Result<Self> {
        cfg.validate()?;
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let rows_per_epoch = hook.rows();
        let width = hook.width();
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("activation-prefetch".into())
            .spawn(move || {
                let tx2 = tx.clone();
                if let Err(e) = produce(&hook, &cfg, &tx, &stop2) {
                    let _ = tx2.send(Err(e));
                }
            })
            .map_err(|e| Error::Prefetch(format!("cannot start the prefetch thread: {e}")))?;
        Ok(BatchStream {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            rows_per_epoch,
            width,
            finished: false,
        })
    }

    /// Rows in one epoch (the cache's rows).
    pub fn rows_per_epoch(&self) -> u64 {
        self.rows_per_epoch
    }

    /// `d_in` of the batches.
    pub fn width(&self) -> usize {
        self.width
    }
}

impl Iterator for BatchStream {
    type Item = Result<Tensor>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(Ok(t)) => Some(Ok(t)),
            Ok(Err(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            Err(_) => {
                // The sender is gone: a normal end, or a panic in the thread.
                self.finished = true;
                let panicked = self.handle.take().map(|h| h.join().is_err());
                panicked
                    .unwrap_or(false)
                    .then(|| Err(Error::Prefetch("the prefetch thread panicked".into())))
            }
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sent in place of a real error when the consumer went away; never reaches anyone.
fn stopped() -> Error {
    Error::Prefetch("stream dropped".into())
}

fn produce(
    hook: &HookActivations,
    cfg: &StreamConfig,
    tx: &SyncSender<Result<Tensor>>,
    stop: &AtomicBool,
) -> Result<()> {
    let d = hook.width();
    if cfg.verify_checksums && matches!(cfg.shuffle, Shuffle::Buffer { .. }) {
        for s in &hook.cache().manifest().shards {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            check_file(hook.cache().dir(), &s.hooks[hook.index()].file, None)?;
        }
    }
    // A batch never holds more rows than the stream has: reserve no more than that, so that an
    // absurd batch size costs the rows that exist rather than aborting on the reservation.
    let stream_rows = cfg
        .epochs
        .map_or(hook.rows(), |e| hook.rows().saturating_mul(e))
        .max(1);
    let batch_rows = usize::try_from(stream_rows).map_or(cfg.batch_size, |r| r.min(cfg.batch_size));
    let reserve = batch_rows.saturating_mul(d);
    let mut batch: Vec<f32> = Vec::with_capacity(reserve);
    let mut epoch = 0u64;
    let mut skip = cfg.skip_batches;
    let mut uploader = Uploader::new(&cfg.device);
    let mut send = |batch: Vec<f32>| -> Result<bool> {
        let rows = batch.len() / d;
        let t = uploader.tensor(batch, (rows, d))?;
        Ok(tx.send(Ok(t)).is_ok())
    };
    while cfg.epochs.is_none_or(|n| epoch < n) {
        if hook.rows() == 0 {
            break;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(epoch);
        // Only the first epoch needs hashing; later ones read the same, already checked bytes.
        let verify = cfg.verify_checksums && epoch == 0;
        let mut reader: Box<dyn EpochReader> = match &cfg.shuffle {
            Shuffle::Sequential => Box::new(SeqCursor::new(hook.clone(), 4096, verify)),
            Shuffle::Buffer {
                buffer_bytes,
                chunk_rows,
            } => Box::new(BufferReader::new(
                hook.clone(),
                *buffer_bytes,
                *chunk_rows,
                rng,
            )),
            Shuffle::External {
                memory_bytes,
                scratch_dir,
            } => Box::new(ExternalReader::new(
                hook.clone(),
                *memory_bytes,
                scratch_dir.clone(),
                rng,
                verify,
                stop,
            )?),
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(stopped());
            }
            let want = cfg.batch_size - batch.len() / d;
            let got = reader.fill(&mut batch, want)?;
            if got == 0 {
                break;
            }
            if batch.len() / d == cfg.batch_size && skip > 0 {
                skip -= 1;
                batch.clear();
            } else if batch.len() / d == cfg.batch_size {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(reserve));
                if !send(full)? {
                    return Ok(());
                }
            }
        }
        epoch += 1;
    }
    if !batch.is_empty() && skip == 0 {
        send(batch)?;
    }
    Ok(())
}

/// Yields one epoch's rows.
trait EpochReader {
    /// Appends up to `want` rows (f32, row-major) to `out`; 0 means the epoch is over.
    fn fill(&mut self, out: &mut Vec<f32>, want: usize) -> Result<usize>;
}

/// Reads a hook's shards in storage order, a chunk at a time, optionally hashing each shard.
struct SeqCursor {
    hook: HookActivations,
    chunk_rows: usize,
    shard: usize,
    local: u64,
    hasher: Option<Sha256>,
    verify: bool,
}

impl SeqCursor {
    fn new(hook: HookActivations, chunk_rows: usize, verify: bool) -> Self {
        SeqCursor {
            hook,
            chunk_rows,
            shard: 0,
            local: 0,
            hasher: verify.then(Sha256::new),
            verify,
        }
    }

    /// Hands the next chunk's raw bytes and row count to `f`; `None` at the end.
    fn next_chunk<R>(&mut self, f: impl FnOnce(&[u8], usize) -> R) -> Result<Option<R>> {
        let shards = &self.hook.cache().manifest().shards;
        while let Some(s) = shards.get(self.shard) {
            if self.local < s.rows {
                break;
            }
            if let Some(h) = self.hasher.take() {
                let info = &s.hooks[self.hook.index()].file;
                let found = hex::encode(h.finalize());
                if found != info.sha256 {
                    return Err(Error::ChecksumMismatch {
                        path: self.hook.shard_path(self.shard),
                        expected: info.sha256.clone(),
                        found,
                    });
                }
            }
            self.shard += 1;
            self.local = 0;
            if self.verify {
                self.hasher = Some(Sha256::new());
            }
        }
        let Some(s) = shards.get(self.shard) else {
            return Ok(None);
        };
        let row_bytes = self.hook.width() * self.hook.dtype().size();
        let take = ((s.rows - self.local) as usize).min(self.chunk_rows);
        let path = self.hook.shard_path(self.shard);
        let hasher = &mut self.hasher;
        let r = with_mapped(
            &path,
            self.local * row_bytes as u64,
            take * row_bytes,
            |bytes| {
                if let Some(h) = hasher.as_mut() {
                    h.update(bytes);
                }
                f(bytes, take)
            },
        )?;
        self.local += take as u64;
        Ok(Some(r))
    }
}

impl EpochReader for SeqCursor {
    fn fill(&mut self, out: &mut Vec<f32>, want: usize) -> Result<usize> {
        let d = self.hook.width();
        let dtype = self.hook.dtype();
        let saved = self.chunk_rows;
        self.chunk_rows = saved.min(want);
        let r = self.next_chunk(|bytes, rows| {
            let start = out.len();
            out.resize(start + rows * d, 0.0);
            dtype.decode(bytes, &mut out[start..]);
            rows
        });
        self.chunk_rows = saved;
        Ok(r?.unwrap_or(0))
    }
}

/// A keyed pseudo-random permutation of `0..n` (a 4-round Feistel network on the smallest
/// even-bit domain covering `n`, with cycle walking): O(1) memory, every index exactly once.
#[derive(Debug, Clone)]
pub(crate) struct Feistel {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Feistel {
    pub(crate) fn new(n: u64, rng: &mut impl Rng) -> Self {
        let mut half_bits = 0;
        while half_bits < 32 && (1u64 << (2 * half_bits)) < n {
            half_bits += 1;
        }
        Feistel {
            n,
            half_bits,
            keys: [rng.random(), rng.random(), rng.random(), rng.random()],
        }
    }

    fn round_trip(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = mix64(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// The image of `i < n`.
    pub(crate) fn get(&self, i: u64) -> u64 {
        let mut x = self.round_trip(i);
        while x >= self.n {
            x = self.round_trip(x);
        }
        x
    }
}

/// Chunks in Feistel order, rows drawn at random from a mixing buffer.
struct BufferReader {
    hook: HookActivations,
    chunk_rows: usize,
    /// First global chunk index of each shard, plus the total at the end.
    chunk_starts: Vec<u64>,
    perm: Feistel,
    next_chunk: u64,
    buffer: Vec<f32>,
    capacity_rows: usize,
    rng: ChaCha8Rng,
}

impl BufferReader {
    fn new(
        hook: HookActivations,
        buffer_bytes: usize,
        chunk_rows: usize,
        mut rng: ChaCha8Rng,
    ) -> Self {
        let mut chunk_starts = vec![0u64];
        for s in &hook.cache().manifest().shards {
            let last = *chunk_starts.last().unwrap_or(&0);
            chunk_starts.push(last + s.rows.div_ceil(chunk_rows as u64));
        }
        let total = *chunk_starts.last().unwrap_or(&0);
        let d = hook.width();
        let capacity_rows = (buffer_bytes / (4 * d)).max(2 * chunk_rows);
        BufferReader {
            perm: Feistel::new(total, &mut rng),
            hook,
            chunk_rows,
            chunk_starts,
            next_chunk: 0,
            buffer: Vec::new(),
            capacity_rows,
            rng,
        }
    }

    fn load_chunk(&mut self) -> Result<()> {
        let c = self.perm.get(self.next_chunk);
        self.next_chunk += 1;
        let shard = self.chunk_starts.partition_point(|&s| s <= c) - 1;
        let first = (c - self.chunk_starts[shard]) * self.chunk_rows as u64;
        let rows = self.hook.cache().manifest().shards[shard].rows;
        let take = (rows - first).min(self.chunk_rows as u64) as usize;
        let d = self.hook.width();
        let dtype = self.hook.dtype();
        let row_bytes = d * dtype.size();
        let start = self.buffer.len();
        self.buffer.resize(start + take * d, 0.0);
        let buf = &mut self.buffer[start..];
        with_mapped(
            &self.hook.shard_path(shard),
            first * row_bytes as u64,
            take * row_bytes,
            |bytes| dtype.decode(bytes, buf),
        )
    }
}

impl EpochReader for BufferReader {
    fn fill(&mut self, out: &mut Vec<f32>, want: usize) -> Result<usize> {
        let d = self.hook.width();
        let total = *self.chunk_starts.last().unwrap_or(&0);
        let mut n = 0;
        while n < want {
            while self.next_chunk < total
                && self.buffer.len() / d + self.chunk_rows <= self.capacity_rows
            {
                self.load_chunk()?;
            }
            let have = self.buffer.len() / d;
            if have == 0 {
                break;
            }
            let j = self.rng.random_range(0..have);
            out.extend_from_slice(&self.buffer[j * d..(j + 1) * d]);
            let last = have - 1;
            if j != last {
                self.buffer.copy_within(last * d..have * d, j * d);
            }
            self.buffer.truncate(last * d);
            n += 1;
        }
        Ok(n)
    }
}

/// Most bucket files dealt to at once.
const MAX_FANOUT: usize = 64;

/// A bucket file of raw rows (in the cache's dtype) waiting for pass two.
struct Bucket {
    path: PathBuf,
    rows: usize,
}

/// The two-pass (or more) external shuffle.
struct ExternalReader {
    hook: HookActivations,
    memory_bytes: usize,
    row_bytes: usize,
    /// Keeps the scratch folder alive; deleted on drop.
    scratch: tempfile::TempDir,
    pending: Vec<Bucket>,
    /// The bucket being emitted: raw rows and the order to emit them in.
    current: Vec<u8>,
    order: Vec<u32>,
    pos: usize,
    rng: ChaCha8Rng,
    next_name: u64,
}

impl ExternalReader {
    fn new(
        hook: HookActivations,
        memory_bytes: usize,
        scratch_dir: Option<PathBuf>,
        rng: ChaCha8Rng,
        verify: bool,
        stop: &AtomicBool,
    ) -> Result<Self> {
        let row_bytes = hook.width() * hook.dtype().size();
        let parent = scratch_dir.unwrap_or_else(|| hook.cache().dir().to_path_buf());
        let scratch = tempfile::Builder::new()
            .prefix(".shuffle-")
            .tempdir_in(&parent)
            .at("create scratch folder in", &parent)?;
        let mut r = ExternalReader {
            hook,
            memory_bytes,
            row_bytes,
            scratch,
            pending: Vec::new(),
            current: Vec::new(),
            order: Vec::new(),
            pos: 0,
            rng,
            next_name: 0,
        };
        // Pass one: deal every row to a bucket.
        let total_rows = r.hook.rows() as usize;
        let mut cursor = SeqCursor::new(r.hook.clone(), 4096, verify);
        let buckets = r.deal(total_rows, |sink| {
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Err(stopped());
                }
                match cursor.next_chunk(|bytes, rows| sink(bytes, rows))? {
                    Some(res) => res?,
                    None => return Ok(()),
                }
            }
        })?;
        r.pending = buckets;
        r.pending.reverse();
        Ok(r)
    }

    /// How many buckets `rows` rows need so that each (with margin) fits in memory.
    fn bucket_count(&self, rows: usize) -> usize {
        let bytes = rows as f64 * (self.row_bytes + 4) as f64 * 1.25;
        ((bytes / self.memory_bytes as f64).ceil() as usize).max(1)
    }

    /// Deals the rows that `feed` produces into fresh bucket files, uniformly at random.
    fn deal(
        &mut self,
        rows: usize,
        feed: impl FnOnce(&mut dyn FnMut(&[u8], usize) -> Result<()>) -> Result<()>,
    ) -> Result<Vec<Bucket>> {
        // At most MAX_FANOUT open buckets, so write buffers take at most a quarter of the budget
        // whatever the cache size; a bucket that comes out too large is dealt again later.
        let k = self.bucket_count(rows).clamp(2, MAX_FANOUT);
        let cap = (self.memory_bytes / (4 * k)).clamp(16 << 10, 4 << 20);
        let mut files = Vec::with_capacity(k);
        let mut counts = vec![0usize; k];
        for _ in 0..k {
            let path = self
                .scratch
                .path()
                .join(format!("bucket-{}.bin", self.next_name));
            self.next_name += 1;
            let f = File::create(&path).at("create scratch bucket", &path)?;
            files.push((path, BufWriter::with_capacity(cap, f)));
        }
        let rb = self.row_bytes;
        let rng = &mut self.rng;
        let mut sink = |bytes: &[u8], n: usize| -> Result<()> {
            for row in bytes.chunks_exact(rb).take(n) {
                let b = rng.random_range(0..k);
                counts[b] += 1;
                let (path, w) = &mut files[b];
                w.write_all(row).at("write scratch bucket", path)?;
            }
            Ok(())
        };
        feed(&mut sink)?;
        let mut out = Vec::with_capacity(k);
        for ((path, w), rows) in files.into_iter().zip(counts) {
            w.into_inner()
                .map_err(|e| Error::io("write scratch bucket", &path, e.into_error()))?;
            out.push(Bucket { path, rows });
        }
        Ok(out)
    }

    /// Makes the next bucket that fits in memory current; false when none are left.
    fn next_bucket(&mut self) -> Result<bool> {
        while let Some(b) = self.pending.pop() {
            if b.rows == 0 {
                std::fs::remove_file(&b.path).at("remove scratch bucket", &b.path)?;
                continue;
            }
            if b.rows * (self.row_bytes + 4) <= self.memory_bytes || b.rows == 1 {
                // Read into the previous bucket's allocation: never two buckets in memory.
                self.current.clear();
                self.current.reserve_exact(b.rows * self.row_bytes);
                File::open(&b.path)
                    .and_then(|mut f| f.read_to_end(&mut self.current))
                    .at("read scratch bucket", &b.path)?;
                std::fs::remove_file(&b.path).at("remove scratch bucket", &b.path)?;
                if self.current.len() != b.rows * self.row_bytes {
                    return Err(Error::ShardSize {
                        path: b.path,
                        expected: (b.rows * self.row_bytes) as u64,
                        found: self.current.len() as u64,
                    });
                }
                self.order = (0..b.rows as u32).collect();
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
                return Ok(true);
            }
            // Too large for memory: deal it again into smaller buckets (another pass).
            let path = b.path.clone();
            let rb = self.row_bytes;
            let subs = self.deal(b.rows, |sink| {
                let f = File::open(&path).at("open scratch bucket", &path)?;
                let mut r = BufReader::with_capacity(4 << 20, f);
                let mut buf = vec![0u8; rb * 1024];
                let mut left = b.rows;
                while left > 0 {
                    let n = left.min(1024);
                    r.read_exact(&mut buf[..n * rb])
                        .at("read scratch bucket", &path)?;
                    sink(&buf[..n * rb], n)?;
                    left -= n;
                }
                Ok(())
            })?;
            std::fs::remove_file(&path).at("remove scratch bucket", &path)?;
            self.pending.extend(subs.into_iter().rev());
        }
        Ok(false)
    }
}

impl EpochReader for ExternalReader {
    fn fill(&mut self, out: &mut Vec<f32>, want: usize) -> Result<usize> {
        let d = self.hook.width();
        let dtype = self.hook.dtype();
        let rb = self.row_bytes;
        let mut n = 0;
        while n < want {
            if self.pos == self.order.len() && !self.next_bucket()? {
                break;
            }
            let take = (self.order.len() - self.pos).min(want - n);
            let start = out.len();
            out.resize(start + take * d, 0.0);
            for (k, &r) in self.order[self.pos..self.pos + take].iter().enumerate() {
                let r = r as usize;
                dtype.decode(
                    &self.current[r * rb..(r + 1) * rb],
                    &mut out[start + k * d..start + (k + 1) * d],
                );
            }
            self.pos += take;
            n += take;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feistel_is_a_permutation() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let mut rng = ChaCha8Rng::seed_from_u64(n);
            let p = Feistel::new(n, &mut rng);
            let mut seen: Vec<u64> = (0..n).map(|i| p.get(i)).collect();
            let moved = seen
                .iter()
                .enumerate()
                .filter(|&(i, &v)| i as u64 != v)
                .count();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
            if n >= 64 {
                assert!(moved as u64 > n / 2, "n = {n}: only {moved} moved");
            }
        }
    }

    /// Buckets larger than memory are dealt again (a third pass), and still every row comes out
    /// exactly once.
    #[test]
    fn oversized_buckets_are_split_again() {
        use crate::{HarvestConfig, ModelIdentity, Split, SyntheticSource, TokenizedDocument};
        let tmp = tempfile::tempdir().unwrap();
        let docs: Vec<TokenizedDocument> = (0..40)
            .map(|i| TokenizedDocument {
                id: format!("d/{i}"),
                split: Split::Train,
                tokens: (0..30).map(|j| 2 + (i * 31 + j) as u32).collect(),
            })
            .collect();
        let plan = crate::WindowPlan::build(&docs, Split::Train, 16, 1, 0).unwrap();
        let mut src = SyntheticSource {
            widths: vec![("h".into(), 12)],
            delay: std::time::Duration::ZERO,
        };
        let id = ModelIdentity {
            model: "m".into(),
            model_sha256: "0".into(),
            tokenizer: "t".into(),
        };
        let mut cfg = HarvestConfig::new(vec!["h".into()]);
        cfg.shard_rows = 300;
        crate::harvest(tmp.path(), &plan, &id, &mut src, &cfg, None).unwrap();
        let acts = crate::ActivationStore::open(tmp.path())
            .unwrap()
            .hook("h")
            .unwrap();
        let n = acts.rows() as usize;
        assert_eq!(n, 1200);
        let stop = AtomicBool::new(false);
        let rng = ChaCha8Rng::seed_from_u64(3);
        let mut r = ExternalReader::new(acts.clone(), 1 << 30, None, rng, true, &stop).unwrap();
        assert_eq!(r.pending.len(), 2);
        // Now only ~100 rows fit: each ~600-row bucket must be dealt again.
        r.memory_bytes = 100 * (r.row_bytes + 4);
        let mut out = Vec::new();
        while r.fill(&mut out, 77).unwrap() > 0 {}
        assert!(
            r.next_name > 4,
            "no bucket was re-dealt ({} files)",
            r.next_name
        );
        let key = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let mut got: Vec<_> = out.chunks(12).map(key).collect();
        let mut want: Vec<_> = acts.read_rows(0, n).unwrap().chunks(12).map(key).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }
}
