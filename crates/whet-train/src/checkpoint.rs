//! Checkpoints: written into a temporary folder, every file fsynced, then renamed into place,
//! so a crash (or kill -9, or a full disk) at any moment leaves the previous checkpoints intact.
//!
//! ```text
//! out/checkpoint-000120/
//!   adapter_model.safetensors + adapter_config.json   (LoRA, PEFT format)  or  model.safetensors (full)
//!   optimizer.safetensors      optimizer moments, named `exp_avg.<param>` ...
//!   trainer_state.json         step, data cursor, best validation loss, metrics so far
//!   config.toml                the fully resolved config of the run
//! out/best -> the checkpoint folder name with the lowest validation loss (a text file)
//! ```

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    pub best_step: Option<u64>,
    /// Evaluations since the last improvement (early stopping).
    pub stale_evals: u32,
    pub tokens_seen: u64,
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

/// Writes a checkpoint atomically. `write_tensors` fills the temporary folder with the weight
/// and optimizer files; this function adds the state and config, fsyncs, and renames.
pub fn write(
    out: &Path,
    state: &TrainerState,
    config_toml: &str,
    write_tensors: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = out.join(checkpoint_name(state.step));
    let tmp = out.join(format!(".{}.tmp", checkpoint_name(state.step)));
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::CheckpointWrite { path, source }
    };
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(werr(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(werr(&tmp))?;
    let result = (|| {
        write_tensors(&tmp)?;
        let state_json = serde_json::to_string_pretty(state).expect("trainer state serialises");
        write_file(&tmp.join(STATE_FILE), state_json.as_bytes()).map_err(werr(&tmp))?;
        write_file(&tmp.join(CONFIG_FILE), config_toml.as_bytes()).map_err(werr(&tmp))?;
        for entry in fs::read_dir(&tmp).map_err(werr(&tmp))? {
            let path = entry.map_err(werr(&tmp))?.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(werr(&path))?;
        }
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(werr(&final_dir))?;
        }
        fs::rename(&tmp, &final_dir).map_err(werr(&final_dir))?;
        sync_dir(out).map_err(werr(out))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| final_dir)
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Keeps the newest `keep_last` checkpoints and the best one; deletes the rest.
pub fn prune(out: &Path, keep_last: usize, best_step: Option<u64>) -> Result<()> {
    let all = list(out);
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, dir) in &all[..cut] {
        if Some(*step) != best_step {
            fs::remove_dir_all(dir).map_err(|source| TrainError::Io {
                path: dir.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

pub fn mark_best(out: &Path, step: u64) -> Result<()> {
    write_file(&out.join(BEST_FILE), checkpoint_name(step).as_bytes()).map_err(|source| {
        TrainError::CheckpointWrite {
            path: out.join(BEST_FILE),
            source,
        }
    })
}
