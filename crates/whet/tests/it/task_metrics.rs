//! Task metrics (`[eval] metrics`, `whet eval --metric`): greedy completions of the validation
//! examples scored against their references, base vs tuned in the report.

use std::fs;

use serde_json::Value;

use crate::common::*;

/// The values of one side's task scores (`{"accuracy": 0.5, ...}`), sorted by metric name.
fn values(task: &Value) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = task["values"]
        .as_object()
        .unwrap_or_else(|| panic!("{task}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn value(task: &Value, metric: &str) -> f64 {
    task["values"][metric]
        .as_f64()
        .unwrap_or_else(|| panic!("{metric}: {task}"))
}

#[test]
fn a_run_reports_task_metrics_before_and_after() {
    let tmp = Tmp::new("task-metrics");
    let m = model(&tmp);
    chat_data(&tmp);
    let body = CHAT_RUN.replace(
        "[eval]\n",
        "[eval]\nmetrics = [\"exact_match\", \"chrf\", \"accuracy\"]\n",
    );
    let cfg = config(&tmp, &m, &body);
    let r = whet(["train", "--config", s(&cfg)]).ok();
    assert!(r.stderr.contains("exact_match "), "{}", r.stderr);
    let out = tmp.join("out");
    let report: Value =
        serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
    for when in ["before", "after"] {
        let task = &report[when]["task"];
        assert_eq!(task["n"], 2, "{when}: both validation chats are scored");
        let v = values(task);
        let names: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["accuracy", "chrf", "exact_match"], "{when}");
        assert!(
            v.iter().all(|(_, x)| (0.0..=1.0).contains(x)),
            "{when}: {v:?}"
        );
        // Accuracy over the label set of the training and validation answers: its confusion
        // matrix (2 validation answers, 8 distinct labels) agrees with it.
        let c = &task["classification"];
        let confusion: Vec<Vec<u64>> = serde_json::from_value(c["confusion"].clone()).unwrap();
        assert_eq!(confusion.len(), 8, "{c}");
        let total: u64 = confusion.iter().flatten().sum();
        let diagonal: u64 = (0..8).map(|i| confusion[i][i]).sum();
        assert_eq!(total, 2);
        assert_eq!(
            diagonal as f64 / 2.0,
            value(task, "accuracy"),
            "{when}: accuracy = trace / n"
        );
        let other: u64 = confusion.iter().map(|row| row[8]).sum();
        assert_eq!(c["outside_label_set"].as_u64().unwrap(), other);
        assert_eq!(task["samples"].as_array().unwrap().len(), 2);
    }
    let md = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("## Task metrics (2 validation examples")
            && md.contains("| exact_match |")
            && md.contains("Confusion matrix of the tuned model"),
        "{md}"
    );
    assert!(md.contains("| tuned task metrics |"), "{md}");
}

/// `train.select_by = "metric:chrf"`: chrF++ is scored at every evaluation during training, and
/// the best checkpoint is the evaluation with the highest, whatever its loss.
#[test]
fn a_task_metric_selects_the_best_checkpoint() {
    let tmp = Tmp::new("select-by");
    let m = model(&tmp);
    chat_data(&tmp);
    let body = CHAT_RUN
        .replace(
            "[eval]\n",
            "[eval]\nmetrics = [\"chrf\", \"exact_match\"]\n",
        )
        .replace(
            "eval_every = 3",
            "eval_every = 2\nselect_by = \"metric:chrf\"",
        );
    let cfg = config(&tmp, &m, &body);
    let r = whet(["train", "--config", s(&cfg)]).ok();
    assert!(r.stderr.contains(", chrf "), "{}", r.stderr);
    let out = tmp.join("out");
    let evals: Vec<Value> = metrics(&out)
        .into_iter()
        .filter(|v| v["kind"] == "eval")
        .collect();
    assert_eq!(evals.len(), 3, "evaluations at steps 2, 4, 6");
    let chrf: Vec<f64> = evals
        .iter()
        .map(|e| e["task"]["chrf"].as_f64().unwrap_or_else(|| panic!("{e}")))
        .collect();
    // The highest chrF++ is the best, a tie going to the lower validation loss.
    let loss: Vec<f64> = evals
        .iter()
        .map(|e| e["val_loss"].as_f64().unwrap())
        .collect();
    let best = (0..3).fold(0, |b, i| {
        if chrf[i] > chrf[b] || (chrf[i] == chrf[b] && loss[i] < loss[b]) {
            i
        } else {
            b
        }
    });
    let best_step = evals[best]["step"].as_u64().unwrap();
    let report: Value =
        serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["summary"]["best_step"], best_step, "{chrf:?}");
    assert_eq!(report["summary"]["best_metric"].as_f64(), Some(chrf[best]));
    assert_eq!(
        fs::read_to_string(out.join("best")).unwrap().trim(),
        format!("checkpoint-{best_step:06}")
    );
    let md = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("Best checkpoint by chrf (`train.select_by`)")
            && md.contains("### Task metrics during training")
            && md.contains("| task metrics during training |"),
        "{md}"
    );
}

/// `eval.metric_every = 2` scores every second evaluation and the last, without selecting.
#[test]
fn metric_every_scores_metrics_during_training() {
    let tmp = Tmp::new("metric-every");
    let m = model(&tmp);
    chat_data(&tmp);
    let body = CHAT_RUN
        .replace(
            "[eval]\n",
            "[eval]\nmetrics = [\"exact_match\"]\nmetric_every = 2\n",
        )
        .replace("eval_every = 3", "eval_every = 1");
    let cfg = config(&tmp, &m, &body);
    whet(["train", "--config", s(&cfg)]).ok();
    let scored: Vec<u64> = metrics(&tmp.join("out"))
        .iter()
        .filter(|v| v["kind"] == "eval" && v["task"].is_object())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(scored, [2, 4, 6]);
}

#[test]
fn whet_eval_scores_completions_against_references() {
    let tmp = Tmp::new("eval-metric");
    let m = model(&tmp);
    // Prompt/completion pairs whose answers are labels; a reference-free text row would be
    // refused (see below).
    let rows = [
        ("Route: my bill is wrong ->", " billing"),
        ("Route: the internet is down ->", " outage"),
        ("Route: I was charged twice ->", " billing"),
    ];
    let text: Vec<String> = rows
        .iter()
        .map(|(p, c)| serde_json::json!({ "prompt": p, "completion": c }).to_string())
        .collect();
    let data = tmp.join("route.jsonl");
    write(&data, &(text.join("\n") + "\n"));
    let r = whet([
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--max-len",
        "64",
        "--metric",
        "accuracy",
        "--metric",
        "macro_f1",
        "--metric",
        "exact_match",
        "--max-new-tokens",
        "4",
        "--label",
        "billing",
        "--label",
        "outage",
    ])
    .ok();
    let j = r.json();
    let task = &j["metrics"];
    assert_eq!(task["n"], 3, "{j}");
    let c = &task["classification"];
    assert_eq!(c["labels"], serde_json::json!(["billing", "outage"]));
    // accuracy equals exact match here: every reference is a label.
    assert_eq!(
        value(task, "accuracy"),
        value(task, "exact_match"),
        "{task}"
    );
    let per: Vec<f64> = c["per_label"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["f1"].as_f64().unwrap())
        .collect();
    assert!(
        (value(task, "macro_f1") - (per[0] + per[1]) / 2.0).abs() < 1e-12,
        "macro F1 = mean F1"
    );
    assert!(task["hit_token_limit"].as_u64().unwrap() <= 3);

    // A text row has no reference: refused, naming file and row.
    let bad = tmp.join("text.jsonl");
    write(&bad, "{\"text\": \"no answer here\"}\n");
    let r = whet([
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&bad),
        "--metric",
        "exact_match",
    ])
    .fails();
    assert!(
        r.stderr.contains("text.jsonl") && r.stderr.contains("reference"),
        "{}",
        r.stderr
    );
    // An unknown metric name is a usage error (clap's exit 2) that lists the valid ones.
    let r = whet([
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--metric",
        "bleu",
    ]);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("bleu") && r.stderr.contains("chrf"),
        "{}",
        r.stderr
    );
}
