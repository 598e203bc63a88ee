//! Continuing a run: `[model] adapter = DIR` starts LoRA training from an existing adapter,
//! records where it came from, and refuses `[lora]` settings that contradict the adapter.

use std::fs;

use serde_json::Value;

use crate::common::*;

/// `CHAT_RUN` into `out2`, one step over every row (micro-batch 8), from `adapter`, with
/// `extra` appended to the `[model]` section.
fn continued(tmp: &Tmp, m: &std::path::Path, adapter: &str, lora: &str) -> std::path::PathBuf {
    let body = CHAT_RUN
        .replace("dir = \"out\"", "dir = \"out2\"")
        .replace("max_steps = 6", "max_steps = 1")
        .replace("micro_batch = 2", "micro_batch = 8")
        .replace("[lora]\nr = 4\nalpha = 8.0\ndropout = 0.0\n", lora);
    let cfg = config(tmp, m, &body);
    let text = fs::read_to_string(&cfg).unwrap();
    write(&cfg, &format!("{text}adapter = {adapter:?}\n"));
    cfg
}

#[test]
fn training_from_an_adapter_starts_at_its_loss_and_records_where_it_came_from() {
    let tmp = Tmp::new("continue");
    let (m, out) = trained_chat_run(&tmp);
    let first_run = fs::read_to_string(out.join(".whet-run")).unwrap();

    // Whole-set loss of the finished adapter on the training data, as `whet eval` sees it.
    let eval = whet([
        "eval",
        "--model",
        s(&m),
        "--adapter",
        s(&out.join("adapter")),
        "--data",
        s(&tmp.join("train.jsonl")),
        "--format",
        "chat",
        "--max-len",
        "64",
    ])
    .ok()
    .json();
    let adapter_loss = eval["loss"].as_f64().unwrap();

    // No [lora] keys at all: the adapter's settings are the run's.
    let cfg = continued(&tmp, &m, "out/adapter", "");
    let r = whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    assert!(
        r.stderr.contains("continuing from the adapter"),
        "{}",
        r.stderr
    );
    let out2 = tmp.join("out2");
    let first = series(&out2, "train", "loss")[0].1;
    assert!(
        (first - adapter_loss).abs() < 1e-4 * adapter_loss,
        "first step {first} vs the adapter's loss {adapter_loss}"
    );
    let fresh = series(&out, "train", "loss")[0].1;
    assert!(
        first < fresh - 0.01,
        "from the adapter {first} vs from scratch {fresh}"
    );

    // Provenance: the adapter, its hash and the run that wrote it.
    let report: Value =
        serde_json::from_slice(&fs::read(out2.join("report.json")).unwrap()).unwrap();
    let from = &report["continued_from"];
    assert_eq!(
        from["adapter"].as_str(),
        Some(s(&out.join("adapter"))),
        "{from}"
    );
    assert!(first_run.contains(from["run"].as_str().unwrap()), "{from}");
    let sha = from["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
    let md = fs::read_to_string(out2.join("report.md")).unwrap();
    assert!(md.contains("Continued from the adapter"), "{md}");
    // The resolved config names the adapter and carries its LoRA settings.
    let ckpt = fs::read_dir(&out2)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .expect("a checkpoint");
    let resolved: toml::Table =
        toml::from_str(&fs::read_to_string(ckpt.join("config.toml")).unwrap()).unwrap();
    assert_eq!(
        resolved["model"]["adapter"].as_str(),
        Some(s(&out.join("adapter")))
    );
    assert_eq!(resolved["lora"]["r"].as_integer(), Some(4));
    assert_eq!(resolved["lora"]["alpha"].as_float(), Some(8.0));
}

#[test]
fn lora_settings_that_contradict_the_adapter_are_errors() {
    let tmp = Tmp::new("continue-bad");
    let m = model(&tmp);
    chat_data(&tmp);
    // The tiny golden LoRA is r = 4, alpha = 8 on every linear layer, PEFT-written; it fits
    // this model's shapes only in name, so a conflict must be found before the weights load.
    let peft = fixture("golden/llama_tiny/lora");
    let cfg = continued(&tmp, &m, s(&peft), "[lora]\nr = 8\n");
    let r = whet(["train", "--config", s(&cfg)]).fails();
    assert!(
        r.stderr.contains("lora.r") && r.stderr.contains("is 8") && r.stderr.contains("has 4"),
        "{}",
        r.stderr
    );
    assert!(!tmp.join("out2").exists(), "nothing is written");

    // Matching keys are fine at load; a full fine-tune from an adapter is not.
    let cfg = continued(&tmp, &m, s(&peft), "[lora]\nr = 4\nalpha = 8.0\n");
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("method = \"lora\"", "method = \"full\"");
    write(&cfg, &text);
    let r = whet(["train", "--config", s(&cfg)]).fails();
    assert!(
        r.stderr.contains("model.adapter") && r.stderr.contains("method"),
        "{}",
        r.stderr
    );
}
