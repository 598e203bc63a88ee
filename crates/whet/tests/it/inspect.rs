//! `whet data inspect`: token counts, supervision, and the example with learned tokens marked.

use std::fs;

use serde_json::Value;

use crate::common::*;

/// The numbers of a line such as "tokens: 1391 total, 848 supervised (61.0%), ...".
fn numbers(line: &str) -> Vec<f64> {
    line.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.trim_matches('.').parse().ok())
        .collect()
}

fn line<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stdout}"))
}

/// The ⟦...⟧ spans of `text`.
fn learned(text: &str) -> Vec<&str> {
    text.split('⟦')
        .skip(1)
        .map(|s| s.split_once('⟧').expect("unclosed ⟦").0)
        .collect()
}

#[test]
fn inspect_shows_tokens_supervision_and_the_learned_tokens() {
    let tmp = Tmp::new("inspect");
    let m = model(&tmp);
    let data = fixture("data/support/validation.jsonl");
    let r = whet(["data", "inspect", "--data", s(&data), "--model", s(&m)]).ok();
    let out = &r.stdout;
    let rows = fs::read_to_string(&data).unwrap().lines().count() as f64;
    let read = numbers(line(out, "rows read:"));
    assert_eq!(read[..2], [rows, rows], "{out}");

    let t = numbers(line(out, "tokens:"));
    let (total, supervised, pct) = (t[0], t[1], t[2]);
    assert!(total > rows * 20.0, "{out}");
    assert!(
        supervised > 0.0 && supervised < total,
        "chat data learns the assistant turns only:\n{out}"
    );
    assert!(
        (pct - 100.0 * supervised / total).abs() < 0.051,
        "supervised ratio {pct}% vs {supervised}/{total}"
    );
    assert!(
        line(out, "BOS:").contains(&format!("learned in {rows}/{rows}")),
        "{out}"
    );

    // The marked example: the assistant answer (and its end-of-turn) is learned, the rest is not.
    let first: Value =
        serde_json::from_str(fs::read_to_string(&data).unwrap().lines().next().unwrap()).unwrap();
    let turn = |role: &str| {
        first["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["role"] == role)
            .unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let example = out
        .split_once("(learned tokens in ⟦ ⟧):\n")
        .expect("no marked example")
        .1;
    let spans = learned(example);
    assert_eq!(
        spans.len(),
        1,
        "one assistant turn, one learned span: {example}"
    );
    assert_eq!(
        spans[0],
        format!("{}<|im_end|>", turn("assistant")),
        "{example}"
    );
    assert!(example.contains(&turn("user")) && !spans[0].contains(&turn("user")));
    assert!(example.contains(&turn("system")) && !spans[0].contains(&turn("system")));
    assert!(example.contains("<|im_start|>assistant\n⟦"), "{example}");
}

#[test]
fn inspect_counts_duplicates_and_train_validation_leakage() {
    let tmp = Tmp::new("inspect-leak");
    let m = model(&tmp);
    let lines: Vec<String> = CHATS.iter().map(|(u, a)| chat(u, a)).collect();
    let train = tmp.join("train.jsonl");
    write(&train, &format!("{}\n{}\n", lines.join("\n"), lines[2]));
    let val = tmp.join("val.jsonl");
    write(
        &val,
        &format!(
            "{}\n{}\n",
            lines[5],
            chat("Where is my parcel?", "We do not ship parcels, sorry.")
        ),
    );
    let r = whet([
        "data",
        "inspect",
        "--data",
        s(&train),
        "--validation",
        s(&val),
        "--model",
        s(&m),
        "--format",
        "chat",
    ])
    .ok();
    assert_eq!(
        numbers(line(&r.stdout, "duplicates:"))[..2],
        [1.0, 8.0],
        "{}",
        r.stdout
    );
    assert!(
        line(&r.stdout, "leakage:").contains("50.0% of 2 validation examples"),
        "{}",
        r.stdout
    );

    // Truncation is reported: 40 tokens hold every prompt but cut most answers.
    let r = whet([
        "data",
        "inspect",
        "--data",
        s(&train),
        "--model",
        s(&m),
        "--max-len",
        "40",
    ])
    .ok();
    let trunc = numbers(line(&r.stdout, "truncated to 40:"));
    assert!(
        trunc[1] > 0.0 && trunc[2] > 0.0,
        "no truncation reported:\n{}",
        r.stdout
    );
    let total = numbers(line(&r.stdout, "tokens:"))[0];
    assert!(
        total > 0.0 && total <= 9.0 * 40.0,
        "no example is longer than 40 tokens:\n{}",
        r.stdout
    );
}

/// `--pairs`: preference pairs as a `[preference]` run reads them, implicit prompts included.
#[test]
fn inspect_pairs_shows_kept_pairs_pii_duplicates_leakage_and_both_sides() {
    let tmp = Tmp::new("inspect-pairs");
    let m = model(&tmp);
    let pair = |u: &str, a: &str| {
        serde_json::json!({
            "prompt": [{"role": "user", "content": u}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": "No."}],
        })
        .to_string()
    };
    let implicit = serde_json::json!({
        "chosen": [{"role": "user", "content": "Mail bob@example.com"},
                   {"role": "assistant", "content": "Sent."}],
        "rejected": [{"role": "user", "content": "Mail bob@example.com"},
                     {"role": "assistant", "content": "Later."}],
    })
    .to_string();
    let train = tmp.join("pairs.jsonl");
    let lines = [
        pair("Hi", "Hello! How can I help?"),
        pair("Reset my router", "Unplug it for ten seconds."),
        pair("Hi", "Hello! How can I help?"),
        implicit,
    ];
    write(&train, &(lines.join("\n") + "\n"));
    let val = tmp.join("val_pairs.jsonl");
    write(
        &val,
        &(pair("Reset my router", "Unplug it for ten seconds.") + "\n"),
    );
    let r = whet([
        "data",
        "inspect",
        "--pairs",
        "--data",
        s(&train),
        "--validation",
        s(&val),
        "--model",
        s(&m),
    ])
    .ok();
    let out = &r.stdout;
    assert!(line(out, "rows read:").contains("pairs: 4"), "{out}");
    assert!(
        line(out, "pairs tokenized").contains("3 of 3 kept"),
        "{out}"
    );
    assert!(
        line(out, "PII:").contains("1 pair(s)") && out.contains("email=1"),
        "{out}"
    );
    assert_eq!(numbers(line(out, "duplicates:"))[..2], [1.0, 3.0], "{out}");
    assert!(
        line(out, "leakage:").contains("100.0% of 1 validation pairs"),
        "{out}"
    );
    assert!(
        out.contains("chosen:\n") && out.contains("rejected:\n"),
        "{out}"
    );
    assert!(out.contains("⟦Hello! How can I help?"), "{out}");
    assert!(out.contains("⟦No."), "{out}");
}
