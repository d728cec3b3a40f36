//! Interop with dictionary_learning (Marks et al.): folders written by
//! `scripts/dictionary_learning_fixtures.py` with that library's own classes (`ae.pt` and
//! `config.json`) load as SAEs whose codes and reconstructions are the library's own `encode`
//! and `decode`, within 1e-5; saved again they are SAELens folders giving the same numbers.

mod common;

use std::path::{Path, PathBuf};

use common::{expected, flat, max_diff};
use sae_core::{SaeError, SaeModel};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/dictionary_learning")
        .join(name)
}

/// Codes and reconstructions of `sae` against the library's, from `dir`'s expected outputs.
fn check(name: &str, sae: &SaeModel) {
    let e = expected(&fixture(name));
    assert!(e.acts.iter().any(|v| *v != 0.0), "{name}: no active codes");
    let ours = sae.encode(&e.x).unwrap();
    let da = max_diff(&flat(&ours), &e.acts);
    assert!(
        da <= 1e-5,
        "{name}: codes differ from dictionary_learning's by {da}"
    );
    let dr = max_diff(&flat(&sae.forward(&e.x).unwrap()), &e.recon);
    assert!(dr <= 1e-5, "{name}: reconstructions differ by {dr}");
}

#[test]
fn every_class_reproduces_dictionary_learning() {
    for (name, arch, hook) in [
        ("standard", "standard", "blocks.3.hook_resid_post"),
        ("topk", "topk", "blocks.3.hook_mlp_out"),
        ("batchtopk", "jumprelu", "blocks.3.hook_resid_post"),
        ("matryoshka", "jumprelu", "blocks.3.hook_resid_post"),
        ("jumprelu", "jumprelu", "blocks.3.hook_resid_post"),
        ("gated", "gated", "blocks.3.hook_resid_post"),
    ] {
        let sae = SaeModel::load(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(sae.config().architecture(), arch, "{name}");
        assert_eq!((sae.d_in(), sae.d_sae()), (6, 10), "{name}");
        assert_eq!(sae.hook_name(), Some(hook), "{name}");
        assert_eq!(
            sae.config().metadata().model_name.as_deref(),
            Some("tiny-fixture"),
            "{name}"
        );
        check(name, &sae);

        // Saved here it is an SAELens folder with the same numbers.
        let out = tempfile::tempdir().unwrap();
        sae.save(out.path()).unwrap();
        assert!(out.path().join("cfg.json").exists());
        check(name, &SaeModel::load(out.path()).unwrap());
    }
}

fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ae.pt", "config.json"] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn damaged_dictionary_learning_folders_are_named() {
    // A truncated state dict.
    let dir = copy("topk");
    let pt = dir.path().join("ae.pt");
    let bytes = std::fs::read(&pt).unwrap();
    std::fs::write(&pt, &bytes[..bytes.len() / 2]).unwrap();
    let e = SaeModel::load(dir.path()).unwrap_err();
    assert!(matches!(e, SaeError::CorruptFile { .. }), "{e}");
    assert!(e.to_string().contains("ae.pt"), "{e}");

    // A state dict whose pickle holds a tensor's arguments as a tuple too short: candle's
    // reader panics on it (found by libFuzzer); here it is an error naming the file.
    let dir = copy("gated");
    let damaged = fixture("damaged/ae_short_tuple.pt");
    std::fs::copy(&damaged, dir.path().join("ae.pt")).unwrap();
    let e = SaeModel::load(dir.path()).unwrap_err();
    assert!(matches!(e, SaeError::CorruptFile { .. }), "{e}");
    assert!(e.to_string().contains("ae.pt"), "{e}");

    // A class this crate does not read, and a config without the trainer section.
    let dir = copy("topk");
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("AutoEncoderTopK", "AutoEncoderNew")).unwrap();
    let e = SaeModel::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("AutoEncoderNew"), "{e}");
    std::fs::write(&cfg, "{\"dict_class\": \"AutoEncoderTopK\"}").unwrap();
    let e = SaeModel::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("trainer"), "{e}");

    // A state dict of another class than the config says: the missing tensor is named.
    let dir = copy("jumprelu");
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("JumpReluAutoEncoder", "AutoEncoderTopK")).unwrap();
    let e = SaeModel::load(dir.path()).unwrap_err();
    assert!(
        matches!(&e, SaeError::MissingTensor { name, .. } if name == "encoder.weight"),
        "{e}"
    );
}
