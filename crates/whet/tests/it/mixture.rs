//! `[[data.sources]]`: several training sources drawn in the weights' proportions, each
//! prepared on its own (its own `format` and `columns`), the mixture in `report.json` and
//! `report.md`, and the same rows and losses from the same seed.

use std::fs;
use std::path::Path;

use serde_json::Value;

use whet_tokenize::store::Store;

use crate::common::*;

const RUN: &str = r#"
method = "lora"

[lora]
r = 2
alpha = 4.0
dropout = 0.0

[train]
max_steps = 2
micro_batch = 2
lr = 1e-2

[output]
dir = "out"
"#;

/// `n` distinct short documents of `topic`, one JSON line each, the text under `field`.
fn docs(path: &Path, topic: &str, field: &str, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({ field: format!("{topic} note {i}: step {i} of the {topic} guide, then check the {topic} light.") })
                .to_string()
        })
        .collect();
    write(path, &(lines.join("\n") + "\n"));
}

/// Two sources of 20 one-row documents each (`pack = false`), weights 3:1.
fn mixture_config(tmp: &Tmp, m: &Path) -> std::path::PathBuf {
    mixture_config_with(tmp, m, "")
}

/// [`mixture_config`] with more `[data]` settings.
fn mixture_config_with(tmp: &Tmp, m: &Path, extra: &str) -> std::path::PathBuf {
    docs(&tmp.join("manuals.jsonl"), "router", "body", 20);
    docs(&tmp.join("general.jsonl"), "weather", "text", 20);
    let data = r#"
[data]
EXTRA
max_len = 64
pack = false
validation_fraction = 0.0

[[data.sources]]
name = "manuals"
path = "manuals.jsonl"
format = "text"
columns = { text = "body" }
weight = 3.0

[[data.sources]]
path = "general.jsonl"
"#;
    config(tmp, m, &format!("{RUN}\n{}", data.replace("EXTRA", extra)))
}

fn report(out: &Path) -> Value {
    serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn weights_3_to_1_up_sample_the_small_share_and_down_sample_the_large() {
    let tmp = Tmp::new("mixture");
    let m = model(&tmp);
    let cfg = mixture_config(&tmp, &m);
    let run = whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("data: "))
        .unwrap_or_else(|| panic!("no data line in:\n{}", run.stderr));
    assert!(
        line.contains("40 train examples -> 40 rows")
            && line.contains("manuals (weight 3): 30 of 20 rows")
            && line.contains("general (weight 1): 10 of 20 rows"),
        "{line}"
    );
    let sources = report(&tmp.join("out"))["data"]["sources"].clone();
    let sources = sources.as_array().expect("data.sources in report.json");
    assert_eq!(sources.len(), 2);
    let (manuals, general) = (&sources[0], &sources[1]);
    assert_eq!(manuals["name"], "manuals");
    assert_eq!(general["name"], "general", "the file stem");
    assert_eq!(manuals["weight"], 3.0);
    assert!(manuals["path"].as_str().unwrap().ends_with("manuals.jsonl"));
    assert_eq!(manuals["examples_read"], 20);
    assert_eq!(general["examples_read"], 20);
    assert_eq!(manuals["rows_available"], 20);
    assert_eq!(general["rows_available"], 20);
    // R = 40 rows: round(40 * 3/4) = 30 (20 rows up-sampled), round(40 * 1/4) = 10 (a subset).
    assert_eq!(manuals["rows_per_epoch"], 30);
    assert_eq!(general["rows_per_epoch"], 10);
    let (tm, tg) = (
        manuals["tokens_per_epoch"].as_u64().unwrap(),
        general["tokens_per_epoch"].as_u64().unwrap(),
    );
    assert!(tm > 2 * tg, "{tm} vs {tg} tokens");
    let share = manuals["token_share"].as_f64().unwrap() + general["token_share"].as_f64().unwrap();
    assert!((share - 1.0).abs() < 1e-9, "{share}");
}

#[test]
fn a_mixture_run_is_deterministic_from_the_seed() {
    let tmp = Tmp::new("mixture-seed");
    let m = model(&tmp);
    let cfg = mixture_config(&tmp, &m);
    let mut losses = Vec::new();
    let mut rows = Vec::new();
    for out in ["out-a", "out-b", "out-c"] {
        let mut args = vec![
            "train".to_string(),
            "--config".into(),
            s(&cfg).into(),
            "--no-report".into(),
            "--set".into(),
            format!("output.dir=\"{out}\""),
        ];
        if out == "out-c" {
            args.extend(["--set".into(), "train.seed=7".into()]);
        }
        whet(args).ok();
        losses.push(series(&tmp.join(out), "train", "loss"));
        let sources = report(&tmp.join(out))["data"]["sources"].clone();
        let drawn: Vec<(Value, Value)> = sources
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["rows_per_epoch"].clone(), s["tokens_per_epoch"].clone()))
            .collect();
        rows.push(drawn);
    }
    assert_eq!(losses[0], losses[1], "same seed, same losses");
    assert_eq!(rows[0], rows[1], "same seed, same mixture");
    assert_eq!(losses[0].len(), 2);
    assert_ne!(losses[0], losses[2], "another seed draws other rows");
    // The same config claims its own output folder again (the run id, which hashes the training
    // rows, is the same), as a resume does; another seed's run is another run.
    whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        "output.dir=\"out-a\"",
    ])
    .ok();
    let run = whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        "output.dir=\"out-a\"",
        "--set",
        "train.seed=7",
    ])
    .fails();
    assert!(run.stderr.contains("belongs to run"), "{}", run.stderr);
}

#[test]
fn the_report_md_shows_the_mixture() {
    let tmp = Tmp::new("mixture-md");
    let m = model(&tmp);
    let cfg = mixture_config(&tmp, &m);
    whet(["train", "--config", s(&cfg), "--set", "train.max_steps=1"]).ok();
    let md = fs::read_to_string(tmp.join("out/report.md")).unwrap();
    assert!(
        md.contains("### Data mixture") && md.contains("| manuals |") && md.contains("| general |"),
        "{md}"
    );
}

#[test]
fn mixture_config_errors_name_the_fields() {
    let tmp = Tmp::new("mixture-errors");
    let m = model(&tmp);
    let cfg = mixture_config(&tmp, &m);
    for (set, want) in [
        ("data.train=\"general.jsonl\"", "`data.train`"),
        ("train.k_folds=2", "train.k_folds"),
    ] {
        let run = whet(["train", "--config", s(&cfg), "--set", set]).fails();
        assert!(
            run.stderr.contains(want) && run.stderr.contains("data.sources"),
            "{set}: {}",
            run.stderr
        );
    }
    let text = fs::read_to_string(&cfg).unwrap();
    for (edit, want) in [
        ("weight = 3.0", "weight = 0.0"),
        ("name = \"manuals\"", "name = \"general\""),
    ] {
        fs::write(&cfg, text.replace(edit, want)).unwrap();
        let run = whet(["train", "--config", s(&cfg)]).fails();
        let field = if want.starts_with("weight") {
            "`data.sources[0].weight`"
        } else {
            "`data.sources[1].name`"
        };
        assert!(run.stderr.contains(field), "{want}: {}", run.stderr);
    }
    // A source that is missing names its index and file.
    fs::write(&cfg, text.replace("general.jsonl", "missing.jsonl")).unwrap();
    let run = whet(["train", "--config", s(&cfg)]).fails();
    assert!(
        run.stderr.contains("data.sources[1]") && run.stderr.contains("missing.jsonl"),
        "{}",
        run.stderr
    );
}

#[test]
fn each_source_holds_out_its_share_or_all_share_one_validation_file() {
    let tmp = Tmp::new("mixture-validation");
    let m = model(&tmp);
    let cfg = mixture_config(&tmp, &m);
    let run = whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        "data.validation_fraction=0.25",
    ])
    .ok();
    let r = report(&tmp.join("out"));
    let sources = r["data"]["sources"].as_array().unwrap();
    let held: u64 = sources
        .iter()
        .map(|s| s["validation_examples"].as_u64().unwrap())
        .sum();
    assert!(held > 0, "{}", run.stderr);
    for s in sources {
        assert_eq!(
            s["train_examples"].as_u64().unwrap() + s["validation_examples"].as_u64().unwrap(),
            20
        );
    }
    assert_eq!(r["data"]["validation_examples"].as_u64(), Some(held));

    docs(&tmp.join("val.jsonl"), "garden", "text", 5);
    whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        "data.validation=\"val.jsonl\"",
        "--set",
        "output.dir=\"out-shared\"",
    ])
    .ok();
    let r = report(&tmp.join("out-shared"));
    assert_eq!(r["data"]["validation_examples"], 5);
    for s in r["data"]["sources"].as_array().unwrap() {
        assert_eq!(s["validation_examples"], 0, "{s}");
        assert_eq!(s["train_examples"], 20, "{s}");
    }
}

#[test]
fn max_tokens_caps_a_sources_rows_per_epoch() {
    let tmp = Tmp::new("mixture-budget");
    let m = model(&tmp);
    let cfg = mixture_config(&tmp, &m);
    whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    let full = report(&tmp.join("out"))["data"]["sources"][0].clone();
    let budget = full["tokens_per_epoch"].as_u64().unwrap() / 3;
    let text = fs::read_to_string(&cfg).unwrap().replace(
        "weight = 3.0",
        &format!("weight = 3.0\nmax_tokens = {budget}"),
    );
    fs::write(&cfg, text).unwrap();
    let run = whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        "output.dir=\"out-budget\"",
    ])
    .ok();
    let sources = report(&tmp.join("out-budget"))["data"]["sources"].clone();
    let (manuals, general) = (&sources[0], &sources[1]);
    assert_eq!(manuals["max_tokens"].as_u64(), Some(budget));
    let tokens = manuals["tokens_per_epoch"].as_u64().unwrap();
    let rows = manuals["rows_per_epoch"].as_u64().unwrap();
    assert!(tokens <= budget, "{tokens} > {budget}");
    assert!((8..=11).contains(&rows), "30 rows cut to a third: {rows}");
    assert_eq!(
        general["rows_per_epoch"], 10,
        "the other source keeps its rows"
    );
    assert!(
        run.stderr
            .contains(&format!("manuals (weight 3): {rows} of 20 rows")),
        "{}",
        run.stderr
    );
}

/// The tokens trained on, counted per source as the run goes: one epoch of the mixture (20
/// steps of 2 of its 40 rows) trains on exactly each source's tokens per epoch.
#[test]
fn the_report_counts_the_tokens_trained_on_from_each_source() {
    let tmp = Tmp::new("mixture-seen");
    let m = model(&tmp);
    let cfg = mixture_config(&tmp, &m);
    whet(["train", "--config", s(&cfg), "--set", "train.max_steps=20"]).ok();
    let r = report(&tmp.join("out"));
    let seen = r["summary"]["tokens_by_source"].as_array().unwrap().clone();
    let sources = r["data"]["sources"].as_array().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (seen, planned) in seen.iter().zip(sources) {
        assert_eq!(seen[0], planned["name"]);
        assert_eq!(seen[1], planned["tokens_per_epoch"], "{seen:?}");
    }
    let md = fs::read_to_string(tmp.join("out/report.md")).unwrap();
    assert!(md.contains("tokens trained on"), "{md}");
}

/// `data.store` with `[[data.sources]]`: a token store per source in the folder, drawn by weight
/// as they stream; the tokens trained on follow the weights, a second run reads the stores as
/// they are, and a resumed run has the uninterrupted run's losses.
#[test]
fn a_mixture_of_token_stores_follows_the_weights_and_resumes_exactly() {
    let tmp = Tmp::new("mixture-store");
    let m = model(&tmp);
    let cfg = mixture_config_with(&tmp, &m, "store = \"tokens\"");
    let args = |out: &Path| {
        let mut a: Vec<String> = ["train", "--config", s(&cfg), "--no-report"]
            .map(String::from)
            .to_vec();
        for set in [
            "train.max_steps=20".to_string(),
            "output.save_every=5".into(),
            "output.keep_last=10".into(),
            format!("output.dir={}", toml_str(out)),
        ] {
            a.extend(["--set".into(), set]);
        }
        a
    };
    let full = tmp.join("out");
    let run = whet(args(&full)).ok();
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("data: ") && l.contains("mixture per epoch"))
        .unwrap_or_else(|| panic!("no data line in:\n{}", run.stderr));
    assert!(
        line.contains("manuals (weight 3): 30 of 20 rows")
            && line.contains("general (weight 1): 10 of 20 rows"),
        "{line}"
    );
    for store in ["00-manuals", "01-general"] {
        let st = Store::open(&tmp.join("tokens").join(store)).unwrap();
        assert_eq!(st.documents(), 20, "{store}");
    }
    let r = report(&full);
    let seen: Vec<f64> = r["summary"]["tokens_by_source"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[1].as_f64().unwrap())
        .collect();
    let share = seen[0] / (seen[0] + seen[1]);
    let planned = r["data"]["sources"][0]["token_share"].as_f64().unwrap();
    assert!((share - planned).abs() < 0.05, "{share} vs {planned}");
    assert!((share - 0.75).abs() < 0.1, "{share}");

    let part = tmp.join("part");
    killed_after(&full, &part, "checkpoint-000010");
    let again = whet(args(&part)).ok();
    assert!(
        !again.stderr.contains("preparing the token store"),
        "{}",
        again.stderr
    );
    assert_eq!(
        series(&part, "train", "loss"),
        series(&full, "train", "loss")
    );
    assert_eq!(
        report(&part)["summary"]["tokens_by_source"],
        r["summary"]["tokens_by_source"]
    );
}

/// A mixture of stores holds out each source's share of its documents for validation (read
/// from the stores too), and a source's `max_tokens` cuts its rows per epoch to the budget on
/// average (a store's rows are not all counted up front).
#[test]
fn a_mixture_of_token_stores_holds_out_validation_and_keeps_a_token_budget() {
    let tmp = Tmp::new("mixture-store-budget");
    let m = model(&tmp);
    let cfg = mixture_config_with(&tmp, &m, "store = \"tokens\"")
        .to_string_lossy()
        .into_owned();
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("validation_fraction = 0.0", "validation_fraction = 0.2");
    fs::write(&cfg, &text).unwrap();
    whet(["train", "--config", &cfg, "--no-report"]).ok();
    let r = report(&tmp.join("out"));
    assert_eq!(r["data"]["validation_examples"], 8, "4 of each source's 20");
    assert_eq!(r["data"]["train_examples"], 32);
    assert!(r["before"]["val_loss"].is_f64(), "{}", r["before"]);
    // The leakage check covers every source's held-out documents against all training ones.
    let leakage = &r["data"]["leakage"];
    assert_eq!(leakage["validation"], 8, "{leakage}");
    assert_eq!(leakage["train"], 32, "{leakage}");
    let manuals = &r["data"]["sources"][0];
    assert_eq!(manuals["rows_available"], 16);
    let per_row =
        manuals["tokens_per_epoch"].as_f64().unwrap() / manuals["rows_per_epoch"].as_f64().unwrap();

    let budget = (4.5 * per_row) as u64;
    fs::write(
        &cfg,
        text.replace(
            "weight = 3.0",
            &format!("weight = 3.0\nmax_tokens = {budget}"),
        ),
    )
    .unwrap();
    whet([
        "train",
        "--config",
        &cfg,
        "--no-report",
        "--set",
        "output.dir=\"out-budget\"",
    ])
    .ok();
    let r = report(&tmp.join("out-budget"));
    let manuals = &r["data"]["sources"][0];
    assert_eq!(
        manuals["rows_per_epoch"], 4,
        "{budget} tokens of ~{per_row} a row"
    );
    assert!(manuals["tokens_per_epoch"].as_u64().unwrap() <= budget);
    assert_eq!(r["data"]["sources"][1]["rows_per_epoch"], 8);
}
