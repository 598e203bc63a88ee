//! `[data]` settings end to end: long text documents become several rows (`long_documents`,
//! `window_overlap`), fields of other names (`columns`), and a chat template for a model without
//! one (`chat_template`, `--chat-template`).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use whet_data::Shape;

use crate::common::*;

/// A run of one optimizer step without the report, `output.dir = out`.
const ONE_STEP: &str = r#"
method = "lora"

[lora]
r = 2
alpha = 4.0
dropout = 0.0

[train]
max_steps = 1
micro_batch = 1

[output]
dir = "out"
"#;

/// The `N` of `data: E train examples -> N rows` in a run's stderr.
fn train_rows(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("data: "))
        .unwrap_or_else(|| panic!("no data line in:\n{stderr}"));
    let rows = line.split("-> ").nth(1).and_then(|r| r.split(' ').next());
    rows.and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

fn report(out: &Path) -> Value {
    serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_long_text_document_is_trained_on_as_several_windows() {
    let tmp = Tmp::new("windows");
    let m = model(&tmp);
    let long: String = (0..300)
        .map(|i| format!("Line {i} of the manual: the hub restarts when its light turns blue."))
        .collect::<Vec<_>>()
        .join(" ");
    let doc = serde_json::json!({ "text": long }).to_string();
    write(&tmp.join("docs.jsonl"), &format!("{doc}\n"));
    let body = format!(
        "{ONE_STEP}\n[data]\ntrain = \"docs.jsonl\"\nformat = \"text\"\nmax_len = 64\npack = false\nvalidation_fraction = 0.0\n"
    );
    let cfg = config(&tmp, &m, &body);
    let run = whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    let rows = train_rows(&run.stderr);
    assert!(rows >= 10, "one document of ~4k tokens -> {rows} rows");
    assert!(
        run.stderr.contains(&format!(
            "1 long documents cut into {rows} windows of at most 64 tokens"
        )),
        "{}",
        run.stderr
    );
    let t = &report(&tmp.join("out"))["data"]["train_tokenize"];
    assert_eq!(
        (t["rows_windowed"].as_u64(), t["windows"].as_u64()),
        (Some(1), Some(rows))
    );
    assert_eq!(t["rows_truncated"], 0);
    let supervised = t["supervised_tokens_out"].as_u64().unwrap();
    // Every token learned once, but a BOS.
    let tokens = t["tokens_out"].as_u64().unwrap();
    assert!(
        supervised == tokens || supervised + 1 == tokens,
        "{supervised} of {tokens}"
    );

    // With an overlap: more windows, each token still learned once.
    let run = whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        "data.window_overlap=16",
        "--set",
        "output.dir=\"out-overlap\"",
    ])
    .ok();
    let overlapped = train_rows(&run.stderr);
    assert!(overlapped > rows, "{overlapped} vs {rows}");
    let t = &report(&tmp.join("out-overlap"))["data"]["train_tokenize"];
    assert_eq!(t["supervised_tokens_out"].as_u64(), Some(supervised));

    // `truncate`, the old rule: one row. The tokenized-row cache must not serve the windows.
    let run = whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        "data.long_documents=\"truncate\"",
        "--set",
        "output.dir=\"out-truncated\"",
    ])
    .ok();
    assert_eq!(train_rows(&run.stderr), 1, "{}", run.stderr);
    let t = &report(&tmp.join("out-truncated"))["data"]["train_tokenize"];
    assert_eq!(
        (t["rows_truncated"].as_u64(), t["windows"].as_u64()),
        (Some(1), Some(0))
    );

    // A bad overlap is refused naming the field, before anything runs.
    let run = whet([
        "train",
        "--config",
        s(&cfg),
        "--set",
        "data.window_overlap=64",
    ])
    .fails();
    assert!(
        run.stderr.contains("`data.window_overlap`"),
        "{}",
        run.stderr
    );
}

#[test]
fn columns_map_fields_of_other_names() {
    let tmp = Tmp::new("columns");
    let m = model(&tmp);
    let rows: Vec<String> = CHATS
        .iter()
        .map(|(q, a)| serde_json::json!({ "question": q, "answer": a }).to_string())
        .collect();
    write(&tmp.join("qa.jsonl"), &(rows.join("\n") + "\n"));
    let data = "[data]\ntrain = \"qa.jsonl\"\nmax_len = 64\nvalidation_fraction = 0.0\n";
    let cfg = config(&tmp, &m, &format!("{ONE_STEP}\n{data}"));
    // Without `columns`: which fields were found and how to map them.
    let run = whet(["train", "--config", s(&cfg), "--no-report"]).fails();
    for want in ["qa.jsonl", "row ", "question", "answer", "data.columns"] {
        assert!(run.stderr.contains(want), "{want}: {}", run.stderr);
    }
    // With them: prompt/completion rows, the answer learned.
    let cfg = config(
        &tmp,
        &m,
        &format!(
            "{ONE_STEP}\n{data}columns = {{ prompt = \"question\", completion = \"answer\" }}\n"
        ),
    );
    let run = whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    let rows = train_rows(&run.stderr);
    assert!(
        (1..8).contains(&rows),
        "8 short pairs packed into {rows} rows"
    );
    let t = &report(&tmp.join("out"))["data"]["train_tokenize"];
    assert_eq!(t["rows_out"], 8);
    assert!(t["supervised_tokens_out"].as_u64().unwrap() < t["tokens_out"].as_u64().unwrap());
    // An unknown key is refused, naming it.
    let cfg = config(
        &tmp,
        &m,
        &format!("{ONE_STEP}\n{data}columns = {{ promt = \"question\" }}\n"),
    );
    let run = whet(["train", "--config", s(&cfg)]).fails();
    assert!(
        run.stderr.contains("promt") && run.stderr.contains("data.columns"),
        "{}",
        run.stderr
    );
}

/// The tiny model with its chat template removed: a base model.
fn base_model(tmp: &Tmp) -> PathBuf {
    let m = model(tmp);
    let base = tmp.join("base");
    fs::create_dir_all(&base).unwrap();
    for e in fs::read_dir(&m).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name == "chat_template.jinja" || name == ".whet-run" {
            continue;
        }
        fs::copy(&p, base.join(&name)).unwrap();
    }
    let cfg = base.join("tokenizer_config.json");
    let mut json: Value = serde_json::from_slice(&fs::read(&cfg).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("chat_template");
    fs::write(&cfg, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    assert!(
        whet_tokenize::Tokenizer::from_dir(&base)
            .unwrap()
            .chat_template()
            .is_none()
    );
    base
}

#[test]
fn a_shipped_chat_template_renders_chats_for_a_model_without_one() {
    let tmp = Tmp::new("template");
    let base = base_model(&tmp);
    chat_data(&tmp);
    let train = tmp.join("train.jsonl");
    let inspect = |extra: &[&str]| {
        let mut args = vec!["data", "inspect", "--data", s(&train), "--model", s(&base)];
        args.extend(extra);
        whet(args)
    };
    let run = inspect(&[]).fails();
    assert!(run.stderr.contains("chat template"), "{}", run.stderr);
    let run = inspect(&["--chat-template", "chatml"]).ok();
    assert!(
        run.stdout.contains("<|im_start|>user\nHi<|im_end|>"),
        "{}",
        run.stdout
    );
    let run = inspect(&["--chat-template", "chatml2"]).fails();
    assert!(
        run.stderr.contains("--chat-template") && run.stderr.contains("chatml, llama3"),
        "{}",
        run.stderr
    );
    // A file works the same.
    let file = tmp.join("mine.jinja");
    write(
        &file,
        "{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}",
    );
    let run = inspect(&["--chat-template", s(&file)]).ok();
    assert!(
        run.stdout.contains("<|im_start|>user: Hi<|im_end|>"),
        "{}",
        run.stdout
    );

    // Training with `data.chat_template`: the run renders with it, and the adapter carries it.
    let body = format!(
        "{ONE_STEP}\n[data]\ntrain = \"train.jsonl\"\nformat = \"chat\"\nmax_len = 64\nvalidation_fraction = 0.0\nchat_template = \"chatml\"\n"
    );
    let cfg = config(&tmp, &base, &body);
    whet(["train", "--config", s(&cfg), "--no-report"]).ok();
    let saved = fs::read_to_string(tmp.join("out/adapter/chat_template.jinja")).unwrap();
    assert_eq!(
        saved,
        whet_tokenize::template::shipped::shipped("chatml").unwrap()
    );
    // ... which `--adapter` picks up: `--chat` needs a template, and the base has none.
    let adapter = tmp.join("out/adapter");
    let chat = |adapter: Option<&Path>| {
        let mut args = vec!["generate", "--model", s(&base), "--chat", "--prompt", "Hi"];
        args.extend(["--max-new-tokens", "2"]);
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        whet(args)
    };
    chat(Some(&adapter)).ok();
    let run = chat(None).fails();
    assert!(run.stderr.contains("chat template"), "{}", run.stderr);
    // Without it the same run stops at the first chat, naming the file.
    let cfg = config(
        &tmp,
        &base,
        &body.replace("chat_template = \"chatml\"\n", ""),
    );
    let run = whet(["train", "--config", s(&cfg), "--set", "output.dir=\"out2\""]).fails();
    assert!(run.stderr.contains("chat template"), "{}", run.stderr);
}

/// `data.system_prompt` reaches the rendering, through the template `data.chat_template` names.
#[test]
fn the_system_prompt_is_rendered_by_the_chosen_template() {
    let tmp = Tmp::new("system");
    let base = base_model(&tmp);
    chat_data(&tmp);
    let mut data = whet::pipeline::flags_section(
        &tmp.join("train.jsonl"),
        None,
        Shape::Conversation,
        128,
        false,
    );
    data.system_prompt = Some("Answer in one line.".into());
    data.chat_template = Some("chatml".into());
    let tok = whet::runtime::load_tokenizer_with(
        &base,
        data.chat_template.as_deref(),
        "data.chat_template",
    )
    .unwrap();
    let (examples, _) = whet::pipeline::read(&data.train, &data).unwrap();
    let (tokenized, _) = whet::pipeline::tokenize(&tok, &examples, &data).unwrap();
    let text = tok.decode(&tokenized[0].input_ids, false).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nAnswer in one line.<|im_end|>\n<|im_start|>user\nHi"),
        "{text}"
    );
}
