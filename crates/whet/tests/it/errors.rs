//! Bad input: clear errors, non-zero exits, and nothing of an earlier run damaged.

use crate::common::*;

#[test]
fn an_unknown_config_key_is_named_with_a_suggestion() {
    let tmp = Tmp::new("unknown-key");
    let m = model(&tmp);
    chat_data(&tmp);
    let cfg = config(
        &tmp,
        &m,
        &CHAT_RUN.replace("eval_every = 3", "eval_evry = 3"),
    );
    let r = whet(["train", "--config", s(&cfg)]).fails();
    assert!(r.stderr.contains("eval_evry"), "{}", r.stderr);
    assert!(
        r.stderr.contains("did you mean `eval_every`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(s(&cfg)),
        "the config file is not named:\n{}",
        r.stderr
    );
    assert!(
        !tmp.join("out").exists(),
        "a rejected config created its output folder"
    );

    // The same through --set.
    let cfg = config(&tmp, &m, CHAT_RUN);
    let r = whet(["train", "--config", s(&cfg), "--set", "train.max_step=3"]).fails();
    assert!(
        r.stderr.contains("max_step") && r.stderr.contains("did you mean `max_steps`"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_zero_learning_rate_is_refused() {
    let tmp = Tmp::new("lr0");
    let m = model(&tmp);
    chat_data(&tmp);
    let cfg = config(&tmp, &m, CHAT_RUN);
    let r = whet(["train", "--config", s(&cfg), "--set", "train.lr=0"]).fails();
    assert!(
        r.stderr.contains("train.lr") && r.stderr.contains("learning rate"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_malformed_jsonl_line_is_named_by_file_and_line() {
    let tmp = Tmp::new("bad-jsonl");
    let m = model(&tmp);
    chat_data(&tmp);
    let lines = [
        chat("a", "b"),
        chat("c", "d"),
        chat("e", "f"),
        "{\"messages\": [ broken".to_string(),
        chat("g", "h"),
    ];
    let bad = tmp.join("bad.jsonl");
    write(&bad, &(lines.join("\n") + "\n"));
    let cfg = config(
        &tmp,
        &m,
        &CHAT_RUN.replace("train = \"train.jsonl\"", "train = \"bad.jsonl\""),
    );
    let r = whet(["train", "--config", s(&cfg)]).fails();
    assert!(
        r.stderr.contains(s(&bad)),
        "the file is not named:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("row 4") || r.stderr.contains("line 4"),
        "the line is not named:\n{}",
        r.stderr
    );
    assert!(!tmp.join("out/metrics.jsonl").exists());

    // `whet eval` reads the same way.
    let r = whet(["eval", "--model", s(&m), "--data", s(&bad)]).fails();
    assert!(
        r.stderr.contains("bad.jsonl")
            && (r.stderr.contains("row 4") || r.stderr.contains("line 4")),
        "{}",
        r.stderr
    );
}

#[test]
fn an_output_folder_of_another_run_is_refused_and_left_intact() {
    let tmp = Tmp::new("foreign");
    let (_, out) = trained_chat_run(&tmp);
    let before = snapshot(&out);
    assert!(before.keys().any(|p| p.starts_with("checkpoint-000006")));
    let r = whet([
        "train",
        "--config",
        s(&tmp.join("run.toml")),
        "--set",
        "train.lr=2e-2",
    ])
    .fails();
    assert!(r.stderr.contains("different run"), "{}", r.stderr);
    assert!(
        r.stderr.contains(s(&out)),
        "the folder is not named:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("output.dir"),
        "no way out is suggested:\n{}",
        r.stderr
    );
    let after = snapshot(&out);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files appeared or vanished"
    );
    for (path, bytes) in &before {
        assert!(after[path] == *bytes, "{} changed", path.display());
    }
}

#[test]
fn a_missing_model_folder_is_named() {
    let tmp = Tmp::new("no-model");
    let missing = tmp.join("nonexistent");
    let r = whet(["generate", "--model", s(&missing), "--prompt", "hi"]).fails();
    assert!(r.stderr.contains(s(&missing)), "{}", r.stderr);
    let r = whet(["generate", "--model", "/nonexistent", "--prompt", "hi"]).fails();
    assert!(r.stderr.contains("/nonexistent"), "{}", r.stderr);
    let m = model(&tmp);
    let r = whet([
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&tmp.join("missing.jsonl")),
    ])
    .fails();
    assert!(r.stderr.contains("missing.jsonl"), "{}", r.stderr);
    // A missing adapter folder is named too.
    let r = whet([
        "generate",
        "--model",
        s(&m),
        "--adapter",
        s(&tmp.join("no-adapter")),
        "--prompt",
        "hi",
    ])
    .fails();
    assert!(r.stderr.contains("no-adapter"), "{}", r.stderr);
}
