//! `whet eval` with and without the trained adapter, and `whet merge`.

use std::fs;

use serde_json::Value;

use crate::common::*;

fn eval(model: &str, adapter: Option<&str>, data: &str) -> (f64, f64, u64) {
    let mut args = vec!["eval", "--model", model, "--data", data, "--format", "chat"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    let v = whet(&args).ok().json();
    let loss = v["loss"].as_f64().unwrap_or_else(|| panic!("no loss: {v}"));
    let ppl = v["perplexity"]
        .as_f64()
        .unwrap_or_else(|| panic!("no perplexity: {v}"));
    let tokens = v["tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tokens: {v}"));
    (loss, ppl, tokens)
}

#[test]
fn eval_reports_loss_perplexity_and_tokens_and_sees_the_adapter() {
    let tmp = Tmp::new("eval");
    let (m, out) = trained_chat_run(&tmp);
    let val = tmp.join("val.jsonl");
    let adapter = out.join("adapter");
    let (tuned, ppl, tokens) = eval(s(&m), Some(s(&adapter)), s(&val));
    assert!(tuned.is_finite() && tuned > 0.0, "{tuned}");
    assert!(
        ((ppl - tuned.exp()) / ppl).abs() < 1e-9,
        "perplexity {ppl} != exp({tuned})"
    );
    assert!(tokens > 0);
    let (base, _, base_tokens) = eval(s(&m), None, s(&val));
    assert_eq!(
        tokens, base_tokens,
        "the same supervised tokens with and without the adapter"
    );
    assert!(
        (base - tuned).abs() > 1e-3,
        "the adapter changed nothing: {base} vs {tuned}"
    );

    // The same numbers as the training report (same reading, template, masks).
    let report: Value =
        serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
    assert!(
        (report["before"]["val_loss"].as_f64().unwrap() - base).abs() < 1e-4,
        "{report}"
    );
    assert!(
        (report["after"]["val_loss"].as_f64().unwrap() - tuned).abs() < 1e-4,
        "{report}"
    );
    assert_eq!(report["after"]["val_tokens"].as_u64(), Some(tokens));
}

#[test]
fn merge_folds_the_adapter_into_an_equivalent_hf_folder() {
    let tmp = Tmp::new("merge");
    let (m, out) = trained_chat_run(&tmp);
    let adapter = out.join("adapter");
    let merged = tmp.join("merged");
    let v = whet([
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ])
    .ok()
    .json();
    let diff = v["max_abs_logit_diff"]
        .as_f64()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        (0.0..1e-4).contains(&diff),
        "merged logits differ by {diff}"
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(f).is_file(), "merge did not write {f}");
    }
    let header = safetensors_header(&merged.join("model.safetensors"));
    assert!(
        header.contains_key("model.layers.0.self_attn.q_proj.weight"),
        "{:?}",
        header.keys()
    );
    assert!(
        !header.keys().any(|k| k.contains("lora")),
        "LoRA tensors left in the merged model"
    );
    // The merged weights really differ from the base ones.
    assert_ne!(
        fs::read(merged.join("model.safetensors")).unwrap(),
        fs::read(m.join("model.safetensors")).unwrap()
    );

    let val = tmp.join("val.jsonl");
    let (with_adapter, _, n1) = eval(s(&m), Some(s(&adapter)), s(&val));
    let (merged_loss, _, n2) = eval(s(&merged), None, s(&val));
    assert_eq!(n1, n2);
    assert!(
        (with_adapter - merged_loss).abs() < 1e-4,
        "adapter {with_adapter} vs merged {merged_loss}"
    );

    // The merged folder is a complete model: chat generation matches the adapter's.
    let generate = |args: &[&str]| {
        let mut a = vec![
            "generate",
            "--chat",
            "--prompt",
            "Slow Wi-Fi",
            "--max-new-tokens",
            "8",
        ];
        a.extend_from_slice(args);
        whet(&a).ok().stdout
    };
    assert_eq!(
        generate(&["--model", s(&merged)]),
        generate(&["--model", s(&m), "--adapter", s(&adapter)])
    );

    // Into the base model's own folder (files whet did not write there): refused, untouched.
    let base = snapshot(&m);
    let r = whet([
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&adapter),
        "--out",
        s(&m),
    ])
    .fails();
    assert!(r.stderr.contains("whet convert"), "{}", r.stderr);
    assert_eq!(
        snapshot(&m),
        base,
        "merge wrote into the base model's folder"
    );
    let r = whet([
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&adapter),
        "--out",
        s(&tmp.join("val.jsonl")),
    ])
    .fails();
    assert!(r.stderr.contains("not a folder"), "{}", r.stderr);
    // Again into its own folder: replaced whole.
    let before = snapshot(&merged);
    whet([
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ])
    .ok();
    assert_eq!(snapshot(&merged), before);

    // Without an adapter there is nothing to merge.
    let r = whet(["merge", "--model", s(&m), "--out", s(&tmp.join("nothing"))]).fails();
    assert!(r.stderr.contains("--adapter"), "{}", r.stderr);
}
