//! Chat templates are untrusted input: each attack below must end fast with
//! `Error::TemplateLimit` naming the template and the limit, never hang, abort or overflow
//! the stack; real templates render long conversations within the limits.

use std::time::{Duration, Instant};

use whet_data::{Message, Role};
use whet_tokenize::template::render_untrusted;
use whet_tokenize::{ChatTemplate, Error};

use crate::common::{load, msg};

/// Render `src` over one user message on a thread with a 2 MiB stack (rayon's and the
/// test harness's size), returning the error and how long it took.
fn attack(src: &'static str) -> (Error, Duration) {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let t = ChatTemplate::new(src)
                .unwrap()
                .with_origin("evil/chat_template.jinja");
            let start = Instant::now();
            let e = t
                .render(&[msg(Role::User, "hi")], false)
                .expect_err("the template must be refused");
            (e, start.elapsed())
        })
        .unwrap()
        .join()
        .expect("the render must not panic or overflow the stack")
}

fn assert_limit(src: &'static str, want: &str) {
    let (e, took) = attack(src);
    match &e {
        Error::TemplateLimit {
            template, limit, ..
        } => {
            assert_eq!(template, "evil/chat_template.jinja", "{e}");
            assert_eq!(*limit, want, "{e}");
        }
        other => panic!("{src}: expected the {want} limit, got {other}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("evil/chat_template.jinja") && text.contains(want),
        "{text}"
    );
    assert!(took < Duration::from_secs(3), "{src}: took {took:?}");
}

#[test]
fn nested_range_loops_run_out_of_fuel() {
    assert_limit(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
        "step budget (fuel)",
    );
}

#[test]
fn a_namespace_that_holds_itself_stops_tojson() {
    assert_limit(
        "{% set ns = namespace(a=1) %}{% set ns.me = ns %}{{ ns | tojson }}",
        "tojson depth",
    );
}

#[test]
fn a_list_nested_100k_deep_stops_tojson() {
    // Built by the template itself: 100 x 1000 iterations of `x = [x]`; dropping it
    // recurses 100 000 levels, so the render runs on a stack sized to its fuel.
    assert_limit(
        "{% set ns = namespace(x=[]) %}{% for i in range(100) %}{% for j in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x | tojson }}",
        "tojson depth",
    );
}

#[test]
fn a_list_nested_as_deep_as_the_fuel_allows_is_dropped_safely() {
    assert_limit(
        "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% for j in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}",
        "step budget (fuel)",
    );
}

#[test]
fn a_list_that_doubles_60_times_stops_tojson_by_size() {
    // 60 levels of [x, x]: tiny in memory, 2^60 items as text.
    assert_limit(
        "{% set ns = namespace(x=[1]) %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x | tojson }}",
        "tojson size",
    );
}

#[test]
fn a_huge_tojson_indent_is_refused() {
    assert_limit(
        "{{ [1, [2]] | tojson(indent=100000000000) }}",
        "tojson indent",
    );
    assert_limit(
        "{{ [1, [2]] | tojson(indent='          ' * 100000) }}",
        "tojson indent",
    );
}

#[test]
fn a_huge_format_width_is_refused() {
    assert_limit("{{ '%100000000000d' | format(1) }}", "format width");
    assert_limit("{{ '{:>100000000000}'.format(1) }}", "format width");
    assert_limit("{{ '{:.100000000000f}'.format(1.5) }}", "format width");
}

#[test]
fn string_repetition_runs_out_of_fuel() {
    assert_limit("{{ 'x' * 100000000000 }}", "step budget (fuel)");
    // Doubling a string until it is huge.
    assert_limit(
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        "step budget (fuel)",
    );
}

#[test]
fn deep_macro_recursion_is_refused() {
    assert_limit(
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "recursion",
    );
}

#[test]
fn huge_output_is_refused() {
    // Each piece is small, the whole is over the output limit (16 MiB here).
    assert_limit(
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "output size",
    );
}

#[test]
fn errors_name_the_template_file_of_a_model_folder() {
    let dir = std::env::temp_dir().join(format!("whet-evil-template-{}", std::process::id()));
    let src = crate::common::model_dir("llama3");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let tok = whet_tokenize::Tokenizer::from_dir(&dir).unwrap();
    let e = tok
        .chat_template()
        .unwrap()
        .render(&[msg(Role::User, "hi")], false)
        .unwrap_err();
    std::fs::remove_dir_all(&dir).ok();
    assert!(matches!(e, Error::TemplateLimit { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&dir.join("chat_template.jinja").display().to_string()),
        "{e}"
    );
}

#[test]
fn render_untrusted_takes_template_and_messages_as_text() {
    let out = render_untrusted(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
        r#"[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]"#,
        false,
    )
    .unwrap();
    assert_eq!(out, "<user>hi<assistant>yo");
    let e = render_untrusted("{{ 'x' * 100000000000 }}", "[]", false).unwrap_err();
    assert!(matches!(e, Error::TemplateLimit { .. }), "{e}");
    // Messages nested past serde_json's depth limit are an error, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(render_untrusted("x", &deep, false).is_err());
    assert!(render_untrusted("x", "{not json", false).is_err());
}

#[test]
fn real_templates_render_long_conversations_within_the_limits() {
    // 2 000 turns of 2 KB each (4 MB of content) through every fixture template.
    let mut msgs: Vec<Message> = Vec::new();
    for i in 0..2000 {
        let role = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        msgs.push(msg(role, &format!("turn {i} ünï 日本 ").repeat(100)));
    }
    for model in [
        "smollm2",
        "qwen2",
        "llama3",
        "mistral_v03",
        "gemma2",
        "chatml_generation",
    ] {
        let tok = load(model);
        let text = tok
            .chat_template()
            .unwrap()
            .render(&msgs, true)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        assert!(text.len() > 4_000_000, "{model}");
    }
}

#[test]
fn a_line_longer_than_minijinjas_column_counter_is_a_syntax_error_not_a_panic() {
    // An unclosed block on a 70 000-byte line: minijinja's syntax error would carry a column
    // past u16::MAX (found by whet-fuzz).
    let src = format!("{{% if {} ", "x".repeat(70_000));
    let e = ChatTemplate::new(src).expect_err("the template must be refused");
    assert!(
        matches!(&e, Error::TemplateSyntax { message } if message.contains("line 1") && message.contains("at most 60000")),
        "{e}"
    );
}
