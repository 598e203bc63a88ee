//! Continued pre-training, prompt-completion SFT and chat instruction tuning learn a repeated
//! tiny set: the loss falls, and the adapter reproduces what it was taught.

use crate::common::*;

/// A LoRA run with a high constant learning rate and no validation.
fn run_body(train: &str, format: &str, steps: u32, lr: f64, schedule: &str) -> String {
    format!(
        r#"
method = "lora"

[data]
train = "{train}"
format = "{format}"
max_len = 64
validation_fraction = 0.0

[lora]
r = 8
alpha = 16.0
dropout = 0.0

[train]
max_steps = {steps}
micro_batch = 2
lr = {lr}
schedule = "{schedule}"

[output]
dir = "out"
"#
    )
}

fn mean(xs: &[(u64, f64)]) -> f64 {
    xs.iter().map(|p| p.1).sum::<f64>() / xs.len() as f64
}

/// Trains and returns the per-step train losses.
fn train(tmp: &Tmp, body: &str) -> Vec<(u64, f64)> {
    let m = tmp.join("model");
    let cfg = config(tmp, &m, body);
    whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    series(&tmp.join("out"), "train", "loss")
}

fn generate(tmp: &Tmp, extra: &[&str]) -> String {
    let m = tmp.join("model");
    let mut args = vec!["generate", "--model", s(&m), "--max-new-tokens", "24"];
    args.extend_from_slice(extra);
    whet(&args).ok().stdout.trim_end_matches('\n').to_string()
}

#[test]
fn continued_pretraining_on_text_lowers_the_loss() {
    let tmp = Tmp::new("text");
    model(&tmp);
    let docs = [
        "The cat sat on the mat. The dog sat on the log.",
        "Red fish, blue fish, one fish, two fish.",
    ];
    let lines: Vec<String> = (0..4)
        .flat_map(|_| docs.map(|t| serde_json::json!({ "text": t }).to_string()))
        .collect();
    write(&tmp.join("text.jsonl"), &(lines.join("\n") + "\n"));
    let losses = train(&tmp, &run_body("text.jsonl", "text", 10, 3e-2, "constant"));
    assert_eq!(losses.len(), 10);
    let (first, last) = (mean(&losses[..3]), mean(&losses[7..]));
    assert!(last < 0.5 * first, "text loss did not fall: {losses:?}");
    // The text format learns every token: plain-text eval sees the adapter's improvement.
    let text = s(&tmp.join("text.jsonl")).to_string();
    let m = s(&tmp.join("model")).to_string();
    let adapter = s(&tmp.join("out/adapter")).to_string();
    let base = whet(["eval", "--model", &m, "--data", &text, "--format", "text"])
        .ok()
        .json()["loss"]
        .as_f64()
        .unwrap();
    let tuned = whet([
        "eval",
        "--model",
        &m,
        "--adapter",
        &adapter,
        "--data",
        &text,
        "--format",
        "text",
    ])
    .ok()
    .json()["loss"]
        .as_f64()
        .unwrap();
    assert!(tuned < 0.5 * base, "eval: base {base}, tuned {tuned}");
}

#[test]
fn prompt_completion_sft_learns_the_completions() {
    let tmp = Tmp::new("prompt-completion");
    model(&tmp);
    let pairs = [("2+2=", " four"), ("Capital of France?", " Paris")];
    let lines: Vec<String> = (0..4)
        .flat_map(|_| {
            pairs.map(|(p, c)| serde_json::json!({ "prompt": p, "completion": c }).to_string())
        })
        .collect();
    write(&tmp.join("pc.jsonl"), &(lines.join("\n") + "\n"));
    let losses = train(
        &tmp,
        &run_body("pc.jsonl", "prompt-completion", 10, 3e-2, "constant"),
    );
    assert_eq!(losses.len(), 10);
    let (first, last) = (mean(&losses[..3]), mean(&losses[7..]));
    assert!(
        last < 0.5 * first,
        "prompt-completion loss did not fall: {losses:?}"
    );
    let adapter = tmp.join("out/adapter");
    for (prompt, completion) in pairs {
        let tuned = generate(&tmp, &["--adapter", s(&adapter), "--prompt", prompt]);
        assert_eq!(tuned.trim(), completion.trim(), "prompt {prompt:?}");
        let base = generate(&tmp, &["--prompt", prompt]);
        assert_ne!(
            base.trim(),
            completion.trim(),
            "the base model already knew {prompt:?}"
        );
    }
}

#[test]
fn chat_instruction_tuning_teaches_the_answers() {
    let tmp = Tmp::new("chat");
    model(&tmp);
    let taught = [
        ("Hi", "Hello! How can I help?"),
        ("Slow Wi-Fi", "Move the hub up high."),
    ];
    let lines: Vec<String> = (0..4)
        .flat_map(|_| taught.map(|(u, a)| chat(u, a)))
        .collect();
    write(&tmp.join("chat.jsonl"), &(lines.join("\n") + "\n"));
    let losses = train(&tmp, &run_body("chat.jsonl", "chat", 30, 1e-2, "cosine"));
    assert!(
        mean(&losses[27..]) < 0.1 * mean(&losses[..3]),
        "chat loss did not fall: {losses:?}"
    );
    let adapter = tmp.join("out/adapter");
    for (user, assistant) in taught {
        assert_eq!(
            generate(
                &tmp,
                &["--adapter", s(&adapter), "--chat", "--prompt", user]
            ),
            assistant
        );
        assert_ne!(generate(&tmp, &["--chat", "--prompt", user]), assistant);
    }
}
