//! On-disk cache of the tokenized and packed dataset.
//!
//! A dataset is stored as one Parquet file `<cache dir>/<fingerprint>.parquet` with list
//! columns `input_ids` (u32), `labels` (i64), `position_ids` (u32), `segment_ids` (u32),
//! one Parquet row per training row, and the reports as JSON in the file's key-value
//! metadata. The fingerprint is a stable hash (FNV-1a 128, hex) of everything the
//! result depends on: the data files (path, size, mtime, or their content), the
//! tokenizer (tokenizer.json and tokenizer_config.json bytes, chat template text) and all
//! settings. Files are written to a temporary name and renamed into place, so a reader
//! never sees a partial file; an unreadable file is rebuilt.

use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use arrow::array::{Array, ArrayRef, Int64Array, ListArray, RecordBatch, UInt32Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use whet_data::atomic::{self, Existing};

use crate::error::{Error, Result};
use crate::fingerprint::Fnv128;
use crate::pack::{PackReport, PackedRow};
use crate::tokenize::TokenizeReport;
use crate::tokenizer::Tokenizer;

const FORMAT_VERSION: &str = "whet-tokenize-cache-v1";
const KEY_FINGERPRINT: &str = "whet.fingerprint";
const KEY_META: &str = "whet.meta";
const ROWS_PER_BATCH: usize = 2048;

/// A cache key: 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds a [`Fingerprint`] from labelled parts; the order of calls matters.
#[derive(Debug, Clone)]
pub struct FingerprintBuilder {
    h: Fnv128,
}

impl Default for FingerprintBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl FingerprintBuilder {
    pub fn new() -> Self {
        let mut h = Fnv128::new();
        h.bytes(FORMAT_VERSION.as_bytes());
        FingerprintBuilder { h }
    }

    /// Any labelled bytes.
    pub fn bytes(mut self, label: &str, bytes: &[u8]) -> Self {
        self.h.bytes(label.as_bytes());
        self.h.bytes(bytes);
        self
    }

    /// A data file by path, size and modification time (cheap; a touched file rebuilds).
    pub fn data_file(mut self, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            action: "stat",
            source,
        })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        self.h.bytes(b"data_file");
        self.h.bytes(path.to_string_lossy().as_bytes());
        self.h.u64(meta.len());
        self.h.u128(mtime);
        Ok(self)
    }

    /// A data file by its content (reads the whole file; survives copies and touches).
    pub fn data_file_contents(mut self, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            action: "read",
            source,
        };
        let mut f = File::open(path).map_err(io)?;
        let mut content = Fnv128::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            content.bytes(&buf[..n]);
            total += n as u64;
        }
        self.h.bytes(b"data_file_contents");
        self.h.u64(total);
        self.h.u128(content.finish());
        Ok(self)
    }

    /// The tokenizer: tokenizer.json and tokenizer_config.json bytes and the chat template.
    pub fn tokenizer(mut self, tokenizer: &Tokenizer) -> Self {
        self.h.bytes(b"tokenizer");
        self.h.u128(tokenizer.content_hash());
        if let Some(t) = tokenizer.chat_template() {
            self.h.bytes(b"chat_template");
            self.h.bytes(t.source().as_bytes());
        }
        self
    }

    /// Settings, hashed as their JSON serialisation (field order is the struct's).
    pub fn settings<T: Serialize>(mut self, label: &str, settings: &T) -> Result<Self> {
        let json = serde_json::to_vec(settings).map_err(|e| Error::Setting {
            field: "settings",
            what: format!("cannot serialise {label}: {e}"),
        })?;
        self.h.bytes(label.as_bytes());
        self.h.bytes(&json);
        Ok(self)
    }

    pub fn finish(&self) -> Fingerprint {
        Fingerprint(self.h.hex())
    }
}

/// What is cached: the rows and the reports of the pass that made them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CachedDataset {
    pub rows: Vec<PackedRow>,
    pub tokenize_report: TokenizeReport,
    pub pack_report: Option<PackReport>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    tokenize_report: TokenizeReport,
    pack_report: Option<PackReport>,
}

/// Whether a lookup reused the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Read from disk.
    Hit,
    /// Not there: built and written.
    Miss,
    /// There but unreadable: rebuilt and overwritten.
    Rebuilt,
}

/// A directory of cached datasets.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the dataset with this fingerprint lives.
    pub fn path_for(&self, fp: &Fingerprint) -> PathBuf {
        self.dir.join(format!("{fp}.parquet"))
    }

    /// Load a cached dataset; `Ok(None)` if there is none.
    pub fn load(&self, fp: &Fingerprint) -> Result<Option<CachedDataset>> {
        let path = self.path_for(fp);
        if !path.is_file() {
            return Ok(None);
        }
        read_parquet(&path, fp).map(Some)
    }

    /// Write a dataset atomically (`whet_data::atomic`: a temporary file, then a rename; several
    /// processes storing the same dataset at once each write their own).
    pub fn store(&self, fp: &Fingerprint, data: &CachedDataset) -> Result<PathBuf> {
        let path = self.path_for(fp);
        let mut failed = None;
        let written = atomic::write_with(&path, Existing::Replace, |w| {
            write_parquet(w, &path, fp, data).map_err(|e| {
                let message = e.to_string();
                failed = Some(e);
                std::io::Error::other(message)
            })
        });
        match failed {
            Some(e) => Err(e),
            None => written.map(|()| path).map_err(Error::from),
        }
    }

    /// Load the dataset for `fp`, or build and store it.
    pub fn load_or_build<F>(
        &self,
        fp: &Fingerprint,
        build: F,
    ) -> Result<(CachedDataset, CacheStatus)>
    where
        F: FnOnce() -> Result<CachedDataset>,
    {
        let existed = self.path_for(fp).is_file();
        if existed && let Ok(Some(d)) = self.load(fp) {
            return Ok((d, CacheStatus::Hit));
        }
        let data = build()?;
        self.store(fp, &data)?;
        let status = if existed {
            CacheStatus::Rebuilt
        } else {
            CacheStatus::Miss
        };
        Ok((data, status))
    }
}

fn list_field(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, false))),
        false,
    )
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        list_field("input_ids", DataType::UInt32),
        list_field("labels", DataType::Int64),
        list_field("position_ids", DataType::UInt32),
        list_field("segment_ids", DataType::UInt32),
    ]))
}

fn list_u32(rows: &[PackedRow], get: impl Fn(&PackedRow) -> &[u32]) -> ArrayRef {
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(|r| get(r).len()));
    let values: Vec<u32> = rows.iter().flat_map(|r| get(r).iter().copied()).collect();
    Arc::new(ListArray::new(
        Arc::new(Field::new("item", DataType::UInt32, false)),
        offsets,
        Arc::new(UInt32Array::from(values)),
        None,
    ))
}

fn list_i64(rows: &[PackedRow]) -> ArrayRef {
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(|r| r.labels.len()));
    let values: Vec<i64> = rows.iter().flat_map(|r| r.labels.iter().copied()).collect();
    Arc::new(ListArray::new(
        Arc::new(Field::new("item", DataType::Int64, false)),
        offsets,
        Arc::new(Int64Array::from(values)),
        None,
    ))
}

/// Writes the dataset as Parquet into `w`; `path` is the file's name for errors.
fn write_parquet(
    w: &mut BufWriter<File>,
    path: &Path,
    fp: &Fingerprint,
    data: &CachedDataset,
) -> Result<()> {
    let err = |what: String| Error::Cache {
        path: path.to_path_buf(),
        what,
    };
    let meta = Meta {
        format: FORMAT_VERSION.into(),
        tokenize_report: data.tokenize_report.clone(),
        pack_report: data.pack_report.clone(),
    };
    let meta = serde_json::to_string(&meta).map_err(|e| err(e.to_string()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).map_err(|e| err(e.to_string()))?,
        ))
        .set_key_value_metadata(Some(vec![
            KeyValue::new(KEY_FINGERPRINT.to_string(), fp.to_string()),
            KeyValue::new(KEY_META.to_string(), meta),
        ]))
        .build();
    let schema = schema();
    let mut writer =
        ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(|e| err(e.to_string()))?;
    for chunk in data.rows.chunks(ROWS_PER_BATCH) {
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                list_u32(chunk, |r| &r.input_ids),
                list_i64(chunk),
                list_u32(chunk, |r| &r.position_ids),
                list_u32(chunk, |r| &r.segment_ids),
            ],
        )
        .map_err(|e| err(e.to_string()))?;
        writer.write(&batch).map_err(|e| err(e.to_string()))?;
    }
    writer.close().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn read_parquet(path: &Path, fp: &Fingerprint) -> Result<CachedDataset> {
    let err = |what: String| Error::Cache {
        path: path.to_path_buf(),
        what,
    };
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        action: "open",
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.to_string()))?;
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned()
        .unwrap_or_default();
    let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
    match get(KEY_FINGERPRINT) {
        Some(f) if f == fp.as_str() => {}
        other => {
            return Err(err(format!(
                "fingerprint {other:?} in the file does not match {fp}"
            )));
        }
    }
    let meta: Meta = serde_json::from_str(&get(KEY_META).ok_or_else(|| err("no metadata".into()))?)
        .map_err(|e| err(format!("metadata: {e}")))?;
    if meta.format != FORMAT_VERSION {
        return Err(err(format!(
            "format {} is not {FORMAT_VERSION}",
            meta.format
        )));
    }
    let reader = builder.build().map_err(|e| err(e.to_string()))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        let col = |name: &str| -> Result<&ListArray> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<ListArray>())
                .ok_or_else(|| err(format!("column `{name}` missing or not a list")))
        };
        let ids = col("input_ids")?;
        let labels = col("labels")?;
        let pos = col("position_ids")?;
        let seg = col("segment_ids")?;
        let u32s = |l: &ListArray, name: &str| -> Result<Vec<u32>> {
            l.values()
                .as_any()
                .downcast_ref::<UInt32Array>()
                .map(|a| a.values().to_vec())
                .ok_or_else(|| err(format!("column `{name}` is not u32")))
        };
        let ids_v = u32s(ids, "input_ids")?;
        let pos_v = u32s(pos, "position_ids")?;
        let seg_v = u32s(seg, "segment_ids")?;
        let lab_v = labels
            .values()
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.values().to_vec())
            .ok_or_else(|| err("column `labels` is not i64".into()))?;
        for r in 0..batch.num_rows() {
            let span = |l: &ListArray| {
                let o = l.value_offsets();
                o[r] as usize..o[r + 1] as usize
            };
            rows.push(PackedRow {
                input_ids: ids_v[span(ids)].to_vec(),
                labels: lab_v[span(labels)].to_vec(),
                position_ids: pos_v[span(pos)].to_vec(),
                segment_ids: seg_v[span(seg)].to_vec(),
            });
        }
    }
    Ok(CachedDataset {
        rows,
        tokenize_report: meta.tokenize_report,
        pack_report: meta.pack_report,
    })
}
