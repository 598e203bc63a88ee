//! Row sources for the columnar formats: Parquet and Arrow IPC (file and stream).
//!
//! Batches are read one at a time (only the columns [`Columns`] can use, when any are present),
//! encoded to JSON Lines with Arrow's own JSON encoder, and parsed row by row, so the JSON
//! mapping is shared with the text formats and every Arrow type the encoder knows is supported
//! (Utf8, LargeUtf8, Utf8View, dictionaries, List/LargeList of Struct, ...).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Schema};
use arrow::error::ArrowError;
use arrow::ipc::reader::{FileReader, StreamReader};
use arrow::json::writer::{LineDelimited, WriterBuilder};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

use super::{ReadOptions, RowSource};
use crate::error::{DataError, Result};
use crate::mapping::Columns;
use crate::record::Origin;

type Batches = Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>>>;

fn corrupt(path: &Path, row: u64, format: &'static str, message: impl ToString) -> DataError {
    DataError::Corrupt {
        origin: Origin {
            file: path.to_path_buf(),
            row,
        },
        format,
        message: message.to_string(),
    }
}

fn open_file(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        action: "open",
        source,
    })
}

/// Indices of the top-level fields a mapping can use; `None` (read everything) when there are
/// none, so the shape error can list what the file does have.
fn projection(schema: &Schema, columns: &Columns) -> Option<Vec<usize>> {
    let wanted = columns.top_level();
    let idx: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| wanted.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    (!idx.is_empty()).then_some(idx)
}

pub(crate) fn open_parquet(path: &Path, opts: &ReadOptions) -> Result<BatchSource> {
    const FMT: &str = "Parquet";
    let builder = ParquetRecordBatchReaderBuilder::try_new(open_file(path)?)
        .map_err(|e| corrupt(path, 0, FMT, e))?;
    let mut builder = builder.with_batch_size(opts.batch_size.max(1));
    let projected = match projection(builder.schema(), &opts.mapping.columns) {
        Some(idx) => {
            let mask = ProjectionMask::roots(builder.parquet_schema(), idx);
            builder = builder.with_projection(mask);
            true
        }
        None => false,
    };
    let reader = builder.build().map_err(|e| corrupt(path, 0, FMT, e))?;
    let mut source = BatchSource::new(path, FMT, Box::new(reader), None);
    source.check_types = projected;
    Ok(source)
}

const ARROW_MAGIC: &[u8; 6] = b"ARROW1";

pub(crate) fn open_arrow(path: &Path, opts: &ReadOptions) -> Result<BatchSource> {
    const FMT: &str = "Arrow IPC";
    let mut file = open_file(path)?;
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        action: "read",
        source,
    };
    let mut magic = [0u8; 6];
    let n = read_up_to(&mut file, &mut magic).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let reader = BufReader::new(file);
    let (batches, schema): (Batches, _) = if n == magic.len() && &magic == ARROW_MAGIC {
        let r = FileReader::try_new(reader, None).map_err(|e| corrupt(path, 0, FMT, e))?;
        let schema = r.schema();
        (Box::new(r), schema)
    } else {
        let r = StreamReader::try_new(reader, None).map_err(|e| corrupt(path, 0, FMT, e))?;
        let schema = r.schema();
        (Box::new(r), schema)
    };
    let idx = projection(&schema, &opts.mapping.columns);
    let mut source = BatchSource::new(path, FMT, batches, idx);
    source.check_types = source.projection.is_some();
    Ok(source)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Rows of a batch iterator; rows are 0-based indices over the whole file.
pub(crate) struct BatchSource {
    batches: Batches,
    projection: Option<Vec<usize>>,
    /// Reject columns whose JSON encoding would be lossy (only when reading mapped columns;
    /// otherwise the rows fail as an unknown shape anyway).
    check_types: bool,
    path: PathBuf,
    format: &'static str,
    next_row: u64,
    encoded: Vec<u8>,
    pos: usize,
    done: bool,
}

impl BatchSource {
    fn new(
        path: &Path,
        format: &'static str,
        batches: Batches,
        projection: Option<Vec<usize>>,
    ) -> Self {
        BatchSource {
            batches,
            projection,
            check_types: false,
            path: path.to_path_buf(),
            format,
            next_row: 0,
            encoded: Vec::new(),
            pos: 0,
            done: false,
        }
    }

    /// Encodes a batch as JSON Lines into `self.encoded`.
    fn encode(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut buf = std::mem::take(&mut self.encoded);
        buf.clear();
        match encode_into(buf, batch) {
            Ok(buf) => {
                self.encoded = buf;
                self.pos = 0;
                Ok(())
            }
            Err(e) => Err(self.unsupported(batch, e)),
        }
    }

    /// Names the column the JSON encoder could not handle.
    fn unsupported(&self, batch: &RecordBatch, e: ArrowError) -> DataError {
        let origin = Origin {
            file: self.path.clone(),
            row: self.next_row,
        };
        for i in 0..batch.num_columns() {
            if let Ok(one) = batch.project(&[i])
                && encode_into(Vec::new(), &one).is_err()
            {
                let field = batch.schema().field(i).clone();
                return DataError::UnsupportedColumn {
                    origin,
                    field: field.name().clone(),
                    data_type: field.data_type().to_string(),
                };
            }
        }
        corrupt(&self.path, self.next_row, self.format, e)
    }
}

/// Types whose JSON encoding is faithful to what a record field means: strings (and
/// dictionaries of them), numbers, booleans, nulls, and lists/structs of those. Numbers and
/// booleans still fail the mapping with a `WrongType` naming the field. Binary, dates,
/// timestamps and the like would be silently stringified, so they are rejected.
fn json_friendly(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null => true,
        DataType::Boolean => true,
        dt if dt.is_numeric() => true,
        DataType::Dictionary(_, value) => json_friendly(value),
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _) => json_friendly(f.data_type()),
        DataType::Struct(fields) => fields.iter().all(|f| json_friendly(f.data_type())),
        _ => false,
    }
}

fn encode_into(buf: Vec<u8>, batch: &RecordBatch) -> std::result::Result<Vec<u8>, ArrowError> {
    let mut w = WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, LineDelimited>(buf);
    w.write(batch)?;
    w.finish()?;
    Ok(w.into_inner())
}

impl RowSource for BatchSource {
    fn next_row(&mut self) -> Option<Result<(u64, Value)>> {
        loop {
            if self.pos < self.encoded.len() {
                let rest = &self.encoded[self.pos..];
                let len = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
                let line = &rest[..len];
                self.pos += len + 1;
                let row = self.next_row;
                self.next_row += 1;
                return Some(
                    serde_json::from_slice(line)
                        .map(|v| (row, v))
                        .map_err(|e| corrupt(&self.path, row, self.format, e)),
                );
            }
            if self.done {
                return None;
            }
            let batch = match self.batches.next() {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(corrupt(&self.path, self.next_row, self.format, e)));
                }
                Some(Ok(batch)) => batch,
            };
            let batch = match &self.projection {
                Some(idx) => match batch.project(idx) {
                    Ok(b) => b,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(corrupt(&self.path, self.next_row, self.format, e)));
                    }
                },
                None => batch,
            };
            if self.check_types
                && let Some(field) = batch
                    .schema()
                    .fields()
                    .iter()
                    .find(|f| !json_friendly(f.data_type()))
            {
                self.done = true;
                return Some(Err(DataError::UnsupportedColumn {
                    origin: Origin {
                        file: self.path.clone(),
                        row: self.next_row,
                    },
                    field: field.name().clone(),
                    data_type: field.data_type().to_string(),
                }));
            }
            if let Err(e) = self.encode(&batch) {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}
