//! Every SAE on every model and text: spliced loss, loss recovered, KL and reconstruction, as a
//! table and a heatmap.

use std::path::Path;

use candle_core::Tensor;
use indicatif::ProgressBar;
use metrics::{
    HookedSplice, SplicedConfig, SplicedEvaluation, TokenGroups, evaluate_spliced_grouped,
};
use sae_core::SaeModel;
use serde::{Deserialize, Serialize};
use transformer_hooks::Model;

use crate::error::Result;

/// An SAE with the labels the table shows.
pub struct NamedSae<'a> {
    /// e.g. `base/topk`.
    pub name: String,
    /// The model whose activations it was trained on.
    pub trained_on: String,
    pub sae: &'a SaeModel,
}

/// One SAE evaluated on one model and text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub sae: String,
    pub trained_on: String,
    pub hook: String,
    pub model: String,
    pub text: String,
    pub eval: SplicedEvaluation,
}

impl Cell {
    pub fn loss_recovered(&self) -> f64 {
        self.eval.spliced.loss_recovered_zero
    }
}

/// Evaluates `saes` (all at `hook`) on `model` over `batches` of one text: the SAE-independent
/// passes (clean, ablations) run once for all of them. With `groups` (e.g. the token kinds of
/// chat conversations) each cell also holds the measures per group.
///
/// # Errors
/// A hook the model lacks, an SAE whose width is not the hook's, labels that do not fit the
/// batches, a forward failure.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_on(
    model: &Model,
    model_name: &str,
    text_name: &str,
    hook: &str,
    saes: &[NamedSae<'_>],
    batches: &[Tensor],
    groups: Option<&TokenGroups>,
    progress: Option<&ProgressBar>,
) -> Result<Vec<Cell>> {
    let mut target = HookedSplice::new(model, hook)?;
    let refs: Vec<&SaeModel> = saes.iter().map(|s| s.sae).collect();
    let evals = evaluate_spliced_grouped(
        &mut target,
        &refs,
        batches,
        groups,
        &SplicedConfig::default(),
        progress,
    )?;
    Ok(saes
        .iter()
        .zip(evals)
        .map(|(s, eval)| Cell {
            sae: s.name.clone(),
            trained_on: s.trained_on.clone(),
            hook: hook.to_string(),
            model: model_name.to_string(),
            text: text_name.to_string(),
            eval,
        })
        .collect())
}

/// A Markdown table, one row per cell.
pub fn markdown_table(cells: &[Cell]) -> String {
    let mut s = String::from(
        "| hook | SAE | on model | text | loss recovered (zero) | (mean) | KL | FVU | L0 | dead | clean NLL | spliced NLL |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells {
        let (sp, r) = (&c.eval.spliced, &c.eval.reconstruction);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.3} |\n",
            c.hook,
            c.sae,
            c.model,
            c.text,
            sp.loss_recovered_zero,
            sp.loss_recovered_mean,
            sp.kl_clean_spliced,
            r.fvu,
            r.l0,
            r.dead_fraction,
            sp.clean,
            sp.spliced
        ));
    }
    s
}

/// A Markdown table of the cells measured per token group: loss recovered (zero ablation) and
/// FVU on each group, with the group's share of the predictions.
pub fn markdown_group_table(cells: &[Cell]) -> String {
    let grouped: Vec<&Cell> = cells
        .iter()
        .filter(|c| !c.eval.by_group.is_empty())
        .collect();
    let Some(&first) = grouped.first() else {
        return String::new();
    };
    let names: Vec<&str> = first
        .eval
        .by_group
        .iter()
        .map(|g| g.group.as_str())
        .collect();
    let mut s = String::from("| hook | SAE | on model | text |");
    for n in &names {
        s.push_str(&format!(" loss recovered: {n} |"));
    }
    for n in &names {
        s.push_str(&format!(" FVU: {n} |"));
    }
    s.push_str(" all |\n|");
    s.push_str(&"---|".repeat(5 + 2 * names.len()));
    s.push('\n');
    for c in grouped {
        s.push_str(&format!(
            "| {} | {} | {} | {} |",
            c.hook, c.sae, c.model, c.text
        ));
        for g in &c.eval.by_group {
            s.push_str(&format!(" {:.3} |", g.loss_recovered_zero));
        }
        for g in &c.eval.by_group {
            s.push_str(&format!(" {:.3} |", g.fvu));
        }
        s.push_str(&format!(" {:.3} |\n", c.loss_recovered()));
    }
    let total: u64 = first.eval.by_group.iter().map(|g| g.n_predictions).sum();
    s.push_str("\nPredictions per group: ");
    let shares: Vec<String> = first
        .eval
        .by_group
        .iter()
        .map(|g| {
            format!(
                "{} {} ({:.0}%)",
                g.group,
                g.n_predictions,
                100.0 * g.n_predictions as f64 / total as f64
            )
        })
        .collect();
    s.push_str(&shares.join(", "));
    s.push('\n');
    s
}

/// A heatmap of loss recovered (zero ablation) per token group: one row per (hook, SAE), one
/// column per (model, group), for the cells measured per group.
///
/// # Errors
/// A plot that cannot be drawn or written.
pub fn plot_groups(cells: &[Cell], title: &str, path: &Path) -> Result<()> {
    let grouped: Vec<&Cell> = cells
        .iter()
        .filter(|c| !c.eval.by_group.is_empty())
        .collect();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut cols: Vec<(String, String)> = Vec::new();
    for c in &grouped {
        push_new(&mut rows, (c.hook.clone(), c.sae.clone()));
        for g in &c.eval.by_group {
            push_new(&mut cols, (c.model.clone(), g.group.clone()));
        }
    }
    heatmap(
        &rows,
        &cols,
        &|(h, s), (m, g)| {
            grouped
                .iter()
                .find(|c| &c.hook == h && &c.sae == s && &c.model == m)
                .and_then(|c| c.eval.by_group.iter().find(|x| &x.group == g))
                .map_or(f64::NAN, |x| x.loss_recovered_zero)
        },
        title,
        (0.0, 1.0),
        path,
    )
}

/// A heatmap of `metric` with one row per (hook, SAE) and one column per (model, text).
///
/// # Errors
/// A plot that cannot be drawn or written.
pub fn plot_matrix(
    cells: &[Cell],
    metric: &dyn Fn(&Cell) -> f64,
    title: &str,
    range: (f64, f64),
    path: &Path,
) -> Result<()> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut cols: Vec<(String, String)> = Vec::new();
    for c in cells {
        push_new(&mut rows, (c.hook.clone(), c.sae.clone()));
        push_new(&mut cols, (c.model.clone(), c.text.clone()));
    }
    heatmap(
        &rows,
        &cols,
        &|(h, s), (m, t)| {
            cells
                .iter()
                .find(|c| &c.hook == h && &c.sae == s && &c.model == m && &c.text == t)
                .map_or(f64::NAN, metric)
        },
        title,
        range,
        path,
    )
}

fn push_new(v: &mut Vec<(String, String)>, x: (String, String)) {
    if !v.contains(&x) {
        v.push(x);
    }
}

type Key = (String, String);

/// One row per (hook, SAE), one column per `(model, text or group)`, labelled for the plot.
fn heatmap(
    rows: &[Key],
    cols: &[Key],
    value: &dyn Fn(&Key, &Key) -> f64,
    title: &str,
    range: (f64, f64),
    path: &Path,
) -> Result<()> {
    let values: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| value(r, c)).collect())
        .collect();
    let short = |h: &str| h.replace("blocks.", "L").replace("hook_", "");
    let row_labels: Vec<String> = rows
        .iter()
        .map(|(h, s)| format!("{} {s}", short(h)))
        .collect();
    let col_labels: Vec<String> = cols.iter().map(|(m, t)| format!("{m} / {t}")).collect();
    metrics::plots::plot_heatmap(&values, &row_labels, &col_labels, title, range, path)?;
    Ok(())
}
