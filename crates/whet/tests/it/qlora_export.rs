//! QLoRA (`model.quantize`) with activation checkpointing, then `whet export --gguf` of the
//! tuned model, end to end on the tiny Llama.

use std::fs;

use crate::common::*;

/// The chat run of the other tests with `[train] activation_checkpointing` and, if given,
/// `[model] quantize`.
fn run(tmp: &Tmp, quantize: Option<&str>) -> Run {
    let m = model(tmp);
    chat_data(tmp);
    let body = CHAT_RUN.replace("[train]\n", "[train]\nactivation_checkpointing = true\n");
    let cfg = config(tmp, &m, &body);
    if let Some(q) = quantize {
        let text = fs::read_to_string(&cfg).unwrap();
        write(&cfg, &format!("{text}quantize = \"{q}\"\n"));
    }
    whet(["train", "--config", s(&cfg), "--no-report"])
}

#[test]
fn qlora_trains_close_to_lora_and_exports_a_gguf_that_reads_back() {
    let plain = Tmp::new("lora-ckpt");
    run(&plain, None).ok();
    let tmp = Tmp::new("qlora");
    let r = run(&tmp, Some("q8_0")).ok();
    assert!(r.stderr.contains("QLoRA base"), "{}", r.stderr);

    // Q8_0 blocks move the loss a little, not much; training still lowers it.
    let lora = series(&plain.join("out"), "train", "loss");
    let qlora = series(&tmp.join("out"), "train", "loss");
    assert_eq!(lora.len(), 6);
    assert_eq!(qlora.len(), 6);
    let (a, b) = (lora[0].1, qlora[0].1);
    assert!((a - b).abs() < 0.02 * a, "first loss: LoRA {a}, QLoRA {b}");
    assert!(qlora[5].1 < qlora[0].1, "QLoRA did not learn: {qlora:?}");
    assert!(tmp.join("out/adapter/adapter_model.safetensors").is_file());

    // Export the tuned model: adapter merged into the f32 base, written as Q8_0, read back.
    let gguf = tmp.join("tuned.gguf");
    let v = whet([
        "export",
        "--model",
        s(&tmp.join("model")),
        "--adapter",
        s(&tmp.join("out/adapter")),
        "--gguf",
        s(&gguf),
        "--type",
        "q8_0",
    ])
    .ok()
    .json();
    assert_eq!(v["tokenizer_round_trip"], true, "{v}");
    // 2 layers x 7 projections, the token embedding and the (untied) output head.
    assert_eq!(v["tensor_types"]["q8_0"], 2 * 7 + 2, "{v}");
    assert!(v["reimport_top1_agreement"].as_f64().unwrap() > 0.9, "{v}");
    assert_eq!(
        v["bytes"].as_u64().unwrap(),
        fs::metadata(&gguf).unwrap().len()
    );
    let back = tmp.join("back");
    whet(["convert", "--from-gguf", s(&gguf), "--out", s(&back)]).ok();
    assert!(back.join("model.safetensors").is_file());
}

#[test]
fn bad_quantize_settings_are_config_errors() {
    let tmp = Tmp::new("qlora-bad");
    let r = run(&tmp, Some("nf4")).fails();
    assert!(
        r.stderr.contains("model.quantize") && r.stderr.contains("q4_0"),
        "{}",
        r.stderr
    );
    assert!(
        !tmp.join("out").exists(),
        "nothing is written for a bad config"
    );

    let full = Tmp::new("qlora-full");
    let m = model(&full);
    chat_data(&full);
    let body = CHAT_RUN.replace("method = \"lora\"", "method = \"full\"");
    let cfg = config(&full, &m, &body);
    let text = fs::read_to_string(&cfg).unwrap();
    write(&cfg, &format!("{text}quantize = \"q8_0\"\n"));
    let r = whet(["train", "--config", s(&cfg)]).fails();
    assert!(
        r.stderr.contains("model.quantize") && r.stderr.contains("lora"),
        "{}",
        r.stderr
    );
}

#[test]
fn export_rejects_an_unknown_type_and_keeps_an_existing_file() {
    let tmp = Tmp::new("export-bad");
    let m = model(&tmp);
    let gguf = tmp.join("old.gguf");
    write(&gguf, "an earlier export");
    let r = whet([
        "export",
        "--model",
        s(&m),
        "--gguf",
        s(&gguf),
        "--type",
        "iq2_xs",
    ])
    .fails();
    assert!(
        r.stderr.contains("iq2_xs") && r.stderr.contains("q4_k"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read_to_string(&gguf).unwrap(), "an earlier export");
}
