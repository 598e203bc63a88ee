//! `whet convert` then `whet generate`: plain and chat prompts, greedy and seeded sampling.

use std::fs;

use serde_json::Value;

use crate::common::*;

fn generate(model: &str, extra: &[&str]) -> String {
    let mut args = vec!["generate", "--model", model];
    args.extend_from_slice(extra);
    let out = whet(&args).ok().stdout;
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

#[test]
fn convert_writes_a_hugging_face_folder_with_a_chat_template() {
    let tmp = Tmp::new("convert");
    let m = model(&tmp);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(m.join(f).is_file(), "convert did not write {f}");
    }
    let config: Value = serde_json::from_slice(&fs::read(m.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["vocab_size"], 320);
    assert_eq!(config["num_hidden_layers"], 2);
    let header = safetensors_header(&m.join("model.safetensors"));
    assert_eq!(
        header["model.embed_tokens.weight"]["shape"],
        serde_json::json!([320, 64])
    );
    assert!(
        header.contains_key("model.layers.1.self_attn.q_proj.weight"),
        "{:?}",
        header.keys()
    );
    let tc: Value =
        serde_json::from_slice(&fs::read(m.join("tokenizer_config.json")).unwrap()).unwrap();
    let template = tc["chat_template"]
        .as_str()
        .expect("the GGUF's chat template is carried over");
    assert!(template.contains("<|im_start|>"), "{template}");

    // A wrong checksum is refused and nothing is written.
    let other = tmp.join("other");
    let r = whet([
        "convert",
        "--from-gguf",
        s(&fixture("gguf/tiny_llama_bpe.gguf")),
        "--out",
        s(&other),
        "--check-sha256",
        "00ff",
    ])
    .fails();
    assert!(
        r.stderr.contains("sha256") && r.stderr.contains("00ff"),
        "{}",
        r.stderr
    );
    assert!(!other.join("model.safetensors").exists());
}

#[test]
fn generate_is_deterministic_and_prints_only_the_completion() {
    let tmp = Tmp::new("generate");
    let m = model(&tmp);
    let m = s(&m);
    // The prompt is longer than the number of new tokens: only new tokens are printed.
    let prompt = "The quick brown fox jumps over the lazy dog";
    let long = generate(m, &["--prompt", prompt, "--max-new-tokens", "12"]);
    assert!(!long.is_empty(), "no completion");
    assert_eq!(
        long,
        generate(m, &["--prompt", prompt, "--max-new-tokens", "12"]),
        "greedy decoding is deterministic"
    );
    let short = generate(m, &["--prompt", prompt, "--max-new-tokens", "4"]);
    assert!(!short.is_empty(), "4 new tokens decode to nothing");
    // A byte-level token cut in the middle of a UTF-8 character decodes to U+FFFD.
    let short_whole = short.trim_end_matches('\u{FFFD}');
    assert!(
        long.starts_with(short_whole),
        "4 greedy tokens {short:?} are not the start of 12: {long:?}"
    );
    assert!(
        long.chars().count() > short_whole.chars().count(),
        "{short:?} vs {long:?}"
    );
    assert!(!long.contains(prompt), "the prompt is echoed: {long:?}");

    // Chat: the template wraps the prompt, so the completion differs from the plain one.
    let chat = generate(m, &["--chat", "--prompt", prompt, "--max-new-tokens", "12"]);
    assert!(!chat.is_empty(), "no chat completion");
    assert_eq!(
        chat,
        generate(m, &["--chat", "--prompt", prompt, "--max-new-tokens", "12"])
    );
    assert_ne!(chat, long, "--chat made no difference");
    let system = generate(
        m,
        &[
            "--chat",
            "--system",
            "Answer in French.",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "12",
        ],
    );
    assert_ne!(system, chat, "--system made no difference");

    // Seeded sampling is reproducible.
    let sample = |seed: &str| {
        generate(
            m,
            &[
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "16",
                "--temperature",
                "1.0",
                "--top-k",
                "50",
                "--seed",
                seed,
            ],
        )
    };
    let a = sample("7");
    assert!(!a.is_empty());
    assert_eq!(a, sample("7"), "same seed, same sample");
}

#[test]
fn a_q8_gguf_converts_and_generates() {
    let tmp = Tmp::new("q8");
    let out = tmp.join("q8");
    whet([
        "convert",
        "--from-gguf",
        s(&fixture("gguf/tiny_llama_q8.gguf")),
        "--out",
        s(&out),
    ])
    .ok();
    let header = safetensors_header(&out.join("model.safetensors"));
    assert!(
        header.contains_key("model.layers.0.mlp.down_proj.weight"),
        "{:?}",
        header.keys()
    );
    let text = generate(
        s(&out),
        &["--prompt", "Hello, world!", "--max-new-tokens", "8"],
    );
    assert!(!text.is_empty());
}
