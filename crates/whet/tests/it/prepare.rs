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

const STORE_RUN: &str = r#"
method = "lora"

[data]
train = "corpus.jsonl"
validation = "val.jsonl"
max_len = 64
STORE

[lora]
r = 4
alpha = 8.0
dropout = 0.1

[train]
max_steps = 5
micro_batch = 2
lr = 1e-2
eval_every = 2

[eval]
max_new_tokens = 4

[output]
dir = "out"
"#;

fn train_losses(out: &Path) -> Vec<String> {
    metrics(out)
        .iter()
        .map(|v| {
            format!(
                "{} {} {}",
                v["kind"],
                v["step"],
                v.get("loss").unwrap_or(&v["val_loss"])
            )
        })
        .collect()
}

/// `data.store`: the run prepares the store from `data.train` once, trains from it with the
/// losses of the in-memory run bit for bit (the same rows in the same order), reuses it while
/// nothing changed and prepares it again when an input file changes.
#[test]
fn training_from_a_store_matches_training_in_memory() {
    let tmp = Tmp::new("store-train");
    let m = model(&tmp);
    corpus(&tmp.join("corpus.jsonl"), 60);
    corpus(&tmp.join("val.jsonl"), 4);
    let memory = config(&tmp, &m, &STORE_RUN.replace("STORE", ""));
    whet(["train", "--config", s(&memory)]).ok();
    let want = train_losses(&tmp.join("out"));
    assert_eq!(want.len(), 5 + 3, "{want:?}");

    let body = STORE_RUN
        .replace("STORE", "store = \"tokens\"")
        .replace("dir = \"out\"", "dir = \"out-store\"");
    let from_store = config(&tmp, &m, &body);
    let r = whet(["train", "--config", s(&from_store)]).ok();
    assert!(
        r.stderr.contains("preparing the token store"),
        "{}",
        r.stderr
    );
    assert_eq!(train_losses(&tmp.join("out-store")), want);
    assert!(Store::open(&tmp.join("tokens")).is_ok());

    // Nothing changed: the store is read as it is (a new output folder, the same losses).
    let again = config(&tmp, &m, &body.replace("out-store", "out-again"));
    let r = whet(["train", "--config", s(&again)]).ok();
    assert!(
        !r.stderr.contains("preparing the token store"),
        "{}",
        r.stderr
    );
    assert_eq!(train_losses(&tmp.join("out-again")), want);

    // An input file changed: prepared again.
    corpus(&tmp.join("corpus.jsonl"), 61);
    let changed = config(&tmp, &m, &body.replace("out-store", "out-changed"));
    let r = whet(["train", "--config", s(&changed)]).ok();
    assert!(
        r.stderr.contains("preparing the token store"),
        "{}",
        r.stderr
    );
}

/// Without a validation file, a seeded fraction of the store's documents is held out.
#[test]
fn a_store_run_holds_out_a_fraction_of_its_documents() {
    let tmp = Tmp::new("store-fraction");
    let m = model(&tmp);
    corpus(&tmp.join("corpus.jsonl"), 60);
    let body = STORE_RUN
        .replace("STORE", "store = \"tokens\"\nvalidation_fraction = 0.2")
        .replace("validation = \"val.jsonl\"\n", "");
    let cfg = config(&tmp, &m, &body);
    whet(["train", "--config", s(&cfg)]).ok();
    let report: Value =
        serde_json::from_str(&fs::read_to_string(tmp.join("out/report.json")).unwrap()).unwrap();
    let store = Store::open(&tmp.join("tokens")).unwrap();
    let (train, val) = (
        report["data"]["train_examples"].as_u64().unwrap(),
        report["data"]["validation_examples"].as_u64().unwrap(),
    );
    assert_eq!(train + val, store.documents(), "{report}");
    assert_eq!(val, (store.documents() as f64 * 0.2).round() as u64);
    assert!(report["before"]["val_loss"].is_f64(), "{report}");
}

/// A run from a store resumes from a checkpoint with the uninterrupted run's losses.
#[test]
fn a_store_run_resumes_bit_identically() {
    let tmp = Tmp::new("store-resume");
    let m = model(&tmp);
    corpus(&tmp.join("corpus.jsonl"), 60);
    corpus(&tmp.join("val.jsonl"), 4);
    let body = STORE_RUN
        .replace("STORE", "store = \"tokens\"")
        .replace("[output]\n", "[output]\nsave_every = 1\nkeep_last = 10\n");
    let cfg = config(&tmp, &m, &body);
    whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    let full = tmp.join("out");
    let want = train_losses(&full);
    let part = tmp.join("part");
    killed_after(&full, &part, "checkpoint-000003");
    let r = whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        &format!("output.dir={}", s(&part)),
    ])
    .ok();
    assert!(
        !r.stderr.contains("preparing the token store"),
        "{}",
        r.stderr
    );
    assert_eq!(train_losses(&part), want);
}

/// `corpus`'s text lines, each written `copies` times in a row, and a near copy (one word
/// changed) of every tenth.
fn duplicated_corpus(path: &Path, n: usize, copies: usize) {
    let mut lines = Vec::new();
    for i in 0..n {
        let words: Vec<String> = (0..(30 + i % 10))
            .map(|w| format!("w{}x{}", i, (w * 13 + i) % 97))
            .collect();
        for _ in 0..copies {
            lines.push(json!({ "text": words.join(" ") }).to_string());
        }
        if i % 10 == 0 {
            let mut near = words.clone();
            near[15] = "changed".into();
            lines.push(json!({ "text": near.join(" ") }).to_string());
        }
    }
    write(path, &(lines.join("\n") + "\n"));
}

/// `data prepare --dedup` marks the copies and near copies dropped (counted in the output,
/// `prepare.json` and the manifest); a run from a store with `data.dedup` trains on the
/// remaining documents only and reports what was dropped; validation documents copied from
/// training ones are reported as leakage.
#[test]
fn a_deduplicated_store_trains_on_fewer_documents_and_reports_leakage() {
    let tmp = Tmp::new("store-dedup");
    let m = model(&tmp);
    let data = tmp.join("corpus.jsonl");
    duplicated_corpus(&data, 30, 2);
    let out = tmp.join("store");
    let prepare = |extra: &[&str]| {
        let mut args = vec![
            "data",
            "prepare",
            "--data",
            s(&data),
            "--model",
            s(&m),
            "--out",
            s(&out),
            "--max-len",
            "256",
        ];
        args.extend_from_slice(extra);
        whet(args).ok()
    };
    let r = prepare(&["--dedup"]);
    // 30 distinct, 30 exact copies, 3 near copies.
    assert!(
        r.stdout.contains("63 documents")
            && r.stdout
                .contains("33 duplicate documents dropped (30 exact, 3 near)"),
        "{}",
        r.stdout
    );
    let store = Store::open(&out).unwrap();
    assert_eq!((store.documents(), store.dropped()), (63, 33));
    // Kept: the first of each group.
    assert!(!store.is_dropped(0) && store.is_dropped(1) && store.is_dropped(2));
    let summary: Value =
        serde_json::from_str(&fs::read_to_string(out.join("prepare.json")).unwrap()).unwrap();
    assert_eq!(summary["dedup_removed"], 33);
    assert_eq!(summary["dedup"]["near"], 3);
    let dedup_fp = store.manifest().fingerprint.clone();
    drop(store);
    // Without --dedup: another fingerprint, nothing dropped.
    prepare(&[]);
    let plain = Store::open(&out).unwrap();
    assert_eq!(plain.dropped(), 0);
    assert_ne!(plain.manifest().fingerprint, dedup_fp);

    // Validation: two copies of training documents and one unrelated text.
    duplicated_corpus(&tmp.join("val.jsonl"), 2, 1);
    fs::write(
        tmp.join("val.jsonl"),
        fs::read_to_string(tmp.join("val.jsonl")).unwrap()
            + "{\"text\": \"nothing like the training documents at all here\"}\n",
    )
    .unwrap();
    let run = |dedup: bool, dir: &str| -> Value {
        let body = STORE_RUN
            .replace(
                "STORE",
                &format!("store = \"tokens-{dedup}\"\ndedup = {dedup}"),
            )
            .replace("max_len = 64", "max_len = 256")
            .replace("dir = \"out\"", &format!("dir = \"{dir}\""));
        let cfg = config(&tmp, &m, &body);
        whet(["train", "--config", s(&cfg)]).ok();
        serde_json::from_str(&fs::read_to_string(tmp.join(dir).join("report.json")).unwrap())
            .unwrap()
    };
    let deduped = run(true, "out-dedup");
    let all = run(false, "out-all");
    let d = &deduped["data"];
    assert_eq!(d["train_examples"], 30, "{d}");
    assert_eq!(all["data"]["train_examples"], 63);
    assert_eq!(d["store_dedup"]["exact"], 30);
    assert_eq!(d["store_dedup"]["near"], 3);
    assert!(all["data"].get("store_dedup").is_none());
    let md = fs::read_to_string(tmp.join("out-dedup/report.md")).unwrap();
    assert!(
        md.contains("duplicate documents dropped from the token store: 33 (30 exact, 3 near)"),
        "{md}"
    );
    // Validation: training document 0; the near copy of 0 (training document 2, dropped, so near
    // to 0); training document 3; a new text.
    let leak = &d["leakage"];
    assert_eq!(leak["validation"], 4, "{leak}");
    let exact: Vec<u64> = leak["exact"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["train_id"].as_u64().unwrap())
        .collect();
    assert_eq!(exact, [0, 3], "{leak}");
    let near = &leak["near"].as_array().unwrap();
    assert_eq!(near.len(), 1, "{leak}");
    assert_eq!(
        (&near[0]["validation_id"], &near[0]["train_id"]),
        (&json!(1), &json!(0))
    );
    assert!(md.contains("leakage: 75.0% of validation examples"), "{md}");
    // Without dedup the near copy is training document 2, token for token.
    let exact: Vec<u64> = all["data"]["leakage"]["exact"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["train_id"].as_u64().unwrap())
        .collect();
    assert_eq!(exact, [0, 2, 3]);

    // The report is cached by what it depends on: a run over the same store and validation
    // reads it back instead of signing the store again (seen by editing the cached copy).
    let dir = Path::new(concat!(
        env!("CARGO_TARGET_TMPDIR"),
        "/whet-cache/datasets/leakage"
    ));
    let cached = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            // Other tests write here too: a file gone or half there is not this one.
            let text = fs::read(p).ok();
            text.and_then(|t| serde_json::from_slice::<Value>(&t).ok())
                .as_ref()
                == Some(leak)
        })
        .expect("the leakage report in the cache");
    let mut edited = leak.clone();
    edited["train"] = json!(12345);
    fs::write(&cached, edited.to_string()).unwrap();
    let again = run(true, "out-dedup-again");
    assert_eq!(again["data"]["leakage"]["train"], 12345);
    fs::write(&cached, leak.to_string()).unwrap();
}
