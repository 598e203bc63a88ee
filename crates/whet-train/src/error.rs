use std::path::PathBuf;

use thiserror::Error;

pub type Result<T> = std::result::Result<T, TrainError>;

#[derive(Debug, Error)]
pub enum TrainError {
    // ---- configuration ----
    #[error("{path}: {message}", path = path.display())]
    Config { path: PathBuf, message: String },

    // ---- data ----
    #[error(
        "the training set has no supervised token: every label is masked. Check the data format (`data.format`) and the chat template; `whet data inspect` shows what would be learned"
    )]
    NoSupervisedTokens,
    #[error("the {split} set is empty: {hint}")]
    EmptySplit {
        split: &'static str,
        hint: &'static str,
    },

    // ---- preference losses ----
    #[error("{loss}: {message}")]
    Preference {
        /// Which loss or input ("DPO loss", "ORPO loss", "preference pairs").
        loss: &'static str,
        message: String,
    },

    // ---- the run ----
    #[error(
        "loss became {value} at step {step} (micro-batch {micro}): {cause}; stopping. Lower `train.lr`, keep `train.max_grad_norm` on, or check the data for empty rows. The last good checkpoint is untouched"
    )]
    NonFinite {
        step: u64,
        micro: usize,
        value: f32,
        /// [`whet_model::Model::non_finite_cause`]: a weight holding NaN/inf, or overflow.
        cause: String,
    },
    #[error("{dir} holds a different run ({why}); pass a new `output.dir`, or resume that run with the same config", dir = dir.display())]
    ForeignOutput { dir: PathBuf, why: String },
    #[error(
        "{dir} is not empty and was not made by whet (no `.whet-run` file in it; it holds {found}); whet writes only into a new or empty folder, or the folder of the same run: set `output.dir` to a new folder",
        dir = dir.display()
    )]
    OutputNotOwned { dir: PathBuf, found: String },
    #[error(
        "`output.dir` is empty; set it to the folder this run writes its checkpoints, metrics and report into (e.g. `output.dir = \"runs/my-run\"`)"
    )]
    NoOutputDir,

    // ---- checkpoints and metrics ----
    #[error("writing checkpoint {path}: {source}; the previous checkpoints are intact", path = path.display())]
    CheckpointWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is unusable: {message}", path = path.display())]
    CheckpointRead { path: PathBuf, message: String },
    #[error("{path}: line {line} is not a metrics line: {message}", path = path.display())]
    MetricsRead {
        path: PathBuf,
        line: usize,
        message: String,
    },

    // ---- task metrics (`score`) ----
    #[error("{metric}: {message}")]
    ScoreInput {
        metric: &'static str,
        message: String,
    },
    #[error(
        "classification: reference {row} (counting from 0) is {reference:?}, which normalises to none of the labels ({labels}); add it to the label set or fix that reference"
    )]
    ReferenceOutsideLabels {
        row: usize,
        reference: String,
        labels: String,
    },
    #[error(
        "entity_f1: reference {row} (counting from 0) is not an entity list: {reason}. Write each reference as a JSON object {{\"type\": [\"span\", ...]}}, a JSON list [{{\"type\": ..., \"text\": ...}}], or lines `type: span`"
    )]
    UnparseableReference { row: usize, reason: String },
    #[error("unknown metric {name:?}; the metrics are {valid}")]
    UnknownMetric { name: String, valid: String },

    // ---- distributed runs ----
    #[error("rank {rank} of {world} ({backend}): {op} failed: {message}")]
    Comm {
        rank: usize,
        world: usize,
        backend: &'static str,
        op: String,
        message: String,
    },
    #[error("the ranks disagree on {what}: {detail}. {hint}")]
    RankMismatch {
        what: &'static str,
        detail: String,
        hint: &'static str,
    },
    #[error("{message}")]
    Launch { message: String },
    #[error("task metrics at step {step}: {source}")]
    TaskScore {
        step: u64,
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] whet_data::atomic::WriteError),
    #[error(transparent)]
    Model(#[from] whet_model::Error),
    #[error(transparent)]
    Optim(#[from] whet_optim::OptimError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
