//! Parity with transformers' `apply_chat_template` on real chat templates
//! (fixtures/templates/*/expected.json, made by fixtures/gen/make_templates.py).

use std::collections::BTreeMap;

use serde::Deserialize;
use whet_data::{Message, Record};
use whet_tokenize::{IGNORE_INDEX, TokenizeConfig, mask_from_spans};

use crate::common::{fixtures, learned_texts, load, matches_with_glue_space, model_dir};

const MODELS: [&str; 6] = [
    "smollm2",
    "qwen2",
    "llama3",
    "mistral_v03",
    "gemma2",
    "chatml_generation",
];

#[derive(Deserialize)]
struct Expected {
    model: String,
    bos_token_id: Option<u32>,
    eos_token_id: u32,
    pad_token_id: Option<u32>,
    end_of_turn: String,
    template_trims_content: bool,
    has_generation_blocks: bool,
    conversations: BTreeMap<String, Vec<Message>>,
    cases: Vec<Case>,
    texts: Vec<TextCase>,
}

#[derive(Deserialize)]
struct Case {
    conversation: String,
    add_generation_prompt: bool,
    text: Option<String>,
    input_ids: Option<Vec<u32>>,
    assistant_masks: Option<Vec<u8>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct TextCase {
    text: String,
    with_special_tokens: Vec<u32>,
    without_special_tokens: Vec<u32>,
}

fn expected(model: &str) -> Expected {
    let path = model_dir(model).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn fixtures_are_small() {
    let tj = std::fs::metadata(fixtures().join("tokenizer.json")).expect("tokenizer.json");
    assert!(tj.len() < 1_000_000, "tokenizer.json is {} bytes", tj.len());
    let tok = whet_tokenize::Tokenizer::from_files(fixtures().join("tokenizer.json"), None::<&str>)
        .expect("bare tokenizer");
    assert!(
        (500..=1000).contains(&tok.vocab_size()),
        "vocab {}",
        tok.vocab_size()
    );
    assert_eq!(tok.eos().text, "<|endoftext|>");
    assert!(tok.chat_template().is_none());
}

#[test]
fn special_token_ids_match_transformers() {
    for model in MODELS {
        let tok = load(model);
        let exp = expected(model);
        assert_eq!(exp.model, model);
        assert_eq!(tok.bos_id(), exp.bos_token_id, "{model}: bos");
        assert_eq!(tok.eos_id(), exp.eos_token_id, "{model}: eos");
        assert_eq!(tok.pad().map(|p| p.id), exp.pad_token_id, "{model}: pad");
    }
}

#[test]
fn rendered_strings_and_ids_match_transformers() {
    let mut compared = 0;
    for model in MODELS {
        let tok = load(model);
        let tmpl = tok.chat_template().expect("fixture has a template");
        let exp = expected(model);
        for case in &exp.cases {
            let messages = &exp.conversations[&case.conversation];
            let what = format!(
                "{model}/{} agp={}",
                case.conversation, case.add_generation_prompt
            );
            let got = tmpl.render(messages, case.add_generation_prompt);
            if let Some(err) = &case.error {
                let e = got.expect_err(&format!("{what}: transformers raised `{err}`"));
                assert!(e.to_string().contains(err.as_str()), "{what}: {e} vs {err}");
                continue;
            }
            let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(Some(&got), case.text.as_ref(), "{what}: rendered text");
            let ids = tok.encode(&got).expect("encode").ids;
            assert_eq!(Some(&ids), case.input_ids.as_ref(), "{what}: token ids");
            compared += 1;
        }
    }
    assert_eq!(compared, 80, "number of rendered cases compared");
}

#[test]
fn generation_block_masks_match_transformers_assistant_masks() {
    let mut compared = 0;
    for model in MODELS {
        let exp = expected(model);
        if !exp.has_generation_blocks {
            continue;
        }
        let tok = load(model);
        let tmpl = tok.chat_template().expect("template");
        assert!(tmpl.has_generation_blocks());
        for case in exp.cases.iter().filter(|c| c.error.is_none()) {
            let messages = &exp.conversations[&case.conversation];
            let r = tmpl
                .render_generation_spans(messages, case.add_generation_prompt)
                .expect("render");
            let enc = tok.encode(&r.text).expect("encode");
            let mask: Vec<u8> = mask_from_spans(&enc.offsets, &r.spans)
                .into_iter()
                .map(u8::from)
                .collect();
            let want = case.assistant_masks.as_ref().expect("masks in fixture");
            assert_eq!(&mask, want, "{model}/{}", case.conversation);
            // And the training path (add_generation_prompt=False) learns exactly those.
            if !case.add_generation_prompt {
                let (ex, _) = tok
                    .tokenize_record(
                        &Record::Conversation {
                            messages: messages.clone(),
                        },
                        &TokenizeConfig::default(),
                    )
                    .expect("tokenize");
                let learned: Vec<u8> = ex
                    .labels
                    .iter()
                    .map(|&l| u8::from(l != IGNORE_INDEX))
                    .collect();
                assert_eq!(&learned, want, "{model}/{} labels", case.conversation);
                assert_eq!(Some(&ex.input_ids), case.input_ids.as_ref());
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 14);
}

/// Without generation blocks, spans come from prefix rendering: every learned run must
/// decode to one assistant message's content (trimmed where the template trims) plus the
/// template's end-of-turn token, and the ids must still be transformers' ids.
#[test]
fn prefix_masks_learn_assistant_content_and_end_of_turn() {
    let mut checked = 0;
    for model in MODELS {
        let exp = expected(model);
        let tok = load(model);
        for case in exp
            .cases
            .iter()
            .filter(|c| c.error.is_none() && !c.add_generation_prompt)
        {
            let messages = &exp.conversations[&case.conversation];
            let (ex, fixed) = tok
                .tokenize_record(
                    &Record::Conversation {
                        messages: messages.clone(),
                    },
                    &TokenizeConfig::default(),
                )
                .expect("tokenize");
            assert!(!fixed);
            assert_eq!(Some(&ex.input_ids), case.input_ids.as_ref(), "{model}: ids");
            let want: Vec<String> = messages
                .iter()
                .filter(|m| m.role == whet_data::Role::Assistant)
                .map(|m| {
                    let c = if exp.template_trims_content {
                        m.content.trim()
                    } else {
                        m.content.as_str()
                    };
                    format!("{c}{}", exp.end_of_turn)
                })
                .collect();
            let got = learned_texts(&tok, &ex);
            assert_eq!(
                got.len(),
                want.len(),
                "{model}/{}: {got:?}",
                case.conversation
            );
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    matches_with_glue_space(g, w),
                    "{model}/{}: learned {g:?}, want {w:?}",
                    case.conversation
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 35, "checked {checked}");
}

/// Text records: `[BOS if the tokenizer adds one] + ids + EOS`, where the BOS decision
/// matches transformers' `add_special_tokens=True`.
#[test]
fn text_records_match_transformers_special_tokens() {
    for model in MODELS {
        let tok = load(model);
        let exp = expected(model);
        for t in &exp.texts {
            assert_eq!(tok.encode(&t.text).unwrap().ids, t.without_special_tokens);
            let (ex, _) = tok
                .tokenize_record(
                    &Record::Text {
                        text: t.text.clone(),
                    },
                    &TokenizeConfig::default(),
                )
                .unwrap();
            let mut want = t.with_special_tokens.clone();
            want.push(tok.eos_id());
            assert_eq!(ex.input_ids, want, "{model}: {:?}", t.text);
        }
    }
}
