//! Preference tuning end to end: `[preference]` DPO and ORPO on (prompt, chosen, rejected) pairs
//! in the chat and plain-text shapes, the rewards in metrics.jsonl and the report, and the bad
//! pairs (equal sides, an empty side, a prompt with no room for the answers).

use std::fs;

use serde_json::{Value, json};

use crate::common::*;

/// Pairs in TRL's conversational shape: the brand's answer chosen, a curt one rejected.
fn chat_pairs(n: usize) -> String {
    CHATS
        .iter()
        .cycle()
        .take(n)
        .map(|(u, a)| {
            json!({
                "prompt": [{ "role": "user", "content": u }],
                "chosen": [{ "role": "assistant", "content": a }],
                "rejected": [{ "role": "assistant", "content": "No." }],
            })
            .to_string()
                + "\n"
        })
        .collect()
}

fn run_body(loss: &str, extra_data: &str) -> String {
    format!(
        r#"
method = "lora"

[data]
train = "pairs.jsonl"
validation = "val_pairs.jsonl"
max_len = 64
{extra_data}

[lora]
r = 4
alpha = 8.0
dropout = 0.0

[train]
max_steps = 4
micro_batch = 2
lr = 1e-2
eval_every = 2

[preference]
loss = "{loss}"
beta = 0.1

[eval]
max_new_tokens = 4
prompts = ["Hi"]

[output]
dir = "out"
"#
    )
}

fn check_run(tmp: &Tmp, loss: &str) {
    let m = model(tmp);
    write(&tmp.join("pairs.jsonl"), &chat_pairs(8));
    write(&tmp.join("val_pairs.jsonl"), &chat_pairs(3));
    let cfg = config(tmp, &m, &run_body(loss, ""));
    let r = whet(["train", "--config", s(&cfg)]).ok();
    assert!(r.stderr.contains("reward accuracy"), "{}", r.stderr);
    let out = tmp.join("out");
    let lines = metrics(&out);
    let steps: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "train").collect();
    assert_eq!(steps.len(), 4);
    for v in &steps {
        assert!(v["loss"].as_f64().unwrap().is_finite(), "{v}");
        for key in [
            "rewards_chosen",
            "rewards_rejected",
            "reward_margin",
            "reward_accuracy",
        ] {
            assert!(
                v[key].as_f64().is_some_and(f64::is_finite),
                "no {key} in {v}"
            );
        }
        assert_eq!(v["pairs"], 2, "{v}");
    }
    let evals: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    assert!(
        evals
            .iter()
            .all(|e| e["pairs"] == 3 && e["reward_margin"].is_f64())
    );
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for side in ["before", "after"] {
        let p = &report[side]["preference"];
        assert_eq!(p["pairs"], 3, "{report}");
        assert!(p["reward_accuracy"].as_f64().is_some(), "{report}");
        assert!(p["reward_margin"].as_f64().is_some(), "{report}");
    }
    let md = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Preference (3 validation pairs)"), "{md}");
    assert!(md.contains("validation preference loss (3 pairs)"), "{md}");
    assert!(out.join("adapter/adapter_model.safetensors").exists());
}

#[test]
fn dpo_trains_on_chat_pairs_and_reports_rewards() {
    let tmp = Tmp::new("dpo");
    check_run(&tmp, "dpo");
    // The reference is the base: before training every reward, so every margin, is 0.
    let report: Value =
        serde_json::from_str(&fs::read_to_string(tmp.join("out/report.json")).unwrap()).unwrap();
    let before = &report["before"]["preference"];
    assert_eq!(before["reward_margin"].as_f64(), Some(0.0), "{report}");
    let after = &report["after"]["preference"];
    assert!(after["reward_margin"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn orpo_trains_on_chat_pairs_and_reports_rewards() {
    let tmp = Tmp::new("orpo");
    check_run(&tmp, "orpo");
    let steps: Vec<Value> = metrics(&tmp.join("out"))
        .into_iter()
        .filter(|v| v["kind"] == "train")
        .collect();
    assert!(
        steps
            .iter()
            .all(|v| v["nll"].is_f64() && v["log_odds_ratio"].is_f64())
    );
}

fn text_pair(prompt: &str, chosen: &str, rejected: &str) -> String {
    json!({ "prompt": prompt, "chosen": chosen, "rejected": rejected }).to_string() + "\n"
}

/// A plain-text training file of good pairs with `bad` as its line 3.
fn with_bad_row(tmp: &Tmp, bad: &str) {
    let good = text_pair("Q: router?\nA:", " Unplug it for ten seconds.", " No.");
    write(
        &tmp.join("pairs.jsonl"),
        &format!("{good}{good}{bad}{good}"),
    );
    write(&tmp.join("val_pairs.jsonl"), &good);
}

#[test]
fn bad_pairs_are_errors_naming_file_row_and_field_or_counted_skips() {
    let tmp = Tmp::new("pref-bad");
    let m = model(&tmp);
    let long_prompt = "word ".repeat(200);
    let cases = [
        (text_pair("Q?", " Same.", " Same."), "`rejected`", "equals `chosen`"),
        (text_pair("Q?", " ", " No."), "`chosen`", "is empty"),
        (
            json!({ "prompt": [{"role": "user", "content": "Q?"}], "chosen": [], "rejected": [{"role": "assistant", "content": "No."}] }).to_string() + "\n",
            "`chosen`",
            "has no messages",
        ),
        (text_pair(&long_prompt, " Yes.", " No."), "`chosen`", "no room for the answer"),
    ];
    for (bad, field, why) in &cases {
        with_bad_row(&tmp, bad);
        let _ = fs::remove_dir_all(tmp.join("out"));
        let cfg = config(&tmp, &m, &run_body("dpo", ""));
        let r = whet(["train", "--config", s(&cfg)]).fails();
        assert!(r.stderr.contains("pairs.jsonl: row 3"), "{}", r.stderr);
        assert!(
            r.stderr.contains(field) && r.stderr.contains(why),
            "{}",
            r.stderr
        );

        let _ = fs::remove_dir_all(tmp.join("out"));
        let cfg = config(&tmp, &m, &run_body("dpo", "skip_invalid = true"));
        whet(["train", "--config", s(&cfg)]).ok();
        let report: Value =
            serde_json::from_str(&fs::read_to_string(tmp.join("out/report.json")).unwrap())
                .unwrap();
        let data = &report["data"];
        let skipped = data["train_read"]["skipped"]
            .as_object()
            .map_or(0, |m| m.values().map(|v| v.as_u64().unwrap()).sum::<u64>())
            + data["train_pairs"]["pairs_skipped"].as_u64().unwrap();
        assert_eq!(skipped, 1, "{bad}: {data}");
        assert_eq!(data["train_pairs"]["pairs_out"], 3, "{bad}: {data}");
    }
}

/// Full fine-tuning has no adapter to switch off: DPO's reference log-probabilities are computed
/// once before training. The first step's policy is the reference (loss ln 2) and the tuned
/// model's validation margin is measured against the same numbers.
#[test]
fn full_fine_tuning_dpo_runs_against_a_precomputed_reference() {
    let tmp = Tmp::new("pref-full");
    let m = model(&tmp);
    write(&tmp.join("pairs.jsonl"), &chat_pairs(8));
    write(&tmp.join("val_pairs.jsonl"), &chat_pairs(3));
    let body = run_body("dpo", "").replace("method = \"lora\"", "method = \"full\"");
    let cfg = config(&tmp, &m, &body.replace("lr = 1e-2", "lr = 1e-3"));
    let r = whet(["train", "--config", s(&cfg)]).ok();
    assert!(
        r.stderr
            .contains("reference log-probabilities of 16 training and 6 validation rows"),
        "{}",
        r.stderr
    );
    let out = tmp.join("out");
    let lines = metrics(&out);
    let first = lines.iter().find(|v| v["kind"] == "train").unwrap();
    assert!(
        (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5,
        "{first}"
    );
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let before = report["before"]["preference"]["reward_margin"]
        .as_f64()
        .unwrap();
    assert!(before.abs() < 1e-6, "the base is the reference: {report}");
    assert!(report["after"]["preference"]["reward_margin"].is_f64());
    assert!(report["time"]["reference_s"].as_f64().unwrap() > 0.0);
    assert!(out.join("model/model.safetensors").exists());

    // Cached with the tokenized data: a second run reads the reference back, to the same run.
    let r = whet([
        "train",
        "--config",
        s(&cfg),
        "--set",
        &format!("output.dir={}", s(&tmp.join("again"))),
    ])
    .ok();
    assert!(
        r.stderr
            .contains("reference log-probabilities from the cache"),
        "{}",
        r.stderr
    );
    let losses = |out: &std::path::Path| -> Vec<f64> {
        metrics(out)
            .iter()
            .filter_map(|v| v["loss"].as_f64().or(v["val_loss"].as_f64()))
            .collect()
    };
    assert_eq!(losses(&tmp.join("again")), losses(&out));
}

/// With LoRA the precomputed reference (`preference.precompute_reference`) gives the numbers of
/// the adapter-off forward it replaces.
#[test]
fn a_precomputed_lora_reference_gives_the_same_run() {
    let run = |extra: &str| {
        let tmp = Tmp::new("pref-precompute");
        let m = model(&tmp);
        write(&tmp.join("pairs.jsonl"), &chat_pairs(8));
        write(&tmp.join("val_pairs.jsonl"), &chat_pairs(3));
        let body = run_body("dpo", "").replace("beta = 0.1", &format!("beta = 0.1\n{extra}"));
        let cfg = config(&tmp, &m, &body);
        whet(["train", "--config", s(&cfg)]).ok();
        let losses: Vec<f64> = metrics(&tmp.join("out"))
            .iter()
            .map(|v| {
                v[if v["kind"] == "train" {
                    "loss"
                } else {
                    "val_loss"
                }]
                .as_f64()
                .unwrap()
            })
            .collect();
        losses
    };
    let (live, pre) = (run(""), run("precompute_reference = true"));
    assert_eq!(live.len(), pre.len());
    for (a, b) in live.iter().zip(&pre) {
        assert!((a - b).abs() < 1e-4, "{live:?} vs {pre:?}");
    }
}

#[test]
fn ipo_trains_on_chat_pairs_and_reports_rewards() {
    let tmp = Tmp::new("ipo");
    check_run(&tmp, "ipo");
}

/// Compliance and forgetting checks apply to preference runs too: PII in the pairs is redacted
/// (the shared prompt counted once per pair), duplicate pairs dropped, and general text and
/// named sets scored before, during and after.
#[test]
fn preference_runs_scrub_dedup_and_score_general_text_and_sets() {
    let tmp = Tmp::new("pref-compliance");
    let m = model(&tmp);
    let mut pairs = chat_pairs(6);
    pairs.push_str(&chat_pairs(1)); // the first pair again: a duplicate
    pairs.push_str(
        &(json!({
            "prompt": [{ "role": "user", "content": "Mail ada@example.com about my bill" }],
            "chosen": [{ "role": "assistant", "content": "Done, ada@example.com is on it." }],
            "rejected": [{ "role": "assistant", "content": "No." }],
        })
        .to_string()
            + "\n"),
    );
    write(&tmp.join("pairs.jsonl"), &pairs);
    write(&tmp.join("val_pairs.jsonl"), &chat_pairs(3));
    write(
        &tmp.join("general.jsonl"),
        "{\"text\":\"The quick brown fox jumps over the lazy dog.\"}\n",
    );
    let body = run_body("dpo", "scrub_pii = true\ndedup = true").replace(
        "[eval]\n",
        "[eval]\ngeneral_data = \"general.jsonl\"\nsets = [{ name = \"fox\", path = \"general.jsonl\" }]\n",
    );
    let cfg = config(&tmp, &m, &body);
    whet(["train", "--config", s(&cfg)]).ok();
    let out = tmp.join("out");
    let audit: Value =
        serde_json::from_str(&fs::read_to_string(out.join("pii_audit.json")).unwrap()).unwrap();
    assert_eq!(audit["examples_touched"], 1, "{audit}");
    assert_eq!(
        audit["redactions"]["email"], 2,
        "once in the shared prompt, once in the chosen answer: {audit}"
    );
    let report: Value =
        serde_json::from_str(&fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let data = &report["data"];
    assert_eq!(
        (&data["dedup"]["input"], &data["dedup"]["kept"]),
        (&json!(8), &json!(7)),
        "{data}"
    );
    assert_eq!(data["train_pairs"]["pairs_out"], 7, "{data}");
    assert!(data["leakage"].is_object(), "{data}");
    for side in ["before", "after"] {
        assert!(report[side]["general_loss"].is_f64(), "{report}");
        assert_eq!(report[side]["sets"][0]["name"], "fox", "{report}");
    }
    let evals: Vec<Value> = metrics(&out)
        .into_iter()
        .filter(|v| v["kind"] == "eval")
        .collect();
    assert!(
        evals.iter().all(|e| e["sets"][0]["name"] == "fox"),
        "{evals:?}"
    );
}
