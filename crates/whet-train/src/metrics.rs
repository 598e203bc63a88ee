//! `metrics.jsonl`: one JSON object per optimizer step (`"kind": "train"`) and per evaluation
//! (`"kind": "eval"`). On resume, lines past the checkpoint's step are dropped so the file
//! describes exactly one history; a run started over (no checkpoint yet) starts an empty file.
//! The lines are appended, the one write whet does not make atomic: a kill may cut the last
//! line, which the next resume drops with the others past its checkpoint.
//!
//! The types of a line ([`StepMetrics`], [`EvalMetrics`]), their writer ([`MetricsLog`]) and
//! their reader ([`read`], [`MetricsLine`]) are all here.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use whet_data::atomic::{self, Existing};

use crate::preference::PreferenceMetrics;
use crate::{Result, TrainError};

/// One optimizer step, as reported to observers and to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    #[serde(deserialize_with = "nan_if_null")]
    pub epoch: f64,
    /// Mean cross-entropy per supervised token over the whole accumulated batch.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    pub supervised_tokens: usize,
    pub tokens: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub elapsed_s: f64,
    /// A preference step's rewards, margin and accuracy (pair-weighted means over its
    /// micro-batches), written as top-level fields (`rewards_chosen`, `reward_margin`,
    /// `reward_accuracy`, ...); absent for other objectives. `loss` is then the mean preference
    /// loss over the step's pairs and `supervised_tokens` counts pairs.
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: u64,
    /// NaN when the validation rows hold no supervised token (written as `null`).
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub val_ppl: f64,
    pub val_tokens: usize,
    pub improved: bool,
    /// The named evaluation sets (`Trainer::eval_sets`), in their order; absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<SetLoss>,
    /// A preference run's validation rewards, margin and accuracy over its pairs (top-level
    /// fields, as in [`StepMetrics`]); `val_loss` is then the mean preference loss, `val_ppl`
    /// null and `val_tokens` the pairs.
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
    /// Task metrics by name (`{"accuracy": 0.8, ...}`) at the evaluations that scored them
    /// (`TrainerConfig::metric_every`); absent at the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<std::collections::BTreeMap<String, f64>>,
}

/// The loss of one named evaluation set at an evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetLoss {
    pub name: String,
    /// NaN when the set holds no supervised token (written as `null`).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub ppl: f64,
    pub tokens: usize,
}

/// One line of `metrics.jsonl`, told apart by its `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricsLine {
    #[serde(rename = "train")]
    Step(StepMetrics),
    Eval(EvalMetrics),
}

impl MetricsLine {
    pub fn step(&self) -> u64 {
        match self {
            Self::Step(m) => m.step,
            Self::Eval(m) => m.step,
        }
    }

    fn parse(line: &str) -> serde_json::Result<Self> {
        serde_json::from_str(line)
    }
}

/// serde_json writes a non-finite float as `null`; read it back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Every line of a `metrics.jsonl`, in order; a line that is not a metrics line is an error
/// naming its number.
pub fn read(path: &Path) -> Result<Vec<MetricsLine>> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            MetricsLine::parse(line).map_err(|e| TrainError::MetricsRead {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    pub fn open(path: &Path, resumed_from: u64) -> Result<Self> {
        let io = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        if resumed_from == 0 {
            atomic::write_file(path, b"", Existing::Replace)?;
        } else if path.exists() {
            let kept: Vec<String> = BufReader::new(File::open(path).map_err(io)?)
                .lines()
                .map_while(|l| l.ok())
                .filter(|l| MetricsLine::parse(l).is_ok_and(|m| m.step() <= resumed_from))
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            atomic::write_file(path, text.as_bytes(), Existing::Replace)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The line's fields, then `kind` (serde_json's map keeps its keys sorted).
    fn line(&mut self, kind: &str, value: &impl Serialize) -> Result<()> {
        let mut v = serde_json::to_value(value).expect("metrics serialise");
        v["kind"] = serde_json::Value::String(kind.into());
        writeln!(self.file, "{v}").map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn step(&mut self, m: &StepMetrics) -> Result<()> {
        self.line("train", m)
    }

    pub fn eval(&mut self, m: &EvalMetrics) -> Result<()> {
        self.line("eval", m)
    }
}
