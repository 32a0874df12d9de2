//! The training state on disk and when to write it.
//!
//! `state.safetensors` in the run directory holds the student (parameters and BN statistics),
//! the critic (parameters, BN statistics, spectral-norm vectors) and both optimisers'
//! velocities, with the number of finished iterations in its metadata. Data order, dropout
//! masks and the critic's `α` are derived from `(seed, iteration)`, so nothing else is needed to
//! resume exactly. The run's config rides along in the metadata. Writes are atomic (temp file,
//! fsync, rename).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use crate::weights::{self, WeightsError};

pub const STATE_FILE: &str = "state.safetensors";

/// Whether to write the state after `done` finished iterations (every `every`, and at the end).
pub fn checkpoint_due(done: usize, every: usize, total: usize) -> bool {
    done == total || (every > 0 && done.is_multiple_of(every))
}

/// Writes the state after `iterations_done` iterations, with the run's resolved `config` (JSON).
pub fn save_state(
    run_dir: &Path,
    tensors: Vec<(String, Tensor)>,
    iterations_done: usize,
    config: &str,
) -> weights::Result<()> {
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let meta = weights::skd_metadata([
        ("kind".to_string(), "training-state".to_string()),
        ("iterations_done".to_string(), iterations_done.to_string()),
        ("config".to_string(), config.to_string()),
    ]);
    weights::save(&run_dir.join(STATE_FILE), &tensors, meta)
}

/// The state's tensors and the number of finished iterations.
pub fn load_state(run_dir: &Path) -> weights::Result<(HashMap<String, Tensor>, usize)> {
    let path = run_dir.join(STATE_FILE);
    let sd = weights::read_file(&path)?;
    let done =
        sd.metadata.get("iterations_done").and_then(|v| v.parse().ok()).ok_or_else(|| WeightsError::Corrupt {
            path: path.display().to_string(),
            detail: "not a training state (no `iterations_done` in its metadata)".into(),
        })?;
    Ok((sd.tensors.into_iter().collect(), done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_every_n_and_at_the_end() {
        let due: Vec<usize> = (1..=10).filter(|&d| checkpoint_due(d, 4, 10)).collect();
        assert_eq!(due, [4, 8, 10]);
        assert!(!checkpoint_due(3, 0, 10) && checkpoint_due(10, 0, 10));
    }
}
