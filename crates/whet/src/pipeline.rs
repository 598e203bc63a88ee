//! Files to trainer rows: read, scrub, dedup, split, tokenize, pack. Each stage's report is kept
//! so `whet data inspect`, the training log and the final report can show what happened.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use whet_data::dedup::{DedupConfig, DedupReport, LeakageReport};
use whet_data::pii::{Audit, Scrubber};
use whet_data::{Example, Mapping, ReadOptions, ReadReport, Shape};
use whet_tokenize::{
    AssistantTurns, Cache, CacheStatus, CachedDataset, FingerprintBuilder, PackConfig, PackReport,
    PackedRow, TokenizeConfig, TokenizeReport, TokenizedExample, Tokenizer, Truncation,
};
use whet_train::Row;

use crate::config::{DataSection, Format};

/// How to turn files into rows; built from a training config or from CLI flags.
#[derive(Debug, Clone, Serialize)]
pub struct DataSpec {
    pub format: Format,
    pub max_len: usize,
    pub pack: bool,
    pub all_assistant_turns: bool,
    pub skip_invalid: bool,
    pub system_prompt: Option<String>,
}

impl From<&DataSection> for DataSpec {
    fn from(d: &DataSection) -> Self {
        Self {
            format: d.format,
            max_len: d.max_len,
            pack: d.pack,
            all_assistant_turns: d.all_assistant_turns,
            skip_invalid: d.skip_invalid,
            system_prompt: d.system_prompt.clone(),
        }
    }
}

pub fn shape_of(format: Format) -> Shape {
    match format {
        Format::Auto => Shape::Auto,
        Format::Text => Shape::Text,
        Format::PromptCompletion => Shape::PromptCompletion,
        Format::Chat => Shape::Conversation,
    }
}

/// Reads every example of `path` (file, directory or glob).
pub fn read(path: &Path, spec: &DataSpec) -> Result<(Vec<Example>, ReadReport)> {
    let opts = ReadOptions {
        mapping: Mapping {
            shape: shape_of(spec.format),
            system_prompt: spec.system_prompt.clone(),
            ..Default::default()
        },
        skip_invalid: spec.skip_invalid,
        ..Default::default()
    };
    whet_data::read_all(path, &opts).with_context(|| format!("reading {}", path.display()))
}

/// Tokenizes with the settings training uses (TRL conventions: text gets EOS, prompt/completion
/// learns completion + EOS, chat learns assistant turns + end-of-turn).
pub fn tokenize(
    tok: &Tokenizer,
    examples: &[Example],
    spec: &DataSpec,
) -> Result<(Vec<TokenizedExample>, TokenizeReport)> {
    let cfg = TokenizeConfig {
        max_len: Some(spec.max_len),
        truncation: Truncation::Right,
        assistant_turns: if spec.all_assistant_turns {
            AssistantTurns::All
        } else {
            AssistantTurns::Last
        },
        ..Default::default()
    };
    Ok(tok.tokenize_examples(examples, &cfg)?)
}

/// Packs (or pads one example per row).
fn packed(
    tok: &Tokenizer,
    examples: &[TokenizedExample],
    spec: &DataSpec,
) -> whet_tokenize::Result<(Vec<PackedRow>, Option<PackReport>)> {
    if spec.pack {
        let cfg = PackConfig {
            seq_len: spec.max_len,
            pad_id: tok.pad_id(),
            truncation: Truncation::Right,
            bos_id: tok.bos_id(),
        };
        let (rows, report) = whet_tokenize::pack(examples, &cfg)?;
        Ok((rows, Some(report)))
    } else {
        Ok((whet_tokenize::pad_each(examples, tok.pad_id(), None)?, None))
    }
}

/// Packs (or pads one example per row) and shifts labels into next-token targets.
pub fn rows(
    tok: &Tokenizer,
    examples: &[TokenizedExample],
    spec: &DataSpec,
) -> Result<(Vec<Row>, Option<PackReport>)> {
    let (rows, report) = packed(tok, examples, spec)?;
    Ok((rows.into_iter().map(to_row).collect(), report))
}

/// Where tokenized, packed datasets are cached: `$WHET_CACHE/datasets` (default
/// `~/.cache/whet/datasets`).
pub fn cache_dir() -> PathBuf {
    let root = match std::env::var_os("WHET_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
            .join(".cache/whet"),
    };
    root.join("datasets")
}

/// Tokenize + pack through the cache: keyed by the tokenizer, its chat template, every setting
/// and the examples themselves (their content ids, in order), reused when all are unchanged.
pub fn cached_rows(
    tok: &Tokenizer,
    examples: &[Example],
    spec: &DataSpec,
) -> Result<(Vec<Row>, TokenizeReport, Option<PackReport>, CacheStatus)> {
    let ids: Vec<u8> = examples.iter().flat_map(|e| e.id.to_le_bytes()).collect();
    let fp = FingerprintBuilder::new()
        .tokenizer(tok)
        .settings("data", spec)?
        .bytes("examples", &ids)
        .finish();
    let (data, status) = Cache::new(cache_dir()).load_or_build(&fp, || {
        let (tokenized, tokenize_report) =
            tokenize(tok, examples, spec).map_err(|e| whet_tokenize::Error::Setting {
                field: "data",
                what: format!("{e:#}"),
            })?;
        let (rows, pack_report) = packed(tok, &tokenized, spec)?;
        Ok(CachedDataset {
            rows,
            tokenize_report,
            pack_report,
        })
    })?;
    let rows = data.rows.into_iter().map(to_row).collect();
    Ok((rows, data.tokenize_report, data.pack_report, status))
}

fn to_row(r: PackedRow) -> Row {
    let targets = r.targets();
    Row {
        input_ids: r.input_ids,
        position_ids: r.position_ids,
        segment_ids: r.segment_ids,
        targets,
    }
}

/// Everything the data stages reported, for logs and the final report.
#[derive(Debug, Default, Serialize)]
pub struct DataReport {
    pub train_read: Option<ReadReport>,
    pub validation_read: Option<ReadReport>,
    pub pii_audit: Option<PathBuf>,
    pub pii_redactions: u64,
    pub dedup: Option<DedupReport>,
    pub leakage: Option<LeakageReport>,
    pub train_tokenize: Option<TokenizeReport>,
    pub validation_tokenize: Option<TokenizeReport>,
    pub train_pack: Option<PackReport>,
    pub train_examples: usize,
    pub validation_examples: usize,
    /// Whether the tokenized training rows came from the cache (`Hit`) or were built.
    pub cache: Option<String>,
}

pub struct Prepared {
    /// The scrubber's audit, written to `report.pii_audit` once the run is known to own `out`.
    pub pii_audit: Option<Audit>,
    pub train_examples: Vec<Example>,
    pub validation_examples: Vec<Example>,
    pub train: Vec<Row>,
    pub validation: Vec<Row>,
    pub report: DataReport,
}

/// The full data path of a training run. Writes nothing: the PII audit comes back in
/// [`Prepared::pii_audit`] for the caller to write once it knows it owns `out`.
pub fn prepare(tok: &Tokenizer, data: &DataSection, seed: u64, out: &Path) -> Result<Prepared> {
    let spec = DataSpec::from(data);
    let mut report = DataReport::default();
    let mut pii_audit = None;
    let (mut train, read_report) = read(&data.train, &spec)?;
    report.train_read = Some(read_report);
    let mut validation = match &data.validation {
        Some(path) => {
            let (v, r) = read(path, &spec)?;
            report.validation_read = Some(r);
            Some(v)
        }
        None => None,
    };
    if data.scrub_pii {
        let scrubber = Scrubber::new();
        let (t, mut audit) = scrubber.scrub_all(train);
        train = t;
        if let Some(v) = validation.take() {
            let (v, a) = scrubber.scrub_all(v);
            audit.merge(a);
            validation = Some(v);
        }
        report.pii_redactions = audit_total(&audit);
        report.pii_audit = Some(out.join("pii_audit.json"));
        pii_audit = Some(audit);
    }
    if data.dedup {
        let (t, r) = whet_data::dedup::dedup(train, &DedupConfig::default())?;
        train = t;
        report.dedup = Some(r);
    }
    let validation = match validation {
        Some(v) => v,
        None if data.validation_fraction > 0.0 => {
            let split = whet_data::split::train_validation_split(
                std::mem::take(&mut train),
                data.validation_fraction,
                seed,
            )?;
            train = split.train;
            split.validation
        }
        None => Vec::new(),
    };
    if !validation.is_empty() {
        report.leakage = Some(whet_data::dedup::leakage(
            &train,
            &validation,
            &DedupConfig::default(),
        )?);
    }
    if train.is_empty() {
        bail!("{}: no training examples were read", data.train.display());
    }
    let (train_rows, r, pack, status) = cached_rows(tok, &train, &spec)?;
    if train_rows.is_empty() {
        bail!(
            "{}: none of the {} training examples has a supervised token left: {} have none at all, {} lost theirs to truncation at data.max_len = {} ({} template errors). Raise data.max_len or check data.format",
            data.train.display(),
            train.len(),
            r.rows_without_supervision,
            r.rows_supervision_emptied + r.rows_dropped_too_long,
            data.max_len,
            r.rows_template_error
        );
    }
    report.train_tokenize = Some(r);
    report.train_pack = pack;
    report.cache = Some(format!("{status:?}"));
    let (val_rows, r, _, _) = cached_rows(tok, &validation, &spec)?;
    report.validation_tokenize = Some(r);
    report.train_examples = train.len();
    report.validation_examples = validation.len();
    Ok(Prepared {
        train_examples: train,
        validation_examples: validation,
        train: train_rows,
        validation: val_rows,
        report,
        pii_audit,
    })
}

fn audit_total(audit: &Audit) -> u64 {
    audit.redactions.values().sum()
}
