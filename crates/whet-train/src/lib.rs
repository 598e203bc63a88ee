//! The training loop, evaluation and checkpoints, on one process or data-parallel over the ranks
//! of a [`comm::Communicator`] (MPI, NCCL).
//!
//! Invariant: this crate sees tokenized rows and a model; it never reads data files or
//! tokenizers (the orchestrator crate `whet` does that), nor the run's TOML configuration: it
//! takes a [`TrainerConfig`] built from it.

pub mod checkpoint;
pub mod comm;
pub mod config;
mod error;
pub mod metrics;
pub mod rows;
mod state_io;
pub mod step;
pub mod trainer;

pub use config::{Method, OptimizerChoice, TrainerConfig};
pub use error::{Result, TrainError};
pub use metrics::{EvalMetrics, StepMetrics};
pub use rows::{Batch, Cursor, Row};
pub use step::{Step, StepOutcome};
pub use trainer::{Observer, Quiet, Summary, Trainer, evaluate, evaluate_sharded, load_trainable};
