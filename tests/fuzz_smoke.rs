//! The fuzz targets' entry points (`fuzz/src/lib.rs`) on stable, as CI can afford them: every
//! seed of `fuzz/seeds/<target>/`, then deterministic mutations of it (truncations, bit flips,
//! overwritten bytes, large integers written over length fields). A loader that panics, aborts
//! or runs out of memory on any of them fails this test. The libFuzzer runs (nightly, hours)
//! are in `docs/reliability.md`.
//!
//! With `SAEW_FUZZ_SEEDS=DIR` it also writes the seeds made by the entry points' own fixtures:
//! the activation cache's (a manifest and its shards) under `DIR/cache_manifest` and
//! `DIR/cache_shard`, and the trainer checkpoints' `trainer.json` under `DIR/checkpoint`.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod entries;

use std::path::{Path, PathBuf};

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// xorshift64*, so the mutations are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `n` mutations of `seed`, the seed itself first. `keep` leading bytes are never changed
/// (the entry's selector byte).
fn mutations(seed: &[u8], n: usize, keep: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = vec![seed.to_vec()];
    let len = seed.len();
    // Truncations at spread-out cuts.
    for i in 1..=16 {
        out.push(seed[..(len * i / 17).max(keep)].to_vec());
    }
    let big: [&[u8]; 5] = [
        &[0xff; 8],
        &[0x00, 0x00, 0x00, 0x80],
        &u64::MAX.to_le_bytes(),
        &(1u64 << 40).to_le_bytes(),
        b"999999999999",
    ];
    while out.len() < n {
        let mut m = seed.to_vec();
        if m.len() <= keep {
            m.push(rng.next() as u8);
        }
        let span = m.len() - keep;
        match rng.below(4) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let i = keep + rng.below(span);
                    m[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = keep + rng.below(span);
                m[i] = rng.next() as u8;
            }
            2 => {
                let b = big[rng.below(big.len())];
                let i = keep + rng.below(span);
                for (j, &x) in b.iter().enumerate() {
                    if let Some(slot) = m.get_mut(i + j) {
                        *slot = x;
                    }
                }
            }
            _ => {
                // A digit of a JSON number, or any byte, made into a 9.
                let digits: Vec<usize> =
                    (keep..m.len()).filter(|&i| m[i].is_ascii_digit()).collect();
                let i = if digits.is_empty() {
                    keep + rng.below(span)
                } else {
                    digits[rng.below(digits.len())]
                };
                m[i] = b'9';
                if let Some(next) = m.get_mut(i + 1).filter(|c| c.is_ascii_digit()) {
                    *next = b'9';
                }
            }
        }
        out.push(m);
    }
    out
}

fn run(target: &str, f: fn(&[u8]), per_seed: usize, keep: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t = std::time::Instant::now();
    let mut n = 0;
    for seed in seeds(target) {
        for m in mutations(&seed, per_seed, keep, &mut rng) {
            f(&m);
            n += 1;
        }
    }
    println!("{target}: {n} inputs in {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn gguf() {
    run("gguf", entries::gguf, 3000, 0);
}

#[test]
fn hf_config() {
    run("hf_config", entries::hf_config, 2000, 0);
}

#[test]
fn tokenizer_json() {
    run("tokenizer_json", entries::tokenizer_json, 3000, 0);
}

#[test]
fn sae_cfg() {
    run("sae_cfg", entries::sae_cfg, 800, 1);
}

#[test]
fn sae_weights() {
    run("sae_weights", entries::sae_weights, 5000, 0);
}

#[test]
fn sae_torch_state() {
    run("sae_torch_state", entries::sae_torch_state, 1500, 1);
}

#[test]
fn rdata() {
    run("rdata", entries::rdata, 20000, 0);
}

/// The cache's seeds come from the entry points' own fixture cache.
fn cache_seeds() -> (Vec<u8>, Vec<Vec<u8>>) {
    let dir = entries::fixture_cache();
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    let shards: Vec<Vec<u8>> = entries::shard_files()
        .iter()
        .enumerate()
        .map(|(i, sub)| {
            let mut v = vec![i as u8];
            v.extend(std::fs::read(dir.join(sub)).unwrap());
            v
        })
        .collect();
    if let Ok(out) = std::env::var("SAEW_FUZZ_SEEDS") {
        let out = Path::new(&out);
        std::fs::create_dir_all(out.join("cache_manifest")).unwrap();
        std::fs::write(out.join("cache_manifest/manifest.json"), &manifest).unwrap();
        std::fs::create_dir_all(out.join("cache_shard")).unwrap();
        for (i, s) in shards.iter().enumerate() {
            std::fs::write(out.join(format!("cache_shard/shard{i}.bin")), s).unwrap();
        }
    }
    (manifest, shards)
}

#[test]
fn cache_manifest() {
    let (manifest, _) = cache_seeds();
    let mut rng = Rng(7);
    let all = mutations(&manifest, 2000, 0, &mut rng);
    for m in &all {
        entries::cache_manifest(m);
    }
    println!("cache_manifest: {} inputs", all.len());
}

#[test]
fn cache_shard() {
    let (_, shards) = cache_seeds();
    let mut rng = Rng(11);
    let mut n = 0;
    for s in shards {
        for m in mutations(&s, 700, 1, &mut rng) {
            entries::cache_shard(&m);
            n += 1;
        }
    }
    println!("cache_shard: {n} inputs");
}

/// The checkpoint seeds: each architecture's `trainer.json`, after its selector byte.
fn checkpoint_seeds() -> Vec<Vec<u8>> {
    let seeds: Vec<Vec<u8>> = entries::checkpoint_dirs()
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let mut v = vec![i as u8];
            v.extend(std::fs::read(dir.join("trainer.json")).unwrap());
            v
        })
        .collect();
    if let Ok(out) = std::env::var("SAEW_FUZZ_SEEDS") {
        let out = Path::new(&out).join("checkpoint");
        std::fs::create_dir_all(&out).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(out.join(format!("trainer{i}.json")), s).unwrap();
        }
    }
    seeds
}

#[test]
fn checkpoint() {
    let mut rng = Rng(13);
    let mut n = 0;
    for s in checkpoint_seeds() {
        for m in mutations(&s, 400, 1, &mut rng) {
            entries::checkpoint(&m);
            n += 1;
        }
    }
    println!("checkpoint: {n} inputs");
}

#[test]
fn options() {
    run("options", entries::options, 300, 0);
}
