//! Where the fetched models, tokenizers and corpora live, so that tests, examples and benchmarks
//! agree on one place: `$SAE_ASSETS`, else `<workspace root>/assets` (filled by
//! `python3 scripts/fetch_assets.py`).

use std::path::{Path, PathBuf};

/// SmolLM2-135M-Instruct, Q4_1 (llama, 30 layers).
pub const SMOLLM2: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Gemma-3-270M, Q4_K_M (gemma3, 18 layers).
pub const GEMMA3: &str = "models/gemma-3-270m-q4_k_m.gguf";
/// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2, 24 layers); fetched only with `--all`.
pub const QWEN2: &str = "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// Gemma 3's official `tokenizer.json` (its GGUF holds a SentencePiece vocabulary instead).
pub const GEMMA3_TOKENIZER: &str = "tokenizers/gemma3/tokenizer.json";

/// The assets folder: `$SAE_ASSETS` if set, else the workspace's `assets/` (located from this
/// crate's source path at compile time), else `./assets`.
pub fn assets_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SAE_ASSETS").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("assets");
    if workspace.is_dir() {
        return workspace;
    }
    PathBuf::from("assets")
}

/// `assets_dir().join(relative)`, e.g. `asset_path(SMOLLM2)`.
pub fn asset_path(relative: impl AsRef<Path>) -> PathBuf {
    assets_dir().join(relative)
}

/// The asset's path if it exists; otherwise prints why a test or benchmark is skipped and how to
/// fetch the asset, and returns `None`.
pub fn asset_or_skip(relative: impl AsRef<Path>) -> Option<PathBuf> {
    let p = asset_path(relative);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} not found (fetch it with `python3 scripts/fetch_assets.py`, or set SAE_ASSETS)",
            p.display()
        );
        None
    }
}
