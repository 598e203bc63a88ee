//! The training loop, evaluation and checkpoints.
//!
//! Invariant: this crate sees tokenized rows and a model; it never reads data files or
//! tokenizers (the orchestrator crate `whet` does that).

pub mod checkpoint;
pub mod config;
mod error;
pub mod metrics;
pub mod rows;
mod state_io;
pub mod trainer;

pub use config::Config;
pub use error::{Result, TrainError};
pub use rows::{Batch, Cursor, Row};
pub use trainer::{
    EvalMetrics, Observer, Quiet, StepMetrics, Summary, Trainer, evaluate, load_trainable,
};
