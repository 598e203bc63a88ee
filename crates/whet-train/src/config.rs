//! What the trainer needs to know of a run: [`TrainerConfig`], the training hyper-parameters,
//! the optimizer as a tagged [`OptimizerChoice`], the checkpoint policy and the text of the run
//! configuration each checkpoint stores. The orchestrator (`whet::config`) owns the TOML file
//! and builds this from it; the settings are named here by the keys they come from
//! (`train.lr`, `output.save_every`), so an error reads the same from either side.
//!
//! [`TrainerConfig::validate`] checks every setting the trainer sizes or divides by;
//! [`crate::Trainer::run`] runs it again for configs built in code. [`check`] is the range check
//! both sides use.

use std::path::Path;

use serde::{Deserialize, Serialize};
use whet_optim::{AdamW, AdamWConfig, Optimizer, Param, Schedule, ScheduleKind, Sgd, SgdConfig};

use crate::{Result, TrainError};

/// What a run trains: LoRA adapters or every weight. Checkpoints hold the adapter
/// (`adapter_model.safetensors`) or the whole model (`model.safetensors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Lora,
    Full,
}

/// The optimizer and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerChoice {
    AdamW(AdamWConfig),
    Sgd(SgdConfig),
}

impl OptimizerChoice {
    pub fn build(&self, params: Vec<Param>) -> Result<Box<dyn Optimizer>> {
        Ok(match *self {
            Self::AdamW(c) => Box::new(AdamW::new(params, c)?),
            Self::Sgd(c) => Box::new(Sgd::new(params, c)?),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainerConfig {
    pub method: Method,
    pub seed: u64,
    pub epochs: f64,
    /// Stop after this many optimizer steps (0: run `epochs`).
    pub max_steps: u64,
    /// Rows per forward/backward.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step; the loss is normalised by the supervised tokens of
    /// all of them together.
    pub grad_accum: usize,
    pub optimizer: OptimizerChoice,
    pub lr: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: f64,
    /// NEFTune noise on input embeddings (Jain et al. 2023): alpha / sqrt(len * dim); 0 = off.
    pub neftune_alpha: f64,
    /// Activation checkpointing per decoder layer: keep only each layer's input and recompute
    /// the layer in backward (less activation memory, about one extra forward of time).
    pub activation_checkpointing: bool,
    /// Run evaluation every N optimizer steps (0: only at the end of each epoch).
    pub eval_every: u64,
    /// Early stopping: stop after `patience` evaluations without an improvement of at least
    /// `min_delta` (0 = off).
    pub patience: u32,
    pub min_delta: f64,
    /// What decides early stopping and the best checkpoint: the validation loss (`None`), or the
    /// task metric of this name (higher is better) that [`crate::Trainer::scorer`] returns
    /// (`train.select_by = "metric:accuracy"`).
    pub select_by: Option<String>,
    /// Task metrics ([`crate::Trainer::scorer`]) at every N-th evaluation and the last one
    /// (`eval.metric_every`; 0: not during training). A metric that selects needs N >= 1.
    pub metric_every: u64,
    /// Write a checkpoint every N optimizer steps (0: at evaluations only).
    pub save_every: u64,
    /// Checkpoints kept besides the best one.
    pub keep_last: usize,
    /// The fully resolved run configuration, saved as `config.toml` in every checkpoint.
    pub config_toml: String,
    /// Cross-entropy, or a preference loss on pair rows (then `micro_batch` counts pairs).
    pub objective: crate::preference::Objective,
}

/// Upper bounds on the trainer's numeric settings: far above any real run, low enough that the
/// products and allocations sized from them stay sane.
pub mod limits {
    pub const MICRO_BATCH: u64 = 1 << 16;
    pub const GRAD_ACCUM: u64 = 1 << 16;
    /// `micro_batch * grad_accum`.
    pub const ROWS_PER_STEP: u64 = 1 << 20;
    /// `max_steps`, `warmup_steps`, `eval_every`.
    pub const STEPS: u64 = 1 << 40;
    pub const EPOCHS: f64 = 1e6;
}

/// Range checks whose error names the key: `Err` is the message, for the caller to put beside
/// the file it read.
pub mod check {
    /// A float that must be finite and within [lo, hi] (`open_hi`: hi itself excluded).
    pub fn real(
        field: &str,
        v: f64,
        lo: f64,
        hi: f64,
        open_hi: bool,
        hint: &str,
    ) -> Result<(), String> {
        let ok = v.is_finite() && v >= lo && if open_hi { v < hi } else { v <= hi };
        if ok {
            Ok(())
        } else {
            let range = match (hi.is_finite(), open_hi) {
                (false, _) => format!(">= {lo}"),
                (true, true) => format!("in [{lo}, {hi})"),
                (true, false) => format!("in [{lo}, {hi}]"),
            };
            Err(format!(
                "`{field}` must be a finite number {range}{hint}, got {v}"
            ))
        }
    }

    /// An integer within [lo, hi].
    pub fn int(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), String> {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(format!("`{field}` must be in [{lo}, {hi}], got {v}"))
        }
    }
}

impl TrainerConfig {
    /// Every setting in range, with an error naming its key; `path` labels the error (the run
    /// config's file, or `<training config>` for one built in code).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let config = |message: String| TrainError::Config {
            path: path.to_path_buf(),
            message,
        };
        let bad = |field: &str, message: String| config(format!("`{field}` {message}"));
        let real = |field: &str, v: f64, lo: f64, hi: f64, open_hi: bool, hint: &str| {
            check::real(field, v, lo, hi, open_hi, hint).map_err(config)
        };
        let int =
            |field: &str, v: u64, lo: u64, hi: u64| check::int(field, v, lo, hi).map_err(config);
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad(
                "train.lr",
                format!(
                    "{} is not a usable learning rate; use a value > 0 such as 2e-4",
                    self.lr
                ),
            ));
        }
        int(
            "train.micro_batch",
            self.micro_batch as u64,
            1,
            limits::MICRO_BATCH,
        )?;
        int(
            "train.grad_accum",
            self.grad_accum as u64,
            1,
            limits::GRAD_ACCUM,
        )?;
        match self.micro_batch.checked_mul(self.grad_accum) {
            Some(rows) if rows as u64 <= limits::ROWS_PER_STEP => {}
            _ => {
                return Err(bad(
                    "train.micro_batch * train.grad_accum",
                    format!(
                        "(rows per optimizer step) must be at most {}, got {} * {}",
                        limits::ROWS_PER_STEP,
                        self.micro_batch,
                        self.grad_accum
                    ),
                ));
            }
        }
        int("train.max_steps", self.max_steps, 0, limits::STEPS)?;
        if self.max_steps == 0 && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return Err(bad(
                "train.epochs",
                format!(
                    "must be a finite number > 0 (or set train.max_steps > 0), got {}",
                    self.epochs
                ),
            ));
        }
        real("train.epochs", self.epochs, 0.0, limits::EPOCHS, false, "")?;
        int("train.warmup_steps", self.warmup_steps, 0, limits::STEPS)?;
        int("train.eval_every", self.eval_every, 0, limits::STEPS)?;
        int("eval.metric_every", self.metric_every, 0, limits::STEPS)?;
        if let Some(name) = &self.select_by
            && self.metric_every == 0
        {
            return Err(bad(
                "eval.metric_every",
                format!(
                    "= 0 never scores the metric `{name}` that train.select_by follows; set it to 1 (every evaluation) or more"
                ),
            ));
        }
        real("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, false, "")?;
        let inf = f64::INFINITY;
        match &self.optimizer {
            OptimizerChoice::AdamW(c) => {
                real("train.weight_decay", c.weight_decay, 0.0, inf, false, "")?;
                real("train.beta1", c.beta1, 0.0, 1.0, true, "")?;
                real("train.beta2", c.beta2, 0.0, 1.0, true, "")?;
            }
            OptimizerChoice::Sgd(c) => {
                real("train.weight_decay", c.weight_decay, 0.0, inf, false, "")?;
                real("train.momentum", c.momentum, 0.0, 1.0, true, "")?;
            }
        }
        real(
            "train.max_grad_norm",
            self.max_grad_norm,
            0.0,
            inf,
            false,
            " (0: no clipping)",
        )?;
        real(
            "train.neftune_alpha",
            self.neftune_alpha,
            0.0,
            inf,
            false,
            " (0: off)",
        )?;
        real("train.min_delta", self.min_delta, 0.0, inf, false, "")?;
        Ok(())
    }

    /// The learning-rate schedule of a run of `total_steps` steps.
    pub fn schedule(&self, total_steps: u64) -> Result<Schedule> {
        Ok(Schedule::new(
            self.schedule,
            self.lr,
            self.warmup_steps,
            total_steps,
            self.min_lr_ratio,
        )?)
    }
}
