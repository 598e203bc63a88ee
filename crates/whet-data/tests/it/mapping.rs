//! Shapes, column mapping, alpaca/sharegpt, dataset system prompt.

use serde_json::json;
use whet_data::mapping::{Columns, Mapping, parse_role, to_record};
use whet_data::read::{ReadOptions, read_all};
use whet_data::{DataError, Origin, Role, Shape};

use crate::common::*;

fn origin() -> Origin {
    Origin {
        file: "m.jsonl".into(),
        row: 1,
    }
}

fn map(row: serde_json::Value, mapping: &Mapping) -> whet_data::Result<whet_data::Record> {
    to_record(&row, &origin(), mapping)
}

#[test]
fn column_mapping_renames_every_shape() {
    let mapping = Mapping {
        columns: Columns {
            text: "body".into(),
            prompt: "question".into(),
            completion: "answer".into(),
            messages: "dialog".into(),
            role: "speaker".into(),
            content: "utterance".into(),
            ..Columns::default()
        },
        ..Mapping::default()
    };
    assert_eq!(map(json!({"body": "b"}), &mapping).unwrap(), text("b"));
    assert_eq!(
        map(json!({"question": "q", "answer": "a"}), &mapping).unwrap(),
        pc("q", "a")
    );
    assert_eq!(
        map(
            json!({"dialog": [{"speaker": "user", "utterance": "u"}, {"speaker": "assistant", "utterance": "a"}]}),
            &mapping
        )
        .unwrap(),
        conv(&[(Role::User, "u"), (Role::Assistant, "a")])
    );
    // The default names are no longer looked at.
    let err = map(json!({"text": "t"}), &mapping).unwrap_err();
    assert!(matches!(err, DataError::UnknownShape { .. }), "{err:?}");
    assert!(err.to_string().contains("`body`"), "{err}");
}

#[test]
fn column_mapping_through_a_csv_file() {
    let dir = tmp();
    let path = write(dir.path(), "qa.csv", "question,answer\nWhy?,Because.\n");
    let opts = ReadOptions {
        mapping: Mapping {
            columns: Columns {
                prompt: "question".into(),
                completion: "answer".into(),
                ..Columns::default()
            },
            ..Mapping::default()
        },
        ..ReadOptions::default()
    };
    let (examples, _) = read_all(&path, &opts).unwrap();
    assert_eq!(records(&examples), vec![pc("Why?", "Because.")]);
}

#[test]
fn alpaca_joins_instruction_and_input() {
    let m = Mapping::default();
    assert_eq!(
        map(
            json!({"instruction": "Translate", "input": "bonjour", "output": "hello"}),
            &m
        )
        .unwrap(),
        conv(&[
            (Role::User, "Translate\n\nbonjour"),
            (Role::Assistant, "hello")
        ])
    );
    for input in [json!(""), json!("   "), serde_json::Value::Null] {
        assert_eq!(
            map(
                json!({"instruction": "Say hi", "input": input, "output": "hi"}),
                &m
            )
            .unwrap(),
            conv(&[(Role::User, "Say hi"), (Role::Assistant, "hi")])
        );
    }
    assert_eq!(
        map(
            json!({"instruction": "I", "output": "O", "system": "You are a pirate."}),
            &m
        )
        .unwrap(),
        conv(&[
            (Role::System, "You are a pirate."),
            (Role::User, "I"),
            (Role::Assistant, "O")
        ])
    );
    let err = map(json!({"instruction": "I"}), &m).unwrap_err();
    assert!(
        matches!(err, DataError::MissingField { ref field, .. } if field == "output"),
        "{err:?}"
    );
}

#[test]
fn sharegpt_roles_map_onto_conversation() {
    let row = json!({"conversations": [
        {"from": "system", "value": "s"},
        {"from": "human", "value": "h"},
        {"from": "gpt", "value": "g"},
        {"from": "function", "value": "f"},
        {"from": "gpt", "value": "g2"}
    ]});
    assert_eq!(
        map(row, &Mapping::default()).unwrap(),
        conv(&[
            (Role::System, "s"),
            (Role::User, "h"),
            (Role::Assistant, "g"),
            (Role::Tool, "f"),
            (Role::Assistant, "g2"),
        ])
    );
    assert_eq!(parse_role(" Assistant "), Some(Role::Assistant));
    assert_eq!(parse_role("narrator"), None);
}

#[test]
fn dataset_system_prompt_is_inserted_only_when_missing() {
    let m = Mapping {
        system_prompt: Some("Be helpful.".into()),
        ..Mapping::default()
    };
    assert_eq!(
        map(
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            &m
        )
        .unwrap(),
        conv(&[(Role::System, "Be helpful."), (Role::User, "q"), (Role::Assistant, "a")])
    );
    assert_eq!(
        map(
            json!({"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            &m
        )
        .unwrap(),
        conv(&[(Role::System, "Own."), (Role::User, "q"), (Role::Assistant, "a")])
    );
    assert_eq!(
        map(json!({"instruction": "i", "output": "o"}), &m).unwrap(),
        conv(&[
            (Role::System, "Be helpful."),
            (Role::User, "i"),
            (Role::Assistant, "o")
        ])
    );
    // Not a conversation: untouched.
    assert_eq!(map(json!({"text": "t"}), &m).unwrap(), text("t"));
}

#[test]
fn explicit_shape_overrides_auto_detection() {
    let row = json!({"text": "t", "prompt": "p", "completion": "c"});
    assert_eq!(map(row.clone(), &Mapping::default()).unwrap(), pc("p", "c"));
    let as_text = Mapping {
        shape: Shape::Text,
        ..Mapping::default()
    };
    assert_eq!(map(row, &as_text).unwrap(), text("t"));
    let as_conv = Mapping {
        shape: Shape::Conversation,
        ..Mapping::default()
    };
    let err = map(json!({"text": "t"}), &as_conv).unwrap_err();
    assert!(
        matches!(err, DataError::MissingField { ref field, .. } if field == "messages"),
        "{err:?}"
    );
}

#[test]
fn shape_names_are_serdes_spelling() {
    // `data.format` (serde) and `--format` (`Shape::name`) must accept the same words.
    for shape in Shape::ALL {
        let json = serde_json::to_string(&shape).unwrap();
        assert_eq!(json, format!("\"{}\"", shape.name()));
        assert_eq!(serde_json::from_str::<Shape>(&json).unwrap(), shape);
    }
    assert_eq!(Shape::Conversation.name(), "chat");
}

#[test]
fn null_fields_count_as_absent_for_detection() {
    let row = json!({"text": "t", "prompt": null, "completion": null, "messages": null});
    assert_eq!(map(row, &Mapping::default()).unwrap(), text("t"));
}

#[test]
fn messages_may_be_a_json_encoded_string_but_not_other_strings() {
    let m = Mapping::default();
    let row = json!({"messages": "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}]"});
    assert_eq!(
        map(row, &m).unwrap(),
        conv(&[(Role::User, "q"), (Role::Assistant, "a")])
    );
    let err = map(json!({"messages": "hello"}), &m).unwrap_err();
    assert!(
        matches!(err, DataError::WrongType { ref field, .. } if field == "messages"),
        "{err:?}"
    );
}
