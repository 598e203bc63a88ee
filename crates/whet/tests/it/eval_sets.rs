//! `[eval] sets`: named evaluation sets scored at every evaluation, in metrics.jsonl and the
//! report, without changing the run.

use std::fs;

use serde_json::Value;

use crate::common::*;

const SETS: &str = r#"[eval]
sets = [
    { name = "faq", path = "val.jsonl", format = "chat" },
    { name = "prose", path = "general.jsonl", format = "text" },
]
"#;

#[test]
fn named_sets_are_in_metrics_and_report_and_change_nothing_else() {
    let plain = Tmp::new("sets-plain");
    let (_, plain_out) = trained_chat_run(&plain);

    let tmp = Tmp::new("sets");
    let m = model(&tmp);
    chat_data(&tmp);
    let cfg = config(&tmp, &m, &CHAT_RUN.replace("[eval]\n", SETS));
    let r = whet(["train", "--config", s(&cfg)]).ok();
    assert!(r.stderr.contains("faq: loss"), "{}", r.stderr);
    let out = tmp.join("out");

    // The run itself is the same, bit for bit.
    assert_eq!(
        series(&out, "train", "loss"),
        series(&plain_out, "train", "loss")
    );
    assert_eq!(
        series(&out, "eval", "val_loss"),
        series(&plain_out, "eval", "val_loss")
    );

    let evals: Vec<Value> = metrics(&out)
        .into_iter()
        .filter(|v| v["kind"] == "eval")
        .collect();
    assert_eq!(evals.len(), 2);
    for e in &evals {
        let sets = e["sets"].as_array().unwrap_or_else(|| panic!("{e}"));
        let names: Vec<&str> = sets.iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["faq", "prose"], "{e}");
        // `faq` is the validation file: the same loss.
        let (faq, val) = (
            sets[0]["loss"].as_f64().unwrap(),
            e["val_loss"].as_f64().unwrap(),
        );
        assert!((faq - val).abs() < 1e-5 * val, "{faq} vs {val}");
        assert!(sets[1]["tokens"].as_u64().unwrap() > 0, "{e}");
    }
    // A plain run's eval lines carry no `sets` key.
    assert!(metrics(&plain_out).iter().all(|v| v.get("sets").is_none()));

    let report: Value =
        serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
    for when in ["before", "after"] {
        let sets = report[when]["sets"]
            .as_array()
            .unwrap_or_else(|| panic!("{report}"));
        assert_eq!(sets.len(), 2, "{when}");
    }
    let md = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| `faq` loss (") && md.contains("| `prose` loss ("),
        "{md}"
    );
}

#[test]
fn set_names_must_be_distinct() {
    let tmp = Tmp::new("sets-bad");
    let m = model(&tmp);
    chat_data(&tmp);
    let body = CHAT_RUN.replace(
        "[eval]\n",
        "[eval]\nsets = [{ name = \"a\", path = \"val.jsonl\" }, { name = \"a\", path = \"general.jsonl\" }]\n",
    );
    let cfg = config(&tmp, &m, &body);
    let r = whet(["train", "--config", s(&cfg)]).fails();
    assert!(r.stderr.contains("eval.sets[1].name"), "{}", r.stderr);
    assert!(!tmp.join("out").exists());
}
