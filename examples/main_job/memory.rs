//! The process's memory over the run, sampled on a thread, so that a leak shows as a rising line
//! in `report/memory.png` rather than as an out-of-memory kill in hour three.
//!
//! Anonymous memory (heap: weights, Adam moments, batches) is what a leak grows. File-backed
//! memory is mostly the memory-mapped activation cache, whose pages the kernel keeps while they
//! are hot and drops under pressure; it is drawn beside it, not added to it.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// The stage named last by `main_job`'s `stage()`: its first word labels each sample.
static STAGE: Mutex<String> = Mutex::new(String::new());

/// Labels the samples taken from now on.
pub fn set_stage(msg: &str) {
    let word = msg.split_whitespace().next().unwrap_or("").to_string();
    if let Ok(mut s) = STAGE.lock() {
        *s = word;
    }
}

/// One reading of `/proc/self/status`.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub seconds: f64,
    pub stage: String,
    pub rss_anon_mib: f64,
    pub rss_file_mib: f64,
}

/// `RssAnon` and `RssFile` of this process in MiB; `None` where `/proc` does not exist.
fn read_rss() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    };
    Some((field("RssAnon:")?, field("RssFile:")?))
}

/// Samples memory every `every` into `csv` (one line each, flushed) until [`MemoryLog::finish`].
pub struct MemoryLog {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl MemoryLog {
    pub fn start(csv: &Path, every: Duration) -> Result<Self> {
        let mut file =
            std::fs::File::create(csv).with_context(|| format!("creating {}", csv.display()))?;
        writeln!(file, "seconds,stage,rss_anon_mib,rss_file_mib")?;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let t0 = Instant::now();
        let handle = std::thread::spawn(move || {
            loop {
                if let Some((anon, file_mib)) = read_rss() {
                    let sample = Sample {
                        seconds: t0.elapsed().as_secs_f64(),
                        stage: STAGE.lock().map(|s| s.clone()).unwrap_or_default(),
                        rss_anon_mib: anon,
                        rss_file_mib: file_mib,
                    };
                    // A full disk loses samples, not the run.
                    let _ = writeln!(
                        file,
                        "{:.1},{},{:.1},{:.1}",
                        sample.seconds, sample.stage, anon, file_mib
                    );
                    if let Ok(mut v) = s.lock() {
                        v.push(sample);
                    }
                }
                // Sleep in short slices so that `finish` returns promptly.
                let until = Instant::now() + every;
                while Instant::now() < until {
                    if st.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50).min(every));
                }
            }
        });
        Ok(Self {
            samples,
            stop,
            handle: Some(handle),
        })
    }

    /// Stops sampling and returns every sample.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.samples.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Per stage: the first, last and largest anonymous RSS, in MiB, in the order the stages ran.
#[derive(Debug, Serialize)]
pub struct StageMemory {
    pub stage: String,
    pub samples: usize,
    /// Time of the stage's last sample, from the start of the run.
    pub until_seconds: f64,
    pub first_anon_mib: f64,
    pub last_anon_mib: f64,
    pub peak_anon_mib: f64,
    pub peak_file_mib: f64,
}

pub fn by_stage(samples: &[Sample]) -> Vec<StageMemory> {
    let mut out: Vec<StageMemory> = Vec::new();
    for s in samples {
        match out.last_mut() {
            Some(m) if m.stage == s.stage => {
                m.samples += 1;
                m.until_seconds = s.seconds;
                m.last_anon_mib = s.rss_anon_mib;
                m.peak_anon_mib = m.peak_anon_mib.max(s.rss_anon_mib);
                m.peak_file_mib = m.peak_file_mib.max(s.rss_file_mib);
            }
            _ => out.push(StageMemory {
                stage: s.stage.clone(),
                samples: 1,
                until_seconds: s.seconds,
                first_anon_mib: s.rss_anon_mib,
                last_anon_mib: s.rss_anon_mib,
                peak_anon_mib: s.rss_anon_mib,
                peak_file_mib: s.rss_file_mib,
            }),
        }
    }
    out
}
