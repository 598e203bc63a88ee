//! `whet chat`: the REPL over its line protocol (in-process, any `BufRead` / `Write`), and the
//! binary with `--compare` on stdin.

use std::io::Write;

use whet::cli::ModelArgs;
use whet::prompt::{chat_ids, complete, stop_tokens};
use whet::runtime::{Runtime, load_tokenizer};
use whet_data::{Message, Role};
use whet_model::{GenerationConfig, Trainable};

use crate::common::*;

/// A `Write` that keeps each write apart, to see the answer arrive in pieces.
#[derive(Default)]
struct Writes(Vec<String>);

impl Write for Writes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(String::from_utf8(buf.to_vec()).unwrap());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn msg(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_string(),
    }
}

const HELP: &str = "commands: /reset, /system [TEXT], /set KEY VALUE, /settings, /help, /quit\n";

#[test]
fn the_chat_loop_streams_answers_keeps_the_conversation_and_obeys_its_commands() {
    let tmp = Tmp::new("chat-repl");
    let m = model(&tmp);
    let rt = Runtime::new("cpu", "auto", "auto").unwrap();
    let model = rt
        .load_model(
            &ModelArgs {
                model: m.clone(),
                adapter: None,
                chat_template: None,
            },
            Trainable::None,
        )
        .unwrap();
    let tok = load_tokenizer(&m).unwrap();
    let mut cfg = GenerationConfig::greedy(8);
    cfg.eos_token_ids = Some(stop_tokens(&model, &tok));
    // What each turn must answer: greedy completions of the whole conversation so far.
    let answer = |messages: &[Message]| {
        complete(&model, &tok, &chat_ids(&tok, messages).unwrap(), &cfg).unwrap()
    };
    let hi = answer(&[msg(Role::User, "Hi")]);
    assert!(!hi.is_empty());
    let second = answer(&[
        msg(Role::User, "Hi"),
        msg(Role::Assistant, hi.trim()),
        msg(Role::User, "Slow Wi-Fi"),
    ]);
    let alone = answer(&[msg(Role::User, "Slow Wi-Fi")]);
    assert_ne!(second, alone, "the fixture cannot tell history from none");
    let with_system = answer(&[msg(Role::System, "Be brief."), msg(Role::User, "Hi")]);

    let input = "Hi\nSlow Wi-Fi\n/reset\nHi\n\n/system Be brief.\nHi\n/set top_p 2\n/set max_new_tokens 3\n/settings\n/bogus\n/quit\nnot read\n";
    let mut out = Writes::default();
    whet::chat::repl(
        &tok,
        &[("base", &model)],
        None,
        cfg.clone(),
        input.as_bytes(),
        &mut out,
    )
    .unwrap();
    let transcript = out.0.concat();
    let expected = [
        HELP.to_string(),
        format!("> {hi}\n"),
        format!("> {second}\n"),
        "> (conversation reset)\n".into(),
        format!("> {hi}\n"),
        "> ".into(), // the empty line: nothing
        "> (system prompt set: Be brief.; conversation reset)\n".into(),
        format!("> {with_system}\n"),
        "> error: top_p \"2\": expected a number in (0, 1]\n".into(),
        "> (temperature 0, top_p 1, top_k 0, max_new_tokens 3, repetition_penalty 1, seed 0)\n"
            .into(),
        "> (temperature 0, top_p 1, top_k 0, max_new_tokens 3, repetition_penalty 1, seed 0)\n"
            .into(),
        format!("> error: unknown command /bogus; {HELP}"),
        "> \n".into(),
    ]
    .concat();
    assert_eq!(transcript, expected);
    // Streamed: the first answer came in several writes, not one.
    let first = out.0.iter().position(|w| w == "> ").unwrap() + 1;
    let pieces = out.0[first..]
        .iter()
        .take_while(|w| !w.ends_with('\n'))
        .count();
    assert!(
        pieces >= 2,
        "the answer {hi:?} was written in {pieces} piece(s)"
    );
}

#[test]
fn whet_chat_compare_answers_with_the_base_then_the_tuned_model() {
    let tmp = Tmp::new("chat-compare");
    let (m, out) = trained_chat_run(&tmp);
    let adapter = out.join("adapter");
    let generate = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            s(&m),
            "--chat",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "8",
        ];
        a.extend_from_slice(extra);
        whet(&a).ok().stdout
    };
    let base = generate(&[]);
    let tuned = generate(&["--adapter", s(&adapter)]);
    assert_ne!(base, tuned, "the adapter changed nothing");

    let mut child = whet_cmd([
        "chat",
        "--model",
        s(&m),
        "--adapter",
        s(&adapter),
        "--compare",
        "--max-new-tokens",
        "8",
    ])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi\n/quit\n")
        .unwrap();
    let done = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(done.stdout).unwrap();
    assert!(
        done.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(stdout, format!("{HELP}> [base] {base}[tuned] {tuned}> \n"));

    // --compare without an adapter has nothing to compare.
    let r = whet(["chat", "--model", s(&m), "--compare"]).fails();
    assert!(
        r.stderr.contains("--compare needs --adapter"),
        "{}",
        r.stderr
    );
}
