//! Round trips through every input format, sources (file, directory, glob), streaming.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};
use whet_data::read::{Format, ReadOptions, open, read_all, resolve};
use whet_data::split::record_id;
use whet_data::{DataError, Role};

use crate::common::*;

fn rows(examples: &[whet_data::Example]) -> Vec<u64> {
    examples.iter().map(|e| e.origin.row).collect()
}

#[test]
fn jsonl_round_trip_all_shapes_with_line_numbers() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "data.jsonl",
        "\u{feff}{\"text\": \"hello world\"}\n\
         \n\
         {\"prompt\": \"Q?\", \"completion\": \"A.\", \"extra\": 1}\r\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
    );
    let (examples, report) = read_all(&path, &ReadOptions::default()).unwrap();
    assert_eq!(
        records(&examples),
        vec![
            text("hello world"),
            pc("Q?", "A."),
            conv(&[(Role::User, "hi"), (Role::Assistant, "yo")]),
        ]
    );
    assert_eq!(
        rows(&examples),
        vec![1, 3, 4],
        "1-based lines, blank line counted"
    );
    assert!(examples.iter().all(|e| e.origin.file == path));
    assert!(examples.iter().all(|e| e.id == record_id(&e.record)));
    assert_eq!(report.files, vec![path]);
    assert_eq!(
        (report.rows, report.examples, report.skipped_total()),
        (3, 3, 0)
    );
}

#[test]
fn json_array_round_trip_streams_elements_with_tricky_strings() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "data.json",
        r#"  [
  {"text": "brackets ] and [ and braces } { inside"},
  {"prompt": "a \"quoted\", comma", "completion": "back\\slash \u00e9"} ,
  {"messages": [
      {"role": "system", "content": "be terse"},
      {"role": "user", "content": "]"},
      {"role": "assistant", "content": "ok"}
  ]}
]
"#,
    );
    let (examples, _) = read_all(&path, &ReadOptions::default()).unwrap();
    assert_eq!(
        records(&examples),
        vec![
            text("brackets ] and [ and braces } { inside"),
            pc("a \"quoted\", comma", "back\\slash é"),
            conv(&[
                (Role::System, "be terse"),
                (Role::User, "]"),
                (Role::Assistant, "ok")
            ]),
        ]
    );
    assert_eq!(rows(&examples), vec![0, 1, 2], "0-based element indices");
}

#[test]
fn empty_json_array_reads_nothing() {
    let dir = tmp();
    let path = write(dir.path(), "empty.json", " [ ] ");
    let (examples, report) = read_all(&path, &ReadOptions::default()).unwrap();
    assert!(examples.is_empty());
    assert_eq!(report.rows, 0);
}

#[test]
fn json_file_holding_json_lines_is_read_as_jsonl() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "hub.json",
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n",
    );
    let (examples, _) = read_all(&path, &ReadOptions::default()).unwrap();
    assert_eq!(records(&examples), vec![text("a"), text("b")]);
    assert_eq!(rows(&examples), vec![1, 2]);
}

#[test]
fn csv_round_trip_with_quoted_multiline_fields_and_json_messages() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "pc.csv",
        "prompt,completion\n\"line one\nline two\",\"a, b\"\nplain,\"say \"\"hi\"\"\"\n",
    );
    let (examples, _) = read_all(&path, &ReadOptions::default()).unwrap();
    assert_eq!(
        records(&examples),
        vec![pc("line one\nline two", "a, b"), pc("plain", "say \"hi\"")]
    );
    assert_eq!(rows(&examples), vec![2, 4], "line where each record starts");

    let conv_path = write(
        dir.path(),
        "conv.csv",
        "id,messages\n7,\"[{\"\"role\"\":\"\"user\"\",\"\"content\"\":\"\"u\"\"},{\"\"role\"\":\"\"assistant\"\",\"\"content\"\":\"\"a\"\"}]\"\n",
    );
    let (examples, _) = read_all(&conv_path, &ReadOptions::default()).unwrap();
    assert_eq!(
        records(&examples),
        vec![conv(&[(Role::User, "u"), (Role::Assistant, "a")])]
    );
}

#[test]
fn parquet_round_trip_mixed_string_types_and_list_of_struct() {
    let dir = tmp();
    let (batch, expected) = mixed_batch();
    let path = dir.path().join("mixed.parquet");
    write_parquet(&path, &[batch]);
    let (examples, _) = read_all(&path, &ReadOptions::default()).unwrap();
    assert_eq!(records(&examples), expected);
    assert_eq!(rows(&examples), vec![0, 1, 2]);
}

#[test]
fn arrow_ipc_file_and_stream_round_trip() {
    let dir = tmp();
    let (batch, expected) = mixed_batch();
    let file = dir.path().join("mixed.arrow");
    let stream = dir.path().join("mixed.arrows");
    let feather = dir.path().join("stream-named.feather");
    write_ipc_file(&file, std::slice::from_ref(&batch));
    write_ipc_stream(&stream, std::slice::from_ref(&batch));
    write_ipc_stream(&feather, std::slice::from_ref(&batch));
    for path in [file, stream, feather] {
        let (examples, _) = read_all(&path, &ReadOptions::default()).unwrap();
        assert_eq!(records(&examples), expected, "{}", path.display());
        assert_eq!(rows(&examples), vec![0, 1, 2]);
    }
}

#[test]
fn parquet_reads_in_batches_with_continuous_row_indices() {
    let dir = tmp();
    let texts: Vec<String> = (0..7).map(|i| format!("row number {i}")).collect();
    let col: ArrayRef = Arc::new(StringArray::from(texts.clone()));
    let path = dir.path().join("t.parquet");
    // Two row groups written, read with batch_size 2 -> several batches.
    write_parquet(
        &path,
        &[
            batch(vec![("text", col.slice(0, 4))]),
            batch(vec![("text", col.slice(4, 3))]),
        ],
    );
    let opts = ReadOptions {
        batch_size: 2,
        ..ReadOptions::default()
    };
    let (examples, _) = read_all(&path, &opts).unwrap();
    let got: Vec<_> = records(&examples);
    let want: Vec<_> = texts.iter().map(|t| text(t)).collect();
    assert_eq!(got, want);
    assert_eq!(rows(&examples), (0..7).collect::<Vec<u64>>());
}

#[test]
fn sharegpt_list_of_from_value_structs_in_parquet() {
    let dir = tmp();
    let b = batch(vec![(
        "conversations",
        conv_column(
            &[Some(vec![
                ("system", "sys"),
                ("human", "q"),
                ("gpt", "a"),
                ("tool", "t"),
            ])],
            "from",
            "value",
        ),
    )]);
    let path = dir.path().join("sharegpt.parquet");
    write_parquet(&path, &[b]);
    let (examples, _) = read_all(&path, &ReadOptions::default()).unwrap();
    assert_eq!(
        records(&examples),
        vec![conv(&[
            (Role::System, "sys"),
            (Role::User, "q"),
            (Role::Assistant, "a"),
            (Role::Tool, "t"),
        ])]
    );
}

#[test]
fn same_content_in_different_formats_gets_the_same_id() {
    let dir = tmp();
    let jsonl = write(dir.path(), "a.jsonl", "{\"text\": \"same\"}\n");
    let pq = dir.path().join("b.parquet");
    write_parquet(
        &pq,
        &[batch(vec![(
            "text",
            Arc::new(StringArray::from(vec!["same"])) as ArrayRef,
        )])],
    );
    let (a, _) = read_all(&jsonl, &ReadOptions::default()).unwrap();
    let (b, _) = read_all(&pq, &ReadOptions::default()).unwrap();
    assert_eq!(a[0].id, b[0].id);
    assert_ne!(a[0].origin, b[0].origin);
}

#[test]
fn directory_reads_supported_files_recursively_in_sorted_order() {
    let dir = tmp();
    write(dir.path(), "b.jsonl", "{\"text\": \"b\"}\n");
    write(dir.path(), "a.json", "[{\"text\": \"a\"}]");
    write(dir.path(), "sub/c.csv", "text\nc\n");
    write(dir.path(), "README.md", "not data");
    write(dir.path(), ".hidden.jsonl", "{\"text\": \"hidden\"}\n");
    write(dir.path(), ".git/x.jsonl", "{\"text\": \"git\"}\n");
    let (examples, report) = read_all(dir.path(), &ReadOptions::default()).unwrap();
    assert_eq!(records(&examples), vec![text("a"), text("b"), text("c")]);
    let names: Vec<_> = report
        .files
        .iter()
        .map(|p| {
            p.strip_prefix(dir.path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, vec!["a.json", "b.jsonl", "sub/c.csv"]);
}

#[test]
fn glob_selects_matching_files() {
    let dir = tmp();
    write(dir.path(), "train-2.jsonl", "{\"text\": \"2\"}\n");
    write(dir.path(), "train-1.jsonl", "{\"text\": \"1\"}\n");
    write(dir.path(), "test-1.jsonl", "{\"text\": \"t\"}\n");
    let pattern = dir.path().join("train-*.jsonl");
    let (examples, _) = read_all(&pattern, &ReadOptions::default()).unwrap();
    assert_eq!(records(&examples), vec![text("1"), text("2")]);
    let files = resolve(&pattern, None).unwrap();
    assert!(files.iter().all(|(_, f)| *f == Format::Jsonl));
}

#[test]
fn format_override_reads_an_unknown_extension() {
    let dir = tmp();
    let path = write(dir.path(), "data.txt", "{\"text\": \"x\"}\n");
    match read_all(&path, &ReadOptions::default()) {
        Err(DataError::UnknownFormat { path: p, extension }) => {
            assert_eq!(p, path);
            assert_eq!(extension, "txt");
        }
        other => panic!("expected UnknownFormat, got {other:?}"),
    }
    let opts = ReadOptions {
        format: Some(Format::Jsonl),
        ..ReadOptions::default()
    };
    let (examples, _) = read_all(&path, &opts).unwrap();
    assert_eq!(records(&examples), vec![text("x")]);
}

#[test]
fn missing_path_and_empty_directory_are_errors() {
    let dir = tmp();
    let missing = dir.path().join("nope.jsonl");
    let err = read_all(&missing, &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.jsonl"));
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = read_all(&empty, &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::NoFiles { .. }), "{err:?}");
    let err = read_all(dir.path().join("*.parquet"), &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::NoFiles { .. }), "{err:?}");
}

#[test]
fn reader_is_lazy_and_continues_after_a_bad_row() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "d.jsonl",
        "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{oops\n{\"text\": \"four\"}\n",
    );
    let mut reader = open(&path, &ReadOptions::default()).unwrap();
    assert_eq!(reader.next().unwrap().unwrap().record, text("one"));
    assert_eq!(reader.report().rows, 1, "only one row read so far");
    assert_eq!(reader.next().unwrap().unwrap().record, text("two"));
    let err = reader.next().unwrap().unwrap_err();
    assert_eq!(err.origin().map(|o| o.row), Some(3));
    assert_eq!(reader.next().unwrap().unwrap().record, text("four"));
    assert!(reader.next().is_none());
    assert_eq!(reader.report().examples, 3);
    assert_eq!(reader.report().rows, 4);
}
