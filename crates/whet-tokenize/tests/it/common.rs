//! Shared helpers: fixture paths, examples, learned-token runs.

use std::path::PathBuf;

use whet_data::{Example, Message, Origin, Record, Role};
use whet_tokenize::{IGNORE_INDEX, TokenizedExample, Tokenizer};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/templates")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn load(name: &str) -> Tokenizer {
    Tokenizer::from_dir(model_dir(name))
        .unwrap_or_else(|e| panic!("loading fixture tokenizer {name}: {e}"))
}

pub fn msg(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_string(),
    }
}

pub fn example(row: u64, record: Record) -> Example {
    Example {
        id: 1000 + row,
        origin: Origin {
            file: PathBuf::from("data/train.jsonl"),
            row,
        },
        record,
    }
}

pub fn text(row: u64, t: &str) -> Example {
    example(row, Record::Text { text: t.into() })
}

pub fn pc(row: u64, prompt: &str, completion: &str) -> Example {
    example(
        row,
        Record::PromptCompletion {
            prompt: prompt.into(),
            completion: completion.into(),
        },
    )
}

pub fn conv(row: u64, messages: Vec<Message>) -> Example {
    example(row, Record::Conversation { messages })
}

/// Maximal runs of consecutive learned positions, as (start, end) index ranges.
pub fn learned_runs(ex: &TokenizedExample) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &l) in ex.labels.iter().enumerate() {
        match (l != IGNORE_INDEX, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push(s..ex.labels.len());
    }
    runs
}

/// Decoded text of each learned run (special tokens kept).
pub fn learned_texts(tok: &Tokenizer, ex: &TokenizedExample) -> Vec<String> {
    learned_runs(ex)
        .into_iter()
        .map(|r| tok.decode(&ex.input_ids[r], false).expect("decode"))
        .collect()
}

/// `decoded` is `expected`, possibly preceded by whitespace that a BPE token shared
/// between template glue and the content carried along.
pub fn matches_with_glue_space(decoded: &str, expected: &str) -> bool {
    decoded.ends_with(expected)
        && decoded[..decoded.len() - expected.len()]
            .chars()
            .all(char::is_whitespace)
}
