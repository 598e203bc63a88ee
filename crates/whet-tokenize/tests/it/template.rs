//! The Jinja environment: what transformers adds on top of plain Jinja, and config loading.

use whet_data::Role;
use whet_tokenize::{AssistantTurns, ChatTemplate, Error, SpanMethod, Tokenizer};

use crate::common::{fixtures, load, msg};

fn render(src: &str) -> String {
    ChatTemplate::new(src)
        .and_then(|t| t.render(&[msg(Role::User, "hi")], false))
        .unwrap_or_else(|e| panic!("{src}: {e}"))
}

#[test]
fn raise_exception_becomes_an_error_with_the_message() {
    let t = ChatTemplate::new("{{ raise_exception('Roles must alternate: ' ~ messages[0].role) }}")
        .unwrap();
    let e = t.render(&[msg(Role::User, "x")], false).unwrap_err();
    assert!(matches!(e, Error::TemplateRender { .. }), "{e:?}");
    assert!(e.to_string().contains("Roles must alternate: user"), "{e}");
}

#[test]
fn syntax_errors_are_reported_at_compile_time() {
    let e = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
    assert!(matches!(e, Error::TemplateSyntax { .. }), "{e:?}");
}

#[test]
fn tojson_formats_like_python_json_dumps() {
    assert_eq!(
        render(r#"{{ {"a": 1, "b": [1.5, "é\"q", none, true, 1e-5]} | tojson }}"#),
        r#"{"a": 1, "b": [1.5, "é\"q", null, true, 1e-05]}"#
    );
    // Messages keep Python's key order (role, content).
    assert_eq!(
        render("{{ messages[0] | tojson }}"),
        r#"{"role": "user", "content": "hi"}"#
    );
    assert_eq!(
        render(r#"{{ {"x": [1, {}], "y": []} | tojson(indent=2) }}"#),
        "{\n  \"x\": [\n    1,\n    {}\n  ],\n  \"y\": []\n}"
    );
    assert_eq!(
        render(r#"{{ {"b": 1, "a": "<&>"} | tojson(sort_keys=true, separators=(",", ":")) }}"#),
        r#"{"a":"<&>","b":1}"#
    );
}

#[test]
fn python_string_methods_and_loop_controls() {
    assert_eq!(
        render("{{ '  x y  '.strip() }}|{{ 'abc'.startswith('ab') }}"),
        "x y|True"
    );
    assert_eq!(render("{{ 'a,b,c'.split(',') | join('+') }}"), "a+b+c");
    assert_eq!(
        render(
            "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        ),
        "02"
    );
    assert_eq!(
        render(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
        ),
        "1"
    );
    assert_eq!(
        render("{{ messages | selectattr('role', 'equalto', 'user') | list | length }}"),
        "1"
    );
}

#[test]
fn variables_match_transformers() {
    // tools and documents are passed as None; add_generation_prompt is a bool.
    assert_eq!(
        render(
            "{{ tools is defined }} {{ tools is none }} {{ documents is none }} {{ add_generation_prompt }}"
        ),
        "True True True False",
        "Jinja2 prints Python booleans"
    );
    let tok = load("llama3");
    let t = tok.chat_template().unwrap();
    assert!(
        t.render(&[msg(Role::User, "hi")], false)
            .unwrap()
            .starts_with("<|begin_of_text|>")
    );
}

#[test]
fn strftime_now_formats_the_current_date() {
    let out = render("{{ strftime_now('%d %b %Y') }}");
    let parts: Vec<&str> = out.split(' ').collect();
    assert_eq!(parts.len(), 3, "{out}");
    assert!(
        parts[0].len() == 2 && parts[0].chars().all(|c| c.is_ascii_digit()),
        "{out}"
    );
    assert!(
        [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
        ]
        .contains(&parts[1]),
        "{out}"
    );
    let year: u32 = parts[2].parse().unwrap();
    assert!((2024..3000).contains(&year), "{out}");
}

#[test]
fn trim_blocks_lstrip_blocks_and_trailing_newline_as_hf_sets_them() {
    // lstrip_blocks removes the indentation before a block tag, trim_blocks the newline
    // after it; the template's single trailing newline is dropped.
    assert_eq!(render("  {% if true %}\nX\n  {% endif %}\nY\n"), "X\nY");
    // Variable tags are not trimmed.
    assert_eq!(render("{{ 'a' }}\n{{ 'b' }}"), "a\nb");
}

#[test]
fn generation_blocks_give_spans_and_last_only_keeps_the_last() {
    let src = "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
    let t = ChatTemplate::new(src).unwrap();
    assert!(t.has_generation_blocks());
    let msgs = vec![
        msg(Role::User, "q1"),
        msg(Role::Assistant, "a1"),
        msg(Role::User, "q2"),
        msg(Role::Assistant, "a2"),
    ];
    let r = t.assistant_spans(&msgs, AssistantTurns::All).unwrap();
    assert_eq!(r.method, SpanMethod::GenerationBlocks);
    assert_eq!(r.text, "<user>q1<assistant>a1</s><user>q2<assistant>a2</s>");
    let spans: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, ["a1</s>", "a2</s>"]);
    let r = t.assistant_spans(&msgs, AssistantTurns::Last).unwrap();
    let spans: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, ["a2</s>"]);
    // Rendering alone removes the markers.
    assert_eq!(t.render(&msgs, false).unwrap(), r.text);
}

#[test]
fn prefix_spans_follow_the_system_prompt_moved_by_mistral() {
    // Mistral v0.3 puts the system prompt into the user turn that is the *last message*,
    // so a conversation cut after a user turn renders the system prompt and the whole
    // conversation (ending with the assistant) does not: prefixes are not prefixes.
    let tok = load("mistral_v03");
    let t = tok.chat_template().unwrap();
    let msgs = vec![
        msg(Role::System, "Be brief."),
        msg(Role::User, "q1"),
        msg(Role::Assistant, "a1"),
        msg(Role::User, "q2"),
        msg(Role::Assistant, "a2"),
    ];
    let r = t.assistant_spans(&msgs, AssistantTurns::All).unwrap();
    assert_eq!(r.method, SpanMethod::PrefixDiff);
    assert_eq!(r.text, "<s>[INST] q1[/INST] a1</s>[INST] q2[/INST] a2</s>");
    let cut = t.render(&msgs[..2], false).unwrap();
    assert_eq!(cut, "<s>[INST] Be brief.\n\nq1[/INST]");
    assert!(!r.text.starts_with(&cut));
    let spans: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, ["a1</s>", "a2</s>"]);
}

#[test]
fn prefix_spans_pick_the_assistant_turn_not_an_equal_user_turn() {
    let tok = load("smollm2");
    let t = tok.chat_template().unwrap();
    let msgs = vec![
        msg(Role::User, "same"),
        msg(Role::Assistant, "same"),
        msg(Role::User, "same"),
        msg(Role::Assistant, "same"),
    ];
    let r = t.assistant_spans(&msgs, AssistantTurns::All).unwrap();
    for s in &r.spans {
        assert_eq!(&r.text[s.clone()], "same<|im_end|>");
        assert!(r.text[..s.start].ends_with("<|im_start|>assistant\n"));
    }
    assert_eq!(r.spans.len(), 2);
}

#[test]
fn config_forms_of_the_chat_template() {
    // qwen2: a list of named templates, "default" picked; llama3: chat_template.jinja.
    let qwen = load("qwen2");
    assert!(
        qwen.chat_template()
            .unwrap()
            .source()
            .contains("You are a helpful assistant.")
    );
    let llama = load("llama3");
    let jinja = std::fs::read_to_string(fixtures().join("llama3/chat_template.jinja")).unwrap();
    assert_eq!(llama.chat_template().unwrap().source(), jinja);
    // mistral and gemma: special tokens as AddedToken objects, add_bos_token set.
    let mistral = load("mistral_v03");
    assert_eq!(mistral.bos().unwrap().text, "<s>");
    assert!(mistral.adds_bos());
    // llama3: no add_bos_token, inferred from its post-processor.
    assert!(llama.adds_bos());
    assert!(!load("smollm2").adds_bos());
}

#[test]
fn config_errors_name_the_file_and_field() {
    let dir = std::env::temp_dir().join(format!("whet-tok-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixtures().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let cases = [
        (
            r#"{"eos_token": "<|im_end|>", "chat_template": [{"name": "tool_use", "template": "x"}]}"#,
            "chat_template",
        ),
        (r#"{"eos_token": "<|nope|>"}"#, "eos_token"),
        (r#"{"eos_token": 5}"#, "eos_token"),
        (
            r#"{"eos_token": "<|im_end|>", "add_bos_token": "yes"}"#,
            "add_bos_token",
        ),
    ];
    for (cfg, field) in cases {
        std::fs::write(dir.join("tokenizer_config.json"), cfg).unwrap();
        let e = Tokenizer::from_dir(&dir).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("tokenizer_config.json") && s.contains(field),
            "{cfg}: {s}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every shipped template (`data.chat_template = "<name>"`) renders a conversation, its assistant turn learned up to the end of turn.
#[test]
fn shipped_templates_render_and_mark_the_assistant_turn() {
    use whet_tokenize::template::shipped::{SHIPPED, shipped};
    let chat = [
        msg(Role::User, "Is there an outage?"),
        msg(Role::Assistant, "No outage in your area."),
    ];
    for (name, text) in SHIPPED {
        assert_eq!(shipped(name), Some(text));
        // A tokenizer with BOS and EOS (Llama 3's template writes `bos_token`, Zephyr's
        // `eos_token`); its own template replaced.
        let mut tok = load("gemma2");
        tok.set_chat_template_from(text, format!("shipped {name}"))
            .unwrap();
        let t = tok.chat_template().unwrap();
        let r = t.assistant_spans(&chat, AssistantTurns::All).unwrap();
        assert!(r.text.contains("Is there an outage?"), "{name}: {}", r.text);
        assert_eq!(r.spans.len(), 1, "{name}");
        let learned = &r.text[r.spans[0].clone()];
        assert!(
            learned.starts_with("No outage in your area."),
            "{name}: {learned:?}"
        );
        let prompt = t.render(&chat[..1], true).unwrap();
        assert!(r.text.len() > prompt.len(), "{name}");
    }
    assert_eq!(shipped("chatml2"), None);
}
