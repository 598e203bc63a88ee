//! Preference rows: TRL's standard and conversational shapes (explicit and implicit prompt) as two records each,
//! from JSONL and CSV, and the invalid pairs as errors or counted skips.

use serde_json::json;
use whet_data::mapping::{Mapping, to_pair};
use whet_data::read::ReadOptions;
use whet_data::{DataError, Origin, Role, SkipReason, read_pairs};

use crate::common::*;

fn origin() -> Origin {
    Origin {
        file: "p.jsonl".into(),
        row: 4,
    }
}

#[test]
fn standard_and_conversational_pairs_become_two_records() {
    let m = Mapping::default();
    let (c, r) = to_pair(
        &json!({"prompt": "Q:", "chosen": " yes", "rejected": " no"}),
        &origin(),
        &m,
    )
    .unwrap();
    assert_eq!((c, r), (pc("Q:", " yes"), pc("Q:", " no")));

    let row = json!({
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "Good."}],
        "rejected": [{"role": "assistant", "content": "Bad."}],
    });
    let (c, r) = to_pair(&row, &origin(), &m).unwrap();
    let turns = |a| conv(&[(Role::System, "S"), (Role::User, "Q"), (Role::Assistant, a)]);
    assert_eq!((c, r), (turns("Good."), turns("Bad.")));

    // A text prompt with message answers is one user turn.
    let row = json!({"prompt": "Q", "chosen": [{"role": "assistant", "content": "A"}],
                     "rejected": [{"role": "assistant", "content": "B"}]});
    let (c, _) = to_pair(&row, &origin(), &m).unwrap();
    assert_eq!(c, conv(&[(Role::User, "Q"), (Role::Assistant, "A")]));
}

/// TRL's implicit-prompt shapes: no `prompt`; the shared beginning of the two sides is it.
#[test]
fn implicit_prompt_pairs_take_the_shared_beginning_as_the_prompt() {
    let m = Mapping::default();
    let row = json!({
        "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Good."}],
        "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Bad."}],
    });
    let (c, r) = to_pair(&row, &origin(), &m).unwrap();
    let turns = |a| conv(&[(Role::User, "Q"), (Role::Assistant, a)]);
    assert_eq!((c, r), (turns("Good."), turns("Bad.")));
    // A multi-turn shared history is all prompt; ShareGPT names map as elsewhere.
    let row = json!({
        "chosen": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                   {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A1"}],
        "rejected": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                     {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A2"}],
    });
    let (c, _) = to_pair(&row, &origin(), &m).unwrap();
    let want = conv(&[
        (Role::User, "Hi"),
        (Role::Assistant, "Hello"),
        (Role::User, "Q"),
        (Role::Assistant, "A1"),
    ]);
    assert_eq!(c, want);
    // Text: the longest common prefix, the space before the split kept with the answers.
    let (c, r) = to_pair(
        &json!({"chosen": "The sky is blue.", "rejected": "The sky is green."}),
        &origin(),
        &m,
    )
    .unwrap();
    assert_eq!(
        (c, r),
        (pc("The sky is", " blue."), pc("The sky is", " green."))
    );
    let err = to_pair(&json!({"chosen": "Yes", "rejected": "No"}), &origin(), &m).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DataError::InvalidPair { ref field, .. } if field == "prompt")
            && msg.contains("share no leading text"),
        "{msg}"
    );
    let row = json!({
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    });
    let msg = to_pair(&row, &origin(), &m).unwrap_err().to_string();
    assert!(msg.contains("share no leading messages"), "{msg}");
}

#[test]
fn invalid_pairs_name_row_and_field() {
    let m = Mapping::default();
    let cases = [
        (
            json!({"prompt": "Q", "chosen": "A", "rejected": "A"}),
            "rejected",
            "equals `chosen`",
        ),
        (
            json!({"prompt": "Q", "chosen": "  ", "rejected": "A"}),
            "chosen",
            "is empty",
        ),
        (
            json!({"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"}),
            "chosen",
            "assistant turn",
        ),
    ];
    for (row, field, why) in cases {
        let err = to_pair(&row, &origin(), &m).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::InvalidPair { .. }), "{msg}");
        assert!(msg.starts_with("p.jsonl: row 4, field `"), "{msg}");
        assert!(msg.contains(field) && msg.contains(why), "{msg}");
    }
    let err = to_pair(&json!({"prompt": "Q", "chosen": "A"}), &origin(), &m).unwrap_err();
    assert!(
        matches!(err, DataError::MissingField { ref field, .. } if field == "rejected"),
        "{err}"
    );
}

#[test]
fn read_pairs_from_csv_and_skips_invalid_ones_when_asked() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "p.csv",
        "prompt,chosen,rejected\nQ1,good,bad\nQ2,same,same\nQ3,fine,poor\n",
    );
    let err = read_pairs(&path, &ReadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("p.csv: row 3"), "{err}");
    let opts = ReadOptions {
        skip_invalid: true,
        ..ReadOptions::default()
    };
    let (pairs, report) = read_pairs(&path, &opts).unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[1].chosen, pc("Q3", "fine"));
    assert_eq!(report.skipped.get(&SkipReason::InvalidPair), Some(&1));
    assert_ne!(pairs[0].id, pairs[1].id);
}
