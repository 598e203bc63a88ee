//! `train.k_folds`: k models, each validated on its held-out fold.

use std::fs;

use serde_json::Value;

use crate::common::*;

#[test]
fn two_fold_cross_validation_writes_kfold_json() {
    let tmp = Tmp::new("kfold");
    let m = model(&tmp);
    chat_data(&tmp);
    // One example per row, so rows count examples.
    let body = CHAT_RUN.replace("max_len = 64", "max_len = 64\npack = false");
    let cfg = config(&tmp, &m, &body);
    let r = whet(["train", "--config", s(&cfg), "--set", "train.k_folds=2"]).ok();
    let out = tmp.join("out");
    let report: Value = serde_json::from_slice(&fs::read(out.join("kfold.json")).unwrap()).unwrap();
    assert_eq!(report["k"], 2);
    let folds = report["folds"].as_array().unwrap();
    assert_eq!(folds.len(), 2);
    // The 8 train + 2 validation examples are split between the folds' validation sets.
    let examples = 10;
    let mut held_out = 0;
    for (i, f) in folds.iter().enumerate() {
        assert_eq!(f["fold"], i);
        let (t, v) = (
            f["train_rows"].as_u64().unwrap(),
            f["validation_rows"].as_u64().unwrap(),
        );
        assert_eq!(t + v, examples, "{f}");
        assert!(t > 0 && v > 0, "{f}");
        held_out += v;
        let (base, best) = (
            f["base_val_loss"].as_f64().unwrap(),
            f["best_val_loss"].as_f64().unwrap(),
        );
        assert!(
            best.is_finite() && best < base,
            "fold {i} did not improve: {f}"
        );
        assert!(
            fs::read_to_string(out.join(format!("fold-{i}/metrics.jsonl")))
                .is_ok_and(|m| m.lines().count() >= 6)
        );
        let evals = series(&out.join(format!("fold-{i}")), "eval", "val_loss");
        let min = evals.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        assert_eq!(best, min, "fold {i}: best_val_loss is the best evaluation");
    }
    assert_eq!(held_out, examples, "every example is held out exactly once");
    let losses: Vec<f64> = folds
        .iter()
        .map(|f| f["best_val_loss"].as_f64().unwrap())
        .collect();
    let mean = (losses[0] + losses[1]) / 2.0;
    let std = (losses[0] - losses[1]).abs() / 2.0;
    assert!(
        (report["mean_val_loss"].as_f64().unwrap() - mean).abs() < 1e-12,
        "{report}"
    );
    assert!(
        (report["std_val_loss"].as_f64().unwrap() - std).abs() < 1e-12,
        "{report}"
    );
    assert!(r.stderr.contains("2-fold cross-validation"), "{}", r.stderr);
}

#[test]
fn k_fold_scores_task_metrics_per_fold() {
    let tmp = Tmp::new("kfold-metrics");
    let m = model(&tmp);
    chat_data(&tmp);
    // One example per row, so rows count the examples scored.
    let body = CHAT_RUN
        .replace("max_len = 64", "max_len = 64\npack = false")
        .replace("[eval]\n", "[eval]\nmetrics = [\"chrf\"]\n");
    let cfg = config(&tmp, &m, &body);
    let r = whet(["train", "--config", s(&cfg), "--set", "train.k_folds=2"]).ok();
    assert!(r.stderr.contains("chrf"), "{}", r.stderr);
    let report: Value =
        serde_json::from_slice(&fs::read(tmp.join("out/kfold.json")).unwrap()).unwrap();
    let chrf = |t: &Value| t["values"]["chrf"].as_f64().unwrap();
    let folds = report["folds"].as_array().unwrap();
    let tuned: Vec<f64> = folds.iter().map(|f| chrf(&f["task"])).collect();
    let base: Vec<f64> = folds.iter().map(|f| chrf(&f["base_task"])).collect();
    for f in folds {
        // Every held-out example is scored.
        assert_eq!(f["task"]["n"], f["validation_rows"], "{f}");
    }
    let m = &report["metrics"][0];
    assert_eq!(m["metric"], "chrf");
    assert!((m["mean"].as_f64().unwrap() - (tuned[0] + tuned[1]) / 2.0).abs() < 1e-12);
    assert!((m["std"].as_f64().unwrap() - (tuned[0] - tuned[1]).abs() / 2.0).abs() < 1e-12);
    assert!((m["base_mean"].as_f64().unwrap() - (base[0] + base[1]) / 2.0).abs() < 1e-12);
}

/// `train.select_by` in k-fold: each fold's best checkpoint is its evaluation with the highest
/// metric on its own held-out examples, and the fold's tuned score is that checkpoint's.
#[test]
fn k_fold_folds_select_by_the_metric() {
    let tmp = Tmp::new("kfold-select");
    let m = model(&tmp);
    chat_data(&tmp);
    let body = CHAT_RUN
        .replace("max_len = 64", "max_len = 64\npack = false")
        .replace("[eval]\n", "[eval]\nmetrics = [\"chrf\"]\n")
        .replace(
            "eval_every = 3",
            "eval_every = 2\nselect_by = \"metric:chrf\"",
        );
    let cfg = config(&tmp, &m, &body);
    whet(["train", "--config", s(&cfg), "--set", "train.k_folds=2"]).ok();
    let report: Value =
        serde_json::from_slice(&fs::read(tmp.join("out/kfold.json")).unwrap()).unwrap();
    for (i, f) in report["folds"].as_array().unwrap().iter().enumerate() {
        let evals: Vec<Value> = metrics(&tmp.join(format!("out/fold-{i}")))
            .into_iter()
            .filter(|v| v["kind"] == "eval")
            .collect();
        let chrf: Vec<f64> = evals
            .iter()
            .map(|e| e["task"]["chrf"].as_f64().unwrap())
            .collect();
        let loss: Vec<f64> = evals
            .iter()
            .map(|e| e["val_loss"].as_f64().unwrap())
            .collect();
        let best = (0..chrf.len()).fold(0, |b, j| {
            if chrf[j] > chrf[b] || (chrf[j] == chrf[b] && loss[j] < loss[b]) {
                j
            } else {
                b
            }
        });
        assert_eq!(f["best_step"], evals[best]["step"], "fold {i}: {chrf:?}");
        let tuned = f["task"]["values"]["chrf"].as_f64().unwrap();
        assert!(
            (tuned - chrf[best]).abs() < 1e-12,
            "fold {i}: {tuned} vs {chrf:?}"
        );
    }
}
