//! Bad inputs: each error names file, row and field; skip_invalid counts instead.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, StringArray};
use whet_data::read::{ReadOptions, read_all};
use whet_data::{DataError, SkipReason};

use crate::common::*;

/// Asserts the message names the file, the row and (when given) the field.
fn assert_names(err: &DataError, file: &str, row: u64, field: Option<&str>) {
    let msg = err.to_string();
    assert!(msg.contains(file), "file {file} missing from: {msg}");
    assert!(
        msg.contains(&format!("row {row}")),
        "row {row} missing from: {msg}"
    );
    assert_eq!(err.origin().map(|o| o.row), Some(row), "{msg}");
    if let Some(field) = field {
        assert!(
            msg.contains(&format!("`{field}`")),
            "field {field} missing from: {msg}"
        );
        assert_eq!(err.field(), Some(field), "{msg}");
    }
}

fn jsonl_error(lines: &str) -> DataError {
    let dir = tmp();
    let path = write(dir.path(), "bad.jsonl", lines);
    first_error(&path, &ReadOptions::default())
}

#[test]
fn malformed_json_line() {
    let err = jsonl_error("{\"text\": \"ok\"}\n{\"text\": \"unterminated}\n");
    assert!(matches!(err, DataError::MalformedJson { .. }), "{err:?}");
    assert_names(&err, "bad.jsonl", 2, None);
}

#[test]
fn missing_field() {
    let err = jsonl_error("{\"prompt\": \"only a prompt\"}\n");
    assert!(matches!(err, DataError::MissingField { .. }), "{err:?}");
    assert_names(&err, "bad.jsonl", 1, Some("completion"));
    assert!(err.to_string().contains("prompt-completion"));
}

#[test]
fn wrong_type_names_the_type_but_never_the_value() {
    let err = jsonl_error("{\"text\": 12345}\n");
    assert!(matches!(err, DataError::WrongType { .. }), "{err:?}");
    assert_names(&err, "bad.jsonl", 1, Some("text"));
    let msg = err.to_string();
    assert!(msg.contains("expected a string, found a number"), "{msg}");
    assert!(!msg.contains("12345"), "value leaked into: {msg}");

    let err = jsonl_error("{\"text\": [\"jane@example.com\"]}\n");
    assert!(!err.to_string().contains("jane@example.com"));
}

#[test]
fn wrong_type_inside_a_message() {
    let err = jsonl_error(
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": 7}]}\n",
    );
    assert!(matches!(err, DataError::WrongType { .. }), "{err:?}");
    assert_names(&err, "bad.jsonl", 1, Some("messages[1].content"));
}

#[test]
fn unknown_role() {
    let err = jsonl_error(
        "{\"text\": \"fine\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"wizard\", \"content\": \"a\"}]}\n",
    );
    assert!(matches!(err, DataError::UnknownRole { .. }), "{err:?}");
    assert_names(&err, "bad.jsonl", 2, Some("messages[1].role"));
    assert!(err.to_string().contains("\"wizard\""));
}

#[test]
fn empty_conversation() {
    let err = jsonl_error("{\"messages\": []}\n");
    assert!(
        matches!(err, DataError::EmptyConversation { .. }),
        "{err:?}"
    );
    assert_names(&err, "bad.jsonl", 1, Some("messages"));
}

#[test]
fn no_assistant_turn() {
    let err = jsonl_error(
        "{\"conversations\": [{\"from\": \"system\", \"value\": \"s\"}, {\"from\": \"human\", \"value\": \"q\"}]}\n",
    );
    assert!(matches!(err, DataError::NoAssistantTurn { .. }), "{err:?}");
    assert_names(&err, "bad.jsonl", 1, Some("conversations"));
}

#[test]
fn unknown_shape_lists_what_was_found() {
    let err = jsonl_error("{\"body\": \"x\", \"title\": \"y\"}\n");
    assert!(matches!(err, DataError::UnknownShape { .. }), "{err:?}");
    assert_names(&err, "bad.jsonl", 1, None);
    let msg = err.to_string();
    assert!(msg.contains("body") && msg.contains("title"), "{msg}");
}

#[test]
fn row_that_is_not_an_object() {
    let err = jsonl_error("[1, 2]\n");
    assert!(matches!(err, DataError::WrongType { .. }), "{err:?}");
    assert_names(&err, "bad.jsonl", 1, Some("<row>"));
}

#[test]
fn json_array_bad_element_and_broken_structure() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "arr.json",
        "[{\"text\": \"a\"}, {\"text\": 1}, {\"text\": \"c\"}]",
    );
    let err = first_error(&path, &ReadOptions::default());
    assert_names(&err, "arr.json", 1, Some("text"));

    let path = write(
        dir.path(),
        "broken.json",
        "[{\"text\": \"a\"} {\"text\": \"b\"}]",
    );
    let err = first_error(&path, &ReadOptions::default());
    assert!(matches!(err, DataError::MalformedJson { .. }), "{err:?}");
    assert_names(&err, "broken.json", 0, None);

    let path = write(
        dir.path(),
        "truncated.json",
        "[{\"text\": \"a\"}, {\"text\": \"b",
    );
    let err = first_error(&path, &ReadOptions::default());
    assert!(matches!(err, DataError::MalformedJson { .. }), "{err:?}");
    assert_names(&err, "truncated.json", 1, None);
}

#[test]
fn csv_row_with_wrong_field_count() {
    let dir = tmp();
    let path = write(dir.path(), "bad.csv", "prompt,completion\na,b\nc,d,e\n");
    let err = first_error(&path, &ReadOptions::default());
    assert!(matches!(err, DataError::MalformedCsv { .. }), "{err:?}");
    assert_names(&err, "bad.csv", 3, None);
}

#[test]
fn corrupt_parquet_garbage_and_truncated() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "garbage.parquet",
        b"definitely not parquet".as_slice(),
    );
    let err = first_error(&path, &ReadOptions::default());
    assert!(matches!(err, DataError::Corrupt { .. }), "{err:?}");
    assert_names(&err, "garbage.parquet", 0, None);
    assert!(err.to_string().contains("Parquet"));

    let good = dir.path().join("good.parquet");
    let col: ArrayRef = Arc::new(StringArray::from(vec!["some text"; 50]));
    write_parquet(&good, &[batch(vec![("text", col)])]);
    let bytes = std::fs::read(&good).unwrap();
    let cut = write(dir.path(), "cut.parquet", &bytes[..bytes.len() / 2]);
    let err = first_error(&cut, &ReadOptions::default());
    assert!(matches!(err, DataError::Corrupt { .. }), "{err:?}");
    assert_names(&err, "cut.parquet", 0, None);
}

#[test]
fn corrupt_arrow_file() {
    let dir = tmp();
    let path = write(dir.path(), "bad.arrow", b"ARROW1\0\0garbage".as_slice());
    let err = first_error(&path, &ReadOptions::default());
    assert!(matches!(err, DataError::Corrupt { .. }), "{err:?}");
    assert_names(&err, "bad.arrow", 0, None);
}

#[test]
fn binary_column_in_parquet_is_rejected_not_stringified() {
    let dir = tmp();
    let col: ArrayRef = Arc::new(BinaryArray::from(vec![b"\x00\x01".as_slice()]));
    let path = dir.path().join("bin.parquet");
    write_parquet(&path, &[batch(vec![("text", col)])]);
    let err = first_error(&path, &ReadOptions::default());
    assert!(
        matches!(err, DataError::UnsupportedColumn { .. }),
        "{err:?}"
    );
    assert_names(&err, "bin.parquet", 0, Some("text"));
    assert!(err.to_string().contains("Binary"), "{err}");
}

#[test]
fn skip_invalid_counts_per_reason_and_keeps_samples() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "mixed.jsonl",
        [
            "{\"text\": \"good 1\"}",
            "not json",
            "{\"text\": 5}",
            "{\"prompt\": \"p\"}",
            "{\"messages\": []}",
            "{\"messages\": [{\"role\": \"alien\", \"content\": \"x\"}]}",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
            "{\"text\": \"good 2\"}",
            "{\"text\": 6}",
        ]
        .join("\n"),
    );
    let opts = ReadOptions {
        skip_invalid: true,
        max_samples: 3,
        ..ReadOptions::default()
    };
    let (examples, report) = read_all(&path, &opts).unwrap();
    assert_eq!(records(&examples), vec![text("good 1"), text("good 2")]);
    assert_eq!(report.rows, 9);
    assert_eq!(report.examples, 2);
    assert_eq!(report.skipped_total(), 7);
    let count = |r| report.skipped.get(&r).copied().unwrap_or(0);
    assert_eq!(count(SkipReason::MalformedJson), 1);
    assert_eq!(count(SkipReason::WrongType), 2);
    assert_eq!(count(SkipReason::MissingField), 1);
    assert_eq!(count(SkipReason::EmptyConversation), 1);
    assert_eq!(count(SkipReason::UnknownRole), 1);
    assert_eq!(count(SkipReason::NoAssistantTurn), 1);
    assert_eq!(report.samples.len(), 3);
    let sample_rows: Vec<u64> = report.samples.iter().map(|s| s.origin.row).collect();
    assert_eq!(sample_rows, vec![2, 3, 4]);
    assert_eq!(report.samples[1].reason, SkipReason::WrongType);
    assert_eq!(report.samples[1].field.as_deref(), Some("text"));
    assert!(report.samples[1].message.contains("mixed.jsonl"));
}

#[test]
fn skip_invalid_skips_a_corrupt_file_and_reads_the_next() {
    let dir = tmp();
    write(dir.path(), "a.parquet", b"PAR1 junk".as_slice());
    write(dir.path(), "b.jsonl", "{\"text\": \"after\"}\n");
    let opts = ReadOptions {
        skip_invalid: true,
        ..ReadOptions::default()
    };
    let (examples, report) = read_all(dir.path(), &opts).unwrap();
    assert_eq!(records(&examples), vec![text("after")]);
    assert_eq!(report.skipped.get(&SkipReason::Corrupt), Some(&1));
    assert_eq!(report.files.len(), 2);
}

#[test]
fn io_errors_are_never_skipped() {
    let dir = tmp();
    let opts = ReadOptions {
        skip_invalid: true,
        ..ReadOptions::default()
    };
    let err = read_all(dir.path().join("missing.jsonl"), &opts).unwrap_err();
    assert!(err.skip_reason().is_none());
}

#[test]
fn numeric_column_in_parquet_is_a_wrong_type() {
    let dir = tmp();
    let col: ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![1, 2]));
    let path = dir.path().join("num.parquet");
    write_parquet(&path, &[batch(vec![("text", col)])]);
    let err = first_error(&path, &ReadOptions::default());
    assert!(matches!(err, DataError::WrongType { .. }), "{err:?}");
    assert_names(&err, "num.parquet", 0, Some("text"));
}

/// Files `whet-fuzz` found (`fixtures/fuzz/found/`): each made the Parquet or Arrow decoder
/// panic (a buffer slice past its end, a negative column length, an offset sum that overflows)
/// or allocate from a declared row count, buffer, block or footer length (1 to 1.6 GB, and
/// 61 PB, from files of about 1 KB). Each is
/// now a `Corrupt` error naming the file, with and without `skip_invalid`.
#[test]
fn fuzz_found_columnar_files_are_corrupt_errors_not_panics() {
    let found = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fuzz/found");
    let cases = [
        ("arrow/buffer-slice-past-end.arrow", "declares"),
        ("arrow/gigabyte-batch.arrow", "declares"),
        ("arrow/petabyte-buffer.arrow", "declares"),
        ("arrow/footer-1-6-gb.arrow", "the footer declares"),
        ("parquet/negative-column-length.parquet", "decoder failed"),
        ("parquet/offset-overflow.parquet", "decoder failed"),
    ];
    for (file, says) in cases {
        let path = found.join(file);
        let err = whet_data::read_all(&path, &whet_data::ReadOptions::default()).expect_err(file);
        let msg = err.to_string();
        assert!(
            matches!(err, whet_data::DataError::Corrupt { .. }),
            "{file}: {msg}"
        );
        assert!(msg.contains(says) && msg.contains(file), "{file}: {msg}");
        let skipping = whet_data::ReadOptions {
            skip_invalid: true,
            ..Default::default()
        };
        // Open-time corruption is an error; a corrupt batch skips the rest of the file.
        if let Ok(mut reader) = whet_data::open(&path, &skipping) {
            for row in reader.by_ref() {
                let _ = row;
            }
        }
    }
}
