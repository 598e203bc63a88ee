//! The Ollama Modelfile (`whet_tokenize::ollama`) against a sample of Ollama's template rules
//! (<https://github.com/ollama/ollama/blob/main/docs/template.md>, `template/template.go`) and
//! against transformers' renders of the real chat templates (fixtures/templates/*/expected.json).

use std::collections::BTreeMap;

use serde::Deserialize;
use whet_data::{Message, Role};
use whet_tokenize::Error;
use whet_tokenize::ollama::{Family, Modelfile, render, with_default_system};

use crate::common::{load, model_dir, msg};

#[derive(Deserialize)]
struct Expected {
    bos_token: Option<String>,
    conversations: BTreeMap<String, Vec<Message>>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    conversation: String,
    add_generation_prompt: bool,
    text: Option<String>,
}

fn expected(model: &str) -> Expected {
    let path = model_dir(model).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The variables Ollama documents for a template (docs/template.md, "Variables").
const OLLAMA_VARIABLES: [&str; 8] = [
    "System",
    "Prompt",
    "Response",
    "Messages",
    "Role",
    "Content",
    "Tools",
    "ToolCalls",
];

/// An independent reading of a template's actions: every `{{ }}` is closed, every `range`/`if`
/// has its `end`, and each `.Field` is one of Ollama's variables.
fn check_actions(template: &str) {
    let mut depth = 0i32;
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        let close = rest[i..].find("}}").expect("a `{{` without `}}`") + i;
        let body = rest[i + 2..close].trim_matches(|c| c == '-' || c == ' ');
        let first = body.split_whitespace().next().unwrap_or("");
        match first {
            "range" | "if" => depth += 1,
            "end" => depth -= 1,
            _ => {}
        }
        assert!(depth >= 0, "{template:?}: `end` before its block");
        for word in body.split_whitespace() {
            if let Some(field) = word.strip_prefix('.') {
                assert!(
                    OLLAMA_VARIABLES.contains(&field),
                    "{template:?}: `.{field}` is not an Ollama template variable"
                );
            }
        }
        assert!(
            !rest[i + 2..close].contains("{{"),
            "{template:?}: nested `{{{{`"
        );
        rest = &rest[close + 2..];
    }
    assert_eq!(depth, 0, "{template:?}: a block without its `end`");
}

#[test]
fn each_family_renders_every_conversation_as_transformers_does() {
    for (model, family) in [
        ("smollm2", Family::ChatMl),
        ("qwen2", Family::ChatMl),
        ("llama3", Family::Llama3),
        ("gemma2", Family::Gemma),
        ("mistral_v03", Family::Mistral),
    ] {
        let tok = load(model);
        let mf = Modelfile::from_tokenizer(&tok).unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_eq!(mf.family, family, "{model}");
        check_actions(&mf.template);
        // Stops: the tokenizer's EOS, and only tokens it has as special tokens.
        assert!(mf.stop.contains(&tok.eos().text), "{model}: {:?}", mf.stop);
        for s in &mf.stop {
            assert!(
                tok.token_to_id(s).is_some(),
                "{model}: stop {s:?} is not a token"
            );
        }
        let exp = expected(model);
        let mut compared = 0;
        for case in &exp.cases {
            let (Some(text), true) = (&case.text, case.add_generation_prompt) else {
                continue;
            };
            let conv = &exp.conversations[&case.conversation];
            // Llama 3 and Gemma `trim` the content; Ollama passes it as it is.
            if conv.iter().any(|m| m.content.trim() != m.content) {
                continue;
            }
            let writes_bos = tok.chat_template().unwrap().source().contains("bos_token");
            let want = match exp.bos_token.as_ref().filter(|_| writes_bos) {
                Some(b) => text.strip_prefix(b.as_str()).unwrap_or(text),
                None => text,
            };
            let got = render(
                &mf.template,
                &with_default_system(mf.system.as_deref(), conv.clone()),
            )
            .unwrap();
            assert_eq!(got, want, "{model}: conversation {}", case.conversation);
            compared += 1;
        }
        assert!(
            compared >= 4,
            "{model}: only {compared} conversations compared"
        );
    }
}

#[test]
fn default_system_prompts_and_stops_per_family() {
    let smol = Modelfile::from_tokenizer(&load("smollm2")).unwrap();
    assert_eq!(
        smol.system.as_deref(),
        Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    );
    assert_eq!(smol.stop, ["<|im_start|>", "<|im_end|>"]);
    let qwen = Modelfile::from_tokenizer(&load("qwen2")).unwrap();
    assert_eq!(qwen.system.as_deref(), Some("You are a helpful assistant."));
    // Qwen2's EOS is <|im_end|> too.
    assert_eq!(qwen.stop, ["<|im_start|>", "<|im_end|>"]);
    let llama = Modelfile::from_tokenizer(&load("llama3")).unwrap();
    assert_eq!(llama.system, None);
    assert_eq!(
        llama.stop,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    );
    let gemma = Modelfile::from_tokenizer(&load("gemma2")).unwrap();
    assert_eq!(gemma.stop, ["<start_of_turn>", "<end_of_turn>", "<eos>"]);
    let mistral = Modelfile::from_tokenizer(&load("mistral_v03")).unwrap();
    assert_eq!(mistral.system, None);
    assert_eq!(mistral.stop, ["[INST]", "[/INST]", "</s>"]);
}

#[test]
fn the_modelfile_text() {
    let mf = Modelfile::from_tokenizer(&load("smollm2")).unwrap();
    let text = mf.to_text("model.gguf");
    assert!(text.contains("\nFROM ./model.gguf\n"), "{text}");
    assert!(
        text.contains(
            "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\"\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("SYSTEM \"\"\"You are a helpful AI assistant named SmolLM, trained by Hugging Face\"\"\"\n"),
        "{text}"
    );
    assert!(
        text.ends_with("PARAMETER stop \"<|im_start|>\"\nPARAMETER stop \"<|im_end|>\"\n"),
        "{text}"
    );
}

/// Ollama's rules, one by one, on the ChatML template (expected texts written from
/// `template.go`: `collate` merges consecutive messages of one role with a blank line, keeps
/// system messages in `.Messages`; `{{-` and `-}}` trim the whitespace beside them).
#[test]
fn a_sample_of_ollamas_rules() {
    let chatml = Family::ChatMl.template();
    assert_eq!(
        render(
            chatml,
            &[
                msg(Role::User, "a"),
                msg(Role::User, "b"),
                msg(Role::Assistant, "c")
            ]
        )
        .unwrap(),
        "<|im_start|>user\na\n\nb<|im_end|>\n<|im_start|>assistant\nc<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        render(chatml, &[msg(Role::System, "s"), msg(Role::User, "u")]).unwrap(),
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        render(
            "x \n{{- range .Messages }} {{ .Role -}}\n\t|{{ end }}",
            &[msg(Role::User, "u")]
        )
        .unwrap(),
        "x user|"
    );
    assert_eq!(
        render(
            "{{ range .Messages }}{{ if eq .Role \"user\" }}U{{ else if eq .Role \"assistant\" }}A{{ else }}S{{ end }}{{ end }}",
            &[msg(Role::System, "s"), msg(Role::User, "u"), msg(Role::Assistant, "a")]
        )
        .unwrap(),
        "SUA"
    );
    // A system prompt from the Modelfile goes first only when the conversation has none.
    let with = with_default_system(Some("d"), vec![msg(Role::User, "u")]);
    assert_eq!(with[0].content, "d");
    let own = with_default_system(Some("d"), vec![msg(Role::System, "s")]);
    assert_eq!(own.len(), 1);
    // Mistral's rule: the system prompt goes before the last message, when that is the user's.
    let mistral = Family::Mistral.template();
    assert_eq!(
        render(
            mistral,
            &[
                msg(Role::System, "s"),
                msg(Role::User, "a"),
                msg(Role::Assistant, "b"),
                msg(Role::User, "c")
            ]
        )
        .unwrap(),
        "[INST] a[/INST] b</s>[INST] s\n\nc[/INST]"
    );
    assert_eq!(
        render(
            "{{ range $i, $_ := .Messages }}{{ $i }}{{ len (slice $.Messages $i) }}{{ end }}|{{ .System }}|{{ if not .System }}none{{ end }}",
            &[msg(Role::System, "s1"), msg(Role::System, "s2"), msg(Role::User, "u")]
        )
        .unwrap(),
        "0211|s1\n\ns2|"
    );
    for bad in [
        "{{ range .Messages }}",
        "{{ .Tools }}",
        "{{ .Role }}",
        "{{ if .System }}x",
        "{{ range .Messages }}{{ .System }}{{ end }}",
    ] {
        assert!(render(bad, &[msg(Role::User, "u")]).is_err(), "{bad}");
    }
    for family in [
        Family::ChatMl,
        Family::Llama3,
        Family::Gemma,
        Family::Mistral,
        Family::Raw,
    ] {
        check_actions(family.template());
    }
}

#[test]
fn unknown_and_lookalike_templates_are_refused() {
    // Phi-3's <|user|>: not translated; the error names the template.
    let mut tok = load("smollm2");
    tok.set_chat_template(
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}<|assistant|>\n",
    )
    .unwrap();
    let e = Modelfile::from_tokenizer(&tok).unwrap_err();
    assert!(matches!(e, Error::Ollama { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("chat template set for") && text.contains("<|user|>"),
        "{text}"
    );

    // ChatML markers with another layout (no newline after the role): refused, not guessed.
    let mut tok = load("smollm2");
    tok.set_chat_template(
        "{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}",
    )
    .unwrap();
    let e = Modelfile::from_tokenizer(&tok).unwrap_err().to_string();
    assert!(
        e.contains("renders differently") && e.contains("chatml"),
        "{e}"
    );
}

#[test]
fn no_chat_template_gives_the_raw_prompt() {
    let tok = whet_tokenize::Tokenizer::from_files(
        crate::common::fixtures().join("tokenizer.json"),
        None::<&str>,
    )
    .unwrap();
    let mf = Modelfile::from_tokenizer(&tok).unwrap();
    assert_eq!(mf.family, Family::Raw);
    assert_eq!(mf.template, "{{ .Prompt }}");
    assert_eq!(mf.system, None);
    assert_eq!(mf.stop, [tok.eos().text.clone()]);
    let text = mf.to_text("model.gguf");
    assert!(
        text.contains("TEMPLATE \"\"\"{{ .Prompt }}\"\"\"\n"),
        "{text}"
    );
}
