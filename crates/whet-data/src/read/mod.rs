//! Readers: a file, a directory or a glob in; a stream of [`Example`]s out.
//!
//! Rows are read lazily: JSONL and CSV line by line, JSON arrays element by element, Parquet and
//! Arrow IPC one record batch at a time, so a multi-GB file never sits in memory whole.
//!
//! ```no_run
//! use whet_data::read::{open, ReadOptions};
//! let mut reader = open("data/train.jsonl", &ReadOptions::default())?;
//! for example in reader.by_ref() {
//!     let example = example?;
//!     println!("{} {}", example.id, example.origin);
//! }
//! println!("{:?}", reader.report());
//! # Ok::<(), whet_data::DataError>(())
//! ```

mod columnar;
mod text;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{DataError, Result, SkipReason};
use crate::mapping::{Mapping, to_record};
use crate::record::{Example, Origin, Record};
use crate::split::record_id;

/// An input container format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per line (`.jsonl`, `.ndjson`).
    Jsonl,
    /// A top-level JSON array of objects (`.json`). A `.json` file whose first non-blank
    /// character is not `[` is read as JSON Lines, as many dataset hubs name them so.
    Json,
    /// Comma-separated values with a header row (`.csv`); every cell is a string, and a
    /// conversation column may hold a JSON-encoded list.
    Csv,
    /// Apache Parquet (`.parquet`, `.pq`).
    Parquet,
    /// Arrow IPC, file or stream format, told apart by the `ARROW1` magic
    /// (`.arrow`, `.ipc`, `.feather`, `.arrows`).
    Arrow,
}

impl Format {
    /// The format for a file extension (without the dot, case-insensitive).
    pub fn from_extension(ext: &str) -> Option<Format> {
        Some(match ext.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Format::Jsonl,
            "json" => Format::Json,
            "csv" => Format::Csv,
            "parquet" | "pq" => Format::Parquet,
            "arrow" | "ipc" | "feather" | "arrows" => Format::Arrow,
            _ => return None,
        })
    }

    /// The format for a path, from its extension.
    pub fn from_path(path: &Path) -> Option<Format> {
        path.extension()
            .and_then(|e| e.to_str())
            .and_then(Format::from_extension)
    }
}

/// How to read a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadOptions {
    /// Force a format instead of going by extension. Applies to a single file, to every file a
    /// glob matches, and to the supported-extension files of a directory.
    pub format: Option<Format>,
    /// Shape, column names and dataset-level system prompt.
    pub mapping: Mapping,
    /// Skip and count invalid rows (see [`ReadReport`]) instead of yielding an error for them.
    /// A corrupt Parquet/Arrow batch skips the rest of that file. I/O errors are always errors.
    pub skip_invalid: bool,
    /// Rows per Parquet/Arrow record batch.
    pub batch_size: usize,
    /// How many skipped rows [`ReadReport::samples`] keeps.
    pub max_samples: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            format: None,
            mapping: Mapping::default(),
            skip_invalid: false,
            batch_size: 1024,
            max_samples: 10,
        }
    }
}

/// One skipped row, for the first few kept in [`ReadReport::samples`]. Carries no field values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRow {
    pub origin: Origin,
    pub reason: SkipReason,
    pub field: Option<String>,
    /// The full error message (file, row, field, expectation; no values).
    pub message: String,
}

/// What a read saw: files, rows, examples produced, and rows skipped per reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReport {
    /// Files opened, in reading order.
    pub files: Vec<PathBuf>,
    /// Rows seen (valid and invalid).
    pub rows: u64,
    /// Examples produced.
    pub examples: u64,
    /// Skipped rows per reason (only with `skip_invalid`).
    pub skipped: BTreeMap<SkipReason, u64>,
    /// The first `max_samples` skipped rows.
    pub samples: Vec<SkippedRow>,
}

impl ReadReport {
    /// Total rows skipped, all reasons.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// The files a source names, each with its format, sorted by path.
///
/// `source` is a file, a directory (searched recursively for supported extensions, skipping
/// hidden entries), or a glob pattern (`*`, `?`, `[..]`, `**`).
pub fn resolve(source: impl AsRef<Path>, format: Option<Format>) -> Result<Vec<(PathBuf, Format)>> {
    let source = source.as_ref();
    let format_of = |p: &Path| format.or_else(|| Format::from_path(p));
    if source.is_file() {
        let f = format_of(source).ok_or_else(|| DataError::UnknownFormat {
            path: source.to_path_buf(),
            extension: source
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })?;
        return Ok(vec![(source.to_path_buf(), f)]);
    }
    let mut files = Vec::new();
    if source.is_dir() {
        walk(source, &mut files)?;
        files.retain(|p| Format::from_path(p).is_some());
    } else {
        let pattern = source.to_string_lossy();
        if !pattern.contains(['*', '?', '[']) {
            return Err(DataError::Io {
                path: source.to_path_buf(),
                action: "open",
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        let paths = glob::glob(&pattern).map_err(|e| DataError::BadGlob {
            pattern: pattern.to_string(),
            message: e.to_string(),
        })?;
        for p in paths {
            let p = p.map_err(|e| DataError::Io {
                path: e.path().to_path_buf(),
                action: "list",
                source: std::io::Error::new(e.error().kind(), e.error().to_string()),
            })?;
            if p.is_file() && format_of(&p).is_some() {
                files.push(p);
            }
        }
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(DataError::NoFiles {
            source_spec: source.display().to_string(),
        });
    }
    Ok(files
        .into_iter()
        .filter_map(|p| format_of(&p).map(|f| (p, f)))
        .collect())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        action: "list directory",
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// A source of decoded rows for one file: `(row, object)` pairs in file order. After a fatal
/// error (I/O, corrupt batch, broken array structure) it returns that error once, then `None`.
pub(crate) trait RowSource {
    fn next_row(&mut self) -> Option<Result<(u64, Value)>>;
}

fn open_source(path: &Path, format: Format, opts: &ReadOptions) -> Result<Box<dyn RowSource>> {
    Ok(match format {
        Format::Jsonl => Box::new(text::JsonlSource::open(path)?),
        Format::Json => text::open_json(path)?,
        Format::Csv => Box::new(text::CsvSource::open(path)?),
        Format::Parquet => Box::new(columnar::open_parquet(path, opts)?),
        Format::Arrow => Box::new(columnar::open_arrow(path, opts)?),
    })
}

/// A lazy stream of examples over every file of a source. Yields `Err` for each invalid row
/// (unless `skip_invalid`) and goes on with the next row; use [`read_all`] to stop at the first.
pub struct DataReader {
    files: std::vec::IntoIter<(PathBuf, Format)>,
    current: Option<(PathBuf, Box<dyn RowSource>)>,
    opts: ReadOptions,
    report: ReadReport,
}

impl std::fmt::Debug for DataReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataReader")
            .field("current", &self.current.as_ref().map(|(p, _)| p))
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// Opens a source (file, directory or glob) for streaming. Fails early if it names no file.
pub fn open(source: impl AsRef<Path>, opts: &ReadOptions) -> Result<DataReader> {
    let files = resolve(source, opts.format)?;
    Ok(DataReader::new(files, opts.clone()))
}

/// Reads a whole source into memory; stops at the first error that `skip_invalid` does not skip.
pub fn read_all(
    source: impl AsRef<Path>,
    opts: &ReadOptions,
) -> Result<(Vec<Example>, ReadReport)> {
    let mut reader = open(source, opts)?;
    let examples = reader.by_ref().collect::<Result<Vec<_>>>()?;
    Ok((examples, reader.into_report()))
}

impl DataReader {
    /// A reader over an explicit list of files (see [`resolve`]).
    pub fn new(files: Vec<(PathBuf, Format)>, opts: ReadOptions) -> Self {
        DataReader {
            files: files.into_iter(),
            current: None,
            opts,
            report: ReadReport::default(),
        }
    }

    /// Counts so far; complete once the iterator has returned `None`.
    pub fn report(&self) -> &ReadReport {
        &self.report
    }

    pub fn into_report(self) -> ReadReport {
        self.report
    }

    /// `Some(err)` to yield, `None` when the error was skipped and counted.
    fn reject(&mut self, err: DataError) -> Option<DataError> {
        let reason = match err.skip_reason() {
            Some(reason) if self.opts.skip_invalid => reason,
            _ => return Some(err),
        };
        *self.report.skipped.entry(reason).or_default() += 1;
        if self.report.samples.len() < self.opts.max_samples
            && let Some(origin) = err.origin()
        {
            self.report.samples.push(SkippedRow {
                origin: origin.clone(),
                reason,
                field: err.field().map(str::to_string),
                message: err.to_string(),
            });
        }
        None
    }
}

impl DataReader {
    /// The next row mapped by `map`, with its origin; errors as [`Iterator::next`] yields them.
    fn next_mapped<T>(
        &mut self,
        map: impl Fn(&Value, &Origin, &Mapping) -> Result<T>,
    ) -> Option<Result<(Origin, T)>> {
        loop {
            let Some((path, source)) = self.current.as_mut() else {
                let (path, format) = self.files.next()?;
                self.report.files.push(path.clone());
                match open_source(&path, format, &self.opts) {
                    Ok(source) => self.current = Some((path, source)),
                    Err(e) => {
                        if let Some(e) = self.reject(e) {
                            return Some(Err(e));
                        }
                    }
                }
                continue;
            };
            let item = source.next_row();
            let path = path.clone();
            let err = match item {
                None => {
                    self.current = None;
                    continue;
                }
                Some(Ok((row, value))) => {
                    self.report.rows += 1;
                    let origin = Origin { file: path, row };
                    match map(&value, &origin, &self.opts.mapping) {
                        Ok(mapped) => {
                            self.report.examples += 1;
                            return Some(Ok((origin, mapped)));
                        }
                        Err(e) => e,
                    }
                }
                Some(Err(e)) => {
                    let whole_file = matches!(
                        e.skip_reason(),
                        None | Some(SkipReason::Corrupt | SkipReason::UnsupportedColumn)
                    );
                    if !whole_file {
                        self.report.rows += 1;
                    }
                    e
                }
            };
            if let Some(e) = self.reject(err) {
                return Some(Err(e));
            }
        }
    }
}

impl Iterator for DataReader {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Result<Example>> {
        self.next_mapped(to_record).map(|r| {
            r.map(|(origin, record)| Example {
                id: record_id(&record),
                origin,
                record,
            })
        })
    }
}

/// One preference pair: the two records it trains on, the prompt followed by the chosen and by
/// the rejected answer ([`crate::mapping::to_pair`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairExample {
    /// Stable across runs: a hash of both records.
    pub id: u64,
    pub origin: Origin,
    pub chosen: Record,
    pub rejected: Record,
}

/// Reads every preference pair of a source (file, directory or glob; any format), stopping at the
/// first error that `skip_invalid` does not skip. `opts.mapping.shape` is not used: a preference
/// row is told by its `prompt`, `chosen` and `rejected` fields.
pub fn read_pairs(
    source: impl AsRef<Path>,
    opts: &ReadOptions,
) -> Result<(Vec<PairExample>, ReadReport)> {
    let mut reader = open(source, opts)?;
    let mut pairs = Vec::new();
    while let Some(item) = reader.next_mapped(crate::mapping::to_pair) {
        let (origin, (chosen, rejected)) = item?;
        let id = record_id(&chosen) ^ record_id(&rejected).rotate_left(1);
        pairs.push(PairExample {
            id,
            origin,
            chosen,
            rejected,
        });
    }
    Ok((pairs, reader.into_report()))
}
