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

/// Runs a call into the Parquet or Arrow decoder, turning a panic into a [`DataError::Corrupt`]
/// for `row`. Both crates assert on some inconsistent inputs instead of returning an error
/// (a buffer slice past its end, a negative column length, offsets that overflow); found by
/// `whet-fuzz`. The decoder that panicked is dropped by the caller, never used again. The
/// panic's message still goes through the process's panic hook (stderr) first.
fn guarded<T>(
    path: &Path,
    row: u64,
    format: &'static str,
    call: impl FnOnce() -> Result<T>,
) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown error".into());
        Err(corrupt(
            path,
            row,
            format,
            format!("the {format} decoder failed: {message}"),
        ))
    })
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
    guarded(path, 0, FMT, || open_parquet_unguarded(path, opts))
}

fn open_parquet_unguarded(path: &Path, opts: &ReadOptions) -> Result<BatchSource> {
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
    check_ipc_rows(path).map_err(|message| corrupt(path, 0, FMT, message))?;
    guarded(path, 0, FMT, || open_arrow_unguarded(path, opts))
}

/// Rows an IPC record batch may declare per byte of its body, plus a slack: an uncompressed
/// column of N rows carries at least N/8 bytes (a validity bitmap), so more rows than
/// `8 * body + slack` can only come from a corrupt header. (Only all-`Null` columns carry no
/// buffers; whet's data files have a text column.)
const IPC_ROWS_PER_BODY_BYTE: u64 = 8;
const IPC_ROWS_SLACK: u64 = 4096;

/// Walks the IPC messages of `path` (file or stream format) and checks every record and
/// dictionary batch's row count and buffer ranges against its body size before arrow allocates
/// from them: arrow sizes buffers by the declared row count and copies unaligned buffers by
/// their declared length, so a 1 KB file could ask for gigabytes (found by `whet-fuzz`). Stops quietly at anything it cannot walk, which arrow then reports.
fn check_ipc_rows(path: &Path) -> std::result::Result<(), String> {
    // Mapped, not read: only the message headers are touched, never the batch bodies, so a
    // large file costs a few pages here (arrow then reads it as usual).
    let Ok(file) = File::open(path) else {
        return Ok(()); // arrow reports the I/O error
    };
    // SAFETY: the map is read-only and dropped before this function returns; as with every
    // mmap-based reader, the file must not be truncated while it is read.
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return Ok(()); // an empty or unmappable file: arrow reports it
    };
    let data: &[u8] = &map;
    let file_format = data.starts_with(ARROW_MAGIC);
    if file_format {
        check_ipc_footer(data)?;
    }
    let mut at = if file_format { 8 } else { 0 };
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
    };
    while let Some(w) = word(at) {
        // 0xFFFFFFFF then the length (current format), or the length alone (legacy).
        let (len, header) = if w == u32::MAX {
            match word(at + 4) {
                Some(n) => (n as usize, at + 8),
                None => return Ok(()),
            }
        } else {
            (w as usize, at + 4)
        };
        if len == 0 {
            return Ok(()); // end of stream
        }
        let Some(meta) = data.get(header..header.saturating_add(len)) else {
            return Ok(());
        };
        let Ok(message) = arrow::ipc::root_as_message(meta) else {
            return Ok(());
        };
        let body = u64::try_from(message.bodyLength()).unwrap_or(0);
        let batch = message
            .header_as_record_batch()
            .or_else(|| message.header_as_dictionary_batch().and_then(|d| d.data()));
        if let Some(batch) = batch {
            let rows = u64::try_from(batch.length()).unwrap_or(u64::MAX);
            let most = body
                .saturating_mul(IPC_ROWS_PER_BODY_BYTE)
                .saturating_add(IPC_ROWS_SLACK);
            if rows > most {
                return Err(format!(
                    "a record batch at byte {at} declares {rows} rows but carries {body} bytes of data (at most {most} rows)"
                ));
            }
            // arrow copies an unaligned buffer into a new one of its declared length.
            for b in batch.buffers().into_iter().flatten() {
                let end = u64::try_from(b.offset())
                    .ok()
                    .zip(u64::try_from(b.length()).ok())
                    .and_then(|(o, l)| o.checked_add(l));
                if end.is_none_or(|end| end > body) {
                    return Err(format!(
                        "a record batch at byte {at} declares a buffer of {} bytes at {} in a body of {body} bytes",
                        b.length(),
                        b.offset()
                    ));
                }
            }
        }
        at = match usize::try_from(body)
            .ok()
            .and_then(|b| (header + len).checked_add(b))
        {
            Some(next) => next,
            None => return Ok(()),
        };
    }
    Ok(())
}

/// The file format's footer lists each batch as a block (offset, metadata and body lengths),
/// and arrow allocates a block's lengths before reading it: each must lie inside the file.
fn check_ipc_footer(data: &[u8]) -> std::result::Result<(), String> {
    let n = data.len();
    if n < 16 || !data.ends_with(ARROW_MAGIC) {
        return Ok(()); // arrow reports it
    }
    // arrow allocates the footer's stated length before reading it.
    let len = i32::from_le_bytes(data[n - 10..n - 6].try_into().expect("4 bytes"));
    let Some(start) = usize::try_from(len)
        .ok()
        .and_then(|l| (n - 10).checked_sub(l))
    else {
        return Err(format!(
            "the footer declares {len} bytes in a file of {n} bytes"
        ));
    };
    let Ok(footer) = arrow::ipc::root_as_footer(&data[start..n - 10]) else {
        return Ok(());
    };
    let blocks = footer.recordBatches().into_iter().flatten();
    for b in blocks.chain(footer.dictionaries().into_iter().flatten()) {
        let end = u64::try_from(b.offset())
            .ok()
            .zip(u64::try_from(b.metaDataLength()).ok())
            .zip(u64::try_from(b.bodyLength()).ok())
            .and_then(|((o, m), l)| o.checked_add(m)?.checked_add(l));
        if end.is_none_or(|end| end > n as u64) {
            return Err(format!(
                "the footer declares a batch of {} + {} bytes at byte {} in a file of {n} bytes",
                b.metaDataLength(),
                b.bodyLength(),
                b.offset()
            ));
        }
    }
    Ok(())
}

fn open_arrow_unguarded(path: &Path, opts: &ReadOptions) -> Result<BatchSource> {
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
            let (path, row, format) = (self.path.clone(), self.next_row, self.format);
            let next = guarded(&path, row, format, || Ok(self.batches.next()));
            let batch = match next {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Ok(Some(Err(e))) => {
                    self.done = true;
                    return Some(Err(corrupt(&self.path, self.next_row, self.format, e)));
                }
                Ok(Some(Ok(batch))) => batch,
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
            let (path, row, format) = (self.path.clone(), self.next_row, self.format);
            if let Err(e) = guarded(&path, row, format, || self.encode(&batch)) {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}
