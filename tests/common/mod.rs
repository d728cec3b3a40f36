//! What the top-level tests share.

use std::path::PathBuf;

use sae_workbench::transformer_hooks::assets;

/// SmolLM2's file and the corpora folder, or `None` (after saying why) when either has not been
/// fetched: the tests that read a real model over real text skip then.
pub fn smollm2_and_corpora() -> Option<(PathBuf, PathBuf)> {
    let model = assets::asset_or_skip(assets::SMOLLM2)?;
    let root = sae_workbench::activation_store::default_corpora_root();
    if !root.join("moby-dick/data.txt").exists() {
        eprintln!("skipping: corpora not fetched (python3 scripts/fetch_assets.py)");
        return None;
    }
    Some((model, root))
}
