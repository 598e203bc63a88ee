//! `whet data prepare`: a corpus streamed into a token store that holds exactly what training
//! tokenizes, in shards bounded by `--memory-mb`; a folder whet does not own is refused.

use std::fs;
use std::path::Path;

use serde_json::{Value, json};
use whet_data::Shape;
use whet_tokenize::store::Store;

use crate::common::*;

/// `n` text documents of growing length (a few past `max_len`) and one chat.
fn corpus(path: &Path, n: usize) {
    let mut lines: Vec<String> = (0..n)
        .map(|i| {
            let words: Vec<String> = (0..(5 + i * 7 % 300))
                .map(|w| format!("word{}", (w * 13 + i) % 97))
                .collect();
            json!({ "text": words.join(" ") }).to_string()
        })
        .collect();
    lines.push(
        json!({"messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"}]})
        .to_string(),
    );
    write(path, &(lines.join("\n") + "\n"));
}

#[test]
fn the_store_holds_what_training_tokenizes_in_bounded_shards() {
    let tmp = Tmp::new("prepare");
    let m = model(&tmp);
    let data = tmp.join("corpus.jsonl");
    corpus(&data, 400);
    let out = tmp.join("store");
    let r = whet([
        "data",
        "prepare",
        "--data",
        s(&data),
        "--model",
        s(&m),
        "--out",
        s(&out),
        "--max-len",
        "64",
        "--memory-mb",
        "1",
    ])
    .ok();
    assert!(
        r.stdout.contains("401 examples (0 skipped)"),
        "{}",
        r.stdout
    );
    let store = Store::open(&out).unwrap();
    // What training makes of the same file: the same documents, windows and masks, in order.
    let tok = whet_tokenize::Tokenizer::from_dir(&m).unwrap();
    let spec = whet::pipeline::flags_section(&data, None, Shape::Auto, 64, false);
    let (examples, _) = whet::pipeline::read(&data, &spec).unwrap();
    let (want, report) = whet::pipeline::tokenize(&tok, &examples, &spec).unwrap();
    assert!(
        report.windows > 0,
        "some documents are longer than 64 tokens"
    );
    assert_eq!(store.documents(), want.len() as u64);
    for (got, want) in store.iter().zip(&want) {
        assert_eq!(got.ids, &want.input_ids[..]);
        let mask: Vec<u8> = want.labels.iter().map(|&l| u8::from(l >= 0)).collect();
        assert_eq!(got.mask, &mask[..]);
    }
    assert!(store.iter().all(|d| d.ids.len() <= 64));
    let summary: Value =
        serde_json::from_str(&fs::read_to_string(out.join("prepare.json")).unwrap()).unwrap();
    assert_eq!(summary["tokens"], store.manifest().tokens);
    assert_eq!(summary["windows"], report.windows);
    // 1 MiB: shards of at most ~84k tokens (5 bytes each in 2/5 of the budget).
    let shards = &store.manifest().shards;
    assert!(shards.iter().all(|s| s.tokens < 84_000 + 64), "{shards:?}");

    // Again: the older store is replaced whole, with the same content.
    whet([
        "data",
        "prepare",
        "--data",
        s(&data),
        "--model",
        s(&m),
        "--out",
        s(&out),
        "--max-len",
        "64",
    ])
    .ok();
    let again = Store::open(&out).unwrap();
    assert_eq!(again.manifest().tokens, store.manifest().tokens);
}

#[test]
fn prepare_scrubs_when_asked_and_refuses_a_folder_it_does_not_own() {
    let tmp = Tmp::new("prepare-pii");
    let m = model(&tmp);
    let data = tmp.join("mail.jsonl");
    write(
        &data,
        "{\"text\": \"Write to ada@example.com today.\"}\n{\"text\": \"Nothing here.\"}\n",
    );
    let out = tmp.join("store");
    let r = whet([
        "data",
        "prepare",
        "--data",
        s(&data),
        "--model",
        s(&m),
        "--out",
        s(&out),
        "--scrub-pii",
    ])
    .ok();
    assert!(r.stdout.contains("1 PII redactions"), "{}", r.stdout);
    let audit: Value =
        serde_json::from_str(&fs::read_to_string(out.join("pii_audit.json")).unwrap()).unwrap();
    assert_eq!(audit["redactions"]["email"], 1);
    let store = Store::open(&out).unwrap();
    let tok = whet_tokenize::Tokenizer::from_dir(&m).unwrap();
    let text = tok.decode(store.doc(0).ids, true).unwrap();
    assert!(!text.contains("ada@example.com"), "{text}");

    let theirs = tmp.join("theirs");
    fs::create_dir_all(&theirs).unwrap();
    write(&theirs.join("notes.txt"), "mine");
    let r = whet([
        "data",
        "prepare",
        "--data",
        s(&data),
        "--model",
        s(&m),
        "--out",
        s(&theirs),
    ])
    .fails();
    assert!(
        r.stderr.contains("not a token store") && r.stderr.contains("theirs"),
        "{}",
        r.stderr
    );
    assert_eq!(
        fs::read_to_string(theirs.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn a_bad_row_names_file_and_row_and_leaves_no_store() {
    let tmp = Tmp::new("prepare-bad");
    let m = model(&tmp);
    let data = tmp.join("bad.jsonl");
    write(&data, "{\"text\": \"fine\"}\n{\"text\": \n");
    let out = tmp.join("store");
    let r = whet([
        "data",
        "prepare",
        "--data",
        s(&data),
        "--model",
        s(&m),
        "--out",
        s(&out),
    ])
    .fails();
    assert!(
        r.stderr.contains("bad.jsonl") && r.stderr.contains("row 2"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
}
