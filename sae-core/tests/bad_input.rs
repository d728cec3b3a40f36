//! Bad input gives an error naming the thing and what was expected, never a panic.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sae_core::io::{read_safetensors, write_safetensors};
use sae_core::{SaeError, SaeModel};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/saelens")
        .join(name)
}

/// A writable copy of a fixture folder.
fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> (SaeError, String) {
    let e = SaeModel::load(dir).unwrap_err();
    let s = e.to_string();
    (e, s)
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("sae_weights.safetensors");
    let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> = read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.shape, t.data))
        .collect();
    edit(&mut ts);
    let refs: Vec<(&str, &[usize], &[f32])> = ts
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
        .collect();
    write_safetensors(&path, &refs).unwrap();
}

#[test]
fn wrong_d_in() {
    let sae = SaeModel::load(fixture("standard")).unwrap();
    let x = Tensor::zeros((3, 7), DType::F32, &Device::Cpu).unwrap();
    let msg = sae.encode(&x).unwrap_err().to_string();
    assert!(msg.contains("expected d_in = 6, got 7"), "{msg}");
    let acts = Tensor::zeros((3, 11), DType::F32, &Device::Cpu).unwrap();
    let msg = sae.decode(&acts).unwrap_err().to_string();
    assert!(msg.contains("expected d_in = 10, got 11"), "{msg}");
    let x3 = Tensor::zeros((2, 3, 6), DType::F32, &Device::Cpu).unwrap();
    let msg = sae.encode(&x3).unwrap_err().to_string();
    assert!(
        msg.contains("expected shape") && msg.contains("[2, 3, 6]"),
        "{msg}"
    );
}

#[test]
fn nan_in_input() {
    let sae = SaeModel::load(fixture("topk")).unwrap();
    let mut v = vec![0.5f32; 4 * 6];
    v[2 * 6 + 3] = f32::INFINITY;
    let x = Tensor::from_vec(v, (4, 6), &Device::Cpu).unwrap();
    let msg = sae.encode(&x).unwrap_err().to_string();
    assert!(
        msg.contains("row 2, column 3") && msg.contains("inf"),
        "{msg}"
    );
}

#[test]
fn missing_tensor() {
    let dir = copy("jumprelu");
    rewrite_weights(dir.path(), |ts| ts.retain(|(n, _, _)| n != "threshold"));
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, SaeError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("`threshold`") && msg.contains("jumprelu"),
        "{msg}"
    );
}

#[test]
fn wrong_shape() {
    let dir = copy("standard");
    rewrite_weights(dir.path(), |ts| {
        for t in ts.iter_mut().filter(|t| t.0 == "W_dec") {
            t.1 = vec![6, 10];
        }
    });
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, SaeError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("W_dec") && msg.contains("[10, 6]") && msg.contains("[6, 10]"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors() {
    let dir = copy("gated");
    let path = dir.path().join("sae_weights.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, SaeError::CorruptFile { .. }), "{msg}");
    assert!(msg.contains("sae_weights.safetensors"), "{msg}");
}

#[test]
fn garbage_safetensors() {
    let dir = copy("standard");
    std::fs::write(
        dir.path().join("sae_weights.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header",
    )
    .unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, SaeError::CorruptFile { .. }), "{msg}");
}

#[test]
fn unknown_architecture() {
    let dir = copy("standard");
    let cfg = std::fs::read_to_string(dir.path().join("cfg.json")).unwrap();
    std::fs::write(
        dir.path().join("cfg.json"),
        cfg.replace("\"standard\"", "\"matryoshka_pursuit\""),
    )
    .unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, SaeError::UnknownArchitecture { .. }), "{msg}");
    assert!(
        msg.contains("matryoshka_pursuit") && msg.contains("standard"),
        "{msg}"
    );
}

#[test]
fn invalid_json_and_missing_files() {
    let dir = copy("standard");
    std::fs::write(dir.path().join("cfg.json"), "{\"d_in\": 6,").unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(
        matches!(e, SaeError::Json { .. }) && msg.contains("cfg.json"),
        "{msg}"
    );
    let empty = tempfile::tempdir().unwrap();
    let (e, msg) = load_err(empty.path());
    assert!(
        matches!(e, SaeError::Io { .. }) && msg.contains("cfg.json"),
        "{msg}"
    );
    let dir = copy("standard");
    std::fs::remove_file(dir.path().join("sae_weights.safetensors")).unwrap();
    let (_, msg) = load_err(dir.path());
    assert!(msg.contains("sae_weights.safetensors"), "{msg}");
}

#[test]
fn non_finite_weights() {
    let dir = copy("standard");
    rewrite_weights(dir.path(), |ts| {
        for t in ts.iter_mut().filter(|t| t.0 == "b_enc") {
            t.2[4] = f32::NAN;
        }
    });
    let (_, msg) = load_err(dir.path());
    assert!(msg.contains("b_enc") && msg.contains("NaN"), "{msg}");
}

#[test]
fn bad_config_values() {
    let dir = copy("topk");
    let cfg = std::fs::read_to_string(dir.path().join("cfg.json")).unwrap();
    std::fs::write(
        dir.path().join("cfg.json"),
        cfg.replace("\"k\": 3", "\"k\": 0"),
    )
    .unwrap();
    let (_, msg) = load_err(dir.path());
    assert!(msg.contains("k") && msg.contains("got 0"), "{msg}");
}

/// Codes assembled by hand with fields that disagree are refused before the decoder indexes
/// with them (each of these used to panic or read out of bounds).
#[test]
fn inconsistent_sparse_codes() {
    let sae = SaeModel::load(fixture("topk")).unwrap();
    let d_sae = sae.d_sae();
    let x = Tensor::ones((2, sae.d_in()), DType::F32, &Device::Cpu).unwrap();
    let good = sae.encode_sparse(&x).unwrap();
    assert!(good.validate().is_ok());
    assert!(sae.decode_sparse(&good, &Device::Cpu).is_ok());
    type Corrupt = Box<dyn Fn(&mut sae_core::SparseCodes)>;
    let cases: Vec<(&str, Corrupt)> = vec![
        ("offsets for", Box::new(|c| c.n_tokens += 1)),
        (
            "never decrease",
            Box::new(|c| c.offsets[1] = c.offsets[2] + 1),
        ),
        (
            "offsets end at",
            Box::new(|c| {
                c.values.pop();
            }),
        ),
        (
            "out of range",
            Box::new(move |c| c.features[0] = d_sae as u32),
        ),
    ];
    for (want, edit) in cases {
        let mut c = good.clone();
        edit(&mut c);
        let e = sae.decode_sparse(&c, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

/// Weights stored as integers are not an SAE's: the error names the tensor and its dtype.
#[test]
fn integer_weights_are_an_unsupported_dtype() {
    let dir = copy("standard");
    let path = dir.path().join("sae_weights.safetensors");
    let mut ts: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k, t.shape, bytes, safetensors::Dtype::F32)
        })
        .collect();
    for t in ts.iter_mut().filter(|t| t.0 == "W_dec") {
        t.3 = safetensors::Dtype::I32;
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = ts
        .iter()
        .map(|(n, s, b, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, SaeError::UnsupportedDtype { .. }), "{msg}");
    assert!(msg.contains("W_dec") && msg.contains("I32"), "{msg}");
}

/// Normalisations that keep a per-input factor between encode and decode are refused by name.
#[test]
fn stateful_normalisations_are_refused() {
    for norm in ["constant_norm_rescale", "layer_norm"] {
        let dir = copy("topk");
        let cfg = std::fs::read_to_string(dir.path().join("cfg.json")).unwrap();
        std::fs::write(
            dir.path().join("cfg.json"),
            cfg.replace(
                "\"normalize_activations\": \"none\"",
                &format!("\"normalize_activations\": \"{norm}\""),
            ),
        )
        .unwrap();
        let (e, msg) = load_err(dir.path());
        assert!(matches!(e, SaeError::Unsupported { .. }), "{norm}: {msg}");
        assert!(msg.contains("normalize_activations"), "{norm}: {msg}");
    }
}

/// sparsify SAEs that are not plain TopK (a skip connection, another activation) are refused
/// by name rather than loaded as something else.
#[test]
fn sparsify_variants_without_an_saelens_form_are_refused() {
    for (from, to, named) in [
        (
            "\"skip_connection\": false",
            "\"skip_connection\": true",
            "skip_connection",
        ),
        (
            "\"multi_topk\": false",
            "\"multi_topk\": false, \"activation\": \"groupmax\"",
            "groupmax",
        ),
    ] {
        let dir = copy("sparsify_topk");
        let cfg = std::fs::read_to_string(dir.path().join("cfg.json")).unwrap();
        assert!(cfg.contains(from));
        std::fs::write(dir.path().join("cfg.json"), cfg.replace(from, to)).unwrap();
        let (e, msg) = load_err(dir.path());
        assert!(matches!(e, SaeError::Unsupported { .. }), "{named}: {msg}");
        assert!(msg.contains(named), "{msg}");
    }
}

/// The streamed writer gives the bytes of safetensors' own in-memory serializer (same header,
/// order and data), and a write that cannot finish is an error naming the path that leaves no
/// temporary file behind.
#[test]
fn streamed_safetensors_match_the_library_and_fail_cleanly() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempfile::tempdir().unwrap();
    let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
    let b: Vec<f32> = vec![f32::MIN_POSITIVE, -0.0, 1e30];
    let tensors: [(&str, &[usize], &[f32]); 2] = [("W_dec", &[3, 4], &a), ("b_dec", &[3], &b)];
    let path = dir.path().join("w.safetensors");
    write_safetensors(&path, &tensors).unwrap();
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (*n, TensorView::new(Dtype::F32, s.to_vec(), b).unwrap()))
        .collect();
    let expected = safetensors::serialize(views, None).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), expected);
    let back = read_safetensors(&path).unwrap();
    assert_eq!(back["W_dec"].data, a);
    assert_eq!(back["b_dec"].shape, vec![3]);

    let missing = dir.path().join("absent/w.safetensors");
    let msg = write_safetensors(&missing, &tensors)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent"), "{msg}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["w.safetensors".to_string()], "{left:?}");
}
