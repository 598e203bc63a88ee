//! The training loop, evaluation and checkpoints, on one process or data-parallel over the ranks
//! of a [`comm::Communicator`] (MPI, NCCL).
//!
//! Invariant: this crate sees tokenized rows and a model; it never reads data files or
//! tokenizers (the orchestrator crate `whet` does that), nor the run's TOML configuration: it
//! takes a [`TrainerConfig`] built from it.
//!
//! # Example
//!
//! LoRA on the tiny model: a few optimizer steps ([`Step`], the step [`Trainer::run`] takes) on
//! one packed row lower its loss ([`evaluate`]).
//!
//! ```
//! use candle_core::Device;
//! use whet_model::{LoraConfig, Model, Trainable};
//! use whet_optim::{AdamW, AdamWConfig, Param};
//! use whet_train::{Batch, Row, Step, evaluate};
//!
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny_chat");
//! let dev = Device::Cpu;
//! let lora = LoraConfig {
//!     r: 4, alpha: 8.0, dropout: 0.0, target_modules: Default::default(), use_rslora: false,
//! };
//! let mut model = Model::load(&dir, Trainable::Lora { config: lora, seed: 0 }, &dev)?;
//! // One document of 16 tokens; each target is the next token (-100: none).
//! let ids: Vec<u32> = (40..56).collect();
//! let row = Row {
//!     targets: ids[1..].iter().map(|&t| t as i64).chain([-100]).collect(),
//!     position_ids: (0..16).collect(),
//!     segment_ids: vec![0; 16],
//!     input_ids: ids,
//! };
//! let params = model.trainable().into_iter().map(|(n, v)| Param::new(n, v)).collect();
//! let mut adamw = AdamW::new(params, AdamWConfig::default())?;
//! let (before, _) = evaluate(&model, std::slice::from_ref(&row), 1, &dev)?;
//! for done in 0..5 {
//!     Step::single().run(&mut model, &mut adamw, done, 1e-2, 1, |_| Batch::from_rows(&[&row], &dev))?;
//! }
//! let (after, _) = evaluate(&model, &[row], 1, &dev)?;
//! assert!(after < before, "{before} -> {after}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod checkpoint;
pub mod comm;
pub mod config;
mod error;
pub mod metrics;
pub mod preference;
pub mod rows;
pub mod score;
mod state_io;
pub mod step;
pub mod trainer;

pub use config::{Method, OptimizerChoice, TrainerConfig};
pub use error::{Result, TrainError};
pub use metrics::{EvalMetrics, SetLoss, StepMetrics};
pub use rows::{Batch, Cursor, Row, RowSource};
pub use step::{Step, StepOutcome};
pub use trainer::{
    Observer, Quiet, Summary, TaskScorer, TrainTime, Trainer, evaluate, evaluate_sharded,
    load_trainable,
};
