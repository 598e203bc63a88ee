//! The training configuration: TOML read with serde, unknown keys rejected with a suggestion,
//! `--set section.key=value` overrides applied before validation, and the fully resolved config
//! written next to every checkpoint (torchtune's habit).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub eval: EvalSection,
    pub output: OutputSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
    pub path: PathBuf,
    /// QLoRA: keep the frozen base's linear weights in this GGML type (`q4_0`, `q4_k`,
    /// `q8_0`, ...; see `whet_model::quant`). LoRA only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
}

impl ModelSection {
    /// The parsed `quantize` type (validated when the config loads).
    pub fn quantize_type(&self) -> Option<candle_core::quantized::GgmlDType> {
        self.quantize.as_deref().and_then(whet_model::quant::parse)
    }
}

/// Which record shape the data has; `auto` picks from the fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    #[default]
    Auto,
    Text,
    PromptCompletion,
    Chat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub train: PathBuf,
    /// A separate validation file; without it `validation_fraction` of train is held out.
    #[serde(default)]
    pub validation: Option<PathBuf>,
    #[serde(default = "defaults::validation_fraction")]
    pub validation_fraction: f64,
    #[serde(default)]
    pub format: Format,
    /// Tokens per packed row.
    #[serde(default = "defaults::max_len")]
    pub max_len: usize,
    /// Pack several examples per row (documents never attend to each other).
    #[serde(default = "defaults::yes")]
    pub pack: bool,
    /// Learn every assistant turn (true) or only the last (false).
    #[serde(default = "defaults::yes")]
    pub all_assistant_turns: bool,
    /// Redact PII before tokenizing and write `pii_audit.json`.
    #[serde(default)]
    pub scrub_pii: bool,
    /// Drop exact and near duplicates before splitting.
    #[serde(default)]
    pub dedup: bool,
    /// Skip (and count) invalid rows instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid: bool,
    #[serde(default)]
    pub system_prompt: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Lora,
    Full,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (`q_proj`, ...) or `["all-linear"]`.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            use_rslora: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub seed: u64,
    pub epochs: f64,
    /// Stop after this many optimizer steps (0: run `epochs`).
    pub max_steps: u64,
    /// Rows per forward/backward.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step; the loss is normalised by the supervised tokens of
    /// all of them together.
    pub grad_accum: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub schedule: whet_optim::ScheduleKind,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub momentum: f64,
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
    /// k-fold cross-validation: train k models, report mean and spread of validation loss (0 = off).
    pub k_folds: u32,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            seed: 42,
            epochs: 1.0,
            max_steps: 0,
            micro_batch: 4,
            grad_accum: 1,
            optimizer: OptimizerKind::Adamw,
            lr: 2e-4,
            schedule: whet_optim::ScheduleKind::Cosine,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            momentum: 0.9,
            max_grad_norm: 1.0,
            neftune_alpha: 0.0,
            activation_checkpointing: false,
            eval_every: 0,
            patience: 0,
            min_delta: 0.0,
            k_folds: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Prompts whose base and tuned generations go side by side into the report.
    pub prompts: Vec<String>,
    /// Held-out general text: its loss before and after shows what general ability was lost.
    pub general_data: Option<PathBuf>,
    pub max_new_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            general_data: None,
            max_new_tokens: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    /// Checkpoints kept besides the best one.
    #[serde(default = "defaults::keep_last")]
    pub keep_last: usize,
    /// Write a checkpoint every N optimizer steps (0: at evaluations only).
    #[serde(default)]
    pub save_every: u64,
}

mod defaults {
    pub fn validation_fraction() -> f64 {
        0.1
    }
    pub fn max_len() -> usize {
        512
    }
    pub fn yes() -> bool {
        true
    }
    pub fn keep_last() -> usize {
        2
    }
}

impl Config {
    /// Reads a TOML file, applies `key=value` overrides, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path, overrides)
    }

    pub fn from_toml(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| TrainError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let config: Config = Config::deserialize(value).map_err(|e| TrainError::Config {
            path: path.to_path_buf(),
            message: with_suggestion(&e.to_string()),
        })?;
        // Relative paths in a config file are relative to that file.
        // Absolute, so the config saved next to a checkpoint still points at the same files.
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let config =
            config.rebased(&std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf()));
        config.validate(path)?;
        Ok(config)
    }

    fn rebased(mut self, base: &Path) -> Self {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let fix = |p: &mut PathBuf| {
            if let (Ok(rest), Some(home)) = (p.strip_prefix("~"), home.as_ref()) {
                *p = home.join(rest);
            }
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.model.path);
        fix(&mut self.data.train);
        if let Some(v) = self.data.validation.as_mut() {
            fix(v);
        }
        if let Some(g) = self.eval.general_data.as_mut() {
            fix(g);
        }
        fix(&mut self.output.dir);
        self
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| TrainError::Config {
            path: path.to_path_buf(),
            message: format!("`{field}`: {message}"),
        };
        let t = &self.train;
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(bad(
                "train.lr",
                format!(
                    "{} is not a usable learning rate; use a value > 0 such as 2e-4",
                    t.lr
                ),
            ));
        }
        if t.micro_batch == 0 || t.grad_accum == 0 {
            return Err(bad(
                "train.micro_batch / train.grad_accum",
                "must be at least 1".into(),
            ));
        }
        if t.epochs <= 0.0 && t.max_steps == 0 {
            return Err(bad(
                "train.epochs",
                "set epochs > 0 or max_steps > 0".into(),
            ));
        }
        if t.k_folds == 1 {
            return Err(bad(
                "train.k_folds",
                "k-fold cross-validation needs k >= 2 (0 turns it off)".into(),
            ));
        }
        if self.data.max_len < 8 {
            return Err(bad(
                "data.max_len",
                format!(
                    "{} tokens is too short for a training row",
                    self.data.max_len
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.data.validation_fraction) {
            return Err(bad("data.validation_fraction", "must be in [0, 1)".into()));
        }
        if self.method == Method::Lora && self.lora.r == 0 {
            return Err(bad("lora.r", "LoRA rank must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err(bad("lora.dropout", "must be in [0, 1)".into()));
        }
        if let Some(q) = &self.model.quantize {
            if whet_model::quant::parse(q).is_none() {
                return Err(bad(
                    "model.quantize",
                    format!(
                        "{q:?} is not a quantization type; use one of {}",
                        whet_model::quant::names()
                    ),
                ));
            }
            if self.method != Method::Lora {
                return Err(bad(
                    "model.quantize",
                    "a quantized base (QLoRA) trains LoRA adapters only; set method = \"lora\" or remove quantize".into(),
                ));
            }
        }
        Ok(())
    }

    /// The resolved config as TOML, as saved next to each checkpoint.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# could not serialise config: {e}\n"))
    }
}

/// `train.lr=1e-4`: the value is parsed as TOML (number, bool, array, inline table), falling back
/// to a plain string.
fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<()> {
    let bad = |message: String| TrainError::Override {
        assignment: assignment.to_string(),
        message,
    };
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| bad("expected `section.key=value`, e.g. `train.lr=1e-4`".into()))?;
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, sections) = parts.split_last().ok_or_else(|| bad("empty key".into()))?;
    let mut table = root;
    for part in sections {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| bad(format!("`{part}` is not a section")))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

/// serde says "unknown field `lr_rate`, expected one of `seed`, `lr`, ..."; add the closest name.
fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.split("unknown field `").nth(1) else {
        return message.to_string();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let best = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (edit_distance(unknown, cand), cand))
        .min();
    match best {
        Some((d, cand)) if d <= unknown.len().max(3) / 2 + 1 => {
            format!("{message} (did you mean `{cand}`?)")
        }
        _ => message.to_string(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [model]
        path = "m"
        [data]
        train = "d.jsonl"
        [output]
        dir = "out"
    "#;

    #[test]
    fn unknown_keys_are_rejected_with_a_suggestion() {
        let text = format!("{MINIMAL}\n[train]\nlearning_rate = 1e-4\n");
        let err = Config::from_toml(&text, Path::new("run.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("run.toml") && err.contains("learning_rate"),
            "{err}"
        );
        let err = Config::from_toml(MINIMAL, Path::new("run.toml"), &["train.lrr=1e-4".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `lr`"), "{err}");
    }

    #[test]
    fn overrides_are_typed_and_paths_are_relative_to_the_file() {
        let c = Config::from_toml(
            MINIMAL,
            Path::new("/cfg/run.toml"),
            &[
                "train.lr=1e-4".into(),
                "lora.target_modules=[\"q_proj\"]".into(),
                "method=full".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 1e-4);
        assert_eq!(c.lora.target_modules, vec!["q_proj".to_string()]);
        assert_eq!(c.method, Method::Full);
        assert_eq!(c.data.train, Path::new("/cfg/d.jsonl"));
        let again = Config::from_toml(&c.to_toml(), Path::new("/elsewhere/x.toml"), &[]).unwrap();
        assert_eq!(again, c, "the saved config reads back to the same config");
    }

    #[test]
    fn a_zero_learning_rate_is_an_error() {
        let err = Config::from_toml(MINIMAL, Path::new("run.toml"), &["train.lr=0".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.lr"), "{err}");
    }
}
