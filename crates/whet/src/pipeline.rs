//! Files to trainer rows: read, scrub, dedup, split, tokenize, pack. Each stage's report is kept
//! so `whet data inspect`, the training log and the final report can show what happened. Every
//! command's rows come from [`rows`], and the `[data]` section (or the flags that stand for one,
//! [`flags_section`]) is translated into the library crates' options here and nowhere else.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use whet_data::dedup::{DedupConfig, DedupReport, LeakageReport};
use whet_data::pii::{Audit, Scrubber};
use whet_data::{Columns, Example, Mapping, ReadOptions, ReadReport, Shape};
use whet_tokenize::{
    AssistantTurns, Cache, CacheStatus, CachedDataset, FingerprintBuilder, LongDocuments,
    PackConfig, PackReport, PackedRow, TokenizeConfig, TokenizeReport, TokenizedExample, Tokenizer,
    Truncation,
};
use whet_train::{Row, RowSource};

use crate::store_rows::{Holdout, Layout, Part, StoreRows};

use crate::config::DataSection;

/// The `[data]` section that command-line flags stand for (`whet eval`, `whet data inspect`, and
/// a training run's general-text data): `train` (and `validation`) read as `format`, packed at
/// `max_len` with every assistant turn learned; nothing scrubbed, deduplicated or held out.
pub fn flags_section(
    train: &Path,
    validation: Option<&Path>,
    format: Shape,
    max_len: usize,
    skip_invalid: bool,
) -> DataSection {
    DataSection {
        train: train.to_path_buf(),
        validation: validation.map(Path::to_path_buf),
        validation_fraction: 0.0,
        format,
        max_len,
        pack: true,
        all_assistant_turns: true,
        scrub_pii: false,
        dedup: false,
        skip_invalid,
        system_prompt: None,
        long_documents: LongDocuments::Window,
        window_overlap: 0,
        columns: Columns::default(),
        chat_template: None,
        store: None,
        shuffle_shards: 8,
        sources: Vec::new(),
    }
}

// The data settings, translated into the library crates' options: here and nowhere else.

pub(crate) fn read_options(data: &DataSection) -> ReadOptions {
    ReadOptions {
        mapping: Mapping {
            shape: data.format,
            columns: data.columns.clone(),
            system_prompt: data.system_prompt.clone(),
        },
        skip_invalid: data.skip_invalid,
        ..Default::default()
    }
}

/// The settings training tokenizes with (TRL conventions: text gets EOS, prompt/completion
/// learns completion + EOS, chat learns assistant turns + end-of-turn).
pub(crate) fn tokenize_config(data: &DataSection) -> TokenizeConfig {
    TokenizeConfig {
        max_len: Some(data.max_len),
        truncation: Truncation::Right,
        long_documents: data.long_documents,
        window_overlap: data.window_overlap,
        assistant_turns: if data.all_assistant_turns {
            AssistantTurns::All
        } else {
            AssistantTurns::Last
        },
        ..Default::default()
    }
}

/// Packing into rows of `max_len`, or `None`: one example per row, padded.
fn pack_config(data: &DataSection, tok: &Tokenizer) -> Option<PackConfig> {
    data.pack.then(|| PackConfig {
        seq_len: data.max_len,
        pad_id: tok.pad_id(),
        truncation: Truncation::Right,
        bos_id: tok.bos_id(),
    })
}

/// What the cached rows of a set of examples depend on besides the tokenizer (whose hash covers
/// the chat template, `data.chat_template`'s included) and the examples: part of the cache key,
/// with the same fields and spelling as earlier whets keyed with, so their caches stay valid.
/// The later settings are left out at the value that reproduces earlier whets' rows:
/// `long_documents` only at `truncate` (the new default, `window`, makes other rows from a long
/// document, so it is in the key), the others at their defaults.
#[derive(Serialize)]
pub(crate) struct RowSettings<'a> {
    format: Shape,
    max_len: usize,
    pack: bool,
    all_assistant_turns: bool,
    skip_invalid: bool,
    system_prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "is_truncate")]
    long_documents: LongDocuments,
    #[serde(skip_serializing_if = "is_zero")]
    window_overlap: usize,
    #[serde(skip_serializing_if = "is_default_columns")]
    columns: &'a Columns,
}

fn is_truncate(l: &LongDocuments) -> bool {
    *l == LongDocuments::Truncate
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_default_columns(c: &&Columns) -> bool {
    **c == Columns::default()
}

impl<'a> From<&'a DataSection> for RowSettings<'a> {
    fn from(d: &'a DataSection) -> Self {
        RowSettings {
            format: d.format,
            max_len: d.max_len,
            pack: d.pack,
            all_assistant_turns: d.all_assistant_turns,
            skip_invalid: d.skip_invalid,
            system_prompt: d.system_prompt.as_deref(),
            long_documents: d.long_documents,
            window_overlap: d.window_overlap,
            columns: &d.columns,
        }
    }
}

/// Reads every example of `path` (file, directory or glob) as `data` says.
pub fn read(path: &Path, data: &DataSection) -> Result<(Vec<Example>, ReadReport)> {
    whet_data::read_all(path, &read_options(data)).map_err(|e| {
        let hint = match &e {
            whet_data::DataError::MissingField { .. } | whet_data::DataError::UnknownShape { .. } => {
                " (data.columns maps fields of other names, e.g. columns = { prompt = \"question\", completion = \"answer\" }; data.format sets the shape)"
            }
            _ => "",
        };
        anyhow::Error::new(e).context(format!("reading {}{hint}", path.display()))
    })
}

/// Tokenizes with the settings training uses: the first stage of [`rows`], on its own for
/// `whet data inspect`, which shows examples as the model will be taught them.
pub fn tokenize(
    tok: &Tokenizer,
    examples: &[Example],
    data: &DataSection,
) -> whet_tokenize::Result<(Vec<TokenizedExample>, TokenizeReport)> {
    tok.tokenize_examples(examples, &tokenize_config(data))
}

/// Packs (or pads one example per row).
fn packed(
    tok: &Tokenizer,
    examples: &[TokenizedExample],
    data: &DataSection,
) -> whet_tokenize::Result<(Vec<PackedRow>, Option<PackReport>)> {
    match pack_config(data, tok) {
        Some(cfg) => {
            let (rows, report) = whet_tokenize::pack(examples, &cfg)?;
            Ok((rows, Some(report)))
        }
        None => Ok((whet_tokenize::pad_each(examples, tok.pad_id(), None)?, None)),
    }
}

/// Trainer rows and the reports of the passes that made them.
pub struct Rows {
    pub rows: Vec<Row>,
    pub tokenize: TokenizeReport,
    /// `None` when `data.pack` is off.
    pub pack: Option<PackReport>,
    /// Whether the rows came from the cache; `None` without one.
    pub cache: Option<CacheStatus>,
}

/// Examples to trainer rows, the one way every command makes them: tokenize, pack (or pad one
/// example per row), shift labels into next-token targets. With a `cache`, tokenize + pack go
/// through it: keyed by the tokenizer, its chat template, every setting and the examples
/// themselves (their content ids, in order), reused when all are unchanged.
pub fn rows(
    tok: &Tokenizer,
    examples: &[Example],
    data: &DataSection,
    cache: Option<&Cache>,
) -> Result<Rows> {
    let build = || -> whet_tokenize::Result<CachedDataset> {
        let (tokenized, tokenize_report) = tokenize(tok, examples, data)?;
        let (rows, pack_report) = packed(tok, &tokenized, data)?;
        Ok(CachedDataset {
            rows,
            tokenize_report,
            pack_report,
        })
    };
    let (built, status) = match cache {
        Some(cache) => {
            let ids: Vec<u8> = examples.iter().flat_map(|e| e.id.to_le_bytes()).collect();
            let fp = FingerprintBuilder::new()
                .tokenizer(tok)
                .settings("data", &RowSettings::from(data))?
                .bytes("examples", &ids)
                .finish();
            let (built, status) = cache.load_or_build(&fp, build)?;
            (built, Some(status))
        }
        None => (build()?, None),
    };
    Ok(Rows {
        rows: built.rows.into_iter().map(to_row).collect(),
        tokenize: built.tokenize_report,
        pack: built.pack_report,
        cache: status,
    })
}

/// The rows of one file as training would see them (the same reading, template, masks and
/// packing), for a loss: `whet eval` and a run's general-text data.
pub fn eval_rows(tok: &Tokenizer, data: &DataSection) -> Result<Vec<Row>> {
    let (examples, _) = read(&data.train, data)?;
    let rows = rows(tok, &examples, data, None)?;
    if rows.rows.is_empty() {
        bail!(
            "{}: no example has a supervised token ({} excluded)",
            data.train.display(),
            rows.tokenize.rows_excluded()
        );
    }
    Ok(rows.rows)
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

/// A packed row as the trainer takes it: labels shifted into next-token targets.
pub(crate) fn to_row(r: PackedRow) -> Row {
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
    /// A token store's duplicates, marked dropped when it was prepared (`data.store`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_dedup: Option<whet_tokenize::store::DedupCounts>,
    pub leakage: Option<LeakageReport>,
    pub train_tokenize: Option<TokenizeReport>,
    pub validation_tokenize: Option<TokenizeReport>,
    pub train_pack: Option<PackReport>,
    /// A preference run's training pairs: read, kept, cut, skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_pairs: Option<PairReport>,
    /// A preference run's validation pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_pairs: Option<PairReport>,
    pub train_examples: usize,
    pub validation_examples: usize,
    /// Whether the tokenized training rows came from the cache (`Hit`) or were built.
    pub cache: Option<String>,
    /// A mixture's sources (`[[data.sources]]`), in config order; empty for `data.train`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceReport>,
}

/// One source of a data mixture: what was read and how many of its rows an epoch trains on.
#[derive(Debug, Serialize)]
pub struct SourceReport {
    pub name: String,
    pub path: PathBuf,
    pub weight: f64,
    /// The source's budget of supervised tokens per epoch, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Examples read from `path` (before dedup and the validation split).
    pub examples_read: usize,
    pub train_examples: usize,
    pub validation_examples: usize,
    /// Packed training rows this source has.
    pub rows_available: usize,
    /// Rows of this source in each epoch of the mixture (more than `rows_available`: some
    /// repeated; fewer: a fixed seeded subset, or what `max_tokens` leaves).
    pub rows_per_epoch: usize,
    /// Supervised (learned) tokens of those rows. Tokens seen over the run are this times the
    /// epochs trained.
    pub tokens_per_epoch: usize,
    /// `tokens_per_epoch` over all sources' (0..1).
    pub token_share: f64,
    pub read: Option<ReadReport>,
    pub dedup: Option<DedupReport>,
    pub tokenize: Option<TokenizeReport>,
    pub pack: Option<PackReport>,
    pub cache: Option<String>,
}

pub struct Prepared {
    /// The scrubber's audit, written to `report.pii_audit` once the run is known to own `out`.
    pub pii_audit: Option<Audit>,
    pub train_examples: Vec<Example>,
    pub validation_examples: Vec<Example>,
    pub train: Vec<Row>,
    /// A mixture's source of each `train` row (an index into `data.sources`); empty without one.
    pub train_sources: Vec<usize>,
    pub validation: Vec<Row>,
    pub report: DataReport,
    /// The training rows of a run from token stores (`data.store`), made on demand; `train`
    /// is then empty.
    pub train_store: Option<Box<dyn RowSource + Send>>,
    /// The validation rows held out of the stores, if any; `validation` is then empty.
    pub validation_store: Option<Box<dyn RowSource + Send>>,
    /// What the stores' rows are keyed by (their fingerprints), for the run id.
    pub store_fingerprint: Option<String>,
}

impl Prepared {
    /// A run's data read from token stores: the examples stay on disk.
    fn from_stores(
        train: Box<dyn RowSource + Send>,
        validation: Vec<Row>,
        validation_store: Option<Box<dyn RowSource + Send>>,
        report: DataReport,
        fingerprint: String,
    ) -> Self {
        Prepared {
            pii_audit: None,
            train_examples: Vec::new(),
            validation_examples: Vec::new(),
            train: Vec::new(),
            train_sources: Vec::new(),
            validation,
            report,
            train_store: Some(train),
            validation_store,
            store_fingerprint: Some(fingerprint),
        }
    }

    /// The training rows, wherever they are (a mixture's tagged with their sources).
    pub fn train_rows(&self) -> Box<dyn RowSource + '_> {
        match &self.train_store {
            Some(s) => Box::new(&**s),
            None if !self.train_sources.is_empty() => Box::new(crate::mixture::Tagged {
                rows: &self.train,
                sources: &self.train_sources,
                names: self.report.sources.iter().map(|s| s.name.clone()).collect(),
            }),
            None => Box::new(&self.train[..]),
        }
    }

    /// The validation rows, wherever they are.
    pub fn validation_rows(&self) -> &dyn RowSource {
        match &self.validation_store {
            Some(s) => &**s,
            None => &self.validation,
        }
    }
}

/// The full data path of a training run. Writes nothing: the PII audit comes back in
/// [`Prepared::pii_audit`] for the caller to write once it knows it owns `out`.
pub fn prepare(tok: &Tokenizer, data: &DataSection, seed: u64, out: &Path) -> Result<Prepared> {
    if let Some(dir) = &data.store {
        return prepare_from_store(tok, data, seed, dir);
    }
    if !data.sources.is_empty() {
        return prepare_mixture(tok, data, seed, out);
    }
    let mut report = DataReport::default();
    let mut pii_audit = None;
    let (mut train, read_report) = read(&data.train, data)?;
    report.train_read = Some(read_report);
    let mut validation = match &data.validation {
        Some(path) => {
            let (v, r) = read(path, data)?;
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
    let cache = Cache::new(cache_dir());
    let Rows {
        rows: train_rows,
        tokenize: r,
        pack,
        cache: status,
    } = rows(tok, &train, data, Some(&cache))?;
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
    report.cache = status.map(|s| format!("{s:?}"));
    let val = rows(tok, &validation, data, Some(&cache))?;
    report.validation_tokenize = Some(val.tokenize);
    report.train_examples = train.len();
    report.validation_examples = validation.len();
    Ok(Prepared {
        train_examples: train,
        validation_examples: validation,
        train: train_rows,
        train_sources: Vec::new(),
        validation: val.rows,
        report,
        pii_audit,
        train_store: None,
        validation_store: None,
        store_fingerprint: None,
    })
}

/// `[[data.sources]]`: each source goes through [`prepare`] on its own (its `format` and
/// `columns` over `[data]`'s, the run's scrub and dedup settings, `validation_fraction` of it held
/// out unless `data.validation` is given, which is read once for all), so no row mixes two
/// sources' documents. The training rows are then drawn by [`mixture`].
fn prepare_mixture(tok: &Tokenizer, data: &DataSection, seed: u64, out: &Path) -> Result<Prepared> {
    let mut report = DataReport::default();
    let mut audit: Option<Audit> = None;
    let mut merge_audit = |a: Option<Audit>| match (&mut audit, a) {
        (Some(all), Some(a)) => all.merge(a),
        (all @ None, a) => *all = a,
        (Some(_), None) => {}
    };
    let mut train_examples = Vec::new();
    let mut validation_examples = Vec::new();
    let mut validation_rows = Vec::new();
    let mut source_rows = Vec::with_capacity(data.sources.len());
    for (i, source) in data.sources.iter().enumerate() {
        let name = source.display_name();
        let section = source_section(data, source);
        let p = prepare(tok, &section, seed, out)
            .with_context(|| format!("data.sources[{i}] `{name}`"))?;
        merge_audit(p.pii_audit);
        let r = p.report;
        report.pii_redactions += r.pii_redactions;
        report.sources.push(SourceReport {
            name,
            path: source.path.clone(),
            weight: source.weight,
            max_tokens: source.max_tokens,
            examples_read: r.train_read.as_ref().map_or(0, |r| r.examples as usize),
            train_examples: r.train_examples,
            validation_examples: r.validation_examples,
            rows_available: p.train.len(),
            rows_per_epoch: 0,
            tokens_per_epoch: 0,
            token_share: 0.0,
            read: r.train_read,
            dedup: r.dedup,
            tokenize: r.train_tokenize,
            pack: r.train_pack,
            cache: r.cache,
        });
        train_examples.extend(p.train_examples);
        validation_examples.extend(p.validation_examples);
        validation_rows.extend(p.validation);
        source_rows.push(p.train);
    }
    if let Some(path) = &data.validation {
        let (mut v, r) = read(path, data)?;
        report.validation_read = Some(r);
        if data.scrub_pii {
            let (scrubbed, a) = Scrubber::new().scrub_all(v);
            v = scrubbed;
            report.pii_redactions += audit_total(&a);
            merge_audit(Some(a));
        }
        let val = rows(tok, &v, data, Some(&Cache::new(cache_dir())))?;
        report.validation_tokenize = Some(val.tokenize);
        validation_rows = val.rows;
        validation_examples = v;
    }
    if !validation_examples.is_empty() {
        report.leakage = Some(whet_data::dedup::leakage(
            &train_examples,
            &validation_examples,
            &DedupConfig::default(),
        )?);
    }
    if audit.is_some() {
        report.pii_audit = Some(out.join("pii_audit.json"));
    }
    let tokens: Vec<Vec<usize>> = source_rows
        .iter()
        .map(|rows| rows.iter().map(Row::supervised).collect())
        .collect();
    let weights: Vec<f64> = data.sources.iter().map(|s| s.weight).collect();
    let budgets: Vec<Option<u64>> = data.sources.iter().map(|s| s.max_tokens).collect();
    let picks = mixture(&tokens, &weights, &budgets, seed);
    let mut train = Vec::with_capacity(picks.len());
    let mut train_sources = Vec::with_capacity(picks.len());
    for &(source, row) in &picks {
        let r = &source_rows[source][row];
        let s = &mut report.sources[source];
        s.rows_per_epoch += 1;
        s.tokens_per_epoch += r.supervised();
        train.push(r.clone());
        train_sources.push(source);
    }
    let total: usize = report.sources.iter().map(|s| s.tokens_per_epoch).sum();
    for s in &mut report.sources {
        s.token_share = s.tokens_per_epoch as f64 / total.max(1) as f64;
    }
    report.train_examples = train_examples.len();
    report.validation_examples = validation_examples.len();
    Ok(Prepared {
        pii_audit: audit,
        train_examples,
        validation_examples,
        train,
        train_sources,
        validation: validation_rows,
        report,
        train_store: None,
        validation_store: None,
        store_fingerprint: None,
    })
}

/// Rows per epoch of each source of a mixture: with `R` rows over all sources, source `i` gets
/// `round(R * w_i / sum(w))`, at least 1 (a source in the config is never left out).
pub fn mixture_quotas(rows: &[usize], weights: &[f64]) -> Vec<usize> {
    let total: usize = rows.iter().sum();
    let sum: f64 = weights.iter().sum();
    weights
        .iter()
        .map(|w| ((total as f64 * w / sum).round() as usize).max(1))
        .collect()
}

/// The rows of a mixture's epoch as (source, row) pairs, deterministic from `seed`. Source `i`
/// has `tokens[i].len()` rows (`tokens[i][r]`: the supervised tokens of row `r`) and gets its
/// [`mixture_quotas`] share `q`, drawn as the first `q` of its rows in a seeded order, cycled:
/// with `q >= n` rows every row is used `q / n` times and `q % n` of them once more
/// (up-sampling: uses differ by at most one); with `q < n` a seeded subset of `q` rows is used
/// once (down-sampling: the same fixed subset every epoch, since the trainer is given one list
/// of rows; the others are not trained on). A `budgets[i]` of supervised tokens keeps the
/// longest prefix of that draw within it (at least one row), so uses still differ by at most
/// one; the other sources keep their rows. The pairs come in a seeded order (the trainer
/// shuffles them again each epoch).
pub fn mixture(
    tokens: &[Vec<usize>],
    weights: &[f64],
    budgets: &[Option<u64>],
    seed: u64,
) -> Vec<(usize, usize)> {
    assert_eq!(tokens.len(), weights.len(), "one weight per source");
    assert_eq!(tokens.len(), budgets.len(), "one budget per source");
    let rows: Vec<usize> = tokens.iter().map(Vec::len).collect();
    let quotas = mixture_quotas(&rows, weights);
    let mut picks = Vec::with_capacity(quotas.iter().sum());
    for (i, (&n, &q)) in rows.iter().zip(&quotas).enumerate() {
        if n == 0 {
            continue;
        }
        let mut rng = SplitMix64(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        let mut spent = 0u64;
        for k in 0..q {
            let r = order[k % n];
            spent += tokens[i][r] as u64;
            if k > 0 && budgets[i].is_some_and(|b| spent > b) {
                break;
            }
            picks.push((i, r));
        }
    }
    SplitMix64(seed).shuffle(&mut picks);
    picks
}

/// splitmix64 (Steele, Lea and Flood 2014): a small seeded generator for the mixture's draws.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fisher-Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

fn audit_total(audit: &Audit) -> u64 {
    audit.redactions.values().sum()
}

// ---- preference pairs ----

/// What tokenizing a set of preference pairs did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairReport {
    pub pairs_in: usize,
    pub pairs_out: usize,
    /// Pairs kept with an answer cut at `data.max_len` (some of it still learned).
    pub pairs_truncated: usize,
    /// Pairs left out under `data.skip_invalid` (an answer with no room left, or the template
    /// refused the conversation).
    pub pairs_skipped: usize,
    /// The first few skipped pairs: `file: row N, field: why`.
    pub skipped: Vec<String>,
}

/// Preference pairs to trainer rows, laid out pair by pair (`[chosen_0, rejected_0, ...]`, what
/// `whet_train::preference::Objective` expects), one sequence per row, unpacked. Each side is
/// tokenized as its record would be for SFT with only the last assistant turn learned: a text
/// pair is `prompt + answer + EOS` with the answer and EOS learned, a chat pair is the chat
/// template's rendering of the prompt's turns and the answer's, the answer's assistant turn
/// learned. A side longer than `data.max_len` keeps its first `max_len` tokens (TRL's
/// `truncation_mode = "keep_start"`); a pair whose prompt leaves no room for one of its answers
/// is an error naming the file, row and side, or with `data.skip_invalid` a counted skip.
pub fn pair_rows(
    tok: &Tokenizer,
    pairs: &[whet_data::PairExample],
    data: &DataSection,
) -> Result<(Vec<Row>, PairReport)> {
    let cfg = TokenizeConfig {
        max_len: Some(data.max_len),
        truncation: Truncation::Right,
        assistant_turns: AssistantTurns::Last,
        // A pair's sides are prompt/completion or chat records, which are never windowed.
        long_documents: LongDocuments::Truncate,
        skip_template_errors: data.skip_invalid,
        parallel: false,
        ..Default::default()
    };
    let mut report = PairReport {
        pairs_in: pairs.len(),
        ..Default::default()
    };
    let mut rows = Vec::with_capacity(2 * pairs.len());
    'pairs: for pair in pairs {
        let mut sides = Vec::with_capacity(2);
        let mut cut = false;
        for (field, record) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
            let example = Example {
                id: pair.id,
                origin: pair.origin.clone(),
                record: record.clone(),
            };
            let why = match tok.tokenize_example(&example, &cfg)? {
                whet_tokenize::Outcome::Kept {
                    example, truncated, ..
                } => {
                    cut |= truncated;
                    sides.push(example);
                    continue;
                }
                whet_tokenize::Outcome::Windowed { .. } => {
                    bail!(
                        "{}, field `{field}`: a preference pair's side was cut into windows; pairs must be prompt/completion or chat records",
                        pair.origin
                    )
                }
                whet_tokenize::Outcome::Excluded { reason, .. } => match reason {
                    whet_tokenize::ExcludeReason::SupervisionTruncated { len, max_len }
                    | whet_tokenize::ExcludeReason::TooLong { len, max_len } => format!(
                        "the prompt leaves no room for the answer within data.max_len = {max_len} (prompt and answer are {len} tokens); raise data.max_len or shorten the prompt"
                    ),
                    whet_tokenize::ExcludeReason::NoSupervision => {
                        "the answer has no learned token".to_string()
                    }
                    whet_tokenize::ExcludeReason::TemplateError { message } => {
                        format!("the chat template refused it: {message}")
                    }
                },
            };
            let line = format!("{}, field `{field}`: {why}", pair.origin);
            if !data.skip_invalid {
                bail!("{line}; or set data.skip_invalid = true to skip such pairs");
            }
            report.pairs_skipped += 1;
            if report.skipped.len() < 10 {
                report.skipped.push(line);
            }
            continue 'pairs;
        }
        report.pairs_out += 1;
        report.pairs_truncated += usize::from(cut);
        rows.extend(sides.into_iter().map(|ex| {
            let n = ex.input_ids.len();
            let segments = vec![0u32; n];
            Row {
                targets: whet_tokenize::targets_from_labels(&ex.labels, &segments),
                input_ids: ex.input_ids,
                position_ids: (0..n as u32).collect(),
                segment_ids: segments,
            }
        }));
    }
    Ok((rows, report))
}

/// A pair as one text record (prompt, both answers), for dedup and the leakage check: two pairs
/// are duplicates when prompt, chosen and rejected all are.
fn pair_example(i: usize, p: &whet_data::PairExample) -> Example {
    use whet_data::dedup::comparable_text;
    Example {
        id: i as u64,
        origin: p.origin.clone(),
        record: whet_data::Record::Text {
            text: format!(
                "{}\n\n{}",
                comparable_text(&p.chosen),
                comparable_text(&p.rejected)
            ),
        },
    }
}

/// The data path of a preference run: read the pairs (`data.train`, `data.validation` or a
/// seeded `data.validation_fraction` of the training pairs), scrub PII (one audit row per pair,
/// its shared prompt counted once) and drop duplicate pairs (prompt, chosen and rejected all
/// exact or near duplicates of an earlier pair's) when asked, check train/validation leakage,
/// and tokenize them ([`pair_rows`]). Pairs are never packed. Writes nothing: the PII audit
/// comes back in [`Prepared::pii_audit`].
pub fn prepare_pairs(
    tok: &Tokenizer,
    data: &DataSection,
    seed: u64,
    out: &Path,
) -> Result<Prepared> {
    let read = |path: &Path| {
        whet_data::read_pairs(path, &read_options(data))
            .with_context(|| format!("reading preference pairs from {}", path.display()))
    };
    let mut report = DataReport::default();
    let mut pii_audit = None;
    let (mut train, r) = read(&data.train)?;
    report.train_read = Some(r);
    let mut validation = match &data.validation {
        Some(path) => {
            let (v, r) = read(path)?;
            report.validation_read = Some(r);
            Some(v)
        }
        None => None,
    };
    if data.scrub_pii {
        let scrubber = Scrubber::new();
        let mut audit = Audit::default();
        for pair in train.iter_mut().chain(validation.iter_mut().flatten()) {
            scrubber.scrub_pair(pair, &mut audit);
        }
        report.pii_redactions = audit_total(&audit);
        report.pii_audit = Some(out.join("pii_audit.json"));
        pii_audit = Some(audit);
    }
    if data.dedup {
        let examples = train.iter().enumerate().map(|(i, p)| pair_example(i, p));
        let (kept, r) = whet_data::dedup::dedup(examples, &DedupConfig::default())?;
        let kept: std::collections::HashSet<u64> = kept.iter().map(|e| e.id).collect();
        train = train
            .into_iter()
            .enumerate()
            .filter(|(i, _)| kept.contains(&(*i as u64)))
            .map(|(_, p)| p)
            .collect();
        report.dedup = Some(r);
    }
    let validation = match validation {
        Some(v) => v,
        None if data.validation_fraction > 0.0 => {
            let order = whet_train::rows::epoch_order(train.len(), seed, 0);
            let n = ((train.len() as f64 * data.validation_fraction).round() as usize)
                .min(train.len().saturating_sub(1));
            let held: std::collections::BTreeSet<usize> = order[..n].iter().copied().collect();
            let (v, t): (Vec<_>, Vec<_>) = train
                .into_iter()
                .enumerate()
                .partition(|(i, _)| held.contains(i));
            train = t.into_iter().map(|(_, p)| p).collect();
            v.into_iter().map(|(_, p)| p).collect()
        }
        None => Vec::new(),
    };
    if train.is_empty() {
        bail!("{}: no preference pairs were read", data.train.display());
    }
    if !validation.is_empty() {
        let examples = |pairs: &[whet_data::PairExample]| -> Vec<Example> {
            pairs
                .iter()
                .enumerate()
                .map(|(i, p)| pair_example(i, p))
                .collect()
        };
        report.leakage = Some(whet_data::dedup::leakage(
            &examples(&train),
            &examples(&validation),
            &DedupConfig::default(),
        )?);
    }
    let (train_rows, r) = pair_rows(tok, &train, data)?;
    if train_rows.is_empty() {
        bail!(
            "{}: none of the {} training pairs fits data.max_len = {} ({} skipped); raise data.max_len",
            data.train.display(),
            train.len(),
            data.max_len,
            r.pairs_skipped
        );
    }
    report.train_pairs = Some(r);
    let (validation_rows, r) = pair_rows(tok, &validation, data)?;
    report.validation_pairs = Some(r);
    report.train_examples = train.len();
    report.validation_examples = validation.len();
    Ok(Prepared {
        pii_audit,
        train_examples: Vec::new(),
        validation_examples: Vec::new(),
        train: train_rows,
        train_sources: Vec::new(),
        validation: validation_rows,
        report,
        train_store: None,
        validation_store: None,
        store_fingerprint: None,
    })
}

/// The data path of a run with `data.store`: the token store made from `data.train` (again when
/// its fingerprint no longer matches), its documents packed as training packs them, the rows
/// read from disk on demand, shard by shard. Validation: `data.validation` read as usual, or a
/// seeded `data.validation_fraction` of the store's documents held out (also read on demand).
/// A mixture (`[[data.sources]]`) has a store per source in the folder, each made from its
/// source with its settings, drawn by weight as they stream ([`crate::mixture::Mixture`]).
fn prepare_from_store(
    tok: &Tokenizer,
    data: &DataSection,
    seed: u64,
    dir: &Path,
) -> Result<Prepared> {
    let mut report = DataReport::default();
    // The validation documents as token ids, for the leakage check: the file's, or those held
    // out of the stores (gathered below).
    let mut leak_docs = Vec::new();
    let validation = match &data.validation {
        Some(path) => {
            let (v, r) = read(path, data)?;
            leak_docs = crate::store_dedup::tokenized(tok, &v, data)?;
            report.validation_read = Some(r);
            report.validation_examples = v.len();
            let rows = rows(tok, &v, data, None)?;
            report.validation_tokenize = Some(rows.tokenize);
            rows.rows
        }
        None => Vec::new(),
    };
    // Else the documents held out of the stores, if any.
    let mut validation_store: Option<Box<dyn RowSource + Send>> = None;
    if data.sources.is_empty() {
        let part = store_part(tok, data, seed, dir)?;
        report.train_examples = part.train.count() as usize;
        report.store_dedup = part.train.store().manifest().dedup;
        if let Some(held) = &part.held {
            leak_docs = crate::store_dedup::held_out(held.store(), &part.held_documents);
        }
        if !leak_docs.is_empty() {
            report.leakage = Some(crate::store_dedup::leakage(
                part.train.store(),
                &part.held_documents,
                &leak_docs,
            )?);
        }
        if let Some(held) = part.held {
            report.validation_examples = held.count() as usize;
            validation_store = Some(Box::new(held));
        }
        report.cache = Some(format!("token store {}", dir.display()));
        return Ok(Prepared::from_stores(
            Box::new(part.train),
            validation,
            validation_store,
            report,
            part.fingerprint,
        ));
    }
    let (mut trains, mut helds, mut names, mut fingerprints) =
        (Vec::new(), Vec::new(), Vec::new(), String::new());
    let (mut held_lists, mut supervised) = (Vec::new(), Vec::new());
    for (i, source) in data.sources.iter().enumerate() {
        let name = source.display_name();
        let section = source_section(data, source);
        let sub = dir.join(format!("{i:02}-{}", sanitize(&name)));
        let part = store_part(tok, &section, seed, &sub)
            .with_context(|| format!("data.sources[{i}] `{name}`"))?;
        fingerprints.push_str(&part.fingerprint[..16.min(part.fingerprint.len())]);
        let (train_docs, held_docs) = (
            part.train.count() as usize,
            part.held.as_ref().map_or(0, |h| h.count() as usize),
        );
        report.train_examples += train_docs;
        if let Some(c) = part.train.store().manifest().dedup {
            let all = report.store_dedup.get_or_insert_default();
            all.exact += c.exact;
            all.near += c.near;
        }
        if let Some(held) = &part.held {
            leak_docs.extend(crate::store_dedup::held_out(
                held.store(),
                &part.held_documents,
            ));
        }
        let rows = part.train.len();
        supervised.push((0..rows).map(|r| part.train.supervised(r)).sum::<usize>());
        report.sources.push(SourceReport {
            name: name.clone(),
            path: source.path.clone(),
            weight: source.weight,
            max_tokens: source.max_tokens,
            examples_read: train_docs + held_docs,
            train_examples: train_docs,
            validation_examples: held_docs,
            rows_available: rows,
            rows_per_epoch: 0,
            tokens_per_epoch: 0,
            token_share: 0.0,
            read: None,
            dedup: None,
            tokenize: None,
            pack: None,
            cache: Some(format!("token store {}", sub.display())),
        });
        if let Some(h) = part.held {
            report.validation_examples += held_docs;
            helds.push((name.clone(), h));
        }
        names.push(name);
        held_lists.push(part.held_documents);
        trains.push(part.train);
    }
    // Every source's validation documents against every source's training documents.
    if !leak_docs.is_empty() {
        let reports = trains
            .iter()
            .zip(&held_lists)
            .map(|(t, held)| crate::store_dedup::leakage(t.store(), held, &leak_docs))
            .collect::<Result<Vec<_>>>()?;
        report.leakage = crate::store_dedup::merge(reports);
    }
    let trains: Vec<Box<dyn RowSource + Send>> = trains
        .into_iter()
        .map(|t| Box::new(t) as Box<dyn RowSource + Send>)
        .collect();
    let lens: Vec<usize> = trains.iter().map(|t| t.len()).collect();
    let weights: Vec<f64> = data.sources.iter().map(|s| s.weight).collect();
    let mut quotas = mixture_quotas(&lens, &weights);
    for (i, (q, source)) in quotas.iter_mut().zip(&data.sources).enumerate() {
        let s = &mut report.sources[i];
        let mean = supervised[i] as f64 / lens[i].max(1) as f64;
        if let Some(budget) = source.max_tokens {
            // A store's rows are not all counted up front: the budget holds on average.
            *q = (*q).min(((budget as f64 / mean.max(1e-9)).floor() as usize).max(1));
        }
        s.rows_per_epoch = *q;
        s.tokens_per_epoch = (*q as f64 * mean).round() as usize;
    }
    let total: usize = report.sources.iter().map(|s| s.tokens_per_epoch).sum();
    for s in &mut report.sources {
        s.token_share = s.tokens_per_epoch as f64 / total.max(1) as f64;
    }
    if !helds.is_empty() {
        let (names, parts): (Vec<String>, Vec<Box<dyn RowSource + Send>>) = helds
            .into_iter()
            .map(|(n, h)| (n, Box::new(h) as Box<dyn RowSource + Send>))
            .unzip();
        validation_store = Some(Box::new(crate::mixture::Mixture::new(
            parts,
            names,
            Vec::new(),
        )));
    }
    report.cache = Some(format!("token stores in {}", dir.display()));
    Ok(Prepared::from_stores(
        Box::new(crate::mixture::Mixture::new(trains, names, quotas)),
        validation,
        validation_store,
        report,
        fingerprints,
    ))
}

/// A source's data settings: the mixture's, with the source's files, format and columns.
fn source_section(data: &DataSection, source: &crate::config::SourceSection) -> DataSection {
    DataSection {
        train: source.path.clone(),
        validation: None,
        validation_fraction: if data.validation.is_some() {
            0.0
        } else {
            data.validation_fraction
        },
        format: source.format.unwrap_or(data.format),
        columns: source
            .columns
            .clone()
            .unwrap_or_else(|| data.columns.clone()),
        sources: Vec::new(),
        ..data.clone()
    }
}

/// A source name as a folder name: letters, digits, `-`, `_` and `.` kept, the rest `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One token store's rows: training, and those held out for validation.
struct StorePart {
    train: StoreRows,
    held: Option<StoreRows>,
    /// The documents held out (ascending; dropped and empty ones included).
    held_documents: Vec<u64>,
    fingerprint: String,
}

/// The store in `dir` made from `data.train` (prepared first when missing or stale), split
/// into training rows and, with `data.validation_fraction` and no `data.validation`, held-out
/// validation rows.
fn store_part(tok: &Tokenizer, data: &DataSection, seed: u64, dir: &Path) -> Result<StorePart> {
    use whet_tokenize::store::Store;
    let fingerprint = crate::prepare::store_fingerprint(tok, data)?;
    // The store opened to check its fingerprint is the one the training rows read.
    let current = Store::open(dir)
        .ok()
        .filter(|s| s.manifest().fingerprint == fingerprint);
    let store = match current {
        Some(store) => store,
        None => {
            eprintln!(
                "data: preparing the token store {} from {}",
                dir.display(),
                data.train.display()
            );
            let (_, p) = crate::prepare::prepare_store(tok, data, &fingerprint, dir, 256, true)?;
            eprintln!(
                "data: {} documents, {} tokens in {:.1} s ({:.1} MB/s)",
                p.documents, p.tokens, p.seconds, p.mb_per_s
            );
            Store::open(dir)?
        }
    };
    let holdout =
        (data.validation.is_none() && data.validation_fraction > 0.0).then_some(Holdout {
            fraction: data.validation_fraction,
            seed,
        });
    let layout = Layout {
        seq_len: data.max_len,
        pad_id: tok.pad_id(),
        pack: data.pack,
        window: data.shuffle_shards,
    };
    let train = StoreRows::new(store, Part::Train, holdout, layout);
    if train.is_empty() {
        bail!(
            "{}: the token store has no training documents",
            dir.display()
        );
    }
    let held = match holdout {
        Some(_) => Some(StoreRows::new(
            Store::open(dir)?,
            Part::Held,
            holdout,
            layout,
        )),
        None => None,
    };
    Ok(StorePart {
        held_documents: train.held_documents(),
        train,
        held,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How often each row of source `i` is used.
    fn uses(picks: &[(usize, usize)], i: usize, n: usize) -> Vec<usize> {
        let mut u = vec![0; n];
        for &(s, r) in picks {
            if s == i {
                u[r] += 1;
            }
        }
        u
    }

    #[test]
    fn quotas_follow_the_weights() {
        assert_eq!(mixture_quotas(&[30, 10], &[3.0, 1.0]), vec![30, 10]);
        assert_eq!(mixture_quotas(&[10, 30], &[3.0, 1.0]), vec![30, 10]);
        assert_eq!(
            mixture_quotas(&[5, 5, 10], &[1.0, 1.0, 2.0]),
            vec![5, 5, 10]
        );
        // A tiny weight still keeps its source in.
        assert_eq!(mixture_quotas(&[100, 1], &[1.0, 1e-9]), vec![101, 1]);
    }

    #[test]
    fn the_mixture_draws_each_sources_quota_evenly_and_deterministically() {
        for seed in 0..20u64 {
            for rows in [vec![1, 7], vec![3, 50], vec![40, 2, 9], vec![13]] {
                for weights in [
                    vec![1.0, 1.0, 1.0],
                    vec![3.0, 1.0, 0.5],
                    vec![0.1, 9.0, 2.0],
                ] {
                    let weights = &weights[..rows.len()];
                    let tokens: Vec<Vec<usize>> = rows.iter().map(|&n| vec![5; n]).collect();
                    let none = vec![None; rows.len()];
                    let picks = mixture(&tokens, weights, &none, seed);
                    assert_eq!(
                        picks,
                        mixture(&tokens, weights, &none, seed),
                        "deterministic"
                    );
                    let quotas = mixture_quotas(&rows, weights);
                    assert_eq!(picks.len(), quotas.iter().sum::<usize>());
                    for (i, (&n, &q)) in rows.iter().zip(&quotas).enumerate() {
                        let u = uses(&picks, i, n);
                        assert_eq!(u.iter().sum::<usize>(), q, "source {i} gets its quota");
                        let (lo, hi) = (*u.iter().min().unwrap(), *u.iter().max().unwrap());
                        assert!(hi - lo <= 1, "uses differ by at most one: {u:?}");
                        if q >= n {
                            assert!(lo >= 1, "up-sampling uses every row: {u:?}");
                        } else {
                            assert_eq!(hi, 1, "down-sampling uses a row at most once");
                        }
                    }
                    // A budget of 33 tokens (rows of 5): 6 rows of source 0, still evenly used.
                    let mut budgets = none.clone();
                    budgets[0] = Some(33);
                    let capped = mixture(&tokens, weights, &budgets, seed);
                    let u = uses(&capped, 0, rows[0]);
                    assert_eq!(u.iter().sum::<usize>(), quotas[0].min(6));
                    assert!(u.iter().max().unwrap() - u.iter().min().unwrap() <= 1);
                    for (i, &n) in rows.iter().enumerate().skip(1) {
                        assert_eq!(uses(&capped, i, n), uses(&picks, i, n));
                    }
                }
            }
        }
        // A budget below one row still keeps one.
        let one = mixture(&[vec![50; 4]], &[1.0], &[Some(10)], 3);
        assert_eq!(one.len(), 1);
        // Another seed draws another subset and order.
        let t = vec![vec![1; 100], vec![1; 100]];
        assert_ne!(
            mixture(&t, &[1.0, 3.0], &[None, None], 1),
            mixture(&t, &[1.0, 3.0], &[None, None], 2)
        );
    }
}
