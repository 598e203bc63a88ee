//! `whet train` end to end: metrics, plot, report, PEFT adapter, checkpoints with the resolved
//! config.

use std::fs;

use serde_json::Value;

use crate::common::*;

#[test]
fn a_lora_chat_run_writes_metrics_plot_report_adapter_and_checkpoints() {
    let tmp = Tmp::new("train");
    let (m, out) = trained_chat_run(&tmp);

    // metrics.jsonl: one train line per step, evaluations at 3 and 6.
    let train = series(&out, "train", "loss");
    assert_eq!(
        train.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert!(
        train.iter().all(|p| p.1.is_finite() && p.1 > 0.0),
        "{train:?}"
    );
    for v in metrics(&out).iter().filter(|v| v["kind"] == "train") {
        assert_eq!(v["total_steps"], 6);
        assert!(
            v["supervised_tokens"].as_u64().unwrap() > 0 && v["tokens"].as_u64().unwrap() > 0,
            "{v}"
        );
        assert!(v["grad_norm"].as_f64().unwrap().is_finite(), "{v}");
        assert!(
            v["lr"].as_f64().unwrap() > 0.0 && v["lr"].as_f64().unwrap() <= 1e-2,
            "{v}"
        );
    }
    let evals = series(&out, "eval", "val_loss");
    assert_eq!(evals.iter().map(|p| p.0).collect::<Vec<_>>(), vec![3, 6]);

    // loss.svg: an SVG document with one marker per evaluation.
    let svg = fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(
        svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG document"
    );
    assert!(svg.contains("xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.contains("<polyline"), "no curve drawn");
    assert_eq!(
        svg.matches("<circle").count(),
        evals.len(),
        "one validation marker per evaluation"
    );
    assert_eq!(
        svg.matches("<text").count(),
        svg.matches("</text>").count(),
        "unbalanced <text>"
    );

    // report.json: base vs tuned, consistent with the metrics.
    let report: Value =
        serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
    let (before, after) = (&report["before"], &report["after"]);
    for side in [before, after] {
        assert!(side["val_loss"].as_f64().unwrap().is_finite(), "{side}");
        assert!(side["general_loss"].as_f64().unwrap().is_finite(), "{side}");
        assert!(
            side["val_tokens"].as_u64().unwrap() > 0
                && side["general_tokens"].as_u64().unwrap() > 0,
            "{side}"
        );
    }
    let best_eval = evals.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let tuned = after["val_loss"].as_f64().unwrap();
    assert!(
        (tuned - best_eval).abs() < 1e-6,
        "the tuned model is the best checkpoint: {tuned} vs {best_eval}"
    );
    assert_ne!(
        before["val_loss"], after["val_loss"],
        "training changed nothing"
    );
    assert_eq!(report["summary"]["steps"], 6);
    let gens = report["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 2);
    assert_eq!(gens[0]["prompt"], "Hi");
    assert_eq!(gens[1]["prompt"], "Slow Wi-Fi");

    // report.md: a base and a tuned column with those numbers, and the prompts.
    let md = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| | base | tuned | change |"), "{md}");
    let row = md
        .lines()
        .find(|l| l.starts_with("| validation loss"))
        .expect("a validation loss row");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(
        cells[2],
        format!("{:.4}", before["val_loss"].as_f64().unwrap()),
        "{row}"
    );
    assert_eq!(cells[3], format!("{:.4}", tuned), "{row}");
    assert!(
        md.lines().any(|l| l.starts_with("| general-text loss")),
        "{md}"
    );
    assert!(
        md.contains("> Hi\n") && md.contains("> Slow Wi-Fi\n"),
        "prompts missing:\n{md}"
    );
    assert!(
        md.contains("**Base model**") && md.contains("**Tuned model**"),
        "{md}"
    );
    assert!(md.contains("loss.svg"));

    // Where the time went: every part measured, none more than the wall time, the steps and
    // the evaluations non-zero, and the same split in report.md.
    let time = &report["time"];
    let wall = report["wall_time_s"].as_f64().unwrap();
    let part = |k: &str| {
        time[k]
            .as_f64()
            .unwrap_or_else(|| panic!("time.{k}: {time}"))
    };
    let train_part = |k: &str| {
        time["train"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("time.train.{k}: {time}"))
    };
    let parts = [
        part("data_s"),
        part("load_s"),
        part("base_eval_s"),
        part("base_generate_s"),
        train_part("steps_s"),
        train_part("eval_s"),
        train_part("checkpoint_s"),
        part("save_s"),
        part("tuned_eval_s"),
        part("tuned_generate_s"),
    ];
    assert!(parts.iter().all(|t| *t >= 0.0), "{time}");
    assert!(parts.iter().sum::<f64>() <= wall, "{time} vs wall {wall}");
    for k in ["steps_s", "eval_s"] {
        assert!(train_part(k) > 0.0, "time.train.{k}: {time}");
    }
    assert!(
        part("base_generate_s") > 0.0 && part("tuned_eval_s") > 0.0,
        "{time}"
    );
    assert!(md.contains("## Where the time went"), "{md}");
    let steps_row = md
        .lines()
        .find(|l| l.starts_with("| training steps |"))
        .expect("a training-steps row");
    assert_eq!(
        steps_row.split('|').nth(2).map(str::trim),
        Some(format!("{:.1}", train_part("steps_s")).as_str()),
        "{steps_row}"
    );

    // The PEFT adapter.
    let adapter = out.join("adapter");
    let ac: Value =
        serde_json::from_slice(&fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["r"], 4);
    assert_eq!(ac["lora_alpha"].as_f64(), Some(8.0));
    let header = safetensors_header(&adapter.join("adapter_model.safetensors"));
    let a = &header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert_eq!(a["shape"], serde_json::json!([4, 64]), "{a}");
    let b = &header["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert_eq!(b["shape"], serde_json::json!([64, 4]), "{b}");
    // all-linear on 2 layers: 7 projections x (A, B) x 2.
    assert_eq!(header.len(), 28, "{:?}", header.keys());
    assert!(
        header
            .keys()
            .all(|k| k.starts_with("base_model.model.model.layers.")
                && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")))
    );

    // Checkpoints at the evaluations, each with the resolved config.
    for step in [3, 6] {
        let dir = out.join(format!("checkpoint-{step:06}"));
        assert!(
            dir.join("adapter_model.safetensors").is_file(),
            "{}",
            dir.display()
        );
        assert!(dir.join("optimizer.safetensors").is_file());
        let state: Value =
            serde_json::from_slice(&fs::read(dir.join("trainer_state.json")).unwrap()).unwrap();
        assert_eq!(state["step"], step);
        let resolved: toml::Table =
            toml::from_str(&fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
        assert_eq!(resolved["train"]["lr"].as_float(), Some(1e-2));
        assert_eq!(resolved["train"]["max_steps"].as_integer(), Some(6));
        // defaults filled in, paths resolved against the config file's folder
        assert_eq!(resolved["train"]["beta2"].as_float(), Some(0.999));
        assert_eq!(
            resolved["data"]["train"].as_str(),
            Some(s(&tmp.join("train.jsonl")))
        );
        assert_eq!(resolved["model"]["path"].as_str(), Some(s(&m)));
        assert_eq!(resolved["output"]["dir"].as_str(), Some(s(&out)));
    }
    let best_step = evals.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    assert_eq!(
        fs::read_to_string(out.join("best")).unwrap().trim(),
        format!("checkpoint-{best_step:06}")
    );
    assert!(
        !walk(&out)
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".tmp")),
        "temporary files left behind"
    );
}

#[test]
fn rerunning_a_finished_run_resumes_at_its_end_and_changes_no_checkpoint() {
    let tmp = Tmp::new("rerun");
    let (_, out) = trained_chat_run(&tmp);
    let checkpoint = || snapshot(&out.join("checkpoint-000006"));
    let before = checkpoint();
    let losses = series(&out, "train", "loss");
    let r = whet(["train", "--config", s(&tmp.join("run.toml")), "--no-report"]).ok();
    assert!(r.stderr.contains("resuming at step 6"), "{}", r.stderr);
    assert!(
        r.stderr.contains("tokenized rows: cache Hit"),
        "the unchanged data is not tokenized again: {}",
        r.stderr
    );
    assert_eq!(series(&out, "train", "loss"), losses, "no step was redone");
    assert!(before == checkpoint(), "the final checkpoint changed");
}
