#![allow(dead_code)]
//! Small synthetic corpora and caches for the tests.

use std::path::Path;
use std::time::Duration;

use activation_store::{
    HarvestConfig, HarvestSummary, ModelIdentity, Split, SyntheticSource, TokenizedDocument,
    WindowPlan, harvest,
};

pub const HOOKS: [&str; 2] = ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"];
pub const WIDTHS: [usize; 2] = [8, 12];
pub const BOS: u32 = 1;

/// `n_docs` documents of varying lengths with pseudo-random token ids in 2..1000.
pub fn docs(n_docs: usize) -> Vec<TokenizedDocument> {
    (0..n_docs)
        .map(|i| {
            let len = 5 + (i * 37) % 90;
            TokenizedDocument {
                id: format!("test/doc-{i:03}"),
                split: Split::Train,
                tokens: (0..len)
                    .map(|j| 2 + ((i * 7919 + j * 104_729) % 998) as u32)
                    .collect(),
            }
        })
        .collect()
}

pub fn plan(n_docs: usize, context_len: usize) -> WindowPlan {
    WindowPlan::build(&docs(n_docs), Split::Train, context_len, BOS, 42).unwrap()
}

pub fn source(delay: Duration) -> SyntheticSource {
    SyntheticSource {
        widths: HOOKS
            .iter()
            .zip(WIDTHS)
            .map(|(h, w)| (h.to_string(), w))
            .collect(),
        delay,
    }
}

pub fn model() -> ModelIdentity {
    ModelIdentity {
        model: "synthetic".into(),
        model_sha256: "00".repeat(32),
        tokenizer: "test".into(),
    }
}

pub fn config(shard_rows: u64) -> HarvestConfig {
    let mut cfg = HarvestConfig::new(HOOKS.iter().map(|h| h.to_string()).collect());
    cfg.batch_windows = 4;
    cfg.shard_rows = shard_rows;
    cfg
}

pub fn run(dir: &Path, plan: &WindowPlan, cfg: &HarvestConfig) -> HarvestSummary {
    harvest(dir, plan, &model(), &mut source(Duration::ZERO), cfg, None).unwrap()
}

/// Every file of a cache (relative path -> bytes), manifest and plan included.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}
