//! The run configuration: TOML read with serde, unknown keys rejected with a suggestion,
//! `--set section.key=value` overrides applied before validation, and the fully resolved config
//! written next to every checkpoint (torchtune's habit). The orchestrator owns it; the trainer
//! takes the part it uses, [`Config::trainer`] (a `whet_train::TrainerConfig`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whet_data::{Columns, Shape};
use whet_optim::{AdamWConfig, SgdConfig};
pub use whet_train::Method;
use whet_train::config::check;
use whet_train::preference::{DpoConfig, DpoLoss, Objective, PreferenceObjective};
use whet_train::score::{Metric, Normalize};
use whet_train::{OptimizerChoice, TrainError, TrainerConfig};

pub use whet_tokenize::LongDocuments;

pub type Result<T> = std::result::Result<T, ConfigError>;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}", path = path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("override `{assignment}`: {message}")]
    Override { assignment: String, message: String },
    /// A chat template choice (`data.chat_template`, `--chat-template`) that names nothing.
    #[error("`{field}` {message}")]
    ChatTemplate { field: String, message: String },
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A setting the trainer checks ([`TrainerConfig::validate`]), named by its key.
    #[error(transparent)]
    Trainer(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] whet_model::Error),
}

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
    /// Preference tuning: with this section the data are (prompt, chosen, rejected) pairs and
    /// the loss is DPO, IPO or ORPO; `method` still says what is trained (LoRA or every weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceSection>,
}

/// `[preference]`: the preference loss and its settings (TRL's `DPOConfig` / `ORPOConfig`
/// names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferenceSection {
    /// `dpo` (sigmoid loss), `ipo`, or `orpo`.
    #[serde(default)]
    pub loss: PreferenceLoss,
    /// DPO's KL weight / IPO's tau / ORPO's lambda (TRL's `beta`; default 0.1).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// cDPO's label-flip probability in [0, 0.5] (`dpo` only; default 0).
    #[serde(default)]
    pub label_smoothing: f64,
    /// DPO / IPO with LoRA: compute the reference log-probabilities once before training
    /// instead of an adapter-off forward in every step (the same numbers; one forward less per
    /// step). Full fine-tuning always does (no reference is left once the weights move).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub precompute_reference: bool,
}

fn default_beta() -> f64 {
    0.1
}

/// The preference loss of `[preference]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceLoss {
    /// DPO's sigmoid loss against the reference (the base with the adapter off).
    #[default]
    Dpo,
    /// IPO against the same reference.
    Ipo,
    /// ORPO: SFT on the chosen answer plus the odds-ratio term; no reference.
    Orpo,
}

impl PreferenceSection {
    /// The trainer's objective.
    pub fn objective(&self) -> PreferenceObjective {
        match self.loss {
            PreferenceLoss::Dpo => PreferenceObjective::Dpo(DpoConfig {
                beta: self.beta,
                loss: DpoLoss::Sigmoid {
                    label_smoothing: self.label_smoothing,
                },
            }),
            PreferenceLoss::Ipo => PreferenceObjective::Dpo(DpoConfig {
                beta: self.beta,
                loss: DpoLoss::Ipo,
            }),
            PreferenceLoss::Orpo => PreferenceObjective::Orpo { beta: self.beta },
        }
    }
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
    /// Continue LoRA training from this PEFT adapter folder (a whet run's `out/adapter`, or
    /// PEFT's `save_pretrained`): its A/B are the starting values and its `adapter_config.json`
    /// gives the run's `[lora]` settings (a `[lora]` key written in the config that differs
    /// from the adapter's is an error). A finished run is extended by pointing this at its
    /// adapter, with new data or more steps, and a new `output.dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

impl ModelSection {
    /// The parsed `quantize` type (validated when the config loads).
    pub fn quantize_type(&self) -> Option<candle_core::quantized::GgmlDType> {
        self.quantize.as_deref().and_then(whet_model::quant::parse)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The training data (file, folder or glob). Exactly one of `train` and `sources` is set; an
    /// empty path stands for "not set" (and is left out of the saved TOML).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub train: PathBuf,
    /// A separate validation file; without it `validation_fraction` of train is held out.
    #[serde(default)]
    pub validation: Option<PathBuf>,
    #[serde(default = "defaults::validation_fraction")]
    pub validation_fraction: f64,
    /// Which record shape the data has (`auto`, `text`, `prompt-completion`, `chat`); `auto`
    /// picks from the fields.
    #[serde(default)]
    pub format: Shape,
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
    /// Drop exact and near duplicates before splitting. With `store`: the store's duplicate
    /// documents (MinHash over token ids) are marked dropped when it is prepared, and training
    /// and the held-out validation documents skip them.
    #[serde(default)]
    pub dedup: bool,
    /// Skip (and count) invalid rows instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid: bool,
    /// Inserted as the system turn of every conversation that has none.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Text documents longer than `max_len`: `window` (cut into consecutive windows of at most
    /// `max_len` tokens, each its own row, no token lost) or `truncate` (keep the first
    /// `max_len`). Prompt/completion and chat rows are always truncated.
    #[serde(default, skip_serializing_if = "is_default")]
    pub long_documents: LongDocuments,
    /// Tokens each window repeats from the end of the one before, as context (not learned
    /// twice); at most half of `max_len`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub window_overlap: usize,
    /// Which field of a row holds which part of a record, for data whose fields have other
    /// names: `columns = { prompt = "question", completion = "answer" }`. Keys: `text`,
    /// `prompt`, `completion`, `messages`, `role`, `content`, `conversations`, `from`, `value`,
    /// `instruction`, `input`, `output`, `system`; each defaults to its own name. Applies to
    /// `train` and `validation`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub columns: Columns,
    /// The chat template to render conversations with, instead of the tokenizer's (for a base
    /// model whose tokenizer_config.json has none): a `.jinja` file (relative to this config),
    /// or the name of a template whet ships (`chatml`, `llama3`, `gemma`, `zephyr`, `phi3`).
    /// Used for training, evaluation, the report's generations and task metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Train from a token store in this folder (`whet data prepare`): made from `train` with
    /// these settings the first time (and again whenever the tokenizer, a setting or an input
    /// file changes), then read memory-mapped: the corpus never has to fit in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,
    /// Training from a store: how many shards' rows are shuffled together. Each epoch visits
    /// the shards in a seeded order, this many at a time, and shuffles their rows (a shuffle
    /// buffer of shards: more mixes better and keeps more packing plans in memory, a few bytes
    /// per document). Default 8; with at least as many as the store has, every row is
    /// shuffled with every other, as in memory.
    #[serde(
        default = "defaults::shuffle_shards",
        skip_serializing_if = "is_default_shuffle_shards"
    )]
    pub shuffle_shards: usize,
    /// `[[data.sources]]`: a mixture of several training sources instead of `train`, each
    /// read, scrubbed, deduplicated, split, tokenized and packed on its own, its rows drawn in
    /// proportion to its `weight` (see `pipeline::mixture`). Left out of the saved TOML when
    /// empty, so a single-`train` config keeps its run id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceSection>,
}

/// One `[[data.sources]]` entry of a data mixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// The name in logs and reports; default: the file stem of `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// File, folder or glob, in any format whet reads.
    pub path: PathBuf,
    /// This source's record shape; default: `data.format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Shape>,
    /// This source's field renames; default: `data.columns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Columns>,
    /// Relative share of the training rows (default 1.0; finite and > 0).
    #[serde(default = "defaults::weight")]
    pub weight: f64,
    /// A budget of supervised tokens per epoch for this source: its drawn rows are cut to
    /// those that fit (at least one). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
}

impl SourceSection {
    /// `name`, or the file stem of `path` (its last component for a folder or glob).
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl DataSection {
    /// The chat template `chat_template` names, as (source, origin for errors); `None` without
    /// one. A shipped name is that template; anything else is a file.
    pub fn chat_template_source(&self) -> Result<Option<(String, String)>> {
        let Some(choice) = &self.chat_template else {
            return Ok(None);
        };
        chat_template_source(choice, "data.chat_template").map(Some)
    }
}

/// The text of the chat template `choice` names (a shipped template's name or a file) and its
/// origin for error messages; `field` is the setting or flag that gave it.
pub fn chat_template_source(choice: &str, field: &str) -> Result<(String, String)> {
    if let Some(text) = whet_tokenize::template::shipped::shipped(choice) {
        return Ok((
            text.to_string(),
            format!("whet's shipped `{choice}` chat template"),
        ));
    }
    let path = Path::new(choice);
    if !path.is_file() {
        return Err(ConfigError::ChatTemplate {
            field: field.to_string(),
            message: format!(
                "{choice:?} is neither a file nor a chat template whet ships ({})",
                whet_tokenize::template::shipped::names()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((text, path.display().to_string()))
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
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
    /// What picks the best checkpoint and drives early stopping: `"val_loss"` (lowest) or
    /// `"metric:NAME"` (highest), NAME one of `eval.metrics`, scored at evaluations as
    /// `eval.metric_every` says.
    #[serde(skip_serializing_if = "SelectBy::is_default")]
    pub select_by: SelectBy,
}

/// `train.select_by`: the validation loss, or a task metric of `eval.metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectBy {
    #[default]
    ValLoss,
    Metric(Metric),
}

impl SelectBy {
    fn is_default(&self) -> bool {
        *self == SelectBy::ValLoss
    }

    /// The metric that selects, if one does.
    pub fn metric(self) -> Option<Metric> {
        match self {
            SelectBy::ValLoss => None,
            SelectBy::Metric(m) => Some(m),
        }
    }
}

impl std::fmt::Display for SelectBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelectBy::ValLoss => f.write_str("val_loss"),
            SelectBy::Metric(m) => write!(f, "metric:{}", m.name()),
        }
    }
}

impl std::str::FromStr for SelectBy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "val_loss" {
            return Ok(SelectBy::ValLoss);
        }
        let Some(name) = s.strip_prefix("metric:") else {
            return Err(format!(
                "expected \"val_loss\" or \"metric:NAME\" (e.g. \"metric:accuracy\"), got {s:?}"
            ));
        };
        name.parse()
            .map(SelectBy::Metric)
            .map_err(|e| e.to_string())
    }
}

impl Serialize for SelectBy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SelectBy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
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
            select_by: SelectBy::ValLoss,
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
    /// Named evaluation sets, each scored at every evaluation (logged in `metrics.jsonl` with
    /// its name) and before/after in the report: `sets = [{ name = "faq", path = "faq.jsonl",
    /// format = "chat" }]`. `data.validation` alone drives early stopping and the best
    /// checkpoint. A k-fold run (`train.k_folds`) scores its folds only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<EvalSet>,
    /// Task metrics (`exact_match`, `accuracy`, `macro_f1`, `entity_f1`, `chrf`): a greedy
    /// completion of at most `max_new_tokens` is generated for each validation example and
    /// scored against its reference completion, for the base and the tuned model (and each
    /// fold of a k-fold run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metric>,
    /// The label set of `accuracy` and `macro_f1`; absent: the distinct completions of the
    /// training data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// What the metrics fold away before comparing (`{ case = true, whitespace = true,
    /// punctuation = true }` by default; set one to false to keep it).
    #[serde(skip_serializing_if = "is_default_normalize")]
    pub normalize: Normalize,
    /// Score the first N validation examples only (0: all): generation costs more than a loss.
    #[serde(skip_serializing_if = "is_zero")]
    pub metric_examples: usize,
    /// Prompts generated together for the metrics.
    #[serde(skip_serializing_if = "is_default_metric_batch")]
    pub metric_batch: usize,
    /// Score the metrics during training too, at every N-th evaluation and the last (logged in
    /// `metrics.jsonl`). 0 (the default): at every evaluation when `train.select_by` follows a
    /// metric, else before and after training only.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub metric_every: u64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_default_normalize(n: &Normalize) -> bool {
    *n == Normalize::default()
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

const DEFAULT_METRIC_BATCH: usize = 8;
const DEFAULT_SHUFFLE_SHARDS: usize = 8;

fn is_default_shuffle_shards(n: &usize) -> bool {
    *n == DEFAULT_SHUFFLE_SHARDS
}

fn is_default_metric_batch(n: &usize) -> bool {
    *n == DEFAULT_METRIC_BATCH
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            general_data: None,
            max_new_tokens: 64,
            sets: Vec::new(),
            metrics: Vec::new(),
            labels: None,
            normalize: Normalize::default(),
            metric_examples: 0,
            metric_batch: DEFAULT_METRIC_BATCH,
            metric_every: 0,
        }
    }
}

/// One named evaluation set of `[eval] sets`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSet {
    pub name: String,
    pub path: PathBuf,
    /// The record shape (`auto`, `text`, `prompt-completion`, `chat`).
    #[serde(default)]
    pub format: Shape,
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

/// Upper bounds on the numeric settings: far above any real run, low enough that the
/// products and allocations sized from them stay sane. The trainer's own (`micro_batch`,
/// `grad_accum`, steps, epochs) are `whet_train::config::limits`, re-exported here.
pub mod limits {
    pub use whet_train::config::limits::*;
    /// `data.max_len` (and at most the model's `max_position_embeddings`).
    pub const MAX_LEN: u64 = 1 << 20;
    /// `micro_batch * max_len`.
    pub const TOKENS_PER_MICRO_BATCH: u64 = 1 << 24;
    /// `micro_batch * max_len * max(hidden_size, intermediate_size)`: 32 GiB of f32.
    pub const ACTIVATION_ELEMS: u64 = 1 << 33;
    pub const LORA_RANK: u64 = 1 << 16;
    pub const K_FOLDS: u64 = 1000;
    /// `data.shuffle_shards`: the packing plans of this many shards stay in memory.
    pub const SHUFFLE_SHARDS: u64 = 1 << 16;
    pub const MAX_NEW_TOKENS: u64 = 1 << 20;
    /// `eval.metric_batch`: prompts generated together.
    pub const METRIC_BATCH: u64 = 1 << 12;
}

mod defaults {
    pub fn validation_fraction() -> f64 {
        0.1
    }
    pub fn weight() -> f64 {
        1.0
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
    pub fn shuffle_shards() -> usize {
        super::DEFAULT_SHUFFLE_SHARDS
    }
}

impl Config {
    /// Reads a TOML file, applies `key=value` overrides, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path, overrides)
    }

    /// [`Config::load`], then [`Config::check_model`] against the config.json of
    /// `model.path`: every limit checked before anything is read, allocated or written.
    pub fn load_for_model(path: &Path, overrides: &[String]) -> Result<Self> {
        let config = Self::load(path, overrides)?;
        let model_config = config.model.path.join(whet_model::load::CONFIG_FILE);
        let model = whet_model::Config::from_file(&model_config)?;
        config.check_model(path, &model, &model_config)?;
        Ok(config)
    }

    pub fn from_toml(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        // The `[lora]` keys the user wrote (the others are defaults an adapter may override).
        let lora_keys: Vec<String> = match value.get("lora") {
            Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let config: Config = Config::deserialize(value).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: with_suggestion(&e.to_string()),
        })?;
        // Relative paths in a config file are relative to that file.
        // Absolute, so the config saved next to a checkpoint still points at the same files.
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut config =
            config.rebased(&std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf()));
        config.adopt_adapter(path, &lora_keys)?;
        config.validate(path)?;
        Ok(config)
    }

    /// With `model.adapter`: the run's `[lora]` becomes the adapter's `adapter_config.json`;
    /// a key in `written` (set in the file or by `--set`) that disagrees with it is an error.
    fn adopt_adapter(&mut self, path: &Path, written: &[String]) -> Result<()> {
        let Some(dir) = &self.model.adapter else {
            return Ok(());
        };
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if self.method != Method::Lora {
            return Err(invalid(format!(
                "`model.adapter` continues LoRA training from {}; set method = \"lora\" (or merge the adapter first with `whet merge` to fine-tune the merged model)",
                dir.display()
            )));
        }
        let file = dir.join(whet_model::lora::ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Io {
            path: file.clone(),
            source,
        })?;
        let (a, _base) = whet_model::LoraConfig::from_peft_json(&text, &file)?;
        let modules: Vec<String> = a.modules(&file)?.iter().map(|m| m.to_string()).collect();
        let target_modules = if all_linear(&modules) {
            vec!["all-linear".to_string()]
        } else {
            modules
        };
        let adapter = LoraSection {
            r: a.r,
            alpha: a.alpha,
            dropout: a.dropout,
            target_modules,
            use_rslora: a.use_rslora,
        };
        let mine = &self.lora;
        let same_targets = |x: &[String], y: &[String]| {
            let sorted = |v: &[String]| {
                let mut v = v.to_vec();
                v.sort();
                v
            };
            (all_linear(x) && all_linear(y)) || sorted(x) == sorted(y)
        };
        for key in written {
            let (ours, theirs, same) = match key.as_str() {
                "r" => (
                    mine.r.to_string(),
                    adapter.r.to_string(),
                    mine.r == adapter.r,
                ),
                "alpha" => (
                    mine.alpha.to_string(),
                    adapter.alpha.to_string(),
                    mine.alpha == adapter.alpha,
                ),
                "dropout" => (
                    mine.dropout.to_string(),
                    adapter.dropout.to_string(),
                    mine.dropout == adapter.dropout,
                ),
                "use_rslora" => (
                    mine.use_rslora.to_string(),
                    adapter.use_rslora.to_string(),
                    mine.use_rslora == adapter.use_rslora,
                ),
                "target_modules" => (
                    format!("{:?}", mine.target_modules),
                    format!("{:?}", adapter.target_modules),
                    same_targets(&mine.target_modules, &adapter.target_modules),
                ),
                _ => continue,
            };
            if !same {
                return Err(invalid(format!(
                    "`lora.{key}` is {ours} but the adapter `model.adapter` continues from has {theirs} ({}); training continues with the adapter's settings: remove `lora.{key}` or set it to {theirs}",
                    file.display()
                )));
            }
        }
        self.lora = adapter;
        Ok(())
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
        if let Some(a) = self.model.adapter.as_mut() {
            fix(a);
        }
        fix(&mut self.data.train);
        for source in &mut self.data.sources {
            fix(&mut source.path);
        }
        if let Some(v) = self.data.validation.as_mut() {
            fix(v);
        }
        if let Some(st) = self.data.store.as_mut() {
            fix(st);
        }
        if let Some(t) = self.data.chat_template.as_mut()
            && whet_tokenize::template::shipped::shipped(t).is_none()
        {
            let mut p = PathBuf::from(&*t);
            fix(&mut p);
            *t = p.to_string_lossy().into_owned();
        }
        if let Some(g) = self.eval.general_data.as_mut() {
            fix(g);
        }
        for set in &mut self.eval.sets {
            fix(&mut set.path);
        }
        fix(&mut self.output.dir);
        self
    }

    /// Every setting in range, with an error naming its key; [`Config::load`] runs it (so
    /// `--set` overrides go through it too). The trainer's settings are checked by
    /// [`TrainerConfig::validate`] (which `whet_train::Trainer::run` runs again); checks against
    /// the model's sizes are [`Config::check_model`].
    pub fn validate(&self, path: &Path) -> Result<()> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let bad = |field: &str, message: String| invalid(format!("`{field}` {message}"));
        let real = |field: &str, v: f64, lo: f64, hi: f64, open_hi: bool, hint: &str| {
            check::real(field, v, lo, hi, open_hi, hint).map_err(invalid)
        };
        let int =
            |field: &str, v: u64, lo: u64, hi: u64| check::int(field, v, lo, hi).map_err(invalid);
        self.trainer_with(String::new()).validate(path)?;
        let t = &self.train;
        // The keys of the optimizer not chosen, which the trainer does not see.
        match t.optimizer {
            OptimizerKind::Adamw => real("train.momentum", t.momentum, 0.0, 1.0, true, "")?,
            OptimizerKind::Sgd => {
                real("train.beta1", t.beta1, 0.0, 1.0, true, "")?;
                real("train.beta2", t.beta2, 0.0, 1.0, true, "")?;
            }
        }
        if self.data.store.is_some() && (t.k_folds > 0 || self.preference.is_some()) {
            return Err(bad(
                "data.store",
                "trains plain runs only for now: k-fold (train.k_folds) and [preference] read their data in memory; remove data.store".into(),
            ));
        }
        if t.k_folds == 1 {
            return Err(bad(
                "train.k_folds",
                "k-fold cross-validation needs k >= 2 (0 turns it off)".into(),
            ));
        }
        int("train.k_folds", t.k_folds.into(), 0, limits::K_FOLDS)?;
        self.validate_sources(path)?;
        if let Some(p) = &self.preference {
            real(
                "preference.beta",
                p.beta,
                1e-6,
                1e6,
                false,
                " (TRL's default is 0.1)",
            )?;
            real(
                "preference.label_smoothing",
                p.label_smoothing,
                0.0,
                0.5,
                false,
                "",
            )?;
            if p.label_smoothing > 0.0 && p.loss != PreferenceLoss::Dpo {
                return Err(bad(
                    "preference.label_smoothing",
                    "applies to loss = \"dpo\" only; remove it or set it to 0".into(),
                ));
            }
            if p.precompute_reference && p.loss == PreferenceLoss::Orpo {
                return Err(bad(
                    "preference.precompute_reference",
                    "applies to DPO and IPO; ORPO has no reference model".into(),
                ));
            }
            if t.k_folds > 0 {
                return Err(bad(
                    "train.k_folds",
                    "k-fold cross-validation is not supported with [preference] yet".into(),
                ));
            }
            if !self.eval.metrics.is_empty() {
                return Err(bad(
                    "eval.metrics",
                    "task metrics are not scored with [preference]: the validation pairs' reward accuracy and margin are".into(),
                ));
            }
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
        int("data.max_len", self.data.max_len as u64, 8, limits::MAX_LEN)?;
        int(
            "data.shuffle_shards",
            self.data.shuffle_shards as u64,
            1,
            limits::SHUFFLE_SHARDS,
        )?;
        match t.micro_batch.checked_mul(self.data.max_len) {
            Some(tokens) if tokens as u64 <= limits::TOKENS_PER_MICRO_BATCH => {}
            _ => {
                return Err(bad(
                    "train.micro_batch * data.max_len",
                    format!(
                        "(tokens per micro-batch) must be at most {}, got {} * {}",
                        limits::TOKENS_PER_MICRO_BATCH,
                        t.micro_batch,
                        self.data.max_len
                    ),
                ));
            }
        }
        if self.data.long_documents.is_window() && self.data.window_overlap > self.data.max_len / 2
        {
            return Err(bad(
                "data.window_overlap",
                format!(
                    "= {} must be at most half of data.max_len ({}): each window repeats that many tokens of the one before as context, and more would multiply the rows",
                    self.data.window_overlap, self.data.max_len
                ),
            ));
        }
        if let Some(t) = &self.data.chat_template
            && whet_tokenize::template::shipped::shipped(t).is_none()
            && !Path::new(t).is_file()
        {
            return Err(bad(
                "data.chat_template",
                format!(
                    "{t:?} is neither a file nor a chat template whet ships ({})",
                    whet_tokenize::template::shipped::names()
                ),
            ));
        }
        real(
            "data.validation_fraction",
            self.data.validation_fraction,
            0.0,
            1.0,
            true,
            "",
        )?;
        if self.method == Method::Lora && self.lora.r == 0 {
            return Err(bad("lora.r", "LoRA rank must be at least 1".into()));
        }
        int("lora.r", self.lora.r as u64, 0, limits::LORA_RANK)?;
        real(
            "lora.alpha",
            self.lora.alpha,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            false,
            "",
        )?;
        real("lora.dropout", self.lora.dropout, 0.0, 1.0, true, "")?;
        self.check_target_modules(path)?;
        int(
            "eval.max_new_tokens",
            self.eval.max_new_tokens as u64,
            0,
            limits::MAX_NEW_TOKENS,
        )?;
        if !self.eval.metrics.is_empty() {
            int(
                "eval.metric_batch",
                self.eval.metric_batch as u64,
                1,
                limits::METRIC_BATCH,
            )?;
            if self.eval.max_new_tokens == 0 {
                return Err(bad(
                    "eval.max_new_tokens",
                    "= 0 leaves nothing to score: task metrics (eval.metrics) generate up to this many tokens per example".into(),
                ));
            }
            if self.data.format == Shape::Text {
                return Err(bad(
                    "eval.metrics",
                    "need a reference completion per example; data.format = \"text\" has none (use prompt-completion or chat data)".into(),
                ));
            }
        }
        if let SelectBy::Metric(m) = t.select_by
            && !self.eval.metrics.contains(&m)
        {
            return Err(bad(
                "train.select_by",
                format!(
                    "follows the task metric `{m}`, which eval.metrics does not score; add it (eval.metrics = [\"{m}\"]) or select by \"val_loss\""
                ),
            ));
        }
        if self.eval.metric_every > 0 && self.eval.metrics.is_empty() {
            return Err(bad(
                "eval.metric_every",
                "scores eval.metrics during training, and none are set; add some (eval.metrics = [\"accuracy\"]) or remove it".into(),
            ));
        }
        if let Some(labels) = &self.eval.labels {
            let folded: Vec<String> = labels
                .iter()
                .map(|l| whet_train::score::normalize(l, &self.eval.normalize))
                .collect();
            if let Some(i) = (0..labels.len())
                .find(|&i| folded[..i].contains(&folded[i]) || folded[i].is_empty())
            {
                return Err(bad(
                    &format!("eval.labels[{i}]"),
                    format!(
                        "{:?} is empty or the same label as an earlier one once normalised (eval.normalize)",
                        labels[i]
                    ),
                ));
            }
        }
        for (i, set) in self.eval.sets.iter().enumerate() {
            let name = set.name.as_str();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(bad(
                    &format!("eval.sets[{i}].name"),
                    format!(
                        "{name:?} must be a non-empty name of letters, digits, `-`, `_` or `.`"
                    ),
                ));
            }
            if self.eval.sets[..i].iter().any(|s| s.name == name) {
                return Err(bad(
                    &format!("eval.sets[{i}].name"),
                    format!("{name:?} names two sets; each set needs its own name"),
                ));
            }
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

    /// `["all-linear"]`, or a list of module names (one name is a list of one, as in PEFT;
    /// a single string, PEFT's regex, is a type error at load).
    fn check_target_modules(&self, path: &Path) -> Result<()> {
        let modules = &self.lora.target_modules;
        let bad = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!("`lora.target_modules` {message}"),
        };
        if modules.is_empty() {
            return Err(bad(format!(
                "is empty; use [\"all-linear\"] or names from {:?}",
                whet_model::KNOWN_LINEAR_MODULES
            )));
        }
        if let [one] = modules.as_slice()
            && one == "all-linear"
        {
            return Ok(());
        }
        for m in modules {
            if !whet_model::KNOWN_LINEAR_MODULES.contains(&m.as_str()) {
                return Err(bad(format!(
                    "names {m:?}, not a linear module of any architecture whet trains; use [\"all-linear\"] or names from {:?}",
                    whet_model::KNOWN_LINEAR_MODULES
                )));
            }
        }
        Ok(())
    }

    /// The LoRA request as `whet_model` takes it: `["all-linear"]` is every linear module,
    /// any other list (one name included) is that list of module names.
    pub fn lora_config(&self) -> whet_model::LoraConfig {
        let l = &self.lora;
        let mut c = whet_model::LoraConfig::new(l.r, l.alpha);
        c.dropout = l.dropout;
        c.use_rslora = l.use_rslora;
        c.target_modules = match l.target_modules.as_slice() {
            [one] if one == "all-linear" => whet_model::TargetModules::One(one.clone()),
            many => whet_model::TargetModules::Many(many.to_vec()),
        };
        c
    }

    /// The settings whose limits depend on the model, checked before the model loads:
    /// `lora.r` at most min(in, out) of every targeted layer, `data.max_len` at most the
    /// model's `max_position_embeddings`, and the largest activation of a micro-batch
    /// (`micro_batch * max_len * max(hidden, intermediate)` values) within
    /// [`limits::ACTIVATION_ELEMS`].
    /// `path` is the training config's file, `model_config` the model's config.json; both
    /// label errors.
    pub fn check_model(
        &self,
        path: &Path,
        model: &whet_model::Config,
        model_config: &Path,
    ) -> Result<()> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!("`{field}` {message} (model: {})", model_config.display()),
        };
        if self.method == Method::Lora {
            let lora = self.lora_config();
            // The targeted layer with the smallest min(out, in) bounds the rank.
            let smallest = lora
                .modules_for(model.linear_modules(), model_config)?
                .into_iter()
                .filter_map(|m| model.linear_shape(m).map(|(o, i)| (o.min(i), o, i, m)))
                .min();
            if let Some((max, out_dim, in_dim, m)) = smallest
                && self.lora.r > max
            {
                return Err(bad(
                    "lora.r",
                    format!(
                        "= {} is larger than min(out {out_dim}, in {in_dim}) = {max} of `{m}` in this model; use a rank of at most {max}",
                        self.lora.r
                    ),
                ));
            }
        }
        let positions = model.max_position_embeddings;
        if self.data.max_len > positions {
            return Err(bad(
                "data.max_len",
                format!(
                    "= {} is longer than this model's max_position_embeddings = {positions}; use at most {positions}",
                    self.data.max_len
                ),
            ));
        }
        let width = model.hidden_size.max(model.intermediate_size);
        let elems = self
            .train
            .micro_batch
            .checked_mul(self.data.max_len)
            .and_then(|n| n.checked_mul(width));
        if elems.is_none_or(|n| n as u64 > limits::ACTIVATION_ELEMS) {
            return Err(bad(
                "train.micro_batch",
                format!(
                    "= {}: micro_batch * data.max_len ({}) * max(hidden_size, intermediate_size) ({width}) must be at most {} values per activation; lower train.micro_batch (and raise train.grad_accum) or data.max_len",
                    self.train.micro_batch,
                    self.data.max_len,
                    limits::ACTIVATION_ELEMS
                ),
            ));
        }
        Ok(())
    }

    /// `data.train` xor `data.sources`; each source's weight, its unique name; and the runs that
    /// do not take a mixture yet (`[preference]`, `train.k_folds`).
    fn validate_sources(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!("`{field}` {message}"),
        };
        let d = &self.data;
        match (is_empty_path(&d.train), d.sources.is_empty()) {
            (false, false) => {
                return Err(bad(
                    "data.train",
                    "and `data.sources` are both set: give the training data as one of them (`data.train` for one source, `[[data.sources]]` for a mixture)".into(),
                ));
            }
            (true, true) => {
                return Err(bad(
                    "data.train",
                    "is not set: give the training data as `data.train = \"file\"` or as at least one `[[data.sources]]` with a `path`".into(),
                ));
            }
            _ => {}
        }
        if d.sources.is_empty() {
            return Ok(());
        }
        if self.preference.is_some() {
            return Err(bad(
                "data.sources",
                "is not supported with [preference] yet: give the pairs as `data.train`".into(),
            ));
        }
        if self.train.k_folds > 0 {
            return Err(bad(
                "data.sources",
                "is not supported with `train.k_folds` yet: give the data as `data.train` or set train.k_folds = 0".into(),
            ));
        }
        let mut names = std::collections::BTreeMap::new();
        for (i, source) in d.sources.iter().enumerate() {
            if !(source.weight.is_finite() && source.weight > 0.0) {
                return Err(bad(
                    &format!("data.sources[{i}].weight"),
                    format!("must be a finite number > 0, got {}", source.weight),
                ));
            }
            if source.max_tokens == Some(0) {
                return Err(bad(
                    &format!("data.sources[{i}].max_tokens"),
                    "must be > 0 (leave it out for no budget)".into(),
                ));
            }
            if is_empty_path(&source.path) {
                return Err(bad(
                    &format!("data.sources[{i}].path"),
                    "is empty: name the source's file, folder or glob".into(),
                ));
            }
            let name = source.display_name();
            if let Some(j) = names.insert(name.clone(), i) {
                return Err(bad(
                    &format!("data.sources[{i}].name"),
                    format!(
                        "= \"{name}\" is also the name of data.sources[{j}]; names must be unique (set `name` on one of them)"
                    ),
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

    /// What the trainer takes of this config; its checkpoints store [`Config::to_toml`].
    pub fn trainer(&self) -> TrainerConfig {
        self.trainer_with(self.to_toml())
    }

    /// The `[train]` section, `method` and the checkpoint policy of `[output]`; the optimizer's
    /// keys become the chosen optimizer's settings.
    fn trainer_with(&self, config_toml: String) -> TrainerConfig {
        let t = &self.train;
        TrainerConfig {
            method: self.method,
            seed: t.seed,
            epochs: t.epochs,
            max_steps: t.max_steps,
            micro_batch: t.micro_batch,
            grad_accum: t.grad_accum,
            optimizer: match t.optimizer {
                OptimizerKind::Adamw => OptimizerChoice::AdamW(AdamWConfig {
                    beta1: t.beta1,
                    beta2: t.beta2,
                    eps: 1e-8,
                    weight_decay: t.weight_decay,
                }),
                OptimizerKind::Sgd => OptimizerChoice::Sgd(SgdConfig {
                    momentum: t.momentum,
                    nesterov: false,
                    weight_decay: t.weight_decay,
                }),
            },
            lr: t.lr,
            schedule: t.schedule,
            warmup_steps: t.warmup_steps,
            min_lr_ratio: t.min_lr_ratio,
            max_grad_norm: t.max_grad_norm,
            neftune_alpha: t.neftune_alpha,
            activation_checkpointing: t.activation_checkpointing,
            eval_every: t.eval_every,
            patience: t.patience,
            min_delta: t.min_delta,
            select_by: t.select_by.metric().map(|m| m.name().to_string()),
            metric_every: match (t.select_by, self.eval.metric_every) {
                (SelectBy::Metric(_), 0) => 1,
                (_, n) => n,
            },
            save_every: self.output.save_every,
            keep_last: self.output.keep_last,
            config_toml,
            objective: match &self.preference {
                Some(p) => Objective::Preference(p.objective()),
                None => Objective::Sft,
            },
        }
    }
}

/// `["all-linear"]`, or every linear of one layout (what PEFT writes for it).
fn all_linear(modules: &[String]) -> bool {
    matches!(modules, [one] if one == "all-linear") || whet_model::lora::is_all_linear(modules)
}

/// `train.lr=1e-4`: the value is parsed as TOML (number, bool, array, inline table), falling back
/// to a plain string.
fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<()> {
    let bad = |message: String| ConfigError::Override {
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

    /// The error of MINIMAL with `overrides`; panics when it loads.
    fn refused(overrides: &[&str]) -> String {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        match Config::from_toml(MINIMAL, Path::new("run.toml"), &o) {
            Ok(_) => panic!("{overrides:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn non_finite_and_out_of_range_numbers_are_refused_naming_the_key() {
        let msg = refused(&["train.epochs=inf"]);
        assert!(
            msg.contains("run.toml")
                && msg.contains("`train.epochs` must be a finite number > 0")
                && msg.contains("got inf"),
            "{msg}"
        );
        // nan used to train one step; with max_steps set, epochs must still be a number.
        for o in [
            &["train.epochs=nan"][..],
            &["train.epochs=-1.0"],
            &["train.epochs=nan", "train.max_steps=5"],
            &["train.epochs=1e300"],
        ] {
            assert!(refused(o).contains("`train.epochs`"), "{o:?}");
        }
        for (o, key) in [
            ("train.beta1=nan", "train.beta1"),
            ("train.beta2=1.0", "train.beta2"),
            ("train.momentum=-0.5", "train.momentum"),
            ("train.weight_decay=inf", "train.weight_decay"),
            ("train.min_lr_ratio=nan", "train.min_lr_ratio"),
            ("train.max_grad_norm=nan", "train.max_grad_norm"),
            ("train.neftune_alpha=-1.0", "train.neftune_alpha"),
            ("train.min_delta=nan", "train.min_delta"),
            ("train.lr=inf", "train.lr"),
            ("lora.alpha=inf", "lora.alpha"),
            ("lora.alpha=nan", "lora.alpha"),
            ("lora.dropout=nan", "lora.dropout"),
            ("data.validation_fraction=nan", "data.validation_fraction"),
            ("train.k_folds=4000000000", "train.k_folds"),
            ("train.max_steps=9000000000000000000", "train.max_steps"),
            (
                "eval.max_new_tokens=9000000000000000000",
                "eval.max_new_tokens",
            ),
        ] {
            let msg = refused(&[o]);
            assert!(msg.contains(&format!("`{key}`")), "{o}: {msg}");
        }
    }

    #[test]
    fn batch_products_that_overflow_or_explode_are_refused() {
        // 4 * 2^62 wraps to 0 (a division by zero in the trainer); 4 * (2^62 + 1) wraps to 4
        // (silently another batch).
        for o in [
            "train.grad_accum=4611686018427387904",
            "train.grad_accum=4611686018427387905",
        ] {
            let msg = refused(&["train.micro_batch=4", o]);
            assert!(msg.contains("`train.grad_accum`"), "{o}: {msg}");
        }
        let msg = refused(&["train.micro_batch=65536", "train.grad_accum=65536"]);
        assert!(
            msg.contains("`train.micro_batch * train.grad_accum`"),
            "{msg}"
        );
        let msg = refused(&["train.micro_batch=9223372036854775807"]);
        assert!(msg.contains("`train.micro_batch`"), "{msg}");
        let msg = refused(&["data.max_len=9223372036854775807"]);
        assert!(msg.contains("`data.max_len`"), "{msg}");
        let msg = refused(&["train.micro_batch=1024", "data.max_len=65536"]);
        assert!(msg.contains("`train.micro_batch * data.max_len`"), "{msg}");
        let msg = refused(&["lora.r=9223372036854775807"]);
        assert!(msg.contains("`lora.r`"), "{msg}");
    }

    #[test]
    fn one_target_module_is_a_list_of_one_name() {
        let c = Config::from_toml(
            MINIMAL,
            Path::new("run.toml"),
            &["lora.target_modules=[\"q_proj\"]".into()],
        )
        .unwrap();
        let modules = c.lora_config().modules(Path::new("x")).unwrap();
        assert_eq!(modules, vec!["q_proj"]);
        let all = Config::from_toml(MINIMAL, Path::new("run.toml"), &[]).unwrap();
        assert_eq!(
            all.lora_config().modules(Path::new("x")).unwrap(),
            whet_model::KNOWN_LINEAR_MODULES.to_vec()
        );
        let llama = whet_model::LINEAR_MODULES;
        assert_eq!(
            all.lora_config()
                .modules_for(&llama, Path::new("x"))
                .unwrap(),
            llama.to_vec()
        );
        // Phi-3's fused names on a Llama-layout model: refused, naming the model's own.
        let fused = Config::from_toml(
            MINIMAL,
            Path::new("run.toml"),
            &["lora.target_modules=[\"qkv_proj\"]".into()],
        )
        .unwrap();
        let msg = fused
            .lora_config()
            .modules_for(&llama, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("qkv_proj") && msg.contains("q_proj"), "{msg}");
        let msg = refused(&["lora.target_modules=[\"q_proj\", \"qproj\"]"]);
        assert!(
            msg.contains("`lora.target_modules`") && msg.contains("qproj"),
            "{msg}"
        );
        assert!(refused(&["lora.target_modules=[]"]).contains("`lora.target_modules`"));
    }

    #[test]
    fn limits_that_depend_on_the_model_name_the_key() {
        let model = whet_model::Config::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 128}"#,
            Path::new("m/config.json"),
        )
        .unwrap();
        let check = |overrides: &[&str]| {
            let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
            let c = Config::from_toml(MINIMAL, Path::new("run.toml"), &o).unwrap();
            c.check_model(Path::new("run.toml"), &model, Path::new("m/config.json"))
                .map_err(|e| e.to_string())
        };
        check(&["lora.r=16", "data.max_len=128"]).unwrap();
        // k_proj and v_proj are 16 x 32.
        let msg = check(&["lora.r=17", "data.max_len=128"]).unwrap_err();
        assert!(
            msg.contains("`lora.r`") && msg.contains("k_proj") && msg.contains("m/config.json"),
            "{msg}"
        );
        // Only q_proj (32 x 32) targeted: 32 fits.
        check(&[
            "lora.r=32",
            "data.max_len=128",
            "lora.target_modules=[\"q_proj\"]",
        ])
        .unwrap();
        // Full fine-tuning has no rank.
        check(&["lora.r=1000", "data.max_len=128", "method=full"]).unwrap();
        let msg = check(&["lora.r=8", "data.max_len=129"]).unwrap_err();
        assert!(
            msg.contains("`data.max_len`") && msg.contains("max_position_embeddings"),
            "{msg}"
        );
    }

    #[test]
    fn task_metric_settings_are_checked() {
        let c = Config::from_toml(
            MINIMAL,
            Path::new("run.toml"),
            &[
                "eval.metrics=[\"accuracy\", \"chrf\"]".into(),
                "eval.normalize={ case = false }".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.eval.metrics, [Metric::Accuracy, Metric::Chrf]);
        assert!(!c.eval.normalize.case && c.eval.normalize.punctuation);
        // Unused, the keys stay out of the saved config (run ids of older configs hold).
        let plain = Config::from_toml(MINIMAL, Path::new("run.toml"), &[]).unwrap();
        assert!(!plain.to_toml().contains("metric") && !plain.to_toml().contains("normalize"));
        let msg = refused(&["eval.metrics=[\"bleu\"]"]);
        assert!(msg.contains("bleu") && msg.contains("exact_match"), "{msg}");
        let msg = refused(&["eval.metrics=[\"accuracy\"]", "data.format=\"text\""]);
        assert!(msg.contains("`eval.metrics`"), "{msg}");
        let msg = refused(&["eval.metrics=[\"accuracy\"]", "eval.max_new_tokens=0"]);
        assert!(msg.contains("`eval.max_new_tokens`"), "{msg}");
        let msg = refused(&["eval.metrics=[\"accuracy\"]", "eval.metric_batch=0"]);
        assert!(msg.contains("`eval.metric_batch`"), "{msg}");
        let msg = refused(&["eval.labels=[\"Wi-Fi\", \"wifi\"]"]);
        assert!(msg.contains("`eval.labels[1]`"), "{msg}");
    }

    #[test]
    fn metric_selection_settings_are_checked() {
        let c = Config::from_toml(
            MINIMAL,
            Path::new("run.toml"),
            &[
                "eval.metrics=[\"accuracy\"]".into(),
                "train.select_by=\"metric:accuracy\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.select_by, SelectBy::Metric(Metric::Accuracy));
        let t = c.trainer();
        assert_eq!(t.select_by.as_deref(), Some("accuracy"));
        assert_eq!(
            t.metric_every, 1,
            "a selecting metric is scored at every evaluation"
        );
        assert!(c.to_toml().contains("select_by = \"metric:accuracy\""));
        let plain = Config::from_toml(MINIMAL, Path::new("run.toml"), &[]).unwrap();
        assert_eq!(plain.trainer().metric_every, 0);
        assert!(!plain.to_toml().contains("select_by"));
        let every = Config::from_toml(
            MINIMAL,
            Path::new("run.toml"),
            &[
                "eval.metrics=[\"chrf\"]".into(),
                "eval.metric_every=3".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (every.trainer().metric_every, every.trainer().select_by),
            (3, None)
        );
        let msg = refused(&["train.select_by=\"accuracy\""]);
        assert!(
            msg.contains("metric:NAME") && msg.contains("val_loss"),
            "{msg}"
        );
        let msg = refused(&["train.select_by=\"metric:bleu\""]);
        assert!(msg.contains("bleu") && msg.contains("exact_match"), "{msg}");
        let msg = refused(&["train.select_by=\"metric:accuracy\""]);
        assert!(
            msg.contains("`train.select_by`") && msg.contains("eval.metrics"),
            "{msg}"
        );
        let msg = refused(&["eval.metric_every=2"]);
        assert!(msg.contains("`eval.metric_every`"), "{msg}");
    }

    #[test]
    fn data_settings_for_long_documents_columns_and_templates() {
        let c = Config::from_toml(
            MINIMAL,
            Path::new("/cfg/run.toml"),
            &[
                "data.long_documents=\"truncate\"".into(),
                "data.columns={ prompt = \"question\", completion = \"answer\" }".into(),
                "data.chat_template=\"chatml\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.data.long_documents, LongDocuments::Truncate);
        assert_eq!(
            (
                c.data.columns.prompt.as_str(),
                c.data.columns.completion.as_str()
            ),
            ("question", "answer")
        );
        assert_eq!(
            c.data.columns.text, "text",
            "unset columns keep their names"
        );
        assert_eq!(c.data.chat_template.as_deref(), Some("chatml"));
        assert!(
            c.data
                .chat_template_source()
                .unwrap()
                .unwrap()
                .0
                .contains("<|im_start|>")
        );
        let again = Config::from_toml(&c.to_toml(), Path::new("/elsewhere/x.toml"), &[]).unwrap();
        assert_eq!(again, c);
        // At their defaults the new keys stay out of the saved config (run ids of older configs
        // hold).
        let plain = Config::from_toml(MINIMAL, Path::new("run.toml"), &[]).unwrap();
        assert_eq!(plain.data.long_documents, LongDocuments::Window);
        for key in [
            "long_documents",
            "window_overlap",
            "columns",
            "chat_template",
        ] {
            assert!(!plain.to_toml().contains(key), "{key}");
        }
        // A template file is relative to the config.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.jinja"), "{{ messages[0]['content'] }}").unwrap();
        let c = Config::from_toml(
            MINIMAL,
            &dir.path().join("run.toml"),
            &["data.chat_template=\"t.jinja\"".into()],
        )
        .unwrap();
        let file = dir.path().join("t.jinja");
        assert_eq!(c.data.chat_template.as_deref(), file.to_str());
        assert_eq!(
            c.data.chat_template_source().unwrap().unwrap().1,
            file.display().to_string()
        );
    }

    #[test]
    fn bad_data_settings_are_refused_naming_the_field() {
        for (o, want) in [
            ("data.window_overlap=300", "`data.window_overlap`"),
            ("data.long_documents=\"slide\"", "long_documents"),
            ("data.columns={ questoin = \"q\" }", "questoin"),
            ("data.columns={ prompt = 3 }", "prompt"),
            ("data.chat_template=\"chatml2\"", "`data.chat_template`"),
            ("data.shuffle_shards=0", "`data.shuffle_shards`"),
            ("data.shuffle_shards=100000", "`data.shuffle_shards`"),
        ] {
            let msg = refused(&[o]);
            assert!(msg.contains(want) && msg.contains("run.toml"), "{o}: {msg}");
        }
        let msg = refused(&["data.chat_template=\"chatml2\""]);
        assert!(msg.contains("chatml, llama3, gemma, zephyr, phi3"), "{msg}");
        let msg = refused(&["data.columns={ questoin = \"q\" }"]);
        assert!(
            msg.contains("did you mean `question`") || msg.contains("`prompt`"),
            "{msg}"
        );
        // Half of max_len is the most.
        Config::from_toml(
            MINIMAL,
            Path::new("run.toml"),
            &["data.window_overlap=256".into()],
        )
        .unwrap();
        // The default is left out of the saved TOML (the run id of a config without it stays).
        let c = Config::from_toml(MINIMAL, Path::new("run.toml"), &[]).unwrap();
        assert_eq!(c.data.shuffle_shards, 8);
        assert!(!c.to_toml().contains("shuffle_shards"));
        let c = Config::from_toml(
            MINIMAL,
            Path::new("run.toml"),
            &["data.shuffle_shards=2".into()],
        )
        .unwrap();
        assert!(c.to_toml().contains("shuffle_shards = 2"));
    }

    #[test]
    fn a_zero_learning_rate_is_an_error() {
        let err = Config::from_toml(MINIMAL, Path::new("run.toml"), &["train.lr=0".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.lr"), "{err}");
    }

    const MIXTURE: &str = r#"
        [model]
        path = "m"
        [data]
        max_len = 64
        [[data.sources]]
        name = "manuals"
        path = "manuals.jsonl"
        format = "text"
        columns = { text = "body" }
        weight = 3.0
        [[data.sources]]
        path = "general.jsonl"
        [output]
        dir = "out"
    "#;

    #[test]
    fn a_config_without_sources_saves_no_sources_key() {
        let c = Config::from_toml(MINIMAL, Path::new("/cfg/run.toml"), &[]).unwrap();
        let saved = c.to_toml();
        assert!(!saved.contains("sources"), "{saved}");
        assert!(saved.contains("train = "), "{saved}");
    }

    #[test]
    fn sources_load_with_defaults_and_read_back() {
        let c = Config::from_toml(MIXTURE, Path::new("/cfg/run.toml"), &[]).unwrap();
        let s = &c.data.sources;
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].display_name(), "manuals");
        assert_eq!(s[0].format, Some(Shape::Text));
        assert_eq!(s[1].display_name(), "general");
        assert_eq!(s[1].weight, 1.0);
        assert_eq!(s[1].path, Path::new("/cfg/general.jsonl"));
        assert_eq!(s[1].format, None);
        let saved = c.to_toml();
        assert!(!saved.contains("\ntrain = "), "{saved}");
        let again = Config::from_toml(&saved, Path::new("/elsewhere/x.toml"), &[]).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn source_errors_name_the_fields() {
        let refuse = |text: &str, overrides: &[&str]| {
            let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
            match Config::from_toml(text, Path::new("run.toml"), &o) {
                Ok(_) => panic!("{text} {overrides:?} was accepted"),
                Err(e) => e.to_string(),
            }
        };
        let both = refuse(MIXTURE, &["data.train=\"d.jsonl\""]);
        assert!(
            both.contains("`data.train`") && both.contains("`data.sources`"),
            "{both}"
        );
        let neither = MIXTURE
            .split("[[data.sources]]")
            .next()
            .unwrap()
            .to_string()
            + "\n[output]\ndir = \"out\"\n";
        let msg = refuse(&neither, &[]);
        assert!(
            msg.contains("`data.train`") && msg.contains("data.sources"),
            "{msg}"
        );
        for w in ["0.0", "-1.0", "nan", "inf"] {
            let text = MIXTURE.replace("weight = 3.0", &format!("weight = {w}"));
            let msg = refuse(&text, &[]);
            assert!(msg.contains("`data.sources[0].weight`"), "{w}: {msg}");
        }
        let msg = refuse(
            &MIXTURE.replace("weight = 3.0", "weight = 3.0\nmax_tokens = 0"),
            &[],
        );
        assert!(msg.contains("`data.sources[0].max_tokens`"), "{msg}");
        let dup = MIXTURE.replace("name = \"manuals\"", "name = \"general\"");
        let msg = refuse(&dup, &[]);
        assert!(
            msg.contains("`data.sources[1].name`") && msg.contains("\"general\""),
            "{msg}"
        );
        let msg = refuse(MIXTURE, &["train.k_folds=3"]);
        assert!(
            msg.contains("`data.sources`") && msg.contains("train.k_folds"),
            "{msg}"
        );
        let pref = format!("{MIXTURE}\n[preference]\nloss = \"dpo\"\n");
        let msg = refuse(&pref, &[]);
        assert!(
            msg.contains("`data.sources`") && msg.contains("[preference]"),
            "{msg}"
        );
    }
}
