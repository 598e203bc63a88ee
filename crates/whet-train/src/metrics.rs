//! `metrics.jsonl`: one JSON object per optimizer step (`"kind": "train"`) and per evaluation
//! (`"kind": "eval"`). On resume, lines past the checkpoint's step are dropped so the file
//! describes exactly one history; a run started over (no checkpoint yet) starts an empty file.
//! The lines are appended, the one write whet does not make atomic: a kill may cut the last
//! line, which the next resume drops with the others past its checkpoint.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use whet_data::atomic::{self, Existing};

use crate::trainer::{EvalMetrics, StepMetrics};
use crate::{Result, TrainError};

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
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s <= resumed_from)
                })
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
