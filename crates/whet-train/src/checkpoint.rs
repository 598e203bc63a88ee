//! Checkpoints: written into a temporary folder, every file fsynced, then renamed into place
//! (`whet_data::atomic::write_dir`), so a crash (or kill -9, or a full disk) at any moment leaves
//! the previous checkpoints intact. The best checkpoint is recorded in each checkpoint's own
//! state (`best_step`) before its rename; `out/best` follows it, is repaired on resume, and the
//! checkpoint it names is never pruned.
//!
//! ```text
//! out/.whet-run            whet's marker: the run this folder belongs to (see [`claim`])
//! out/checkpoint-000120/
//!   adapter_model.safetensors + adapter_config.json   (LoRA, PEFT format)  or  model.safetensors (full)
//!   optimizer.safetensors      optimizer moments, named `exp_avg.<param>` ...
//!   trainer_state.json         step, data cursor, best validation loss, metrics so far
//!   config.toml                the fully resolved config of the run
//! out/best -> the checkpoint folder name with the lowest validation loss (a text file)
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whet_data::atomic::{self, Claim, Existing, WriteError};

use crate::rows::Cursor;
use crate::{Result, TrainError};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const CONFIG_FILE: &str = "config.toml";
pub const BEST_FILE: &str = "best";
const PREFIX: &str = "checkpoint-";

/// Everything besides tensors that an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub cursor: Cursor,
    /// A fingerprint of the config and data: a checkpoint only resumes the run it belongs to.
    pub run_id: String,
    pub best_val_loss: Option<f64>,
    /// The best value of the task metric that selects (`TrainerConfig::select_by`); absent in
    /// runs selected by the validation loss (and in checkpoints written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_metric: Option<f64>,
    pub best_step: Option<u64>,
    /// Evaluations since the last improvement (early stopping).
    pub stale_evals: u32,
    pub tokens_seen: u64,
    /// Supervised tokens trained on so far from each source of a mixture
    /// ([`crate::RowSource::source_names`]); empty for rows of one source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens_by_source: Vec<u64>,
}

pub fn checkpoint_name(step: u64) -> String {
    format!("{PREFIX}{step:06}")
}

/// Checkpoint folders in `out`, oldest first.
pub fn list(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(out)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix(PREFIX)?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|source| TrainError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::CheckpointRead {
        path,
        message: e.to_string(),
    })
}

/// Makes `out` this run's output folder, or refuses it before anything is written: a new or
/// empty folder gets whet's marker naming `run_id` (`whet_data::atomic::claim`); a folder whose
/// marker names `run_id` is this run's (resumed from its last checkpoint, or started over when it
/// has none); any other folder is refused.
pub fn claim(out: &Path, run_id: &str) -> Result<Claim> {
    if out.as_os_str().is_empty() {
        return Err(TrainError::NoOutputDir);
    }
    atomic::claim(out, run_id).map_err(|e| match e {
        WriteError::NotOwned { dir, found } => TrainError::OutputNotOwned { dir, found },
        WriteError::OtherRun { dir, found, this } => TrainError::ForeignOutput {
            dir,
            why: format!("it belongs to run {found}, this config and data make run {this}"),
        },
        e => e.into(),
    })
}

/// Writes a checkpoint atomically (`whet_data::atomic::write_dir`). `write_tensors` fills the
/// temporary folder with the weight and optimizer files; this function adds the state and
/// config; the folder is fsynced and renamed into place.
pub fn write(
    out: &Path,
    state: &TrainerState,
    config_toml: &str,
    write_tensors: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = out.join(checkpoint_name(state.step));
    atomic::write_dir(&final_dir, |tmp| {
        write_tensors(tmp)?;
        let state_json = serde_json::to_string_pretty(state).expect("trainer state serialises");
        atomic::write_file(
            &tmp.join(STATE_FILE),
            state_json.as_bytes(),
            Existing::Replace,
        )?;
        atomic::write_file(
            &tmp.join(CONFIG_FILE),
            config_toml.as_bytes(),
            Existing::Replace,
        )?;
        Ok::<(), TrainError>(())
    })?;
    Ok(final_dir)
}

/// The step of the checkpoint `out/best` names, if it names one.
pub fn best(out: &Path) -> Option<u64> {
    let name = fs::read_to_string(out.join(BEST_FILE)).ok()?;
    name.trim().strip_prefix(PREFIX)?.parse().ok()
}

/// Keeps the newest `keep_last` checkpoints, the best one (`best_step`, from the trainer's
/// state) and the one `out/best` names; deletes the rest, each as a whole.
pub fn prune(out: &Path, keep_last: usize, best_step: Option<u64>) -> Result<()> {
    let all = list(out);
    let cut = all.len().saturating_sub(keep_last.max(1));
    let named = best(out);
    for (step, dir) in &all[..cut] {
        if Some(*step) != best_step && Some(*step) != named {
            atomic::remove_dir(dir)?;
        }
    }
    Ok(())
}

pub fn mark_best(out: &Path, step: u64) -> Result<()> {
    atomic::write_file(
        &out.join(BEST_FILE),
        checkpoint_name(step).as_bytes(),
        Existing::Replace,
    )?;
    Ok(())
}

/// Makes `out/best` name the checkpoint of `best_step` (the resumed state's): a run killed
/// between a checkpoint's rename and [`mark_best`] left it naming an older one.
pub fn repair_best(out: &Path, best_step: Option<u64>) -> Result<()> {
    match best_step {
        Some(step) if best(out) != Some(step) && out.join(checkpoint_name(step)).is_dir() => {
            mark_best(out, step)
        }
        None if out.join(BEST_FILE).exists() => {
            fs::remove_file(out.join(BEST_FILE)).map_err(|source| TrainError::Io {
                path: out.join(BEST_FILE),
                source,
            })
        }
        _ => Ok(()),
    }
}
