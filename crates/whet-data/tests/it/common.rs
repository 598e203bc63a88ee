//! Shared helpers: temp dirs, record builders, Arrow/Parquet writers.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, LargeStringArray, ListArray, RecordBatch, StringArray, StringViewArray, StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema};
use whet_data::split::record_id;
use whet_data::{Example, Message, Origin, Record, Role};

pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("whet-data-it-")
        .tempdir()
        .expect("create temp dir")
}

pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(&path, contents).unwrap();
    path
}

pub fn text(t: &str) -> Record {
    Record::Text { text: t.into() }
}

pub fn pc(p: &str, c: &str) -> Record {
    Record::PromptCompletion {
        prompt: p.into(),
        completion: c.into(),
    }
}

pub fn conv(turns: &[(Role, &str)]) -> Record {
    Record::Conversation {
        messages: turns
            .iter()
            .map(|(role, content)| Message {
                role: *role,
                content: (*content).into(),
            })
            .collect(),
    }
}

/// An in-memory example (origin `mem`, the given row).
pub fn ex(record: Record, row: u64) -> Example {
    Example {
        id: record_id(&record),
        origin: Origin {
            file: "mem".into(),
            row,
        },
        record,
    }
}

pub fn records(examples: &[Example]) -> Vec<Record> {
    examples.iter().map(|e| e.record.clone()).collect()
}

/// A List<Struct{key_a: Utf8, key_b: Utf8View}> column, one list per row (`None` = null row).
pub fn conv_column(rows: &[Option<Vec<(&str, &str)>>], key_a: &str, key_b: &str) -> ArrayRef {
    let flat: Vec<(&str, &str)> = rows.iter().flatten().flatten().copied().collect();
    let a: ArrayRef = Arc::new(StringArray::from(
        flat.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
    ));
    let b: ArrayRef = Arc::new(StringViewArray::from(
        flat.iter().map(|(_, b)| *b).collect::<Vec<_>>(),
    ));
    let fields = Fields::from(vec![
        Field::new(key_a, DataType::Utf8, false),
        Field::new(key_b, DataType::Utf8View, false),
    ]);
    let structs = StructArray::new(fields.clone(), vec![a, b], None);
    let item = Arc::new(Field::new("item", DataType::Struct(fields), false));
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(|r| r.as_ref().map_or(0, Vec::len)));
    let nulls = rows.iter().map(Option::is_some).collect::<Vec<_>>();
    Arc::new(ListArray::new(
        item,
        offsets,
        Arc::new(structs),
        Some(nulls.into()),
    ))
}

pub fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap()
}

/// Three rows, one per shape, in one table (unused columns null): text as Utf8, prompt as
/// LargeUtf8, completion as Utf8View, messages as List<Struct{role, content}>.
pub fn mixed_batch() -> (RecordBatch, Vec<Record>) {
    let b = batch(vec![
        (
            "text",
            Arc::new(StringArray::from(vec![Some("plain text row"), None, None])) as ArrayRef,
        ),
        (
            "prompt",
            Arc::new(LargeStringArray::from(vec![None, Some("2+2?"), None])),
        ),
        (
            "completion",
            Arc::new(StringViewArray::from(vec![None, Some("4"), None])),
        ),
        (
            "messages",
            conv_column(
                &[
                    None,
                    None,
                    Some(vec![
                        ("user", "hi \"there\"\nfriend"),
                        ("assistant", "hello"),
                    ]),
                ],
                "role",
                "content",
            ),
        ),
    ]);
    let expected = vec![
        text("plain text row"),
        pc("2+2?", "4"),
        conv(&[
            (Role::User, "hi \"there\"\nfriend"),
            (Role::Assistant, "hello"),
        ]),
    ];
    (b, expected)
}

pub fn write_parquet(path: &Path, batches: &[RecordBatch]) {
    let file = fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batches[0].schema(), None).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

pub fn write_ipc_file(path: &Path, batches: &[RecordBatch]) {
    let file = fs::File::create(path).unwrap();
    let mut w = arrow::ipc::writer::FileWriter::try_new(file, &batches[0].schema()).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
}

pub fn write_ipc_stream(path: &Path, batches: &[RecordBatch]) {
    let file = fs::File::create(path).unwrap();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(file, &batches[0].schema()).unwrap();
    for b in batches {
        w.write(b).unwrap();
    }
    w.finish().unwrap();
}

/// The error message of the first error a read yields.
pub fn first_error(path: &Path, opts: &whet_data::ReadOptions) -> whet_data::DataError {
    match whet_data::read_all(path, opts) {
        Ok((examples, _)) => panic!("expected an error, read {} examples", examples.len()),
        Err(e) => e,
    }
}
