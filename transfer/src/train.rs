//! Training an SAE on rows held in memory: a fresh seeded shuffle per epoch, one
//! [`sae_core::Trainer`] step per batch, until the trainer's step budget is spent.

use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use sae_core::{HostBatch, TrainMetrics, Trainer};

use crate::error::{Error, Result};

/// Runs `trainer` to its configured step count on `rows` (`[n, d_in]` row-major), `batch` rows
/// per step; returns the last step's metrics.
///
/// # Errors
/// Fewer rows than one batch, a width that is not the trainer's, or a training error.
pub fn train_on_rows(
    trainer: &mut Trainer,
    rows: &[f32],
    d_in: usize,
    batch: usize,
    seed: u64,
    progress: Option<&ProgressBar>,
) -> Result<Option<TrainMetrics>> {
    let n = rows.len() / d_in.max(1);
    if batch == 0 || n < batch {
        return Err(Error::invalid(
            "training rows",
            format!("{n} rows for batches of {batch}"),
        ));
    }
    if let Some(pb) = progress {
        pb.set_length(trainer.config().total_steps);
        pb.set_position(trainer.step_count());
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut epoch = 0u64;
    let mut at = n; // forces a shuffle first
    let mut last = None;
    while !trainer.is_done() {
        if at + batch > n {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch));
            order.shuffle(&mut rng);
            epoch += 1;
            at = 0;
        }
        let mut x = Vec::with_capacity(batch * d_in);
        for &i in &order[at..at + batch] {
            x.extend_from_slice(&rows[i * d_in..(i + 1) * d_in]);
        }
        at += batch;
        let m = trainer.step_host(&HostBatch::from_vec(x, d_in)?)?;
        if let Some(pb) = progress {
            pb.set_position(m.step);
            pb.set_message(format!("FVU {:.3} L0 {:.1}", m.fvu, m.l0));
        }
        last = Some(m);
    }
    Ok(last)
}
