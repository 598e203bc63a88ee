//! `--kernels` / `WHET_KERNELS`: the composed reference ops as a selectable kernel set, and the
//! self-check that `--device cuda` runs before it trains (`--kernels check` runs it on the CPU,
//! whose ops then stand in for the device's).

use crate::common::*;

fn train(tmp: &Tmp, m: &std::path::Path, out: &str, kernels: &str) -> Vec<(u64, f64)> {
    // The end-to-end chat run, shorter, with LoRA dropout on (the fused op takes its mask).
    let body = CHAT_RUN
        .replace("max_steps = 6", "max_steps = 3")
        .replace("dropout = 0.0", "dropout = 0.1")
        .replace("dir = \"out\"", &format!("dir = \"{out}\""));
    assert!(
        body.contains("dropout = 0.1") && body.contains(out),
        "{body}"
    );
    let cfg = config(tmp, m, &body);
    let run = whet([
        "--kernels",
        kernels,
        "train",
        "--config",
        s(&cfg),
        "--no-report",
    ])
    .ok();
    if kernels == "reference" {
        assert!(run.stderr.contains("kernels: reference"), "{}", run.stderr);
    }
    series(&tmp.join(out), "train", "loss")
}

#[test]
fn the_reference_set_trains_to_the_fused_losses() {
    let tmp = Tmp::new("kernels-train");
    let m = model(&tmp);
    chat_data(&tmp);
    let fused = train(&tmp, &m, "out-fused", "fused");
    let reference = train(&tmp, &m, "out-reference", "reference");
    let attention = train(&tmp, &m, "out-attention", "reference:attention,swiglu");
    assert_eq!(fused.len(), 3, "{fused:?}");
    for other in [&reference, &attention] {
        assert_eq!(fused.len(), other.len());
        for ((step, a), (_, b)) in fused.iter().zip(other.iter()) {
            assert!(
                ((a - b) / a).abs() < 1e-4,
                "step {step}: fused {a} vs reference {b}"
            );
        }
    }
}

#[test]
fn check_reports_every_op_and_keeps_the_fused_result() {
    let tmp = Tmp::new("kernels-check");
    let m = model(&tmp);
    chat_data(&tmp);
    let val = tmp.join("val.jsonl");
    let args = |k: &str| {
        vec![
            "--kernels".to_string(),
            k.to_string(),
            "eval".into(),
            "--model".into(),
            s(&m).into(),
            "--data".into(),
            s(&val).into(),
            "--format".into(),
            "chat".into(),
        ]
    };
    let fused = whet(args("fused")).ok();
    let checked = whet(args("check")).ok();
    assert!(
        checked.stderr.contains("kernel self-check on cpu"),
        "{}",
        checked.stderr
    );
    for op in whet_kernels::Op::ALL {
        let line = checked
            .stderr
            .lines()
            .find(|l| l.trim_start().starts_with(op.name()))
            .unwrap_or_else(|| panic!("no line for {op}:\n{}", checked.stderr));
        assert!(line.ends_with(" ok"), "{line}");
    }
    assert!(!checked.stderr.contains("warning"), "{}", checked.stderr);
    // Every op passed, so the fused set ran: the same loss bit for bit.
    assert_eq!(fused.json()["loss"], checked.json()["loss"]);
    assert!(!fused.stderr.contains("self-check"), "{}", fused.stderr);

    // The environment variable picks the set too; the reference gives the same loss up to
    // rounding.
    let out = whet_cmd(args("auto").iter().skip(2))
        .env("WHET_KERNELS", "reference")
        .output()
        .expect("running whet");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernels: reference"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (a, b) = (
        fused.json()["loss"].as_f64().unwrap(),
        v["loss"].as_f64().unwrap(),
    );
    assert!(((a - b) / a).abs() < 1e-5, "fused {a} vs reference {b}");
}

#[test]
fn an_unknown_kernel_set_is_named() {
    let run = whet([
        "--kernels",
        "reference:flash",
        "eval",
        "--model",
        "x",
        "--data",
        "y",
    ])
    .fails();
    assert!(
        run.stderr.contains("--kernels \"flash\" is not an op") && run.stderr.contains("attention"),
        "{}",
        run.stderr
    );
    let run = whet(["--kernels", "fast", "eval", "--model", "x", "--data", "y"]).fails();
    assert!(run.stderr.contains("expected fused"), "{}", run.stderr);
}
