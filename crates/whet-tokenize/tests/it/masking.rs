//! Property: under every fixture template, the learned tokens of a conversation decode
//! to exactly the assistant contents plus the end-of-turn token, one run per assistant
//! turn (or only the last, in last-only mode).

use proptest::prelude::*;
use whet_data::{Message, Record, Role};
use whet_tokenize::{AssistantTurns, TokenizeConfig, Tokenizer};

use crate::common::{learned_texts, load, matches_with_glue_space, msg};

struct Model {
    tok: Tokenizer,
    eot: &'static str,
    trims: bool,
    system: bool,
}

fn models() -> Vec<Model> {
    vec![
        Model {
            tok: load("smollm2"),
            eot: "<|im_end|>",
            trims: false,
            system: true,
        },
        Model {
            tok: load("qwen2"),
            eot: "<|im_end|>",
            trims: false,
            system: true,
        },
        Model {
            tok: load("llama3"),
            eot: "<|eot_id|>",
            trims: true,
            system: true,
        },
        Model {
            tok: load("mistral_v03"),
            eot: "</s>",
            trims: true,
            system: true,
        },
        Model {
            tok: load("gemma2"),
            eot: "<end_of_turn>",
            trims: true,
            system: false,
        },
        Model {
            tok: load("chatml_generation"),
            eot: "<|im_end|>",
            trims: true,
            system: true,
        },
    ]
}

/// Content that starts and ends with a non-space character (templates glue a newline or
/// space before it, and a byte-level pre-tokenizer would fuse leading whitespace with
/// that glue), with inner spaces, newlines, punctuation and non-ASCII text.
fn content() -> impl Strategy<Value = String> {
    let edge = "[a-zA-Z0-9é日ü?!.,]";
    let inner = "[a-zA-Z0-9 é日本語ü😀?!.,:;'\n-]{0,40}";
    (edge, inner, edge).prop_map(|(a, b, c)| format!("{a}{b}{c}"))
}

fn conversation() -> impl Strategy<Value = (bool, Vec<(String, String)>)> {
    (
        any::<bool>(),
        prop::collection::vec((content(), content()), 1..4),
    )
}

fn build(system: bool, turns: &[(String, String)], sys_ok: bool) -> Vec<Message> {
    let mut m = Vec::new();
    if system && sys_ok {
        m.push(msg(Role::System, "Be kind."));
    }
    for (u, a) in turns {
        m.push(msg(Role::User, u));
        m.push(msg(Role::Assistant, a));
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn learned_tokens_decode_to_assistant_content_and_end_of_turn(
        (system, turns) in conversation(),
        last_only in any::<bool>(),
    ) {
        let cfg = TokenizeConfig {
            assistant_turns: if last_only { AssistantTurns::Last } else { AssistantTurns::All },
            ..TokenizeConfig::default()
        };
        for m in models() {
            let messages = build(system, &turns, m.system);
            let (ex, _) = m
                .tok
                .tokenize_record(&Record::Conversation { messages: messages.clone() }, &cfg)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ex.input_ids.len(), ex.labels.len());
            let mut want: Vec<String> = messages
                .iter()
                .filter(|x| x.role == Role::Assistant)
                .map(|x| {
                    let c = if m.trims { x.content.trim() } else { x.content.as_str() };
                    format!("{c}{}", m.eot)
                })
                .collect();
            if last_only {
                want = want.split_off(want.len() - 1);
            }
            let got = learned_texts(&m.tok, &ex);
            prop_assert_eq!(got.len(), want.len(), "{:?}", got);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!(matches_with_glue_space(g, w), "learned {:?}, want {:?}", g, w);
            }
            // Learned labels are the ids at their own positions.
            for (i, &l) in ex.labels.iter().enumerate() {
                prop_assert!(l == -100 || l == ex.input_ids[i] as i64);
            }
            // Exactly one BOS, first, where the tokenizer adds one. (SmolLM2's BOS is
            // `<|im_start|>`, which ChatML repeats per turn, so only BOS-adding models.)
            if let (true, Some(b)) = (m.tok.adds_bos(), m.tok.bos_id()) {
                let n = ex.input_ids.iter().filter(|&&t| t == b).count();
                prop_assert_eq!(n, 1);
                prop_assert_eq!(ex.input_ids[0], b);
            }
        }
    }
}
