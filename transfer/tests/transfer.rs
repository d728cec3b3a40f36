//! Pair checks, the scaled copy, SAE renormalisation, norm profiles and the matrix, on the tiny
//! random checkpoints HF transformers wrote (`transformer-hooks/tests/fixtures/tiny`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use metrics::TokenGroups;
use sae_core::{ArchitectureConfig, TopKTraining, Trainer, TrainerConfig};
use transfer::Error;
use transfer::capture::{capture, mean_row_norm};
use transfer::matrix::{
    NamedSae, evaluate_on, markdown_group_table, markdown_table, plot_groups, plot_matrix,
};
use transfer::norms::norm_profile;
use transfer::pair::check_pair;
use transfer::rescale::{normalized_for, scaled_residual_copy};
use transfer::train::train_on_rows;
use transformer_hooks::{HookPoint, Hooks, Model, Site};

fn tiny(key: &str) -> Model {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../transformer-hooks/tests/fixtures/tiny")
        .join(key);
    Model::load(&dir, &Device::Cpu).unwrap()
}

fn tokens(batch: usize, len: usize, vocab: usize, salt: usize) -> Tensor {
    let ids: Vec<u32> = (0..batch * len)
        .map(|i| ((i * 37 + 11 + salt * 13) % (vocab - 3) + 3) as u32)
        .collect();
    Tensor::from_vec(ids, (batch, len), &Device::Cpu).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let m = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-12)
}

#[test]
fn a_model_pairs_with_itself_and_not_with_another_family() {
    let g = tiny("gemma3");
    check_pair(&g, &tiny("gemma3")).unwrap();
    match check_pair(&g, &tiny("llama")) {
        Err(Error::PairMismatch { what, base, chat }) => {
            assert_eq!(what, "architecture");
            assert_eq!((base.as_str(), chat.as_str()), ("gemma3", "llama"));
        }
        other => panic!("expected a pair mismatch, got {other:?}"),
    }
}

/// The scaled copy computes the same logits with a residual stream c times larger; the MLP
/// neurons, read through a norm, do not change. Checked on a family with sandwich norms (Gemma)
/// and one without (Llama). The norms' epsilon is made negligible first: the tiny models'
/// residual stream is so small (norm ~0.1) that Llama's 1e-5 shifts logits by about 1%.
#[test]
fn scaled_copy_has_the_same_logits_and_a_larger_residual() {
    for key in ["gemma3", "llama"] {
        let t0 = tiny(key);
        let mut cfg = t0.config().clone();
        cfg.norm_eps = 1e-12;
        let m = Model::from_params(cfg, t0.params().clone(), None).unwrap();
        let c = 8.0;
        let s = scaled_residual_copy(&m, c).unwrap();
        let t = tokens(2, 6, m.config().vocab_size, 0);
        let la = m.forward(&t, &mut Hooks::new()).unwrap().logits.unwrap();
        let lb = s.forward(&t, &mut Hooks::new()).unwrap().logits.unwrap();
        assert!(max_rel_diff(&la, &lb) < 1e-4, "{key}: logits differ");
        let hooks = [
            HookPoint::Block(1, Site::ResidPost),
            HookPoint::Block(1, Site::MlpPost),
        ];
        let a = capture(&m, &hooks, std::slice::from_ref(&t), 1, None).unwrap();
        let b = capture(&s, &hooks, std::slice::from_ref(&t), 1, None).unwrap();
        let ratio = b[0].mean_norm() / a[0].mean_norm();
        assert!(
            (ratio - c).abs() < 1e-3 * c,
            "{key}: residual ratio {ratio}"
        );
        let ratio_mlp = b[1].mean_norm() / a[1].mean_norm();
        assert!(
            (ratio_mlp - 1.0).abs() < 1e-3,
            "{key}: mlp ratio {ratio_mlp}"
        );
    }
    assert!(scaled_residual_copy(&tiny("gpt2"), 2.0).is_err());
    assert!(scaled_residual_copy(&tiny("gemma3"), 0.0).is_err());
}

fn small_sae(rows: &[f32], d_in: usize) -> sae_core::SaeModel {
    let mut cfg = TrainerConfig::new(
        d_in,
        4 * d_in,
        ArchitectureConfig::TopK(TopKTraining::new(4)),
        60,
    );
    cfg.lr = 3e-3;
    let mut t = Trainer::new(cfg).unwrap();
    train_on_rows(&mut t, rows, d_in, 16, 0, None).unwrap();
    t.to_model().unwrap()
}

/// An SAE carried to inputs r times larger reconstructs r·x exactly as the original
/// reconstructs x, r times over; without the fix it does not.
#[test]
fn normalized_sae_on_scaled_inputs_is_the_original_scaled() {
    let m = tiny("gemma3");
    let hook = [HookPoint::Block(1, Site::ResidPost)];
    let batches: Vec<Tensor> = (0..4)
        .map(|i| tokens(4, 12, m.config().vocab_size, i))
        .collect();
    let rows = capture(&m, &hook, &batches, 1, None).unwrap().remove(0);
    let d = rows.width;
    let sae = small_sae(&rows.data, d);
    let x = Tensor::from_vec(rows.data[..16 * d].to_vec(), (16, d), &Device::Cpu).unwrap();
    let r = 8.0f64;
    let y = (&x * r).unwrap();
    let plain = sae.forward(&x).unwrap();
    let fixed = normalized_for(small_sae(&rows.data, d), 1.0, r).unwrap();
    let on_scaled = fixed.forward(&y).unwrap();
    assert!(max_rel_diff(&(plain.clone() * r).unwrap(), &on_scaled) < 1e-4);
    let unfixed = sae.forward(&y).unwrap();
    assert!(max_rel_diff(&(plain * r).unwrap(), &unfixed) > 1e-3);
    assert!(normalized_for(small_sae(&rows.data, d), 0.0, 1.0).is_err());
}

/// The profile reports c at every residual hook and 1 at every MLP hook for a scaled copy.
#[test]
fn norm_profile_of_a_scaled_copy() {
    let m = tiny("gemma3");
    let s = scaled_residual_copy(&m, 4.0).unwrap();
    let batches = vec![tokens(2, 8, m.config().vocab_size, 1)];
    let rows = norm_profile(&m, &s, &batches).unwrap();
    assert_eq!(rows.len(), 2 * m.config().n_layers);
    for r in &rows {
        let want = if r.site == "hook_resid_post" {
            4.0
        } else {
            1.0
        };
        assert!(
            (r.ratio - want).abs() < 1e-3 * want,
            "{}: {}",
            r.hook,
            r.ratio
        );
    }
    let dir = tempfile_dir();
    transfer::norms::plot_norms(&rows, &dir.join("n.png"), &dir.join("r.png")).unwrap();
    assert!(std::fs::metadata(dir.join("r.png")).unwrap().len() > 1000);
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("transfer-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The matrix: an SAE trained on one model's activations recovers more loss there than
/// zero-ablation does (loss recovered > 0), each cell names its SAE, model and text, and the
/// table and heatmap are written.
#[test]
fn matrix_cells_table_and_heatmap() {
    let m = tiny("gemma3");
    let s = scaled_residual_copy(&m, 8.0).unwrap();
    let hook = "blocks.1.hook_resid_post";
    let train: Vec<Tensor> = (0..8)
        .map(|i| tokens(4, 12, m.config().vocab_size, i))
        .collect();
    let rows = capture(&m, &[hook.parse().unwrap()], &train, 1, None)
        .unwrap()
        .remove(0);
    assert!((mean_row_norm(&rows.data, rows.width) - rows.mean_norm()).abs() < 1e-12);
    let sae = small_sae(&rows.data, rows.width);
    let eval = vec![tokens(2, 12, m.config().vocab_size, 99)];
    let named = [NamedSae {
        name: "base/topk".into(),
        trained_on: "base".into(),
        sae: &sae,
    }];
    let mut cells = evaluate_on(&m, "base", "text", hook, &named, &eval, None, None).unwrap();
    // On the scaled copy, per group: the first half of each row and the second.
    let groups = TokenGroups {
        names: vec!["early".into(), "late".into()],
        labels: vec![(0..2 * 12).map(|i| u8::from(i % 12 >= 6)).collect()],
    };
    cells.extend(
        evaluate_on(
            &s,
            "scaled",
            "text",
            hook,
            &named,
            &eval,
            Some(&groups),
            None,
        )
        .unwrap(),
    );
    assert_eq!(cells.len(), 2);
    assert_eq!(
        (cells[1].model.as_str(), cells[1].sae.as_str()),
        ("scaled", "base/topk")
    );
    // The same clean loss on both models: the scaled copy computes the same function.
    assert!((cells[0].eval.spliced.clean - cells[1].eval.spliced.clean).abs() < 1e-4);
    let table = markdown_table(&cells);
    assert_eq!(table.lines().count(), 4);
    let dir = tempfile_dir();
    plot_matrix(
        &cells,
        &|c| c.loss_recovered(),
        "t",
        (0.0, 1.0),
        &dir.join("m.png"),
    )
    .unwrap();
    assert!(std::fs::metadata(dir.join("m.png")).unwrap().len() > 1000);
    // The per-group table has the grouped cell only, its shares adding up to every prediction.
    assert!(cells[0].eval.by_group.is_empty());
    let g = &cells[1].eval.by_group;
    assert_eq!(g.len(), 2);
    assert_eq!(
        g[0].n_predictions + g[1].n_predictions,
        cells[1].eval.spliced.n_tokens
    );
    // Predictions of tokens 1..=5 of each row are early, of 6..=11 late.
    assert_eq!((g[0].n_predictions, g[1].n_predictions), (2 * 5, 2 * 6));
    let t = markdown_group_table(&cells);
    assert_eq!(t.lines().filter(|l| l.starts_with("| blocks")).count(), 1);
    assert!(t.contains("early 10 (45%)"), "{t}");
    plot_groups(&cells, "t", &dir.join("g.png")).unwrap();
    assert!(std::fs::metadata(dir.join("g.png")).unwrap().len() > 1000);
}
